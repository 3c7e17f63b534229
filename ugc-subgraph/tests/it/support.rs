//! `TestApp`: a real ugc-subgraph instance for one test, on its own fresh
//! Postgres database and a free port, talked to over HTTP like the gateway.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_redis::redis;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use ugc_subgraph::config::Config;
use ugc_subgraph::http::state::AppState;
use ugc_subgraph::redis::Conn;
use ugc_subgraph::server;
use ugc_subgraph::store::seed::SeedPlan;

pub const SECRET: &str = "integration-test-secret-0123456789";

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// `TEST_REDIS_CLUSTER_URLS`: run the instances on this Redis Cluster
/// instead (`make test-cluster` starts one); tests that bring their own
/// Redis keep it.
pub fn redis_cluster_urls() -> Option<Vec<String>> {
    let urls = std::env::var("TEST_REDIS_CLUSTER_URLS").ok()?;
    Some(urls.split(',').map(str::to_owned).collect())
}

/// A connection to the Redis the instances use, as they connect to it.
pub async fn redis_conn() -> Conn {
    match redis_cluster_urls() {
        Some(urls) => {
            Conn::Cluster(redis::cluster::ClusterClient::new(urls).unwrap().get_async_connection().await.unwrap())
        }
        None => {
            Conn::Single(redis::Client::open(redis_url()).unwrap().get_multiplexed_async_connection().await.unwrap())
        }
    }
}

/// One URL per Redis server holding the instances' keys: the server, or
/// each master of the cluster (`SCAN` sees one node's keys only).
pub fn redis_nodes() -> Vec<String> {
    let Some(urls) = redis_cluster_urls() else { return vec![redis_url()] };
    let nodes: Result<String, _> = redis::Client::open(urls[0].as_str())
        .and_then(|c| redis::cmd("CLUSTER").arg("NODES").query(&mut c.get_connection()?));
    nodes
        .map(|text| {
            text.lines()
                .filter(|l| l.split(' ').nth(2).is_some_and(|f| f.contains("master") && !f.contains("fail")))
                .filter_map(|l| Some(format!("redis://{}", l.split(' ').nth(1)?.split('@').next()?)))
                .collect()
        })
        .unwrap_or_default()
}

/// Every key matching `pattern`, from every node.
pub fn redis_scan(pattern: &str) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for node in redis_nodes() {
        let Ok(mut conn) = redis::Client::open(node.as_str()).and_then(|c| c.get_connection()) else { continue };
        let mut cursor = 0u64;
        loop {
            let Ok((next, keys)): Result<(u64, Vec<String>), _> =
                redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000).query(&mut conn)
            else {
                break;
            };
            found.extend(keys.into_iter().map(|k| (node.clone(), k)));
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    found
}

