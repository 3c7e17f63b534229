//! Every Prometheus metric the service exports, named in one place.
//!
//! Labels are bounded by construction: they take `&'static str` values chosen
//! in code (statement names, loader names, layers), never ids or anything a
//! request controls.

use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

type Labels = [(&'static str, &'static str); 1];
type Labels2 = [(&'static str, &'static str); 2];
type Labels3 = [(&'static str, &'static str); 3];

fn latency_histogram() -> Histogram {
    // 50 µs … ~1.6 s.
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

fn size_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 11))
}

/// The process's metrics. Cheap to update: atomics behind `Arc`s.
pub struct Metrics {
    registry: Registry,
    /// SQL statements executed, by statement name.
    pub sql_statements: Family<Labels, Counter>,
    /// SQL statement latency, by statement name.
    pub sql_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    /// SQL statements that failed, by statement name.
    pub sql_errors: Family<Labels, Counter>,
    /// Keys per DataLoader batch, by loader.
    pub loader_batch_size: Family<Labels, Histogram, fn() -> Histogram>,
    /// GraphQL request latency, by operation type, operation name (only
    /// names on `UGC_METRICS_OPERATIONS`, else `other`) and outcome.
    pub graphql_seconds: Family<Labels3, Histogram, fn() -> Histogram>,
    /// Requests turned away before execution (body too large, bad JSON, ...), by reason.
    pub http_rejections: Family<Labels, Counter>,
    /// Requests in flight.
    pub in_flight: Gauge,
    /// HTTP responses, by route (the fixed set served) and status class.
    pub http_responses: Family<Labels2, Counter>,
    /// Cache lookups by layer (l1, l2, db), kind and result (hit, miss, stale).
    pub cache_requests: Family<Labels3, Counter>,
    /// L1 weighted size in bytes, and entries (refreshed at each scrape).
    pub l1_bytes: Gauge,
    pub l1_entries: Gauge,
    /// L1 entries evicted for size.
    pub l1_evictions: Counter,
    /// Redis calls made (one round trip each: pipelines and scripts
    /// count once), by operation.
    pub redis_calls: Family<Labels, Counter>,
    /// Redis calls that failed or timed out, by operation.
    pub redis_errors: Family<Labels, Counter>,
    /// Redis Cluster invalidations a master's replica did not acknowledge in time.
    pub redis_unreplicated: Counter,
    /// Redis circuit breaker: 0 closed, 1 half-open, 2 open.
    pub redis_breaker_state: Gauge,
    /// Requests that waited for another request's load of the same key.
    pub singleflight_waits: Counter,
    /// Keys whose cross-instance lease was held by another instance.
    pub lease_contention: Counter,
    /// Stale entries served, by reason (revalidate, db_error).
    pub stale_served: Family<Labels, Counter>,
    /// Early (XFetch) and stale-while-revalidate background refreshes.
    pub refreshes: Family<Labels, Counter>,
    /// Keys that became hot.
    pub hot_keys: Counter,
    /// Cache values that failed to decode (treated as misses).
    pub decode_errors: Counter,
    /// Fills refused because an invalidation happened during the load, by layer.
    pub fills_refused: Family<Labels, Counter>,
    /// Keys preloaded into L1 at start-up.
    pub warmup_keys: Counter,
    /// Outbox events relayed (L2 invalidated + notified), by this instance.
    pub events_relayed: Counter,
    /// Invalidation notifications applied to this instance's L1.
    pub events_applied: Counter,
    /// Commit → L1 eviction on this instance, seconds.
    pub invalidation_lag: Histogram,
    /// Whole-L1 drops after a lost event stream.
    pub l1_dropped: Counter,
    /// Cache hits sampled and checked against Postgres.
    pub stale_read_checks: Counter,
    /// Sampled hits older than the committed row by more than the window.
    pub stale_reads: Counter,
    /// Events accepted on POST /events, by outcome (applied, duplicate, conflict).
    pub external_events: Family<Labels, Counter>,
    /// Requests refused by a rate limit, by quota (read, write, user_write,
    /// events) and by which limit decided (local, shared).
    pub rate_limited: Family<Labels2, Counter>,
    /// Shared-budget requests to Redis, by outcome (granted, denied, unavailable).
    pub rate_limit_budget_calls: Family<Labels, Counter>,
    /// Requests shed (503) because the concurrency limit was reached.
    pub load_shed: Counter,
    /// Operations refused by a query cost limit before execution, by limit.
    pub cost_rejections: Family<Labels, Counter>,
    /// Negative results (unknown ids, empty pages) written to L2: only
    /// those read again, so a flood of random ids stays out of Redis.
    pub negative_promotions: Counter,
    /// Time a mutation waited for every live instance to acknowledge its
    /// invalidation, by outcome (acknowledged, timeout).
    pub write_visibility_wait: Family<Labels, Histogram, fn() -> Histogram>,
    /// Mutations that answered after the visibility time-out (some instance
    /// did not acknowledge; it serves no L1 until caught up).
    pub write_visibility_timeouts: Counter,
    /// Live instances (this one included), as last read by a writer.
    pub instances_live: Gauge,
    /// Acknowledgement notifications sent by this instance.
    pub visibility_acks_sent: Counter,
    /// Outbox events parked: failed too often (or unreadable); not retried
    /// until an operator requeues them.
    pub outbox_parked: Counter,
    /// Relay passes that failed to apply an event to L2 (retried with back-off).
    pub outbox_retries: Counter,
    /// Reads with a replica configured, by the pool used (replica, or
    /// primary while the replica is behind a known write).
    pub replica_routing: Family<Labels, Counter>,
    /// Latency of one cache layer's lookup of a batch, by layer (l2, db).
    pub cache_layer_seconds: Family<Labels, Histogram, fn() -> Histogram>,
    /// The process (refreshed at each scrape): resident memory, open file
    /// descriptors, live Tokio tasks.
    pub process_resident_bytes: Gauge,
    pub process_open_fds: Gauge,
    pub tokio_alive_tasks: Gauge,
    /// Tags forwarded to a router's invalidation endpoint, by outcome
    /// (sent, failed, dropped).
    pub router_invalidations: Family<Labels, Counter>,
}

