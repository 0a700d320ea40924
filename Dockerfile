# Stitch: one image with all three programs — stitch-api, stitch-worker and the stitch CLI.
#
#   docker build -t stitch .
#   docker run --rm stitch stitch-api --help
#
# Layers, in the order they change least often:
#   1. the workspace manifests and the lock file, with stub sources: builds every dependency
#      of the three programs (the slow part) and is reused until a manifest or Cargo.lock
#      changes;
#   2. the real sources of the crates the programs are made of (common, api, worker, cli);
#   3. a small Debian runtime with the binaries, run as an unprivileged numeric user.
# The test crate deploy-check (tests/dockerfile.rs) checks that every workspace member and
# every target path a manifest declares is stubbed here, and that every COPY source exists.

FROM rust:1-bookworm AS builder
WORKDIR /src
# The release profile keeps line tables for profiling on a developer's machine (stitch-api:
# 84 MB); the image's programs go without debug info (14 MB; the same settings for both
# builds below, so the dependency layer stays valid).
ENV CARGO_PROFILE_RELEASE_DEBUG=false \
    CARGO_PROFILE_RELEASE_STRIP=debuginfo

# 1. Dependencies. Cargo loads every workspace member's manifest, so all of them are copied
#    and each declared target gets a stub; only the three programs are built.
COPY Cargo.toml Cargo.lock ./
COPY common/Cargo.toml common/Cargo.toml
COPY api/Cargo.toml api/Cargo.toml
COPY worker/Cargo.toml worker/Cargo.toml
COPY cli/Cargo.toml cli/Cargo.toml
COPY testkit/Cargo.toml testkit/Cargo.toml
COPY e2e/Cargo.toml e2e/Cargo.toml
COPY bench/Cargo.toml bench/Cargo.toml
COPY deploy-check/Cargo.toml deploy-check/Cargo.toml
COPY xtask/Cargo.toml xtask/Cargo.toml
COPY soak/Cargo.toml soak/Cargo.toml
RUN set -eu; \
    for f in \
        common/src/lib.rs \
        api/src/lib.rs api/src/main.rs \
        worker/src/lib.rs worker/src/main.rs \
        cli/src/lib.rs cli/src/main.rs \
        testkit/src/lib.rs \
        e2e/src/lib.rs e2e/src/bin/api.rs e2e/src/bin/worker.rs \
        bench/src/lib.rs bench/src/main.rs \
        deploy-check/src/lib.rs deploy-check/src/bin/config-check.rs \
        xtask/src/main.rs \
        soak/src/lib.rs soak/src/main.rs \
    ; do mkdir -p "$(dirname "$f")"; echo 'fn main() {}' > "$f"; done
RUN cargo build --release --locked -p stitch-api -p stitch-worker -p stitch-cli

# 2. Stitch itself, and the migration steps common embeds (include_str!). COPY keeps the files' own modification times, which may be older than
#    the stubs' build: cleaning the workspace crates makes cargo rebuild them from the real
#    sources instead of trusting the stubs' fingerprints.
COPY common common
COPY api api
COPY worker worker
COPY cli cli
COPY migrations migrations
RUN cargo clean --release -p stitch-common -p stitch-api -p stitch-worker -p stitch-cli \
    && cargo build --release --locked -p stitch-api -p stitch-worker -p stitch-cli

# 3. Runtime. curl is here for container health checks (`curl -fsS .../readyz`); the
#    programs themselves need only glibc and the CA certificates (webhooks over HTTPS).
FROM debian:bookworm-slim AS runtime
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 stitch \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin stitch \
    && mkdir /data \
    && chown 10001:10001 /data
COPY --from=builder /src/target/release/stitch-api /usr/local/bin/stitch-api
COPY --from=builder /src/target/release/stitch-worker /usr/local/bin/stitch-worker
COPY --from=builder /src/target/release/stitch /usr/local/bin/stitch

# Shared storage: chunks and merged files (a ReadWriteMany volume when distributed). An empty
# named volume mounted here takes the directory's owner, so uid 10001 can write to it.
ENV STITCH__STORAGE__ROOT=/data
VOLUME /data
# A numeric user, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
# stitch-api listens on 8080, stitch-worker's probes and metrics on 8081, once their
# STITCH__HTTP__BIND says 0.0.0.0 (the programs' own default is loopback).
EXPOSE 8080 8081
CMD ["stitch-api"]
