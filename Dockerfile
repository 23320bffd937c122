# cmdflow container image: the one `cmdflow` binary, which runs every role.
#
#   docker build -t cmdflow:dev .
#   docker run --rm -p 8080:8080 -e CMDFLOW_DATABASE_URL=... cmdflow:dev            # gateway
#   docker run --rm -e CMDFLOW_DATABASE_URL=... cmdflow:dev worker                    # or scheduler, migrate
#
# Needs BuildKit (the default builder since Docker 23) for the cache mounts below. Kubernetes
# manifests that run this image: k8s/ (see k8s/README.md).

# ---- build ----------------------------------------------------------------------------------------
# The workspace's rust-version is 1.94; `rust:1-bookworm` is the newest stable 1.x on Debian 12,
# the same Debian (glibc) as the runtime image. Pin e.g. rust:1.94-bookworm for reproducible builds.
ARG RUST_IMAGE=rust:1-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

FROM ${RUST_IMAGE} AS builder
WORKDIR /src
COPY . .
# Cache mounts keep the crates.io downloads and the compiled dependencies between builds, so a
# source change recompiles only the workspace crates. The binary is copied out of the cached
# target/ within the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
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
