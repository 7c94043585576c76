#!/usr/bin/env bash
# The benchmark (README: `make bench`; results in docs/benchmarks.md). Installs what it
# needs when missing (nginx-light from Debian as the reverse-proxy baseline and as the
# fixed upstream of the throughput rows, wrk from Debian as their load generator and the
# `slow` section's, oha from crates.io for the fixed-rate and concurrency-1 rows), builds
# in release, and runs everything on 127.0.0.1: the upstreams (nginx `return 200`, the mock
# for streams and knob paths), nginx as a proxy and modelgate-dataplane, each stopped at
# the end.
#   BENCH_ARGS=--quick make bench     one short repetition per point (a smoke run)
#   BENCH_ARGS="--only small,16k" make bench   some sections only (see tests/src/bin/bench.rs)
#   BENCH_SOAK=SECS make bench        length of the memory-over-time run (600; 0 skips it)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
# apt_install PACKAGE: from the package lists as they are, or after refreshing them.
apt_install() {
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$1" >/dev/null 2>&1 || {
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "$1" >/dev/null
  }
}
if ! command -v nginx >/dev/null 2>&1 && [ ! -x /usr/sbin/nginx ]; then
  echo "bench: installing nginx-light (the baseline reverse proxy and the fixed upstream)"
  apt_install nginx-light
fi
if ! command -v wrk >/dev/null 2>&1; then
  echo "bench: installing wrk (the load generator of the throughput rows)"
  apt_install wrk
fi
export PATH="$PATH:/usr/sbin:$HOME/.cargo/bin"
if ! command -v oha >/dev/null 2>&1; then
  echo "bench: installing oha (the fixed-rate load generator; a few minutes, once)"
  cargo install --locked oha --version 1.16.0
fi
if [ "${BENCH_PEERS:-}" = 1 ]; then
  LITELLM_VENV=${MODELGATE_CACHE:-/var/cache/modelgate}/litellm-venv
  if [ ! -x "$LITELLM_VENV/bin/litellm" ]; then
    echo "bench: installing litellm[proxy] 1.110.2 (the peer gateway) into $LITELLM_VENV"
    python3 -m venv "$LITELLM_VENV"
    "$LITELLM_VENV/bin/pip" install -q --disable-pip-version-check "litellm[proxy]==1.110.2"
  fi
  export LITELLM_BIN="$LITELLM_VENV/bin/litellm"
  set -- --peers "$@"
fi
command -v taskset >/dev/null || { echo "bench needs taskset (util-linux)"; exit 1; }
# The `slow` section holds 1,000 client connections per proxy and as many to the upstream;
# the servers the bench starts inherit this limit.
if [ "$(ulimit -n)" != unlimited ] && [ "$(ulimit -n)" -lt 65536 ]; then
  ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
fi
cargo build --release -p modelgate-dataplane -p modelgate-tests --bins
exec ./target/release/bench ${BENCH_ARGS:-} "$@"
