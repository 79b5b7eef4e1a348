#!/usr/bin/env bash
# The kind tier (DESIGN.md §7, tier 4): a throwaway kind cluster with Kubernetes 1.31,
# the images built from this checkout, the Helm chart, then
#   PORTCULLIS_E2E=kind cargo test -p portcullis-e2e --test cluster_scenarios -- --test-threads=1
# The cluster is deleted on exit unless KEEP_CLUSTER=1.
#
# Needs: docker (with buildx), kind >= 0.24, kubectl, helm >= 3.14, cargo.
# Environment (all optional):
#   KIND_CLUSTER     cluster name (portcullis-e2e)
#   KIND_NODE_IMAGE  node image (kindest/node:v1.31.6; pin tag@sha256 from the kind release notes)
#   OPERATOR_IMAGE   operator image (ghcr.io/portcullis-dev/portcullis-operator:dev)
#   PROXY_IMAGE      proxy image (ghcr.io/portcullis-dev/portcullis-proxy:dev)
#   SKIP_BUILD=1     use images already built with `make images`
#   KEEP_CLUSTER=1   leave the cluster running (delete: kind delete cluster --name ...)
#   Extra arguments are passed to the test binary (e.g. a test name filter).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
cd "$root"

KIND_CLUSTER=${KIND_CLUSTER:-portcullis-e2e}
KIND_NODE_IMAGE=${KIND_NODE_IMAGE:-kindest/node:v1.31.6}
OPERATOR_IMAGE=${OPERATOR_IMAGE:-ghcr.io/portcullis-dev/portcullis-operator:dev}
PROXY_IMAGE=${PROXY_IMAGE:-ghcr.io/portcullis-dev/portcullis-proxy:dev}
RELEASE_NAMESPACE=portcullis-system

need() {
  command -v "$1" >/dev/null 2>&1 || { echo "run.sh: $1 is not installed: $2" >&2; exit 1; }
}
need docker "https://docs.docker.com/engine/install/"
need kind "https://kind.sigs.k8s.io/docs/user/quick-start/#installation"
need kubectl "https://kubernetes.io/docs/tasks/tools/"
need helm "https://helm.sh/docs/intro/install/"
need cargo "https://rustup.rs/"
docker info >/dev/null 2>&1 || { echo "run.sh: the docker daemon is not reachable (docker info failed)" >&2; exit 1; }

# An image reference split into repository and tag for the chart values.
repo_of() { local r=${1%@*}; case "${r##*/}" in *:*) echo "${r%:*}" ;; *) echo "$r" ;; esac; }
tag_of() { local r=${1%@*}; case "${r##*/}" in *:*) echo "${r##*:}" ;; *) echo latest ;; esac; }

workdir=$(mktemp -d "${TMPDIR:-/tmp}/portcullis-kind.XXXXXX")
export KUBECONFIG="$workdir/kubeconfig"

cleanup() {
  local status=$?
  if [ "$status" -ne 0 ] && kubectl version >/dev/null 2>&1; then
    echo "--- diagnostics (exit $status) ---" >&2
    kubectl get pods -A -o wide >&2 || true
    kubectl -n "$RELEASE_NAMESPACE" logs deployment/portcullis-operator --all-containers --tail=200 >&2 || true
    kubectl get events -A --sort-by=.lastTimestamp 2>&1 | tail -n 50 >&2 || true
  fi
  if [ "${KEEP_CLUSTER:-}" = 1 ]; then
    echo "keeping cluster $KIND_CLUSTER (KUBECONFIG=$KUBECONFIG)" >&2
  else
    kind delete cluster --name "$KIND_CLUSTER" >/dev/null 2>&1 || true
    rm -rf "$workdir"
  fi
  exit "$status"
}
trap cleanup EXIT INT TERM

if [ "${SKIP_BUILD:-}" != 1 ]; then
  make images OPERATOR_IMAGE="$OPERATOR_IMAGE" PROXY_IMAGE="$PROXY_IMAGE"
fi

kind delete cluster --name "$KIND_CLUSTER" >/dev/null 2>&1 || true
kind create cluster --name "$KIND_CLUSTER" --image "$KIND_NODE_IMAGE" \
  --config "$here/kind-config.yaml" --kubeconfig "$KUBECONFIG" --wait 120s
kind load docker-image --name "$KIND_CLUSTER" "$OPERATOR_IMAGE" "$PROXY_IMAGE"

# The test workloads' image (pod-app and curl), built from this checkout and loaded, so
# the tests need no registry (the tag is PORTCULLIS_E2E_TAG).
TOOLS_TAG=kind
if [ "${SKIP_BUILD:-}" != 1 ]; then
  docker buildx build --load -f e2e/node/tools.Containerfile \
    -t "localhost/portcullis-e2e-tools:$TOOLS_TAG" .
fi
kind load docker-image --name "$KIND_CLUSTER" "localhost/portcullis-e2e-tools:$TOOLS_TAG"

helm install portcullis charts/portcullis \
  --namespace "$RELEASE_NAMESPACE" --create-namespace \
  -f "$here/values.yaml" \
  --set operator.image.repository="$(repo_of "$OPERATOR_IMAGE")" \
  --set operator.image.tag="$(tag_of "$OPERATOR_IMAGE")" \
  --set proxy.image.repository="$(repo_of "$PROXY_IMAGE")" \
  --set proxy.image.tag="$(tag_of "$PROXY_IMAGE")" \
  --wait --timeout 5m

# The webhooks are usable once the operator has patched their caBundle.
for config in mutatingwebhookconfiguration/portcullis-injector validatingwebhookconfiguration/portcullis-validator; do
  for _ in $(seq 1 60); do
    bundle=$(kubectl get "$config" -o jsonpath='{.webhooks[0].clientConfig.caBundle}')
    [ -n "$bundle" ] && break
    sleep 2
  done
  [ -n "$bundle" ] || { echo "run.sh: the operator never set the caBundle of $config" >&2; exit 1; }
done

for suite in cluster_scenarios cluster_disruptions; do   # disruptions last: they uninstall
  PORTCULLIS_E2E=kind PORTCULLIS_E2E_TAG=$TOOLS_TAG PORTCULLIS_RELEASE_NAMESPACE="$RELEASE_NAMESPACE" \
    cargo test -p portcullis-e2e --test "$suite" -- --test-threads=1 "$@"
done
