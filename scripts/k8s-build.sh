#!/usr/bin/env bash
# Build real Kubernetes v1.20.2 binaries from Debian bookworm's "kubernetes" source package
# (the only kube-apiserver obtainable here) with Debian's Go.
# Usage: k8s-build.sh <work dir> <bin dir> [COMPONENT...]
#   COMPONENTs are cmd/ names [default: kube-apiserver kube-controller-manager]; the word
#   `pause` builds the kubelet's pause container binary (build/pause/linux/pause.c, static).
# Cached by version: skips the build when <bin dir> already has every component.
set -euo pipefail
WORK=${1:?work dir}; BIN=${2:?bin dir}; shift 2
COMPONENTS=("$@")
[ ${#COMPONENTS[@]} -gt 0 ] || COMPONENTS=(kube-apiserver kube-controller-manager)
mkdir -p "$WORK" "$BIN"; WORK=$(cd "$WORK" && pwd); BIN=$(cd "$BIN" && pwd)
missing=0
for c in "${COMPONENTS[@]}"; do [ -x "$BIN/$c" ] || missing=1; done
[ "$missing" = 1 ] || exit 0
export DEBIAN_FRONTEND=noninteractive
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
APT=(apt-get -o DPkg::Lock::Timeout=600)
if ! apt-cache showsrc kubernetes 2>/dev/null | grep -q '^Package: kubernetes'; then
  # deb-src entries mirror the machine's own deb entries
  sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources \
    | $SUDO tee /etc/apt/sources.list.d/debian-src.sources >/dev/null
  $SUDO "${APT[@]}" update -qq
fi
$SUDO "${APT[@]}" install -y -qq --no-install-recommends golang-go rsync jq make patch gcc libc6-dev \
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
WHAT=
for c in "${COMPONENTS[@]}"; do [ "$c" = pause ] || WHAT="$WHAT cmd/$c"; done
if [ -n "$WHAT" ]; then
  # GOPATH mode, as upstream's make does it (the tree's generated code needs it).
  make WHAT="${WHAT# }" KUBE_BUILD_PLATFORMS=linux/amd64 >/dev/null
fi
for c in "${COMPONENTS[@]}"; do
  if [ "$c" = pause ]; then
    gcc -Os -Wall -Werror -static -DVERSION=v1.20.2-modelgate -o "$BIN/pause" build/pause/linux/pause.c
  else
    cp "_output/bin/$c" "$BIN/"
  fi
done
cd "$WORK" && rm -rf kubernetes-1.20.2 debian kubernetes_*.tar.* kubernetes_*.dsc
for c in "${COMPONENTS[@]}"; do
  [ "$c" = pause ] && { echo "pause: static, $(stat -c %s "$BIN/pause") bytes"; continue; }
  "$BIN/$c" --version 2>/dev/null | head -1 | sed "s/^/$c: /"
done
