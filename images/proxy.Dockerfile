# syntax=docker/dockerfile:1.7
#
# The Portcullis sidecar: a static (musl) `portcullis-proxy` on debian-slim with
# iptables (the injected init step, `portcullis-proxy init`, runs iptables-save and
# iptables-restore). The proxy runs as uid 2102, the uid the injector sets and the
# iptables rules exempt from redirection. Build from the repository root
# (`make images`):
#
#   docker buildx build -f images/proxy.Dockerfile \
#     --build-arg SOURCE_DATE_EPOCH=$(git log -1 --format=%ct) -t portcullis-proxy:dev .
#
# Reproducible: toolchain from rust-toolchain.toml, --locked, fixed paths, Debian
# packages from a dated snapshot.debian.org archive (DEBIAN_SNAPSHOT), and
# SOURCE_DATE_EPOCH for timestamps (BuildKit >= 0.11; add
# --output type=docker,rewrite-timestamp=true for byte-identical layers).
#
# Base images are pinned by tag. To pin by digest as well, resolve the tag once and pass
# (or write) the tag@digest form, e.g.
#   docker buildx imagetools inspect debian:12.11-slim --format '{{json .Manifest.Digest}}'
#   make images PROXY_RUNTIME_IMAGE=debian:12.11-slim@sha256:<digest>

ARG RUST_IMAGE=rust:1.95.0-bookworm
# Where the binary comes from: `builder` (compiled here, the published path) or
# `prebuilt` (a binary built on the host and staged in .image-bin/, for machines
# without the Rust image or the musl target: e2e/node/images.sh uses it). The
# runtime stage below is the same either way.
ARG BINARY_FROM=builder
ARG RUNTIME_IMAGE=debian:12.11-slim

FROM ${RUST_IMAGE} AS builder
ARG TARGETARCH
ARG SOURCE_DATE_EPOCH=0
ENV CARGO_INCREMENTAL=0 \
    CARGO_TERM_COLOR=never \
    CARGO_NET_RETRY=5 \
    SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH}
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
      cargo build --release --locked --target "$target" -p portcullis-sidecar --bin portcullis-proxy; \
    install -D -m 0755 "target/$target/release/portcullis-proxy" /out/portcullis-proxy; \
    touch -d "@${SOURCE_DATE_EPOCH}" /out/portcullis-proxy

# Host-built binary (BINARY_FROM=prebuilt): .image-bin/portcullis-proxy.
FROM scratch AS prebuilt
COPY .image-bin/portcullis-proxy /out/portcullis-proxy

FROM ${BINARY_FROM} AS binary

FROM ${RUNTIME_IMAGE}
ARG DEBIAN_SNAPSHOT=20250601T000000Z
ARG SOURCE_DATE_EPOCH=0
LABEL org.opencontainers.image.title="portcullis-proxy" \
      org.opencontainers.image.description="Portcullis sidecar proxy" \
      org.opencontainers.image.source="https://github.com/portcullis-dev/portcullis" \
      org.opencontainers.image.licenses="Apache-2.0"
# iptables from a fixed snapshot (DEBIAN_SNAPSHOT empty: the base image's own apt
# sources, for builds where snapshot.debian.org is out of reach); no apt lists or logs
# left behind.
RUN set -eux; \
    if [ -n "$DEBIAN_SNAPSHOT" ]; then \
    printf 'Types: deb\nURIs: http://snapshot.debian.org/archive/debian/%s\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\nTypes: deb\nURIs: http://snapshot.debian.org/archive/debian-security/%s\nSuites: bookworm-security\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
      "$DEBIAN_SNAPSHOT" "$DEBIAN_SNAPSHOT" > /etc/apt/sources.list.d/debian.sources; \
    fi; \
    apt-get -o Acquire::Check-Valid-Until=false update; \
    apt-get install -y --no-install-recommends iptables; \
    rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log /var/cache/ldconfig/aux-cache; \
    groupadd --system --gid 2102 portcullis; \
    useradd --system --uid 2102 --gid 2102 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin portcullis
COPY --from=binary --chown=0:0 /out/portcullis-proxy /usr/local/bin/portcullis-proxy
USER 2102:2102
# inbound, outbound, admin
EXPOSE 4143 4140 4191
# The injector sets the arguments (`init ...` for the init step, `run ...` for the proxy).
ENTRYPOINT ["/usr/local/bin/portcullis-proxy"]
