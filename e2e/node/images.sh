#!/usr/bin/env bash
# Builds the Portcullis images for the node tier with buildah, from binaries built on this
# machine, and loads them into the node's containerd (no registry, no docker):
#   localhost/portcullis-operator:$TAG   images/operator.Dockerfile, BINARY_FROM=prebuilt
#   localhost/portcullis-proxy:$TAG      images/proxy.Dockerfile,    BINARY_FROM=prebuilt
#   localhost/portcullis-e2e-tools:$TAG  e2e/node/tools.Containerfile (test app and client)
# The runtime stages are the published ones. The operator's published base,
# distroless/static, needs a static musl binary, and neither that base nor the musl
# target can be fetched here: its image is tested on debian:12.11-slim instead.
#
# usage (as root): e2e/node/images.sh [TAG]          (TAG default: dev)
# env: PORTCULLIS_BIN_DIR  binaries already built (default: build with cargo into target/)
#      CONTAINERD_ADDRESS  the node's containerd socket (default: the realnode one)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
tag=${1:-dev}
sock=${CONTAINERD_ADDRESS:-/run/realnode/containerd/containerd.sock}
log() { echo "images: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (buildah and the node's containerd need it)"
command -v buildah >/dev/null || die "buildah is missing: run ../shared/node/make-base-image.sh (it installs buildah and the base image)"
buildah images --format '{{.Name}}:{{.Tag}}' | grep -x 'docker.io/library/debian:12.11-slim' >/dev/null \
  || die "no local debian:12.11-slim in buildah: run ../shared/node/make-base-image.sh once"

bin_dir=${PORTCULLIS_BIN_DIR:-}
if [ -z "$bin_dir" ]; then
  log "cargo build (portcullis-operator, portcullis-proxy, pod-app)"
  CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2} cargo build --locked --workspace --bins >&2
  bin_dir=$root/target/debug
fi
for b in portcullis-operator portcullis-proxy pod-app; do
  [ -x "$bin_dir/$b" ] || die "$bin_dir/$b is missing: build it with cargo build --workspace --bins"
done

# Stage stripped copies: debug binaries carry hundreds of MB of debug info.
stage=$root/.image-bin
rm -rf "$stage"; mkdir -p "$stage"
for b in portcullis-operator portcullis-proxy pod-app; do
  objcopy --strip-debug "$bin_dir/$b" "$stage/$b"
done

build() { # name file [build-args...]
  local name=$1 file=$2; shift 2
  local ref=localhost/$name:$tag archive
  log "buildah build $ref"
  buildah build --pull=never --layers -q -f "$file" "$@" -t "$ref" "$root" >/dev/null
  archive=$(mktemp "${TMPDIR:-/tmp}/$name.XXXXXX.tar")
  rm -f "$archive"
  buildah push -q "$ref" "oci-archive:$archive:$ref" >/dev/null
  ctr --address "$sock" -n k8s.io images import "$archive" >/dev/null
  rm -f "$archive"
}
build portcullis-operator images/operator.Dockerfile \
  --build-arg BINARY_FROM=prebuilt --build-arg RUNTIME_IMAGE=debian:12.11-slim
build portcullis-proxy images/proxy.Dockerfile \
  --build-arg BINARY_FROM=prebuilt --build-arg DEBIAN_SNAPSHOT=
build portcullis-e2e-tools e2e/node/tools.Containerfile --build-arg BINARY_FROM=prebuilt
rm -rf "$stage"
log "loaded into containerd: localhost/portcullis-{operator,proxy,e2e-tools}:$tag"
