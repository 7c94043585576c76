#!/usr/bin/env bash
# `make images`: both container images, built without any registry.
#
# 1. The binaries, statically linked (`-C target-feature=+crt-static` on the host's gnu target;
#    rustls/ring need no C library beyond libc, and the CA roots are compiled in), into
#    target/images/context/.
# 2. dataplane/Dockerfile and operator/Dockerfile (FROM scratch: nothing to pull) built on that
#    context with buildah (Debian's package; installed here when missing) or, where there is
#    one, docker.
# 3. docker-save archives in target/images/ (what `ctr images import` and `docker load` take),
#    named ghcr.io/modelgate/modelgate-{dataplane,operator}:<chart appVersion>.
#
# Env: IMAGE_REPOSITORY [ghcr.io/modelgate], IMAGE_TAG [the chart's appVersion],
#      IMAGE_BUILDER [buildah|docker, default: buildah when present, else docker].
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
REPO=${IMAGE_REPOSITORY:-ghcr.io/modelgate}
TAG=${IMAGE_TAG:-$(sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' charts/modelgate/Chart.yaml)}
OUT="$ROOT/target/images"
CTX="$OUT/context"
mkdir -p "$CTX"

HOST=$(rustc -vV | sed -n 's/^host: //p')
case "$HOST" in
  *-linux-gnu) ;;
  *) echo "images: static linking is set up for *-linux-gnu hosts, not $HOST" >&2; exit 1 ;;
esac
VAR="CARGO_TARGET_$(echo "$HOST" | tr 'a-z-' 'A-Z_')_RUSTFLAGS"
# --target keeps build scripts and proc macros dynamic (they run on this host) and puts the
# static artifacts in target/$HOST/, beside, not over, the normal release build.
echo "images: building static binaries for $HOST"
env "$VAR=-C target-feature=+crt-static" cargo build --release --locked --target "$HOST" \
  -p modelgate-dataplane --bin modelgate-dataplane -p modelgate-operator --bin modelgate-operator
for bin in modelgate-dataplane modelgate-operator; do
  src="target/$HOST/release/$bin"
  if readelf -l "$src" | grep -q 'Requesting program interpreter'; then
    echo "images: $src is dynamically linked; an image FROM scratch cannot run it" >&2
    exit 1
  fi
  # The release profile keeps debug info for perf profiles; the image does not need it
  # (the unstripped binary stays in target/$HOST/release/ for symbolizing).
  install -m 0755 "$src" "$CTX/$bin"
  strip --strip-all "$CTX/$bin"
done

BUILDER=${IMAGE_BUILDER:-}
if [ -z "$BUILDER" ]; then
  if command -v buildah >/dev/null 2>&1; then BUILDER=buildah
  elif command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then BUILDER=docker
  else
    echo "images: installing buildah (Debian package)"
    export DEBIAN_FRONTEND=noninteractive
    SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
    $SUDO apt-get install -y -qq --no-install-recommends buildah >/dev/null 2>&1 || {
      $SUDO apt-get update -qq
      $SUDO apt-get install -y -qq --no-install-recommends buildah >/dev/null
    }
    BUILDER=buildah
  fi
fi

for name in dataplane operator; do
  image="$REPO/modelgate-$name:$TAG"
  archive="$OUT/modelgate-$name.tar"
  rm -f "$archive"
  case "$BUILDER" in
    buildah)
      # vfs: works without overlay mounts (containers, CI sandboxes).
      buildah --storage-driver vfs bud --quiet --layers=false -t "$image" -f "$name/Dockerfile" "$CTX" >/dev/null
      buildah --storage-driver vfs push --quiet "$image" "docker-archive:$archive:$image"
      ;;
    docker)
      docker build -q -t "$image" -f "$name/Dockerfile" "$CTX" >/dev/null
      docker save -o "$archive" "$image"
      ;;
    *) echo "images: IMAGE_BUILDER must be buildah or docker, not $BUILDER" >&2; exit 1 ;;
  esac
  awk -v i="$image" -v b="$(stat -c %s "$archive")" -v a="${archive#"$ROOT"/}" \
    'BEGIN { printf "images: %-45s %5.1f MiB  %s\n", i, b / 1048576, a }'
done
