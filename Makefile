# Portcullis developer targets. Cargo does the Rust work; this file only drives the
# container images, the kind tier and the chart checks.
#
#   make images        build portcullis-operator and portcullis-proxy images (docker)
#   make kind-load     load those images into the kind cluster $(KIND_CLUSTER)
#   make kind-e2e      create a kind cluster, install the chart, run the kind tier, delete it
#   make chart-lint    helm lint (default and CI values) and the chart's envtest checks

SHELL := /usr/bin/env bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

REGISTRY        ?= ghcr.io/portcullis-dev
TAG             ?= dev
OPERATOR_IMAGE  ?= $(REGISTRY)/portcullis-operator:$(TAG)
PROXY_IMAGE     ?= $(REGISTRY)/portcullis-proxy:$(TAG)
PLATFORM        ?= linux/amd64
KIND_CLUSTER    ?= portcullis-e2e
# Pin base images by digest by overriding these with tag@sha256:... (see images/*.Dockerfile).
RUST_IMAGE            ?= rust:1.95.0-bookworm
RUNTIME_IMAGE         ?= gcr.io/distroless/static-debian12:nonroot
PROXY_RUNTIME_IMAGE   ?= debian:12.11-slim
SOURCE_DATE_EPOCH     ?= $(shell git log -1 --format=%ct 2>/dev/null || echo 0)
CHART           := charts/portcullis

export CARGO_BUILD_JOBS ?= 2

.PHONY: help
help:
	@sed -n 's/^#   make /  make /p' $(MAKEFILE_LIST)

.PHONY: check-docker
check-docker:
	@command -v docker >/dev/null 2>&1 || { \
	  echo "docker is not installed: see https://docs.docker.com/engine/install/ (Linux) or install Docker Desktop;" >&2; \
	  echo "the images need Docker with BuildKit (docker buildx, Docker 23+)." >&2; exit 1; }
	@docker info >/dev/null 2>&1 || { \
	  echo "docker is installed but its daemon is not reachable (docker info failed):" >&2; \
	  echo "start it (sudo systemctl start docker, or open Docker Desktop) and check you may use it (docker group)." >&2; exit 1; }
	@docker buildx version >/dev/null 2>&1 || { \
	  echo "docker buildx is missing: install the docker-buildx-plugin package (https://docs.docker.com/build/install-buildx/)." >&2; exit 1; }

.PHONY: images
images: check-docker
	docker buildx build --platform $(PLATFORM) --load \
	  -f images/operator.Dockerfile \
	  --build-arg RUST_IMAGE=$(RUST_IMAGE) --build-arg RUNTIME_IMAGE=$(RUNTIME_IMAGE) \
	  --build-arg SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) \
	  -t $(OPERATOR_IMAGE) .
	docker buildx build --platform $(PLATFORM) --load \
	  -f images/proxy.Dockerfile \
	  --build-arg RUST_IMAGE=$(RUST_IMAGE) --build-arg RUNTIME_IMAGE=$(PROXY_RUNTIME_IMAGE) \
	  --build-arg SOURCE_DATE_EPOCH=$(SOURCE_DATE_EPOCH) \
	  -t $(PROXY_IMAGE) .

.PHONY: check-kind
check-kind:
	@command -v kind >/dev/null 2>&1 || { \
	  echo "kind is not installed: go install sigs.k8s.io/kind@v0.27.0, or see https://kind.sigs.k8s.io/docs/user/quick-start/#installation" >&2; exit 1; }

.PHONY: kind-load
kind-load: check-kind
	kind load docker-image --name $(KIND_CLUSTER) $(OPERATOR_IMAGE) $(PROXY_IMAGE)

.PHONY: kind-e2e
kind-e2e: check-docker check-kind
	OPERATOR_IMAGE=$(OPERATOR_IMAGE) PROXY_IMAGE=$(PROXY_IMAGE) KIND_CLUSTER=$(KIND_CLUSTER) \
	  e2e/kind/run.sh

.PHONY: chart-lint
chart-lint:
	@command -v helm >/dev/null 2>&1 || { \
	  echo "helm is not installed: see https://helm.sh/docs/intro/install/ (or eval \"\$$(../shared/setup-tools.sh)\")" >&2; exit 1; }
	helm lint --strict $(CHART)
	for values in $(CHART)/ci/*-values.yaml e2e/kind/values.yaml; do \
	  helm lint --strict $(CHART) -f "$$values"; \
	done
	cargo build --workspace --bin portcullis-operator
	cargo test --workspace --test helm_chart
