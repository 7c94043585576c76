#!/usr/bin/env bash
# Start etcd (Debian etcd-server) + kube-apiserver + kube-controller-manager on 127.0.0.1;
# writes <state>/kubeconfig and <state>/*.pid.  Usage: k8s-up.sh <bin dir> <state dir>
# Token auth (system:masters), RBAC, a self-signed serving cert. No scheduler or kubelet:
# Pods stay Pending, so tests run proxies and operators as local processes.
set -euo pipefail
BIN=${1:?bin dir}; DIR=${2:?state dir}
ETCD_PORT=${ETCD_PORT:-23790}; ETCD_PEER_PORT=${ETCD_PEER_PORT:-23800}
API_PORT=${API_PORT:-16443}; KCM_PORT=${KCM_PORT:-10257}
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
command -v etcd >/dev/null || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends etcd-server >/dev/null
command -v openssl >/dev/null || DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends openssl >/dev/null
mkdir -p "$DIR/etcd" "$DIR/pki"; DIR=$(cd "$DIR" && pwd)
T0=$(date +%s%N)
etcd --name k8s --data-dir "$DIR/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "k8s=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync >"$DIR/etcd.log" 2>&1 &
echo $! >"$DIR/etcd.pid"
[ -f "$DIR/pki/sa.key" ] || openssl genrsa -out "$DIR/pki/sa.key" 2048 2>/dev/null
TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "$TOKEN,admin,admin,system:masters" >"$DIR/pki/tokens.csv"
for i in $(seq 1 100); do curl -sf "http://127.0.0.1:$ETCD_PORT/health" >/dev/null && break; sleep 0.1; done
"$BIN/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$API_PORT" \
  --cert-dir "$DIR/pki" --token-auth-file "$DIR/pki/tokens.csv" --authorization-mode RBAC \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$DIR/pki/sa.key" --service-account-signing-key-file "$DIR/pki/sa.key" \
  --service-cluster-ip-range 10.96.0.0/24 --disable-admission-plugins ServiceAccount \
  >"$DIR/apiserver.log" 2>&1 &
echo $! >"$DIR/apiserver.pid"
cat >"$DIR/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster: {server: "https://127.0.0.1:$API_PORT", insecure-skip-tls-verify: true}
users:
- name: admin
  user: {token: "$TOKEN"}
contexts:
- name: local
  context: {cluster: local, user: admin, namespace: default}
current-context: local
KC
ok=
for i in $(seq 1 600); do
  if curl -skf -H "Authorization: Bearer $TOKEN" "https://127.0.0.1:$API_PORT/readyz" >/dev/null; then ok=1; break; fi
  kill -0 "$(cat "$DIR/apiserver.pid")" 2>/dev/null || break; sleep 0.1
done
[ -n "$ok" ] || { echo "kube-apiserver failed"; tail -40 "$DIR/apiserver.log"; exit 1; }
# controller-manager: namespace deletion, ownerReference GC, ...
if [ -x "$BIN/kube-controller-manager" ] && [ "${K8S_NO_KCM:-}" != 1 ]; then
  "$BIN/kube-controller-manager" --kubeconfig "$DIR/kubeconfig" --bind-address 127.0.0.1 \
    --port 0 --secure-port "$KCM_PORT" --leader-elect=false --use-service-account-credentials=false \
    --service-account-private-key-file "$DIR/pki/sa.key" \
    --controllers '*,-nodeipam,-nodelifecycle,-cloud-node-lifecycle,-route,-service' \
    >"$DIR/kcm.log" 2>&1 &
  echo $! >"$DIR/kcm.pid"
fi
echo "kube-apiserver ready in $(( ($(date +%s%N) - T0) / 1000000 )) ms; KUBECONFIG=$DIR/kubeconfig"
