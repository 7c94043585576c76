#!/usr/bin/env bash
# A single-node Kubernetes v1.20.2 cluster with a real kubelet, for `make test-cluster`.
#
#   cluster-up.sh <control-plane bin> <node bin> <state dir> [image archive...]
#
# <control-plane bin> has kube-apiserver and kube-controller-manager, <node bin> has kubelet,
# kube-scheduler, kube-proxy and pause (scripts/k8s-build.sh builds both from Debian's source
# package). Debian gives etcd, containerd, runc, the CNI plugins, iptables and dnsmasq.
#
# Everything listens on loopback or on addresses this script creates: an interface
# `mgnode0` (a bridge without ports) holds the node's address 10.77.0.1 (apiserver :16444, kubelet :10250, cluster DNS
# :53); pods live on the CNI bridge `cni0` in 10.88.0.0/16; Services in 10.96.0.0/24 through
# kube-proxy's iptables rules. Cluster DNS is dnsmasq answering `<svc>.<ns>.svc.cluster.local`
# from records a loop here writes from the Services. Images cannot be pulled: the pause image
# is built FROM scratch (and a static busybox image for test applications), and every archive
# given is imported into containerd's `k8s.io` namespace (pods use imagePullPolicy
# IfNotPresent or Never).
#
# Writes <state>/kubeconfig (cluster admin) and PID files; scripts/cluster-down.sh undoes all of
# it. Prints the time to a Ready node.
set -euo pipefail
CP=${1:?control-plane bin dir}; NODE=${2:?node bin dir}; S=${3:?state dir}; shift 3
ADDR=10.77.0.1
API_PORT=16444
ETCD_PORT=23791; ETCD_PEER_PORT=23801
POD_CIDR=10.88.0.0/16
SVC_CIDR=10.96.0.0/24
NODE_NAME=modelgate-node
PAUSE_IMAGE=localhost/modelgate-rig/pause:1.20.2
# An application container for tests (the sidecar example's app): Debian's static busybox.
APP_IMAGE=localhost/modelgate-rig/busybox:1.35
T0=$(date +%s%N)
ms() { echo $(( ($(date +%s%N) - T0) / 1000000 )); }

export DEBIAN_FRONTEND=noninteractive
SUDO=; [ "$(id -u)" = 0 ] || SUDO=sudo
PKGS=()
for p in etcd:etcd-server containerd:containerd runc:runc iptables:iptables conntrack:conntrack \
         dnsmasq:dnsmasq-base buildah:buildah openssl:openssl busybox:busybox-static; do
  command -v "${p%%:*}" >/dev/null || PKGS+=("${p#*:}")
done
[ -x /usr/lib/cni/bridge ] || PKGS+=(containernetworking-plugins)
# The busybox image needs the static build (Debian's `busybox` package is dynamic).
if command -v busybox >/dev/null && readelf -l "$(command -v busybox)" | grep -q 'program interpreter'; then
  PKGS+=(busybox-static)
