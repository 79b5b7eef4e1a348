#!/usr/bin/env bash
# Undoes e2e/node/up.sh DIR: uninstalls the chart, then stops the node up.sh started
# (a cluster that was already running is left running). Idempotent.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dir=${1:?usage: e2e/node/down.sh DIR}
[ -d "$dir" ] || { echo "node: nothing in $dir" >&2; exit 0; }
dir=$(cd "$dir" && pwd)
shared=${PORTCULLIS_SHARED:-$(cd "$root/.." && pwd)/shared}
log() { echo "node: $*" >&2; }
if [ -s "$dir/external-kubeconfig" ]; then
  export KUBECONFIG=$(cat "$dir/external-kubeconfig")
  if command -v helm >/dev/null && helm status portcullis -n portcullis-system >/dev/null 2>&1; then
    log "helm uninstall portcullis"
    helm uninstall portcullis -n portcullis-system --wait --timeout 2m >&2 || true
  fi
  log "left the cluster at $KUBECONFIG running (up.sh did not start it)"
elif [ -s "$dir/cluster/pids" ]; then
  # The whole cluster goes: no need to uninstall first.
  log "stopping the node in $dir/cluster"
  "$shared/node/stop.sh" "$dir/cluster" >&2
else
  log "no node running from $dir"
fi
rm -f "$dir/tag" "$dir/external-kubeconfig"
