# One image with every recpipe binary; each service picks its command.
# Build: docker build -t recpipe:latest .
FROM rust:1.95-bookworm AS build
WORKDIR /src
# librdkafka (bundled by rdkafka) builds with make and a C/C++ toolchain and links
# OpenSSL (libssl-dev, pkg-config), all present in this image.
COPY . .
RUN cargo build --release --locked --bins \
    && mkdir -p /out \
    && cp target/release/update-embeddings target/release/gen-recommendations \
          target/release/save-worker target/release/query-api \
          target/release/recpipe-admin target/release/recpipe-train /out/

FROM debian:bookworm-slim
# curl serves the container health checks; libssl3 is the OpenSSL librdkafka links.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --home-dir /var/lib/recpipe --create-home recpipe \
    && install -d -o recpipe -g recpipe /var/lib/recpipe/catalog
COPY --from=build /out/ /usr/local/bin/
COPY configuration /etc/recpipe/configuration
ENV RECPIPE_CONFIG_DIR=/etc/recpipe/configuration \
    RECPIPE_CATALOG__DIR=/var/lib/recpipe/catalog \
    RECPIPE_TELEMETRY__JSON=true
WORKDIR /var/lib/recpipe
USER 10001:10001
CMD ["query-api"]
