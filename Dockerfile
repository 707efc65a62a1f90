# mati-sentinel as a long-running daemon (the vendor's Docker way): a cycle whenever one is due.
# Build: docker build -t mati-sentinel .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --release --locked --bin mati-sentinel

FROM debian:bookworm-slim
# CA roots for rustls' platform verifier; nothing else is needed at run time.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --home-dir /var/lib/mati-sentinel --create-home mati
COPY --from=build /src/target/release/mati-sentinel /usr/local/bin/mati-sentinel
USER 10001:10001
ENV STATE_DIR=/var/lib/mati-sentinel
VOLUME ["/var/lib/mati-sentinel"]
ENTRYPOINT ["/usr/local/bin/mati-sentinel"]
CMD ["daemon"]
