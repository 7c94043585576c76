#!/usr/bin/env bash
# Undo scripts/cluster-up.sh: the node's agents first (so nothing restarts what goes next),
# then every container (killed and deleted through containerd, so runc forgets them too),
# containerd and its shims, the control plane, DNS; then sweep what the pods leave behind
# (mounts, network namespaces, the bridge, KUBE-/CNI- iptables chains) and restore the sysctls
# the kubelet and the bridge changed. Usage: cluster-down.sh <state dir>
S=${1:?state dir}
[ -d "$S" ] || exit 0
S=$(cd "$S" && pwd)
stop() {
  local f="$S/$1.pid" pid
  [ -f "$f" ] || return 0
  pid=$(cat "$f")
  kill "$pid" 2>/dev/null && for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null
  rm -f "$f"
}
stop dns-sync
stop kubelet
stop kube-proxy
stop scheduler
# Pods and the images tests' containers: killed, then deleted (no grace: the cluster goes).
if [ -S "$S/containerd.sock" ]; then
  for ns in $(ctr --address "$S/containerd.sock" namespaces ls -q 2>/dev/null); do
    CTR=(ctr --address "$S/containerd.sock" -n "$ns")
    for t in $("${CTR[@]}" tasks ls -q 2>/dev/null); do "${CTR[@]}" tasks kill -s SIGKILL "$t" >/dev/null 2>&1; done
    for _ in $(seq 1 50); do
      "${CTR[@]}" tasks ls 2>/dev/null | grep -q RUNNING || break
      sleep 0.1
    done
    for t in $("${CTR[@]}" tasks ls -q 2>/dev/null); do "${CTR[@]}" tasks delete -f "$t" >/dev/null 2>&1; done
    for c in $("${CTR[@]}" containers ls -q 2>/dev/null); do "${CTR[@]}" containers delete "$c" >/dev/null 2>&1; done
  done
fi
stop containerd
pkill -9 -f "containerd-shim-runc-v2 .*-address $S/containerd.sock" 2>/dev/null
stop dnsmasq
stop kcm
stop apiserver
stop etcd
# Leftovers: mounts under the state dir (deepest first), network namespaces made by the CNI
# plugins, the bridge and the node interface, the rules kube-proxy and the portmap/bridge
# plugins wrote.
grep " $S/" /proc/self/mounts | awk '{print $2}' | sort -r | while read -r m; do umount -l "$m" 2>/dev/null; done
for ns in $(ip netns list 2>/dev/null | awk '/^cni-/ {print $1}'); do ip netns delete "$ns" 2>/dev/null; done
ip link delete cni0 2>/dev/null
ip link delete mgnode0 2>/dev/null
if command -v iptables >/dev/null; then
  for table in filter nat mangle; do
    iptables-save -t "$table" 2>/dev/null | awk '/^:(KUBE-|CNI-)/ {sub(":", "", $1); print $1}' >"$S/chains" || continue
    # Jumps into those chains first, then the chains.
    iptables-save -t "$table" 2>/dev/null | grep -E '^-A .* -j (KUBE-|CNI-)' | grep -vE '^-A (KUBE-|CNI-)' \
      | sed 's/^-A/-D/' | while read -r rule; do eval "iptables -t $table $rule" 2>/dev/null; done
    while read -r c; do iptables -t "$table" -F "$c" 2>/dev/null; done <"$S/chains"
    while read -r c; do iptables -t "$table" -X "$c" 2>/dev/null; done <"$S/chains"
  done
fi
if [ -f "$S/sysctls.orig" ]; then
  while IFS== read -r k v; do [ -n "$v" ] && sysctl -qw "$k=$v" >/dev/null 2>&1; done <"$S/sysctls.orig"
fi
rm -rf /var/log/pods/* 2>/dev/null
rmdir /run/containerd/runc/* 2>/dev/null   # runc's per-namespace state, empty once all is deleted
# The state holds overlay snapshots and kubelet volumes: remove it once nothing is mounted.
rm -rf "$S" 2>/dev/null || echo "cluster-down: could not remove all of $S"
exit 0