fi
if [ ${#PKGS[@]} -gt 0 ]; then
  echo "cluster-up: installing ${PKGS[*]}"
  $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null 2>&1 || {
    $SUDO apt-get -o DPkg::Lock::Timeout=600 update -qq
    $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
  }
fi

mkdir -p "$S"/{etcd,pki,containerd,cni/net.d,kubelet,dns,images}; S=$(cd "$S" && pwd)
CP=$(cd "$CP" && pwd); NODE=$(cd "$NODE" && pwd)
for sysctl in vm.overcommit_memory kernel.panic kernel.panic_on_oops net.ipv4.ip_forward \
              net.ipv4.conf.all.route_localnet net.bridge.bridge-nf-call-iptables; do
  echo "$sysctl=$(sysctl -n "$sysctl" 2>/dev/null || echo)" >>"$S/sysctls.orig"
done
$SUDO sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1 >/dev/null 2>&1 || true

# The node's address, on an interface that exists only for the rig: a bridge with no ports
# (this kernel has no `dummy` link type; a bridge is always there, the CNI plugin needs it).
ip link show mgnode0 >/dev/null 2>&1 || {
  $SUDO ip link add mgnode0 type bridge
  $SUDO ip addr add "$ADDR/32" dev mgnode0
  $SUDO ip link set mgnode0 up
}

# etcd and kube-apiserver: ServiceAccount admission on (pods get tokens), the node address
# advertised (the `kubernetes` Service's endpoint, reachable from pods).
etcd --name node --data-dir "$S/etcd" \
  --listen-client-urls "http://127.0.0.1:$ETCD_PORT" --advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
  --listen-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" --initial-advertise-peer-urls "http://127.0.0.1:$ETCD_PEER_PORT" \
  --initial-cluster "node=http://127.0.0.1:$ETCD_PEER_PORT" --unsafe-no-fsync >"$S/etcd.log" 2>&1 &
echo $! >"$S/etcd.pid"
[ -f "$S/pki/sa.key" ] || openssl genrsa -out "$S/pki/sa.key" 2048 2>/dev/null
TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "$TOKEN,admin,admin,system:masters" >"$S/pki/tokens.csv"
for _ in $(seq 1 100); do curl -sf "http://127.0.0.1:$ETCD_PORT/health" >/dev/null && break; sleep 0.1; done
"$CP/kube-apiserver" --etcd-servers "http://127.0.0.1:$ETCD_PORT" \
  --bind-address "$ADDR" --advertise-address "$ADDR" --secure-port "$API_PORT" \
  --cert-dir "$S/pki" --token-auth-file "$S/pki/tokens.csv" --authorization-mode RBAC \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$S/pki/sa.key" --service-account-signing-key-file "$S/pki/sa.key" \
  --service-cluster-ip-range "$SVC_CIDR" --kubelet-preferred-address-types InternalIP \
  --allow-privileged=false >"$S/apiserver.log" 2>&1 &
echo $! >"$S/apiserver.pid"
cat >"$S/kubeconfig" <<KC
apiVersion: v1
kind: Config
clusters:
- name: node
  cluster: {server: "https://$ADDR:$API_PORT", certificate-authority: "$S/pki/apiserver.crt"}
users:
- name: admin
  user: {token: "$TOKEN"}
contexts:
- name: node
  context: {cluster: node, user: admin, namespace: default}
current-context: node
KC
ok=
for _ in $(seq 1 600); do
  if curl -sf --cacert "$S/pki/apiserver.crt" -H "Authorization: Bearer $TOKEN" "https://$ADDR:$API_PORT/readyz" >/dev/null 2>&1; then ok=1; break; fi
  kill -0 "$(cat "$S/apiserver.pid")" 2>/dev/null || break; sleep 0.1
done
[ -n "$ok" ] || { echo "cluster-up: kube-apiserver failed"; tail -40 "$S/apiserver.log"; exit 1; }
echo "cluster-up: kube-apiserver ready at $(ms) ms"

# The controller manager signs ServiceAccount tokens with the apiserver's CA bundle as ca.crt and
# runs the node lifecycle controller (it lifts the not-ready taint once the kubelet is Ready).
"$CP/kube-controller-manager" --kubeconfig "$S/kubeconfig" --bind-address 127.0.0.1 \
  --port 0 --secure-port 10267 --leader-elect=false --use-service-account-credentials=false \
  --service-account-private-key-file "$S/pki/sa.key" --root-ca-file "$S/pki/apiserver.crt" \
  --controllers '*,-nodeipam,-cloud-node-lifecycle,-route,-service' \
  >"$S/kcm.log" 2>&1 &
echo $! >"$S/kcm.pid"
"$NODE/kube-scheduler" --kubeconfig "$S/kubeconfig" --bind-address 127.0.0.1 --port 0 \
  --secure-port 10269 --leader-elect=false >"$S/scheduler.log" 2>&1 &
echo $! >"$S/scheduler.pid"

# containerd with a private socket and the CRI plugin: local pause image, cgroupfs, Debian's CNI
# plugins. restrict_oom_score_adj: without CAP_SYS_RESOURCE every sandbox fails in runc
# ("can't get final child's PID from pipe: EOF").
cat >"$S/containerd/config.toml" <<EOF
version = 2
root = "$S/containerd/root"
state = "$S/containerd/state"
[grpc]
  address = "$S/containerd.sock"
[ttrpc]
  address = "$S/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$S/cni/net.d"
EOF
cat >"$S/cni/net.d/10-modelgate.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "modelgate-rig",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$POD_CIDR"}]],
              "routes": [{"dst": "0.0.0.0/0"}], "dataDir": "$S/cni/ipam"}},
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "loopback"}
  ]
}
EOF
containerd --config "$S/containerd/config.toml" >"$S/containerd.log" 2>&1 &
echo $! >"$S/containerd.pid"
CTR=(ctr --address "$S/containerd.sock" -n k8s.io)
for _ in $(seq 1 100); do "${CTR[@]}" version >/dev/null 2>&1 && break; sleep 0.1; done

# Images: the pause image FROM scratch, then the archives given.
if [ ! -f "$S/images/pause.tar" ]; then
  cp "$NODE/pause" "$S/images/pause"
  printf 'FROM scratch\nCOPY pause /pause\nUSER 65535:65535\nENTRYPOINT ["/pause"]\n' >"$S/images/Containerfile"
  buildah --storage-driver vfs bud --quiet --layers=false -t "$PAUSE_IMAGE" -f "$S/images/Containerfile" "$S/images" >/dev/null
  buildah --storage-driver vfs push --quiet "$PAUSE_IMAGE" "docker-archive:$S/images/pause.tar:$PAUSE_IMAGE"
