#!/usr/bin/env bash
# The node tier (DESIGN.md §7, tier 4): Portcullis on a real single-node Kubernetes.
#
#   sudo e2e/node/up.sh DIR      # last line: export KUBECONFIG=...
#   sudo e2e/node/down.sh DIR
#
# 1. Uses the cluster KUBECONFIG points at when it answers; otherwise starts the
#    single-node cluster from ../shared/node (kubelet, containerd, runc, kube-proxy,
#    scheduler 1.20.2) with its state in DIR/cluster.
# 2. Builds the operator, proxy and test-tool images with buildah and loads them into
#    the node's containerd (e2e/node/images.sh).
# 3. Installs the chart: helm install portcullis charts/portcullis -n portcullis-system
#    --create-namespace --wait, with e2e/node/values.yaml and the local images; waits
#    until the operator has patched the webhooks' caBundle.
# Idempotent: run again to rebuild the images and upgrade the release in place.
#
# env: PORTCULLIS_SHARED   the shared tools folder (default: ../shared beside the checkout)
#      PORTCULLIS_BIN_DIR  binaries already built (default: cargo build)
#      PORTCULLIS_TAG      image tag (default: dev-<timestamp>, so every run rolls the pods)
#      PORTCULLIS_HELM_ARGS  extra helm arguments (e.g. "--set identity.rotationPeriod=2m")
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
dir=${1:?usage: e2e/node/up.sh DIR}
mkdir -p "$dir"; dir=$(cd "$dir" && pwd)
shared=${PORTCULLIS_SHARED:-$(cd "$root/.." && pwd)/shared}
release_ns=portcullis-system
tag=${PORTCULLIS_TAG:-dev-$(date +%s)}
log() { echo "node: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }
command -v helm >/dev/null || die "helm is not on PATH: eval \"\$($shared/setup-tools.sh)\" puts it there"
command -v kubectl >/dev/null || die "kubectl is not on PATH"

# 1. The cluster.
if [ -n "${KUBECONFIG:-}" ] && [ "$KUBECONFIG" != "$dir/cluster/kubeconfig" ] \
   && kubectl get --raw /readyz >/dev/null 2>&1; then
  log "using the cluster at KUBECONFIG=$KUBECONFIG"
  echo "$KUBECONFIG" > "$dir/external-kubeconfig"
else
  [ "$(id -u)" = 0 ] || die "starting the node needs root (or point KUBECONFIG at a running cluster)"
  [ -x "$shared/node/start.sh" ] || die "$shared/node/start.sh not found: set PORTCULLIS_SHARED"
  log "starting the node in $dir/cluster"
  "$shared/node/start.sh" "$dir/cluster" >"$dir/start.log" 2>&1 || { tail -n 30 "$dir/start.log" >&2; die "the node did not start (log: $dir/start.log)"; }
  export KUBECONFIG=$dir/cluster/kubeconfig
  rm -f "$dir/external-kubeconfig"
fi
for _ in $(seq 1 60); do
  kubectl get nodes -o jsonpath='{.items[0].status.conditions[?(@.type=="Ready")].status}' 2>/dev/null | grep -x True >/dev/null && break
  sleep 1
done

# The node's bridge (rn0, from ../shared/node) takes the lowest MAC address of its ports
# unless one is set, so a pod starting or stopping can change the gateway's MAC under all
# the others: their ARP entries for 10.244.0.1 (DNS and every Service connection) go stale
# and packets vanish for about 5 s. Pin the address it has now (3 = set by the user).
if [ ! -f "$dir/external-kubeconfig" ] && [ -e /sys/class/net/rn0 ] \
   && [ "$(cat /sys/class/net/rn0/addr_assign_type)" != 3 ]; then
  ip link set dev rn0 address "$(cat /sys/class/net/rn0/address)"
  log "pinned the node bridge's MAC address ($(cat /sys/class/net/rn0/address))"
fi

# 2. Images (the base image once per machine).
if ! buildah images --format '{{.Name}}:{{.Tag}}' 2>/dev/null | grep -x 'docker.io/library/debian:12.11-slim' >/dev/null; then
  log "making the local debian:12.11-slim base image (once)"
  "$shared/node/make-base-image.sh" >"$dir/base-image.log" 2>&1 || { tail -n 30 "$dir/base-image.log" >&2; die "base image failed (log: $dir/base-image.log)"; }
fi
"$root/e2e/node/images.sh" "$tag"

# The audit collector's volume. The node has no volume provisioner, so a hostPath
# PersistentVolume waits for the collector's claim: its records then outlive the
# collector pod, as with the chart's default PersistentVolumeClaim. (On a cluster this
# script did not start, the collector keeps values.yaml's emptyDir.)
collector_volume=()
if [ ! -f "$dir/external-kubeconfig" ]; then
  mkdir -p "$dir/audit-volume"
  chown 65532:65532 "$dir/audit-volume"
  chmod 0700 "$dir/audit-volume"
  kubectl apply -f - >&2 <<EOF
apiVersion: v1
kind: PersistentVolume
metadata:
  name: portcullis-node-audit
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  persistentVolumeReclaimPolicy: Retain
  storageClassName: portcullis-node-local
  hostPath: {path: "$dir/audit-volume", type: Directory}
EOF
  collector_volume=(
    --set audit.collector.persistence.enabled=true
    --set audit.collector.persistence.storageClassName=portcullis-node-local
    --set audit.collector.persistence.size=1Gi
  )
fi

# 3. The chart.
log "helm upgrade --install portcullis (images localhost/portcullis-*:$tag)"
# shellcheck disable=SC2086
helm upgrade --install portcullis "$root/charts/portcullis" \
  --namespace "$release_ns" --create-namespace \
  -f "$root/e2e/node/values.yaml" \
  "${collector_volume[@]}" \
  --set operator.image.repository=localhost/portcullis-operator \
  --set operator.image.tag="$tag" \
  --set proxy.image.repository=localhost/portcullis-proxy \
  --set proxy.image.tag="$tag" \
  ${PORTCULLIS_HELM_ARGS:-} \
  --wait --timeout 5m >&2 || {
    kubectl -n "$release_ns" get pods -o wide >&2 || true
    kubectl -n "$release_ns" describe pods >&2 || true
    kubectl -n "$release_ns" logs deployment/portcullis-operator --all-containers --tail=100 >&2 || true
    die "helm install failed"
  }
for config in mutatingwebhookconfiguration/portcullis-injector validatingwebhookconfiguration/portcullis-validator; do
  bundle=
  for _ in $(seq 1 60); do
    bundle=$(kubectl get "$config" -o jsonpath='{.webhooks[0].clientConfig.caBundle}' 2>/dev/null || true)
    [ -n "$bundle" ] && break
    sleep 1
  done
  [ -n "$bundle" ] || die "the operator never set the caBundle of $config"
done
echo "$tag" > "$dir/tag"
log "ready: chart installed in $release_ns with images tagged $tag"
echo "export KUBECONFIG=$KUBECONFIG"
