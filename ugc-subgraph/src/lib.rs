//! ugc-subgraph: an Apollo Federation 2 subgraph serving reviews and ratings
//! of marketplace offers.
//!
//! # Layout
//!
//! Reads flow `http → graphql → loaders → store`; writes flow
//! `graphql (mutation) → store (rows + outbox, one transaction)`.
//!
//! - [`cli`]: the `ugc-subgraph` binary's subcommands (serve, migrate, seed, print-schema).
//! - [`config`]: every setting, from the environment, validated at start-up.
//! - [`state`]: [`state::AppState`], built once and shared by all requests.
//! - [`server`], [`shutdown`]: serving a listener; SIGTERM drains in-flight requests.
//! - [`http`]: routes and tower layers; bearer-token auth ([`http::auth`]).
//! - [`graphql`]: the schema (contract + federation entities); resolvers only call loaders and the store.
//! - [`loaders`]: DataLoaders, the only read path of resolvers; batch across requests.
//! - [`store`]: all SQL: batched reads, keyset pages, transactional writes, seeding.
//! - [`domain`]: entities, validation rules, permissions, cursors (pure code).
//! - [`events`]: entity-change events written to the outbox.
//! - [`error`]: the error catalogue, mapped once to GraphQL codes and HTTP statuses.
//! - [`telemetry`]: logging set-up and the metrics registry.

pub mod cache;
pub mod cli;
pub mod config;
pub mod domain;
pub mod error;
pub mod events;
pub mod graphql;
pub mod http;
pub mod loaders;
pub mod server;
pub mod shutdown;
pub mod state;
pub mod store;
pub mod telemetry;
