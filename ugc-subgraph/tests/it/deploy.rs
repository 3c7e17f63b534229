//! What of the deployment can be checked without a Docker engine: the
//! compose file (`docker-compose config`), the Prometheus configuration and
//! alert rules (`promtool`), and that the dashboard and the alerts query
//! only metrics this service exports. `make test` (and `.ci/run`) install
//! Debian's docker-compose and prometheus packages for this.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

use crate::mutations::create;
use crate::support::TestApp;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn run(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(repo())
        .output()
        .unwrap_or_else(|e| panic!("{program} is needed (make deploy-tools installs it): {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{program} {args:?} failed:\n{text}");
    text
}

#[test]
fn the_compose_file_is_valid_and_has_the_whole_topology() {
    let services = run("docker-compose", &["-f", "docker-compose.yml", "config", "--services"]);
    let services: BTreeSet<&str> = services.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    for needed in [
        "postgres",
        "redis",
        "seed",
        "ugc-1",
        "ugc-2",
        "offers",
        "gateway",
        "otel-collector",
        "jaeger",
        "prometheus",
        "grafana",
    ] {
        assert!(services.contains(needed), "{needed} missing from docker-compose.yml: {services:?}");
    }
    // The image runs as a non-root user, built in a separate stage.
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    assert!(dockerfile.matches("FROM ").count() >= 2, "multi-stage");
    assert!(dockerfile.lines().any(|l| l.starts_with("USER ") && !l.contains("root")), "non-root");
}

#[test]
fn the_prometheus_config_and_alert_rules_pass_promtool() {
    let config = run("promtool", &["check", "config", "deploy/prometheus.yml"]);
    assert!(config.contains("SUCCESS"), "{config}");
    let rules = run("promtool", &["check", "rules", "deploy/alerts.yml"]);
    assert!(rules.contains("SUCCESS"), "{rules}");
}

/// Metric names in a PromQL expression (identifiers followed by `{`, `[`
/// or whitespace, minus functions, keywords and label names).
fn metric_names(expr: &str) -> BTreeSet<String> {
    const NOT_METRICS: &[&str] = &[
        "sum",
        "rate",
        "increase",
        "max",
        "min",
        "by",
        "le",
        "histogram_quantile",
        "clamp_min",
        "layer",
        "result",
        "quota",
        "decided_by",
        "status",
        "instance",
        "route",
        "outcome",
        "job",
        "and",
        "or",
        "on",
    ];
    let mut names = BTreeSet::new();
    let mut word = String::new();
    let mut in_quotes = false;
    let mut in_braces = 0;
    for c in expr.chars().chain([' ']) {
        match c {
            '"' => in_quotes = !in_quotes,
            _ if in_quotes => {}
            '{' => {
                push(&mut names, &mut word, in_braces, NOT_METRICS);
                in_braces += 1;
            }
            '}' => in_braces -= 1,
            c if c.is_ascii_alphanumeric() || c == '_' || c == ':' => word.push(c),
            _ => push(&mut names, &mut word, in_braces, NOT_METRICS),
        }
    }
    fn push(names: &mut BTreeSet<String>, word: &mut String, in_braces: i32, skip: &[&str]) {
        let w = std::mem::take(word);
        if in_braces == 0 && w.starts_with(|c: char| c.is_ascii_alphabetic()) && !skip.contains(&w.as_str()) {
            names.insert(w);
        }
    }
    names
}

/// Every sample name `/metrics` can produce, from its `# TYPE` lines.
fn exported(metrics: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in metrics.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let mut parts = line.split_whitespace();
        let (Some(name), Some(kind)) = (parts.next(), parts.next()) else { continue };
        match kind {
            "counter" => names.extend([format!("{name}_total"), name.to_owned()]),
            "histogram" => names.extend(["_bucket", "_count", "_sum"].map(|s| format!("{name}{s}"))),
            _ => {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

#[tokio::test]
async fn the_dashboard_and_alerts_use_only_exported_metrics() {
    let app = TestApp::start().await;
    create(&app, "alice", "offer-d", 4, "dashboard").await;
    app.gql("{ offer(id: \"offer-d\") { rating { count } } }", json!({})).await;
    let metrics = app.client().get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let mut available = exported(&metrics);
    available.insert("up".to_owned()); // Prometheus's own, per target.

    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("deploy/grafana/dashboards/ugc-subgraph.json")).unwrap(),
    )
    .unwrap();
    let exprs: Vec<String> = dashboard["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| p["targets"].as_array().unwrap().iter().map(|t| t["expr"].as_str().unwrap().to_owned()))
        .collect();
    assert!(exprs.len() >= 12, "panels: {}", exprs.len());
    let alerts = std::fs::read_to_string(repo().join("deploy/alerts.yml")).unwrap();
    let alert_exprs: Vec<String> = alerts
        .lines()
        .scan(false, |folded, line| {
            let t = line.trim();
            let out = if let Some(e) = t.strip_prefix("expr:") {
                *folded = e.trim() == ">";
                Some(e.trim().trim_start_matches('>').to_owned())
            } else if *folded && !t.contains(':') {
                Some(t.to_owned())
            } else {
                *folded = false;
                None
            };
            Some(out)
        })
        .flatten()
        .collect();
    assert!(alert_exprs.len() >= 10, "{alert_exprs:?}");

    let mut used = BTreeSet::new();
    for expr in exprs.iter().chain(&alert_exprs) {
        used.extend(metric_names(expr));
    }
    let missing: Vec<&String> = used.iter().filter(|n| !available.contains(*n)).collect();
    assert!(missing.is_empty(), "queried but not exported: {missing:?}");
    // And the dashboard covers what SPEC §7 asks a dashboard to show.
    for needed in [
        "ugc_cache_requests_total",
        "ugc_graphql_request_seconds_bucket",
        "ugc_sql_statements_total",
        "ugc_invalidation_lag_seconds_bucket",
        "ugc_stale_reads_detected_total",
        "ugc_rate_limited_total",
        "ugc_redis_breaker_state",
    ] {
        assert!(used.contains(needed), "the dashboard does not show {needed}");
    }
}

#[test]
fn metric_names_are_read_out_of_promql() {
    let names = metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(ugc_a_bucket{x=\"y z\"}[1m]))) / clamp_min(sum(rate(ugc_b_total[1m])), 1)",
    );
    assert_eq!(names, BTreeSet::from(["ugc_a_bucket".to_owned(), "ugc_b_total".to_owned()]));
}
