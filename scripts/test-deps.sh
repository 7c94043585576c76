#!/usr/bin/env bash
# Install what the tests need on a fresh machine (Debian bookworm + rustup toolchain):
#   promtool (Debian package prometheus), redis-server (Debian package redis-server, the
#   response cache's shared tier) and a Python venv with the official OpenAI and Anthropic
#   SDKs, plus botocore, google-auth and cryptography for the Bedrock and Google mocks, and
#   opentelemetry-proto for the OTLP receiver of the tracing tests.
# Idempotent: does nothing for what is already there.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)

if ! command -v promtool >/dev/null 2>&1; then
  echo "test-deps: installing promtool (Debian package prometheus)"
  export DEBIAN_FRONTEND=noninteractive
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || {
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
  }
fi
promtool --version 2>&1 | head -1

if ! command -v redis-server >/dev/null 2>&1; then
  echo "test-deps: installing redis-server (Debian package redis-server, for the shared cache tier)"
  export DEBIAN_FRONTEND=noninteractive
  SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
  $SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null 2>&1 || {
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
  }
fi
redis-server --version 2>&1 | head -1

VENV="$ROOT/.venv"
if ! "$VENV/bin/python" -c 'import openai, anthropic, pytest, kubernetes_validate, botocore, google.auth, cryptography, opentelemetry.proto' >/dev/null 2>&1; then
  echo "test-deps: creating $VENV with the openai and anthropic SDKs, pytest, kubernetes-validate,"
  echo "test-deps: botocore, google-auth and cryptography"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "openai==3.57.0" "anthropic==2.15.0" "pytest==9.2.0" "kubernetes-validate==1.37.0" \
    "botocore==1.44.8" "google-auth==2.63.0" "cryptography==50.0.2" "opentelemetry-proto==1.45.2"
fi
"$VENV/bin/python" -c 'import openai, anthropic; print("openai SDK", openai.__version__, "anthropic SDK", anthropic.__version__)'
