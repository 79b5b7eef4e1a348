# syntax=docker/dockerfile:1.7
#
# The Portcullis operator: a static (musl) `portcullis-operator` on distroless/static,
# running as uid 65532. Build from the repository root (`make images`):
#
#   docker buildx build -f images/operator.Dockerfile \
#     --build-arg SOURCE_DATE_EPOCH=$(git log -1 --format=%ct) -t portcullis-operator:dev .
#
# Reproducible: the toolchain matches rust-toolchain.toml, dependencies come from
# Cargo.lock (--locked), paths are fixed (/src), and SOURCE_DATE_EPOCH clamps file and
# image timestamps (BuildKit >= 0.11; add --output type=docker,rewrite-timestamp=true
# for byte-identical layers).
#
# Base images are pinned by tag. To pin by digest as well, resolve the tag once and pass
# (or write) the tag@digest form, e.g.
#   docker buildx imagetools inspect gcr.io/distroless/static-debian12:nonroot --format '{{json .Manifest.Digest}}'
#   make images RUNTIME_IMAGE=gcr.io/distroless/static-debian12:nonroot@sha256:<digest>
# Renovate/Dependabot keep tag@digest pins current.

ARG RUST_IMAGE=rust:1.95.0-bookworm
# Where the binary comes from: `builder` (compiled here, the published path) or
# `prebuilt` (a binary built on the host and staged in .image-bin/, for machines
# without the Rust image or the musl target: e2e/node/images.sh uses it). The
# runtime stage below is the same either way.
ARG BINARY_FROM=builder
ARG RUNTIME_IMAGE=gcr.io/distroless/static-debian12:nonroot

FROM ${RUST_IMAGE} AS builder
ARG TARGETARCH
ARG SOURCE_DATE_EPOCH=0
ENV CARGO_INCREMENTAL=0 \
    CARGO_TERM_COLOR=never \
    CARGO_NET_RETRY=5 \
    SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH}
# musl-tools: ring's C and assembly parts for the static target.
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=portcullis-target-${TARGETARCH} \
    set -eux; \
    case "${TARGETARCH:-amd64}" in \
      amd64) target=x86_64-unknown-linux-musl ;; \
      arm64) target=aarch64-unknown-linux-musl ;; \
      *) echo "unsupported TARGETARCH ${TARGETARCH}" >&2; exit 1 ;; \
    esac; \
    rustup target add "$target"; \
    RUSTFLAGS="-C target-feature=+crt-static --remap-path-prefix=/src=. --remap-path-prefix=/usr/local/cargo=cargo" \
      cargo build --release --locked --target "$target" -p portcullis-operator --bin portcullis-operator; \
    install -D -m 0755 "target/$target/release/portcullis-operator" /out/portcullis-operator; \
    touch -d "@${SOURCE_DATE_EPOCH}" /out/portcullis-operator

# Host-built binary (BINARY_FROM=prebuilt): .image-bin/portcullis-operator.
FROM scratch AS prebuilt
COPY .image-bin/portcullis-operator /out/portcullis-operator

FROM ${BINARY_FROM} AS binary

FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="portcullis-operator" \
      org.opencontainers.image.description="Portcullis Kubernetes operator" \
      org.opencontainers.image.source="https://github.com/portcullis-dev/portcullis" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=binary --chown=0:0 /out/portcullis-operator /usr/local/bin/portcullis-operator
USER 65532:65532
# metrics/health, identity, policy, webhook
EXPOSE 8080 8443 8090 9443
ENTRYPOINT ["/usr/local/bin/portcullis-operator"]
CMD ["run"]
