#!/usr/bin/env bash
# Stop what k8s-up.sh started, by PID.  Usage: k8s-down.sh <state dir>
DIR=${1:?state dir}
for p in kcm apiserver etcd; do
  f="$DIR/$p.pid"; [ -f "$f" ] || continue; pid=$(cat "$f")
  kill "$pid" 2>/dev/null && for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -0 "$pid" 2>/dev/null && kill -9 "$pid"; rm -f "$f"
done
