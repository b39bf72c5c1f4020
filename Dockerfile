# One image, roles by subcommand: `switchyard serve`, `switchyard worker`, `switchyard cluster status`.
#
#   docker build -t switchyard:dev .
#   docker build --build-arg VARIANT=cuda -t switchyard:dev-cuda .
#
# VARIANT=cuda builds with `--features cuda` on NVIDIA's CUDA runtime image, which carries cuBLAS,
# NVRTC and NCCL (cudarc loads them and the driver at run time, so the build stage needs no
# toolkit). The build runs the same
# `cargo build --release --locked -p switchyard` as scripts/test.sh's release checks.
ARG VARIANT=cpu
ARG RUST_IMAGE=rust:1.95-bookworm
ARG CPU_BASE=debian:bookworm-slim
ARG CUDA_BASE=nvidia/cuda:12.4.1-runtime-ubuntu22.04

FROM ${RUST_IMAGE} AS build
ARG VARIANT
# protoc and protobuf's well-known .proto files: tonic's and etcd-client's code generation.
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    FEATURES=""; if [ "$VARIANT" = "cuda" ]; then FEATURES="--features cuda"; fi; \
    cargo build --release --locked -p switchyard $FEATURES \
 && install -D target/release/switchyard /out/switchyard

FROM ${CPU_BASE} AS run-cpu
FROM ${CUDA_BASE} AS run-cuda

FROM run-${VARIANT}
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin switchyard
COPY --from=build /out/switchyard /usr/local/bin/switchyard
USER 10001:10001
# API (serve) and expert gRPC (worker).
EXPOSE 8000 7001
ENTRYPOINT ["/usr/local/bin/switchyard"]
CMD ["--help"]
