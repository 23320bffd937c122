# cmdflow container image: the one `cmdflow` binary, which runs every role.
#
#   docker build -t cmdflow:dev .
#   docker run --rm -p 8080:8080 -e CMDFLOW_DATABASE_URL=... cmdflow:dev            # gateway
#   docker run --rm -e CMDFLOW_DATABASE_URL=... cmdflow:dev worker                    # or scheduler, migrate
#
# Needs BuildKit (the default builder since Docker 23) for the cache mounts below. Kubernetes
# manifests that run this image: k8s/ (see k8s/README.md). scripts/k8s-validate.sh checks the
# rules below (pinned bases, stripped binary, cached dependency layer) without building.

# ---- base images, pinned ------------------------------------------------------------------------
# An exact Rust release on Debian 12 (the workspace's rust-version is 1.94), the same Debian
# (glibc) as the runtime image. distroless publishes no version tags, so the runtime is pinned by
# digest (the multi-arch `nonroot` index); refresh it deliberately with
#   docker buildx imagetools inspect gcr.io/distroless/cc-debian12:nonroot
ARG RUST_IMAGE=rust:1.95.0-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f
ARG CARGO_CHEF_VERSION=0.1.78

# ---- chef: the Rust toolchain plus cargo-chef -----------------------------------------------------
FROM ${RUST_IMAGE} AS chef
ARG CARGO_CHEF_VERSION
RUN cargo install cargo-chef --locked --version "${CARGO_CHEF_VERSION}"
WORKDIR /src
# The image's release build, for `cook` and `build` alike (they must agree, or the cooked
# dependencies are not reused). Stripped here rather than in Cargo.toml's [profile.release]:
# local release builds keep their line tables for profiling and benchmarks (bench/), while the
# image drops debug info and symbols (about 143 MB -> 26 MB; a panic still prints its message and
# location). Not compiling the line tables at all also makes the image build faster.
ENV CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=symbols

# ---- planner: the dependency recipe (Cargo.toml files and Cargo.lock only) -----------------------
FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

# ---- builder: dependencies in their own layer, then the workspace ---------------------------------
FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
# This layer changes only when a manifest or Cargo.lock does: a source change recompiles the
# workspace crates alone.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    cargo chef cook --release --locked -p cmdflow --recipe-path recipe.json
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    cargo build --release --locked -p cmdflow \
 && install -D -m 0755 target/release/cmdflow /out/cmdflow

# ---- runtime --------------------------------------------------------------------------------------
# distroless/cc: glibc, libgcc, CA certificates, tzdata; no shell, no package manager. The binary
# links only libc, libm and libgcc_s; migrations are embedded in it.
FROM ${RUNTIME_IMAGE}
LABEL org.opencontainers.image.title="cmdflow" \
      org.opencontainers.image.description="Durable command/event workflows on PostgreSQL, RabbitMQ and Redis" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/cmdflow /usr/local/bin/cmdflow
# 65532 is distroless's `nonroot`; numeric, so Kubernetes can verify runAsNonRoot.
USER 65532:65532
# In a container the gateway must listen on every interface (the binary's default is 127.0.0.1).
ENV CMDFLOW_HTTP_ADDR=0.0.0.0:8080
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/cmdflow"]
CMD ["gateway"]
