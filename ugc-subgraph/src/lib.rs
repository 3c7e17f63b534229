//! ugc-subgraph: an Apollo Federation 2 subgraph serving reviews and ratings
//! of marketplace offers.
//!
//! # Layout
//!
//! Reads flow `http → graphql → loaders → cache (L1 → L2) → store`; writes
//! flow `graphql (mutation) → store (rows + outbox, one transaction) →
//! events (relay → L2 tokens, L1 stripes, NOTIFY → every instance's L1)`.
//!
//! - [`cli`]: the `ugc-subgraph` binary's subcommands (serve, migrate, seed, print-schema).
//! - [`config`]: every setting, from the environment, validated at start-up.
//! - [`server`], [`shutdown`]: the connection loop (connection cap, header-read timeout); SIGTERM
//!   drains in-flight requests.
//! - [`http`]: [`http::state::AppState`] (everything the service runs on, built once and shared by all
//!   requests), routes and the protection stack's tower layers ([`http::layers`]: client address,
//!   rate limits, load shedding); bearer-token auth ([`http::auth`]); trusted proxies ([`http::client`]);
//!   the request span and responses by status (`http/observe.rs`); what answers tell a cache in front
//!   (`http/cache_control.rs`: `Cache-Control`, Apollo Router cache tags).
//! - [`ratelimit`]: the quotas, per instance (governor) and shared by all instances (GCRA in Redis,
//!   spent locally in chunks).
//! - [`graphql`]: the schema (contract + federation entities); resolvers only call loaders and the store;
//!   [`graphql::cost`] refuses costly documents before execution (never expanding fragments);
//!   [`graphql::entity_cache`] answers the gateway's entity fetches from coherent rendered fragments.
//! - [`loaders`]: the only read path of resolvers; L1 fast path, DataLoader batching across requests,
//!   where the cache meets the store; the stale-read detector.
//! - [`cache`]: the tiered cache (moka L1, Redis L2): fenced fills, single-flight, leases,
//!   stale serving, XFetch, hot keys, negative results on their own budget, the L1 gate
//!   ([`cache::L1Gate`]: no L1 while the instance may be behind); knows nothing about SQL.
//! - [`redis`]: the instance's one Redis client, one server or a Redis Cluster (timeouts, circuit
//!   breaker), shared by L2 and the rate limits.
//! - [`store`]: all SQL: batched reads, keyset pages, transactional writes (with idempotency keys),
//!   the live-instance registry, seeding.
//! - [`domain`]: entities, validation rules, permissions, cursors (pure code).
//! - [`events`]: entity-change events, the cascade rule, the outbox relay, the LISTEN/NOTIFY fan-out,
//!   write visibility ([`events::visibility`]: heartbeats, acknowledgements, ticks), events from
//!   other subgraphs, and the forwarder of invalidations to a router in front ([`events::router`]).
//! - [`error`]: the error catalogue, mapped once to GraphQL codes and HTTP statuses.
//! - [`telemetry`]: logging set-up, OpenTelemetry traces ([`telemetry::traces`]: sampling, W3C trace
//!   context) and the metrics registry ([`telemetry::metrics`]).

pub mod cache;
pub mod cli;
pub mod config;
pub mod domain;
pub mod error;
pub mod events;
pub mod graphql;
pub mod http;
pub mod loaders;
pub mod ratelimit;
pub mod redis;
pub mod server;
pub mod shutdown;
pub mod store;
pub mod telemetry;