pub const STATEMENT: &str = "statement";
pub const LOADER: &str = "loader";

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let m = Self {
            registry: Registry::with_prefix("ugc"),
            sql_statements: Family::default(),
            sql_seconds: Family::new_with_constructor(latency_histogram),
            sql_errors: Family::default(),
            loader_batch_size: Family::new_with_constructor(size_histogram),
            graphql_seconds: Family::new_with_constructor(latency_histogram),
            http_rejections: Family::default(),
            in_flight: Gauge::default(),
            http_responses: Family::default(),
            cache_requests: Family::default(),
            l1_bytes: Gauge::default(),
            l1_entries: Gauge::default(),
            l1_evictions: Counter::default(),
            redis_calls: Family::default(),
            redis_errors: Family::default(),
            redis_unreplicated: Counter::default(),
            redis_breaker_state: Gauge::default(),
            singleflight_waits: Counter::default(),
            lease_contention: Counter::default(),
            stale_served: Family::default(),
            refreshes: Family::default(),
            hot_keys: Counter::default(),
            decode_errors: Counter::default(),
            fills_refused: Family::default(),
            warmup_keys: Counter::default(),
            events_relayed: Counter::default(),
            events_applied: Counter::default(),
            // 100 µs … ~3.3 s.
            invalidation_lag: Histogram::new(exponential_buckets(0.000_1, 2.0, 16)),
            l1_dropped: Counter::default(),
            stale_read_checks: Counter::default(),
            stale_reads: Counter::default(),
            external_events: Family::default(),
            rate_limited: Family::default(),
            rate_limit_budget_calls: Family::default(),
            load_shed: Counter::default(),
            cost_rejections: Family::default(),
            negative_promotions: Counter::default(),
            write_visibility_wait: Family::new_with_constructor(latency_histogram),
            write_visibility_timeouts: Counter::default(),
            instances_live: Gauge::default(),
            visibility_acks_sent: Counter::default(),
            outbox_parked: Counter::default(),
            outbox_retries: Counter::default(),
            replica_routing: Family::default(),
            router_invalidations: Family::default(),
            cache_layer_seconds: Family::new_with_constructor(latency_histogram),
            process_resident_bytes: Gauge::default(),
            process_open_fds: Gauge::default(),
            tokio_alive_tasks: Gauge::default(),
        };
        let mut registry = Registry::with_prefix("ugc");
        registry.register("sql_statements", "SQL statements executed", m.sql_statements.clone());
        registry.register("sql_statement_seconds", "SQL statement latency", m.sql_seconds.clone());
        registry.register("sql_errors", "SQL statements that failed", m.sql_errors.clone());
        registry.register("dataloader_batch_size", "Keys per DataLoader batch", m.loader_batch_size.clone());
        registry.register("graphql_request_seconds", "GraphQL request latency", m.graphql_seconds.clone());
        registry.register("http_rejections", "Requests rejected before execution", m.http_rejections.clone());
        registry.register("requests_in_flight", "GraphQL requests being executed", m.in_flight.clone());
        registry.register("http_responses", "HTTP responses by route and status class", m.http_responses.clone());
        registry.register("cache_requests", "Cache lookups by layer, kind and result", m.cache_requests.clone());
        registry.register("l1_bytes", "L1 cache weighted size in bytes", m.l1_bytes.clone());
        registry.register("l1_entries", "L1 cache entries", m.l1_entries.clone());
        registry.register("l1_evictions", "L1 entries evicted for size", m.l1_evictions.clone());
        registry.register("redis_calls", "Redis calls (round trips) made", m.redis_calls.clone());
        registry.register("redis_errors", "Redis calls failed or timed out", m.redis_errors.clone());
        registry.register(
            "redis_unreplicated_invalidations",
            "Redis Cluster invalidations no replica acknowledged within the wait (a failover then could lose them)",
            m.redis_unreplicated.clone(),
        );
        registry.register(
            "redis_breaker_state",
            "Redis circuit: 0 closed, 1 half-open, 2 open",
            m.redis_breaker_state.clone(),
        );
        registry.register(
            "singleflight_waits",
            "Requests that waited for another load of the same key",
            m.singleflight_waits.clone(),
        );
        registry.register(
            "lease_contention",
            "Keys whose cross-instance load lease was taken",
            m.lease_contention.clone(),
        );
        registry.register("stale_served", "Stale cache entries served", m.stale_served.clone());
        registry.register("cache_refreshes", "Background cache refreshes by trigger", m.refreshes.clone());
        registry.register("hot_keys", "Keys that became hot", m.hot_keys.clone());
        registry.register("cache_decode_errors", "Cache values that failed to decode", m.decode_errors.clone());
        registry.register(
            "cache_fills_refused",
            "Fills refused after a concurrent invalidation",
            m.fills_refused.clone(),
        );
        registry.register("cache_warmup_keys", "Keys preloaded into L1 at start-up", m.warmup_keys.clone());
        registry.register("events_relayed", "Outbox events relayed by this instance", m.events_relayed.clone());
        registry.register("events_applied", "Invalidations applied to this instance's L1", m.events_applied.clone());
        registry.register(
            "invalidation_lag_seconds",
            "Commit to L1 eviction on this instance",
            m.invalidation_lag.clone(),
        );
        registry.register("l1_dropped", "Whole-L1 drops after a lost event stream", m.l1_dropped.clone());
        registry.register("stale_read_checks", "Cache hits sampled against Postgres", m.stale_read_checks.clone());
        registry.register(
            "stale_reads_detected",
            "Sampled hits stale beyond the invalidation window",
            m.stale_reads.clone(),
        );
        registry.register("external_events", "Events received on POST /events", m.external_events.clone());
        registry.register("rate_limited", "Requests refused by a rate limit", m.rate_limited.clone());
        registry.register(
            "rate_limit_budget_calls",
            "Shared rate-limit budget requests to Redis",
            m.rate_limit_budget_calls.clone(),
        );
        registry.register("load_shed", "Requests shed at the concurrency limit", m.load_shed.clone());
        registry.register("cost_rejections", "Operations refused by a query cost limit", m.cost_rejections.clone());
        registry.register(
            "cache_negative_promotions",
            "Negative results written to L2 after a second read",
            m.negative_promotions.clone(),
        );
        registry.register(
            "write_visibility_wait_seconds",
            "Mutation wait for every live instance's acknowledgement",
            m.write_visibility_wait.clone(),
        );
        registry.register(
            "write_visibility_timeouts",
            "Mutations answered after the visibility time-out",
            m.write_visibility_timeouts.clone(),
        );
        registry.register("instances_live", "Live instances, as last read by a writer", m.instances_live.clone());
        registry.register("visibility_acks_sent", "Acknowledgement notifications sent", m.visibility_acks_sent.clone());
        registry.register("outbox_parked", "Outbox events parked after too many failures", m.outbox_parked.clone());
        registry.register("replica_routing", "Reads by pool while a replica is configured", m.replica_routing.clone());
        registry.register(
            "router_invalidations",
            "Cache tags forwarded to a router's invalidation endpoint",
            m.router_invalidations.clone(),
        );
        registry.register(
            "cache_layer_seconds",
            "Latency of a cache layer's lookup of one batch",
            m.cache_layer_seconds.clone(),
        );
        registry.register(
            "process_resident_memory_bytes",
            "Resident memory of the process",
            m.process_resident_bytes.clone(),
        );
        registry.register("process_open_fds", "Open file descriptors of the process", m.process_open_fds.clone());
        registry.register("tokio_alive_tasks", "Live Tokio tasks", m.tokio_alive_tasks.clone());
        registry.register("outbox_retries", "Relay passes that failed and will be retried", m.outbox_retries.clone());
        Self { registry, ..m }
    }

    /// Records one executed statement.
    pub fn sql(&self, statement: &'static str, elapsed: Duration, ok: bool) {
        let labels = [(STATEMENT, statement)];
        self.sql_statements.get_or_create(&labels).inc();
        self.sql_seconds.get_or_create(&labels).observe(elapsed.as_secs_f64());
        if !ok {
            self.sql_errors.get_or_create(&labels).inc();
        }
    }

    /// Counts one cache lookup outcome.
    pub fn cache(&self, layer: &'static str, kind: &'static str, result: &'static str) {
        self.cache_n(layer, kind, result, 1);
    }

    /// Counts `n` cache lookups with one outcome.
    pub fn cache_n(&self, layer: &'static str, kind: &'static str, result: &'static str, n: u64) {
        self.cache_requests.get_or_create(&[("layer", layer), ("kind", kind), ("result", result)]).inc_by(n);
    }

    /// Reads the process gauges (Linux `/proc`; elsewhere they stay 0).
    pub fn export_process(&self) {
        // statm's second field: resident pages.
        if let Some(pages) = std::fs::read_to_string("/proc/self/statm")
            .ok()
            .and_then(|s| s.split_whitespace().nth(1).and_then(|p| p.parse::<i64>().ok()))
        {
            self.process_resident_bytes.set(pages * 4096);
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            self.process_open_fds.set(fds.count() as i64);
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            self.tokio_alive_tasks.set(runtime.metrics().num_alive_tasks() as i64);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sql_statements_are_counted_and_rendered() {
        let m = Metrics::new();
        m.sql("reviews_by_id", Duration::from_micros(200), true);
        m.sql("reviews_by_id", Duration::from_micros(300), false);
        m.sql("offer_ratings", Duration::from_micros(100), true);
        let text = m.render();
        assert!(text.contains(r#"ugc_sql_statements_total{statement="reviews_by_id"} 2"#), "{text}");
        assert!(text.contains(r#"ugc_sql_errors_total{statement="reviews_by_id"} 1"#), "{text}");
        assert!(text.contains(r#"ugc_sql_statements_total{statement="offer_ratings"} 1"#), "{text}");
    }
}
