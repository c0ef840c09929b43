# syntax=docker/dockerfile:1
# The stockgate image: built in the Rust image, run as a non-root user in a
# distroless base (no shell, no package manager).
#
#   docker build --build-arg GIT_REVISION=$(git rev-parse --short=12 HEAD) -t stockgate:dev .
#
# `.git` is not sent to the build (see .dockerignore), so the revision shown
# by `stockgate --version`, the start-up log line and `stockgate_build_info`
# comes from the GIT_REVISION build argument.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
# libsqlite3: the embedded profile's store (diesel links the system library).
RUN apt-get update \
 && apt-get install -y --no-install-recommends libsqlite3-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
ARG GIT_REVISION=unknown
# Cache mounts keep the registry and the target directory between builds,
# so a source change rebuilds only this crate.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    GIT_REVISION=${GIT_REVISION} cargo build --release --locked --bin stockgate \
 && mkdir /out \
 && cp target/release/stockgate /out/ \
 && cp -L "/usr/lib/$(gcc -print-multiarch)/libsqlite3.so.0" /out/

# glibc and libgcc only; `nonroot` is uid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/libsqlite3.so.0 /usr/lib/libsqlite3.so.0
COPY --from=build /out/stockgate /usr/local/bin/stockgate
USER 65532:65532
# Callers (gRPC), operators (gRPC, when admin.listen is set), metrics (HTTP).
EXPOSE 50051 50052 9464
ENTRYPOINT ["/usr/local/bin/stockgate"]
CMD ["serve"]