pub fn admin_url() -> String {
    std::env::var("TEST_PG_ADMIN_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// Databases this test process uses, by URL: how many instances run on each,
/// and whether the process created it. When the last instance on one stops,
/// its Redis keys go, and the database too if this process created it;
/// nothing else is ever dropped (the machine's servers are shared).
static IN_USE: LazyLock<Mutex<HashMap<String, (usize, bool)>>> = LazyLock::new(Mutex::default);

/// A fresh, empty database; returns its name and URL.
pub async fn fresh_database() -> (String, String) {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().subsec_nanos();
    let name = format!("ugc_t_{}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed), nanos % 100_000);
    let admin = PgPool::connect(&admin_url()).await.expect("Postgres must run on 127.0.0.1:5432 (make services)");
    sqlx::query(&format!("CREATE DATABASE \"{name}\"")).execute(&admin).await.unwrap();
    admin.close().await;
    let base = admin_url();
    let url = format!("{}/{name}", &base[..base.rfind('/').unwrap()]);
    IN_USE.lock().unwrap().insert(url.clone(), (0, true));
    (name, url)
}

/// A fresh database for a test that runs the binary itself (no `TestApp`):
/// the binary must use `prefix` for its Redis keys; both go when dropped.
pub struct TestDb {
    pub url: String,
    pub prefix: String,
    name: String,
}

impl TestDb {
    pub async fn create() -> Self {
        let (name, url) = fresh_database().await;
        IN_USE.lock().unwrap().remove(&url);
        Self { prefix: format!("t{name}"), url, name }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        clean_up(&self.prefix, Some(&self.name));
    }
}

fn group_by_node(keys: Vec<(String, String)>) -> HashMap<String, Vec<String>> {
    let mut by_node: HashMap<String, Vec<String>> = HashMap::new();
    for (node, key) in keys {
        by_node.entry(node).or_default().push(key);
    }
    by_node
}

/// Deletes every Redis key under `prefix` and, when `database` is given,
/// drops it (terminating the stopped instances' idle connections).
fn clean_up(prefix: &str, database: Option<&str>) {
    // One key per DEL: a cluster node refuses keys of several slots.
    let keys = redis_scan(&format!("{prefix}:*"));
    for (node, keys) in group_by_node(keys) {
        if let Ok(mut conn) = redis::Client::open(node.as_str()).and_then(|c| c.get_connection()) {
            let mut pipe = redis::pipe();
            for key in &keys {
                pipe.cmd("DEL").arg(key).ignore();
            }
            let _: Result<(), _> = pipe.query(&mut conn);
        }
    }
    if let Some(name) = database {
        // The stopped instances' pools may reconnect between FORCE's
        // terminations and the drop: try again a few times.
        for _ in 0..10 {
            let dropped = std::process::Command::new("psql")
                .args(["-Xq", "-v", "ON_ERROR_STOP=1", &admin_url()])
                .args(["-c", &format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)")])
                .output()
                .is_ok_and(|o| o.status.success());
            if dropped {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub db_url: String,
    /// The Redis key prefix of this deployment (shared by instances on one database).
    pub prefix: String,
    pub db: PgPool,
    pub state: AppState,
    client: reqwest::Client,
    stop: CancellationToken,
}

impl TestApp {
    pub async fn start() -> Self {
        Self::start_with(&[]).await
    }

    /// Starts an instance with extra environment settings.
    pub async fn start_with(vars: &[(&str, &str)]) -> Self {
        let (_, db_url) = fresh_database().await;
        Self::start_on(&db_url, vars).await
    }

    /// Starts an instance on an existing database (several instances may share one).
    pub async fn start_on(db_url: &str, vars: &[(&str, &str)]) -> Self {
        Self::start_instance(db_url, vars, true).await
    }

    /// [`TestApp::start_without_background`] on an existing database.
    pub async fn start_without_background_on(db_url: &str, vars: &[(&str, &str)]) -> Self {
        Self::start_instance(db_url, vars, false).await
    }

    /// An instance without its background relay and listener: a test plays
    /// their part at exactly the moment it wants.
    pub async fn start_without_background(vars: &[(&str, &str)]) -> Self {
        let (_, db_url) = fresh_database().await;
        Self::start_instance(&db_url, vars, false).await
    }

    async fn start_instance(db_url: &str, vars: &[(&str, &str)], background: bool) -> Self {
        IN_USE.lock().unwrap().entry(db_url.to_owned()).or_insert((0, false)).0 += 1;
        let prefix = format!("t{}", db_url.rsplit('/').next().unwrap());
        let mut env: Vec<(String, String)> = vec![
            ("DATABASE_URL".into(), db_url.to_owned()),
            // Instances started on one database share a key prefix (they are
            // one deployment); different tests never do.
            ("UGC_CACHE_PREFIX".into(), prefix.clone()),
            ("UGC_JWT_SECRET".into(), SECRET.into()),
            ("UGC_LISTEN".into(), "127.0.0.1:0".into()),
            ("UGC_DB_POOL_SIZE".into(), "8".into()),
            // Sampling adds statements at random; tests that count them want none.
            ("UGC_STALE_CHECK_RATE".into(), "0".into()),
            // A debug build on a busy 2-core machine can exceed the 50 ms
            // production timeout; a timed-out Redis call is a miss, which
            // would make hit-counting tests flaky. The outage test sets 50 ms.
            ("UGC_REDIS_TIMEOUT_MS".into(), "1000".into()),
            // Every test talks from 127.0.0.1: limits high enough never to
            // interfere; the rate-limit tests set their own.
            ("UGC_RATE_LIMIT_READ_PER_SEC".into(), "1000000".into()),
            ("UGC_RATE_LIMIT_READ_BURST".into(), "1000000".into()),
            ("UGC_RATE_LIMIT_WRITE_PER_SEC".into(), "1000000".into()),
            ("UGC_RATE_LIMIT_WRITE_BURST".into(), "1000000".into()),
            ("UGC_RATE_LIMIT_USER_WRITE_PER_SEC".into(), "1000000".into()),
            ("UGC_RATE_LIMIT_USER_WRITE_BURST".into(), "1000000".into()),
        ];
        // The write visibility protocol is on, with a window that a debug
        // build on a loaded 2-core machine keeps (ticks every 500 ms): a
        // stalled tick would close L1 and change what tests count. An
        // instance without a listener cannot take part: off.
        let visibility = if background { "2000" } else { "0" };
        env.push(("UGC_WRITE_VISIBILITY_TIMEOUT_MS".into(), visibility.into()));
        // Heartbeats every 3 s, L1 kept for 6 s after one: a heartbeat
        // delayed by a loaded shared Postgres must not close L1 mid-test.
        env.push(("UGC_INSTANCE_LEASE_MS".into(), "9000".into()));
        // A test that brings its own Redis keeps it.
        if !vars.iter().any(|(k, _)| *k == "REDIS_URL" || *k == "REDIS_CLUSTER_URLS") {
            env.push(match redis_cluster_urls() {
                Some(urls) => ("REDIS_CLUSTER_URLS".into(), urls.join(",")),
                None => ("REDIS_URL".into(), redis_url()),
            });
        }
        env.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let config = Config::from_vars(env).expect("valid test configuration");
        let state = AppState::build(config).unwrap();
        state.store.migrate().await.unwrap();
        ugc_subgraph::events::fanout::sync_epoch(&state.events).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        if background {
            state.spawn_background(&stop);
        }
        tokio::spawn(server::serve(listener, state.clone(), stop.clone().cancelled_owned()));
        if background {
            // Serving from L1 starts once the instance is listening and
            // registered (events/visibility.rs): a test starts after that.
            let open =
                eventually(Duration::from_secs(10), async || state.cache.gate().is_open(std::time::Instant::now()))
                    .await;
            assert!(open, "the instance never joined the live set");
        }
        let db = PgPool::connect(db_url).await.unwrap();
        Self { addr, db_url: db_url.to_owned(), prefix, db, state, client: reqwest::Client::new(), stop }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub async fn seed(&self, offers: u32, users: u32, reviews: u64) {
        self.state.store.seed(SeedPlan { offers, users, reviews, seed: 7 }).await.unwrap();
        // The new data epoch reaches this instance through its listener,
        // some time later, and drops its L1 then: a test that read in
        // between would see its warm entries vanish. Move now.
        ugc_subgraph::events::fanout::sync_epoch(&self.state.events).await;
    }

    /// POSTs a GraphQL request; returns the JSON body (any status).
    pub async fn gql(&self, query: &str, variables: Value) -> Value {
        self.gql_as(None, query, variables).await
    }

    pub async fn gql_as(&self, token: Option<&str>, query: &str, variables: Value) -> Value {
        let mut req = self.client.post(self.url("/graphql")).json(&json!({ "query": query, "variables": variables }));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        req.send().await.unwrap().json().await.unwrap()
    }

    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// SQL statements executed, read from `/metrics` as an operator would,
    /// less those of the background work (relay polling, epoch checks,
    /// readiness) that runs whenever it likes.
    pub async fn sql_statements(&self) -> u64 {
        const BACKGROUND: [&str; 14] = [
            "heartbeat",
            "live_instances",
            "deregister",
            "forget_instances",
            "tick",
            "ack",
            "claim_outbox",
            "finish_outbox",
            "retry_outbox",
            "prune_outbox",
            "begin",
            "commit",
            "data_epoch",
            "migrations_applied",
        ];
        let text = self.client.get(self.url("/metrics")).send().await.unwrap().text().await.unwrap();
        text.lines()
            .filter(|l| l.starts_with("ugc_sql_statements_total{"))
            .filter(|l| !BACKGROUND.iter().any(|s| l.contains(&format!("statement=\"{s}\""))))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }

    /// SQL statements of the read path only (the relays' background
    /// polling aside), from `/metrics`.
    pub async fn read_statements(&self) -> f64 {
        let mut total = 0.0;
        for statement in
            ["offer_ratings", "reviews_by_ids", "author_review_counts", "offer_review_pages", "author_review_pages"]
        {
            total += self.metric("ugc_sql_statements_total", &[&format!("statement=\"{statement}\"")]).await;
        }
        total
    }

    /// Sum of the samples of a metric whose line starts with `name` and
    /// contains every one of `labels` (e.g. `layer="l2"`).
    pub async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        let text = self.client.get(self.url("/metrics")).send().await.unwrap().text().await.unwrap();
        text.lines()
            .filter(|l| l.starts_with(name) && labels.iter().all(|lab| l.contains(lab)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The namespace of L2 keys now: the prefix and the data epoch.
    pub async fn l2_prefix(&self) -> String {
        format!("{}:e{}", self.prefix, self.count("SELECT epoch FROM data_epoch").await)
    }

    /// Cache keys in Redis under this deployment's prefix (a maintenance
    /// `SCAN`; rate-limit state aside).
    pub async fn redis_keys(&self) -> usize {
        let pattern = format!("{}:*", self.prefix);
        let keys = tokio::task::spawn_blocking(move || redis_scan(&pattern)).await.unwrap();
        keys.iter().filter(|(_, k)| !k.contains(":rl:")).count()
    }

    pub async fn count(&self, sql: &str) -> i64 {
        sqlx::query_scalar(sql).fetch_one(&self.db).await.unwrap()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.stop.cancel();
        let last = {
            let mut in_use = IN_USE.lock().unwrap_or_else(|e| e.into_inner());
            match in_use.get_mut(&self.db_url) {
                Some((n, created)) => {
                    *n -= 1;
                    let created = *created;
                    (*n == 0).then(|| {
                        in_use.remove(&self.db_url);
                        created
                    })
                }
                None => None,
            }
        };
        if let Some(created) = last {
            let name = self.db_url.rsplit('/').next().unwrap_or_default().to_owned();
            clean_up(&self.prefix, created.then_some(name.as_str()));
        }
    }
}

/// A signed token for `sub`, valid for an hour.
pub fn token(sub: &str, roles: &[&str]) -> String {
    token_with(sub, roles, 3600, SECRET)
}

pub fn token_with(sub: &str, roles: &[&str], ttl_secs: i64, secret: &str) -> String {
    let exp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64 + ttl_secs;
    encode(
        &Header::default(),
        &json!({ "sub": sub, "exp": exp, "roles": roles }),
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// The `extensions.code` of the first error, if any.
pub fn error_code(body: &Value) -> Option<&str> {
    body["errors"][0]["extensions"]["code"].as_str()
}

/// Polls `probe` until it returns true or `within` passes.
pub async fn eventually(within: Duration, mut probe: impl AsyncFnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if probe().await {
            return true;
        }
        if tokio::time::Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
