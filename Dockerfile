# syntax=docker/dockerfile:1
# unilog in a container: a Rust builder stage, then a slim runtime with the binary only.
#
#   docker build -t unilog .
#   docker run --rm -e PG_URL -e KAFKA_BROKERS -e SCHEMA_REGISTRY_URL \
#     -v "$PWD/pipeline:/etc/unilog:ro" -v unilog-state:/var/lib/unilog \
#     unilog run --config /etc/unilog/pipeline.yaml
#
# The default build links librdkafka with OpenSSL (the `kafka-tls` feature), so SSL, SASL_SSL and
# SCRAM work. State belongs on a volume: /var/lib/unilog (state_dir: /var/lib/unilog), or /app/.unilog
# for the bundled config/demo.yaml. docker-compose.yml runs the demo pipeline with this image.
# scripts/check-compose checks this file's shape without an engine.

ARG RUST_VERSION=1.95
ARG DEBIAN=bookworm

FROM rust:${RUST_VERSION}-${DEBIAN} AS builder
# What the rdkafka crate needs to build librdkafka with its own configure and make (no cmake),
# with zlib and OpenSSL from the system (the same packages as `scripts/stack build-deps`).
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        build-essential pkg-config libssl-dev zlib1g-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin unilog \
    && install -m 0755 target/release/unilog /usr/local/bin/unilog

FROM debian:${DEBIAN}-slim AS runtime
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates libssl3 zlib1g \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/unilog --shell /usr/sbin/nologin unilog \
    && mkdir -p /var/lib/unilog /app/.unilog \
    && chown unilog:unilog /var/lib/unilog /app/.unilog
COPY --from=builder /usr/local/bin/unilog /usr/local/bin/unilog
COPY config/ /app/config/
WORKDIR /app
USER unilog:unilog
VOLUME ["/var/lib/unilog"]
# /metrics, /health, /ready when the pipeline file has `http: { listen: 0.0.0.0:9187 }`
EXPOSE 9187
STOPSIGNAL SIGTERM
ENTRYPOINT ["unilog"]
CMD ["--help"]
