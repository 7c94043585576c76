#!/usr/bin/env bash
# The test command (README: `make test`): installs what the tests need, then runs every
# test of the workspace. Each test starts its own servers (mock upstreams and proxies) on
# 127.0.0.1 and stops them itself.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
bash scripts/test-deps.sh
export MODELGATE_PYTHON="$ROOT/.venv/bin/python"
cargo build --workspace --bins --quiet
cargo test --workspace
