//! Integration tests: real Postgres, real HTTP, one database per test.
//! Files are named by the behaviour they check.

mod bad_input;
mod bounded_events;
mod cache;
mod cluster;
mod coherence;
mod deploy;
mod entity_shapes;
mod gateway;
mod http_surface;
mod lifecycle;
mod mutations;
mod protection;
mod reads;
mod redis_cluster;
mod replica;
mod router_cache;
mod schema;
mod seed;
mod sql_bound;
mod support;
mod traces;
mod visibility;
