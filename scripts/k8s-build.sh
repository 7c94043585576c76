#!/usr/bin/env bash
# Build the real kube-apiserver + kube-controller-manager v1.20.2 from Debian bookworm's
# "kubernetes" source package (the only kube-apiserver obtainable here) with Debian's Go.
# Cached by version: skips the build when <bin dir> already has both binaries.
# Usage: k8s-build.sh <work dir> <bin dir>
set -euo pipefail
WORK=${1:?work dir}; BIN=${2:?bin dir}
mkdir -p "$WORK" "$BIN"; WORK=$(cd "$WORK" && pwd); BIN=$(cd "$BIN" && pwd)
if [ -x "$BIN/kube-apiserver" ] && [ -x "$BIN/kube-controller-manager" ]; then
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
if ! apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Package: kubernetes'; then
  # deb-src entries mirror the machine's own deb entries
  sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
    | $SUDO tee /etc/apt/sources.list.d/debian-src.sources >/dev/null
  $SUDO apt-get update -qq
fi
$SUDO apt-get install -y -qq --no-install-recommends golang-go rsync jq make patch \
  golang-github-modern-go-reflect2-dev >/dev/null
cd "$WORK"
apt-get source --download-only kubernetes=1.20.5+really1.20.2-1.1+deb12u1 >/dev/null
rm -rf kubernetes-1.20.2 debian
tar xzf kubernetes_1.20.5+really1.20.2.orig.tar.gz
tar xJf kubernetes_1.20.5+really1.20.2-1.1+deb12u1.debian.tar.xz
cd kubernetes-1.20.2
for p in $(cat ../debian/patches/series); do patch -s -p1 <"../debian/patches/$p"; done
# Go >= 1.18 with the vendored reflect2 v1.0.1 crashes (runtime.mapiterinit) on the first
# custom-resource create; Debian's reflect2 1.0.2 carries the fix.
rm -rf vendor/github.com/modern-go/reflect2
cp -r /usr/share/gocode/src/github.com/modern-go/reflect2 vendor/github.com/modern-go/reflect2
rm -f vendor/github.com/modern-go/reflect2/go.mod
make WHAT="cmd/kube-apiserver cmd/kube-controller-manager" KUBE_BUILD_PLATFORMS=linux/amd64 >/dev/null
cp _output/bin/kube-apiserver _output/bin/kube-controller-manager "$BIN/"
cd "$WORK" && rm -rf kubernetes-1.20.2 debian kubernetes_*.tar.* kubernetes_*.dsc
"$BIN/kube-apiserver" --version
