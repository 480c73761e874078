# klarify-sync container image. See docs/container.md.
#
#   podman build --format docker -t klarify-sync .     # or: docker build -t klarify-sync .
#   docker run -d -v klarify-data:/data -e KLARIFY_ACCESS_KEY -p 8080:8080 klarify-sync
#   docker run --rm -v klarify-data:/data -e KLARIFY_ACCESS_KEY klarify-sync --backfill
#
# RUST_VERSION picks the builder image; the default matches the toolchain the CI machine's
# stand-in rust image is made from (.ci/container-smoke passes the host's exact version).
ARG RUST_VERSION=1.95

# ---- builder --------------------------------------------------------------------------------
# -bookworm so that the binary links against the same glibc as the runtime image.
FROM rust:${RUST_VERSION}-slim-bookworm AS builder
WORKDIR /build
# Only what the build reads (.dockerignore keeps the rest out): the manifests, the stand-in
# that Cargo.toml's [patch] names, the sources, the migrations (embedded by sqlx::migrate!;
# build.rs rebuilds when they change) and config/default.toml (embedded by include_str!).
# klarify-fake's sources are built in: the image's `--demo` serves its sample organisation. Of
# the bench, a workspace member the image does not ship, only the manifest: Cargo reads every
# member's to load the workspace, and builds nothing of it here.
COPY Cargo.toml Cargo.lock build.rs ./
COPY patches ./patches
COPY migrations ./migrations
COPY config ./config
COPY src ./src
COPY klarify-fake/Cargo.toml ./klarify-fake/
COPY klarify-fake/src ./klarify-fake/src
COPY bench/Cargo.toml ./bench/
# The crate registry and the target directory live in build caches, so a source change rebuilds
# only the crates it touched and a Cargo.lock change only the crates that changed. The binary is
# copied out of the cache mount (which is not part of the layer).
RUN --mount=type=cache,id=klarify-sync-cargo-registry,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,id=klarify-sync-target,target=/build/target,sharing=locked \
    cargo build --release --locked -p klarify-sync --bin klarify-sync \
    && install -D -m 0755 target/release/klarify-sync /out/klarify-sync \
    && strip --strip-debug /out/klarify-sync

# ---- runtime --------------------------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates: the system trust store, which the binary trusts for HTTPS besides the Mozilla
# roots compiled into it; add a private or proxy CA here.
# Not version-pinned on purpose: a pin to a Debian revision breaks at the next security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 klarify \
    && useradd --uid 10001 --gid klarify --home-dir /data --no-create-home --no-log-init \
        --shell /usr/sbin/nologin klarify \
    && mkdir -p /data \
    && chown klarify:klarify /data

COPY --from=builder /out/klarify-sync /usr/local/bin/klarify-sync

# The working directory holds the image's own ./config/default.toml (the built-in defaults,
# owned by root, not writable by the service). It is not the data volume: whoever can write
# the volume could otherwise drop a config/default.toml there that points klarify.base_url at
# their own host and receive the access key. Extra settings: `--config FILE` or
# KLARIFY_SYNC_CONFIG=FILE (mounted read-only), or KLARIFY_SYNC__* variables.
WORKDIR /app
COPY config/default.toml /app/config/default.toml
# Only the SQLite file, its WAL and its lock files are written, all under /data.
VOLUME ["/data"]
ENV KLARIFY_SYNC__HTTP__LISTEN=0.0.0.0:8080 \
    DATABASE_URL=sqlite:///data/klarify.db
USER 10001:10001
EXPOSE 8080
# `klarify-sync healthcheck` reads the same configuration and asks the daemon's /healthz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["klarify-sync", "healthcheck"]
# Arguments go to the binary: no arguments = the daemon; `--once`, `--backfill`, `--demo`, ...
ENTRYPOINT ["klarify-sync"]
