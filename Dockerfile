# ugc-subgraph: a release build in a throw-away stage, then a small runtime
# image that runs as an unprivileged user. Migrations are embedded in the
# binary (sqlx::migrate!), so the image needs nothing else.
#
#   docker build -t ugc-subgraph .
#   docker run -e DATABASE_URL=… -e REDIS_URL=… -p 4001:4001 ugc-subgraph
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml ./
COPY ugc-subgraph ugc-subgraph
COPY migrations migrations
RUN cargo build --release --locked -p ugc-subgraph \
 && strip target/release/ugc-subgraph

FROM debian:bookworm-slim
RUN useradd --system --no-create-home --uid 10001 ugc
COPY --from=build /src/target/release/ugc-subgraph /usr/local/bin/ugc-subgraph
USER 10001:10001
ENV UGC_LISTEN=0.0.0.0:4001 \
    UGC_LOG_FORMAT=json
EXPOSE 4001
ENTRYPOINT ["/usr/local/bin/ugc-subgraph"]
CMD ["serve"]
