#!/usr/bin/env bash
# `make test-cluster`: the chart's pods for real. Builds the images (scripts/images.sh), the
# node's Kubernetes binaries once (kubelet, kube-scheduler, kube-proxy and the pause binary,
# from the same Debian source package and cache as the apiserver), starts a single-node
# cluster (scripts/cluster-up.sh) with both images imported, runs the tests that need pods
# (tests/tests/images.rs, tests/tests/cluster.rs; cargo feature `cluster` of modelgate-tests),
# and tears the node down again. Run by CI after `make test`.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
CACHE=${MODELGATE_CACHE:-/var/cache/modelgate}
K8S="$CACHE/k8s-1.20.2"
TOOLS="$CACHE/tools"
T0=$(date +%s)
since() { echo "$(( $(date +%s) - T0 )) s"; }

bash scripts/test-deps.sh
bash scripts/k8s-build.sh "$K8S/work" "$K8S/bin"
echo "test-cluster: kubelet, kube-scheduler, kube-proxy v1.20.2 (built once into $K8S/node-bin; about 6 minutes the first time)"
bash scripts/k8s-build.sh "$K8S/work" "$K8S/node-bin" kubelet kube-scheduler kube-proxy pause
bash scripts/k8s-tools.sh "$TOOLS"
bash scripts/images.sh
echo "test-cluster: binaries and images ready after $(since)"

STATE=$(mktemp -d /tmp/modelgate-node.XXXXXX)
cleanup() {
  local t=$(date +%s)
  bash scripts/cluster-down.sh "$STATE"
  echo "test-cluster: node torn down in $(( $(date +%s) - t )) s"
}
trap cleanup EXIT
export KUBECTL="$TOOLS/bin/kubectl"
bash scripts/cluster-up.sh "$K8S/bin" "$K8S/node-bin" "$STATE" \
  target/images/modelgate-dataplane.tar target/images/modelgate-operator.tar

export MODELGATE_PYTHON="$ROOT/.venv/bin/python"
export MODELGATE_KUBECONFIG="$STATE/kubeconfig"
export MODELGATE_KUBECTL="$TOOLS/bin/kubectl"
export MODELGATE_HELM="$TOOLS/bin/helm"
export MODELGATE_KUBERNETES_VALIDATE="$ROOT/.venv/bin/kubernetes-validate"
export MODELGATE_CONTAINERD="$STATE/containerd.sock"
export MODELGATE_IMAGES="$ROOT/target/images"
cargo test -p modelgate-tests --features cluster --test images --test cluster -- --test-threads=1 --nocapture
echo "test-cluster: done after $(since)"
