#!/usr/bin/env bash
# The test command (README: `make test`). On a fresh machine it installs what the tests
# need, builds the real kube-apiserver once (cached by version outside the repository),
# starts etcd + kube-apiserver + kube-controller-manager on 127.0.0.1, runs every test of
# the workspace, and stops the cluster again; then the tests that need real pods on a
# single-node cluster (scripts/test-cluster.sh, also `make test-cluster` alone). Each test
# starts its own mock upstreams, proxies and operators on 127.0.0.1 and stops them itself.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
CACHE=${MODELGATE_CACHE:-/var/cache/modelgate}
K8S="$CACHE/k8s-1.20.2"
TOOLS="$CACHE/tools"

bash scripts/test-deps.sh
echo "test: kube-apiserver v1.20.2 (built once into $K8S/bin; about 10 minutes the first time)"
bash scripts/k8s-build.sh "$K8S/work" "$K8S/bin"
bash scripts/k8s-tools.sh "$TOOLS"

STATE=$(mktemp -d)
cleanup() { bash scripts/k8s-down.sh "$STATE"; rm -rf "$STATE"; }
trap cleanup EXIT
bash scripts/k8s-up.sh "$K8S/bin" "$STATE"

export MODELGATE_PYTHON="$ROOT/.venv/bin/python"
export MODELGATE_KUBECONFIG="$STATE/kubeconfig"
export MODELGATE_KUBECTL="$TOOLS/bin/kubectl"
export MODELGATE_HELM="$TOOLS/bin/helm"
export MODELGATE_KUBERNETES_VALIDATE="$ROOT/.venv/bin/kubernetes-validate"
cargo build --workspace --bins --quiet
cargo test --workspace
# A short bounded fuzz pass, 30 s per target (`make fuzz` runs each for 10 minutes).
bash scripts/fuzz.sh 30
# The chart's pods on a node of their own (`make test-cluster`): images, kubelet, containerd.
bash scripts/test-cluster.sh
