#!/usr/bin/env bash
# Prints what a red node-tier run needs to say what broke: every pod, the recent events,
# and the last lines of each container's log (current and previous) outside kube-system.
# usage: e2e/node/diagnose.sh        (KUBECONFIG points at the cluster)
set -uo pipefail
lines=${DIAGNOSE_LINES:-40}
echo "=== pods"
kubectl get pods -A -o wide
echo "=== events (last 80)"
kubectl get events -A --sort-by=.lastTimestamp | tail -n 80
kubectl get pods -A -o jsonpath='{range .items[*]}{.metadata.namespace}{" "}{.metadata.name}{" "}{range .spec.initContainers[*]}{.name}{","}{end}{range .spec.containers[*]}{.name}{","}{end}{"\n"}{end}' |
while read -r ns pod containers; do
  [ "$ns" = kube-system ] && continue
  for c in ${containers//,/ }; do
    echo "=== logs $ns/$pod [$c]"
    kubectl -n "$ns" logs "$pod" -c "$c" --tail="$lines" 2>&1
    prev=$(kubectl -n "$ns" logs "$pod" -c "$c" --previous --tail="$lines" 2>/dev/null) && {
      echo "=== previous logs $ns/$pod [$c]"; echo "$prev"; }
  done
done
