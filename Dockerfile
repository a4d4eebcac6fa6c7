# etag-gateway image: both binaries (etag-gateway, demo-backend), run as a non-root user.
#
#   docker build -t etag-gateway .
#   docker run --rm -p 127.0.0.1:8080:8080 \
#     -v "$PWD/conf/compose/gateway.toml:/etc/etag-gateway/gateway.toml:ro" etag-gateway
#
# The configuration is read from /etc/etag-gateway/gateway.toml, to be mounted (see conf/gateway.toml
# for every key; the image carries it as /usr/share/doc/etag-gateway/gateway.toml). The HEALTHCHECK
# asks the admin listener, so the mounted file should have [admin] listen = "0.0.0.0:9091".
# /var/lib/etag-gateway (owned by the gateway's user) is for [store] snapshot: mount a volume there to
# keep the memory table's etags across a clean restart.
# docker-compose.yml runs the whole stack (demo backend, gateway, Redis-backed replicas).

# ---- build ----------------------------------------------------------------------------------------
FROM rust:1-bookworm AS build
# cmake: Pingora's zlib-ng. (gcc, make, pkg-config are in the image already.)
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src

# Dependencies first, in their own layer: a source change does not rebuild them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src/bin \
    && echo 'fn main() {}' > src/main.rs \
    && echo 'fn main() {}' > src/bin/demo-backend.rs \
    && touch src/lib.rs \
    && cargo build --release --locked --bins \
    && rm -rf src

COPY src ./src
# touch: the real sources must be newer than the placeholders built above.
RUN touch src/lib.rs src/main.rs src/bin/demo-backend.rs \
    && cargo build --release --locked --bins \
    && mkdir /out \
    && cp target/release/etag-gateway target/release/demo-backend /out/ \
    && objcopy --strip-debug /out/etag-gateway \
    && objcopy --strip-debug /out/demo-backend

# ---- run ------------------------------------------------------------------------------------------
FROM debian:bookworm-slim
# The system's CAs, for https:// upstreams (verified against them unless a ca_file is given).
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --gid 10001 etag \
    && useradd --uid 10001 --gid etag --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin etag \
    && mkdir -p /etc/etag-gateway /usr/share/doc/etag-gateway /var/lib/etag-gateway \
    && chown etag:etag /var/lib/etag-gateway
COPY --from=build /out/etag-gateway /out/demo-backend /usr/local/bin/
COPY docker/http-healthcheck /usr/local/bin/http-healthcheck
COPY conf/gateway.toml /usr/share/doc/etag-gateway/gateway.toml

USER etag
# 8080: the proxy ([server] listen); 9091: the admin listener ([admin] listen: /healthz, /metrics).
EXPOSE 8080 9091
# Bash builtins only (no curl in the image): GET /healthz on the admin listener must answer 2xx.
HEALTHCHECK --interval=10s --timeout=5s --start-period=10s --retries=3 \
    CMD ["http-healthcheck", "9091", "/healthz"]
# SIGTERM: in-flight requests get [server] grace_period_seconds to finish (give `docker stop` more).
STOPSIGNAL SIGTERM
ENTRYPOINT ["etag-gateway"]
CMD ["--config", "/etc/etag-gateway/gateway.toml"]
