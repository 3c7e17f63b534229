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
    /// GraphQL request latency, by operation type and outcome.
    pub graphql_seconds: Family<Labels2, Histogram, fn() -> Histogram>,
    /// Requests turned away before execution (body too large, bad JSON, ...), by reason.
    pub http_rejections: Family<Labels, Counter>,
    /// Requests in flight.
    pub in_flight: Gauge,
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
        let mut registry = Registry::with_prefix("ugc");
        let m = Self {
            sql_statements: Family::default(),
            sql_seconds: Family::new_with_constructor(latency_histogram),
            sql_errors: Family::default(),
            loader_batch_size: Family::new_with_constructor(size_histogram),
            graphql_seconds: Family::new_with_constructor(latency_histogram),
            http_rejections: Family::default(),
            in_flight: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "sql_statements",
            "SQL statements executed",
            m.sql_statements.clone(),
        );
        registry.register(
            "sql_statement_seconds",
            "SQL statement latency",
            m.sql_seconds.clone(),
        );
        registry.register(
            "sql_errors",
            "SQL statements that failed",
            m.sql_errors.clone(),
        );
        registry.register(
            "dataloader_batch_size",
            "Keys per DataLoader batch",
            m.loader_batch_size.clone(),
        );
        registry.register(
            "graphql_request_seconds",
            "GraphQL request latency",
            m.graphql_seconds.clone(),
        );
        registry.register(
            "http_rejections",
            "Requests rejected before execution",
            m.http_rejections.clone(),
        );
        registry.register(
            "requests_in_flight",
            "GraphQL requests being executed",
            m.in_flight.clone(),
        );
        Self { registry, ..m }
    }

    /// Records one executed statement.
    pub fn sql(&self, statement: &'static str, elapsed: Duration, ok: bool) {
        let labels = [(STATEMENT, statement)];
        self.sql_statements.get_or_create(&labels).inc();
        self.sql_seconds
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        if !ok {
            self.sql_errors.get_or_create(&labels).inc();
        }
    }

    /// Total SQL statements executed so far, all statements together.
    pub fn sql_total(&self) -> u64 {
        // Families are read by encoding; this is for logs and the bench, not the hot path.
        let text = self.render();
        text.lines()
            .filter(|l| l.starts_with("ugc_sql_statements_total{"))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
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
        assert!(
            text.contains(r#"ugc_sql_statements_total{statement="reviews_by_id"} 2"#),
            "{text}"
        );
        assert!(
            text.contains(r#"ugc_sql_errors_total{statement="reviews_by_id"} 1"#),
            "{text}"
        );
        assert_eq!(m.sql_total(), 3);
    }
}