fi
if [ ! -f "$S/images/busybox.tar" ]; then
  mkdir -p "$S/images/busybox"
  cp "$(command -v busybox)" "$S/images/busybox/busybox"
  printf 'FROM scratch\nCOPY busybox /bin/busybox\nUSER 65534:65534\nENTRYPOINT ["/bin/busybox"]\n' >"$S/images/busybox/Containerfile"
  buildah --storage-driver vfs bud --quiet --layers=false -t "$APP_IMAGE" -f "$S/images/busybox/Containerfile" "$S/images/busybox" >/dev/null
  buildah --storage-driver vfs push --quiet "$APP_IMAGE" "docker-archive:$S/images/busybox.tar:$APP_IMAGE"
fi
for archive in "$S/images/pause.tar" "$S/images/busybox.tar" "$@"; do
  "${CTR[@]}" images import "$archive" >/dev/null
done
"${CTR[@]}" images ls -q | grep -v '^sha256:' | sed 's/^/cluster-up: image /'

# Cluster DNS: dnsmasq on the node address, answering cluster.local from the Services only.
: >"$S/dns/hosts"
dnsmasq --keep-in-foreground --no-resolv --no-hosts --no-poll --user=root \
  --listen-address="$ADDR" --bind-interfaces --port 53 --local=/cluster.local/ \
  --addn-hosts="$S/dns/hosts" --pid-file="$S/dnsmasq.pidfile" --log-facility="$S/dnsmasq.log" &
echo $! >"$S/dnsmasq.pid"
KUBECTL=${KUBECTL:-kubectl}
(
  while kill -0 "$(cat "$S/dnsmasq.pid")" 2>/dev/null; do
    if "$KUBECTL" --kubeconfig "$S/kubeconfig" get svc -A -o \
        jsonpath='{range .items[*]}{.spec.clusterIP} {.metadata.name}.{.metadata.namespace}.svc.cluster.local{"\n"}{end}' \
        2>/dev/null | grep -v '^None ' >"$S/dns/hosts.new"; then
      if ! cmp -s "$S/dns/hosts.new" "$S/dns/hosts"; then
        mv "$S/dns/hosts.new" "$S/dns/hosts"
        kill -HUP "$(cat "$S/dnsmasq.pid")" 2>/dev/null || true
      fi
    fi
    sleep 1
  done
) >/dev/null 2>&1 &
echo $! >"$S/dns-sync.pid"
printf 'nameserver %s\n' "$ADDR" >"$S/resolv.conf"

# kubelet: CRI over the private socket, cgroupfs, images never collected (they cannot be pulled
# again), the apiserver allowed in for logs, exec and port-forward.
cat >"$S/kubelet/config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $ADDR
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
cgroupDriver: cgroupfs
failSwapOn: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}
clusterDNS: [$ADDR]
clusterDomain: cluster.local
resolvConf: $S/resolv.conf
serializeImagePulls: false
EOF
"$NODE/kubelet" --config "$S/kubelet/config.yaml" --kubeconfig "$S/kubeconfig" \
  --container-runtime=remote --container-runtime-endpoint="unix://$S/containerd.sock" \
  --root-dir "$S/kubelet/root" --cert-dir "$S/kubelet/pki" --node-ip "$ADDR" \
  --hostname-override "$NODE_NAME" >"$S/kubelet.log" 2>&1 &
echo $! >"$S/kubelet.pid"
# kube-proxy, iptables mode; every Service connection masqueraded so replies between pods on the
# one bridge come back through the node.
"$NODE/kube-proxy" --kubeconfig "$S/kubeconfig" --hostname-override "$NODE_NAME" \
  --proxy-mode iptables --cluster-cidr "$POD_CIDR" --masquerade-all \
  --bind-address "$ADDR" --healthz-bind-address 127.0.0.1:10256 --metrics-bind-address 127.0.0.1:10249 \
  --conntrack-max-per-core 0 >"$S/kube-proxy.log" 2>&1 &
echo $! >"$S/kube-proxy.pid"

ok=
for _ in $(seq 1 1200); do
  st=$("$KUBECTL" --kubeconfig "$S/kubeconfig" get node "$NODE_NAME" \
    -o jsonpath='{.status.conditions[?(@.type=="Ready")].status} {.spec.taints}' 2>/dev/null || true)
  if [ "${st%% *}" = True ] && ! echo "$st" | grep -q not-ready; then ok=1; break; fi
  kill -0 "$(cat "$S/kubelet.pid")" 2>/dev/null || break
  sleep 0.1
done
[ -n "$ok" ] || { echo "cluster-up: the node did not become Ready"; tail -30 "$S/kubelet.log"; exit 1; }
echo "cluster-up: node $NODE_NAME Ready at $(ms) ms; KUBECONFIG=$S/kubeconfig"
