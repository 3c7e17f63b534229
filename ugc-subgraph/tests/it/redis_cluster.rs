//! L2 on a real Redis Cluster (3 masters, 3 replicas) started by each test
//! with `scripts/redis-cluster.sh`: a master killed mid-traffic and its
//! replica promoted, and slots migrated under the cache (`ASK` while a slot
//! moves, `MOVED` after). The rest of the cache and coherence suite runs on
//! a cluster too: `make test` runs it with `TEST_REDIS_CLUSTER_URLS`.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use ugc_subgraph::cache::key::{CacheKey, Tag};

use crate::mutations::create;
use crate::support::{token, TestApp};

/// A node as `CLUSTER NODES` lists it: id, port, flags, slot ranges.
type Node = (String, u16, String, Vec<(u16, u16)>);

/// A private cluster on six free loopback ports; stopped and deleted when dropped.
pub struct RedisCluster {
    dir: PathBuf,
    base: u16,
    pub urls: String,
}

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/redis-cluster.sh")
}

/// A base port whose six ports and their cluster-bus ports (+10000) are free.
fn free_base() -> u16 {
    let free = |p: u16| TcpListener::bind(("127.0.0.1", p)).is_ok();
    // Tests of one process start clusters at once: each takes its own candidates.
    static TAKEN: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let seed = (std::process::id() as u16).wrapping_mul(7919).wrapping_add(TAKEN.fetch_add(97, Ordering::Relaxed));
    (0..500u16)
        .map(|i| 20_000 + (seed.wrapping_add(i * 37) % 900) * 10)
        .find(|&b| (b..b + 6).all(|p| free(p) && free(p + 10_000)))
        .expect("no free ports for a Redis Cluster")
}

impl RedisCluster {
    pub fn start() -> Self {
        let base = free_base();
        let dir = std::env::temp_dir().join(format!("ugc-test-redis-cluster-{base}"));
        let out = Command::new("bash").arg(script()).arg("start").arg(&dir).arg(base.to_string()).output().unwrap();
        assert!(out.status.success(), "cluster start failed: {}", String::from_utf8_lossy(&out.stderr));
        Self { dir, base, urls: String::from_utf8_lossy(&out.stdout).trim().to_owned() }
    }

    fn cli(&self, port: u16, args: &[&str]) -> String {
        let out = Command::new("redis-cli").arg("-p").arg(port.to_string()).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn ports(&self) -> impl Iterator<Item = u16> {
        self.base..self.base + 6
    }

    /// `(id, port, flags, slot ranges)` of every node, as a live node sees them.
    fn nodes(&self) -> Vec<Node> {
        let text = self.ports().map(|p| self.cli(p, &["CLUSTER", "NODES"])).find(|t| !t.is_empty()).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                let port = f.get(1)?.split('@').next()?.rsplit(':').next()?.parse().ok()?;
                let ranges = f
                    .iter()
                    .skip(8)
                    .filter(|r| !r.starts_with('['))
                    .filter_map(|r| {
                        let (a, b) = r.split_once('-').unwrap_or((r, r));
                        Some((a.parse().ok()?, b.parse().ok()?))
                    })
                    .collect();
                Some((f[0].to_owned(), port, f.get(2)?.to_string(), ranges))
            })
            .collect()
    }

    /// The live master serving `slot`: (id, port).
    fn master_of(&self, slot: u16) -> Option<(String, u16)> {
        self.nodes()
            .into_iter()
            .find(|(_, _, flags, ranges)| {
                flags.contains("master")
                    && !flags.contains("fail")
                    && ranges.iter().any(|&(a, b)| a <= slot && slot <= b)
            })
            .map(|(id, port, ..)| (id, port))
    }

    /// The slot of `key`, as the cluster computes it.
    fn slot(&self, key: &str) -> u16 {
        self.ports().find_map(|p| self.cli(p, &["CLUSTER", "KEYSLOT", key]).trim().parse().ok()).unwrap()
    }

    fn kill(&self, port: u16) {
        let pid = std::fs::read_to_string(self.dir.join(port.to_string()).join("redis.pid")).unwrap();
        assert!(Command::new("kill").args(["-9", pid.trim()]).status().unwrap().success());
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        let _ = Command::new("bash").arg(script()).arg("stop").arg(&self.dir).status();
    }
}

const OFFER: &str = "query($representations: [_Any!]!) {
  _entities(representations: $representations) { ... on Offer { id rating { count } reviews(first: 5) { edges { node { id text } } } } }
}";

fn offers(ids: &[String]) -> Value {
    json!({ "representations": ids.iter().map(|id| json!({ "__typename": "Offer", "id": id })).collect::<Vec<_>>() })
}

/// The text of review `id` in an offer entity answer, if listed.
fn text_of(body: &Value, id: &str) -> Option<String> {
    body["data"]["_entities"].as_array()?.iter().find_map(|offer| {
        offer["reviews"]["edges"].as_array()?.iter().find(|e| e["node"]["id"] == id)?["node"]["text"]
            .as_str()
            .map(str::to_owned)
    })
}

/// After a promotion, how long an instance may still serve what an edit
/// replaced: the relay retries what the dead master refused (backing off
/// from 0.1 s), and instances rebuild their cluster connections at most once
/// a second. Measured here: none at all in most runs, the last ~1 s after.
const WINDOW: Duration = Duration::from_secs(5);

const UPDATE: &str = "mutation($id: ID!, $text: String!) { updateReview(id: $id, input: { text: $text }) { id text } }";

#[tokio::test]
async fn a_master_killed_mid_traffic_costs_no_failed_read_and_no_stale_read_after_failover() {
    let cluster = RedisCluster::start();
    let vars = [("REDIS_CLUSTER_URLS", cluster.urls.as_str()), ("UGC_REDIS_TIMEOUT_MS", "200")];
    let a = TestApp::start_with(&vars).await;
    a.seed(30, 200, 600).await;
    let b = TestApp::start_on(&a.db_url, &vars).await;
    let prefix = a.l2_prefix().await;

    // The review we keep editing, on an offer whose slot is on the master we kill.
    let offer = "offer-000003".to_owned();
    let body = create(&a, "writer", &offer, 5, "v0").await;
    let review = body["data"]["createReview"]["id"].as_str().unwrap().to_owned();
    let offer_slot = cluster.slot(&Tag::Offer(offer.clone()).redis_key(&prefix));
    let (victim_id, victim) = cluster.master_of(offer_slot).expect("a master serves the offer's slot");
    let batch: Vec<String> = (1..=20).map(|i| format!("offer-{i:06}")).collect();
    for app in [&a, &b] {
        assert!(app.gql(OFFER, offers(&batch)).await["errors"].is_null());
    }

    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // Reads that saw less than the version acknowledged before they
    // started: when each was sent.
    let mut readers = Vec::new();
    for app in [&a, &b] {
        let (url, client) = (app.url("/graphql"), app.client().clone());
        let (acked, stop, batch, review) = (acked.clone(), stop.clone(), batch.clone(), review.clone());
        readers.push(tokio::spawn(async move {
            let (mut reads, mut failed, mut stale) = (0u64, 0u64, Vec::new());
            while !stop.load(Ordering::Relaxed) && reads < 100_000 {
                let (floor, sent_at) = (acked.load(Ordering::SeqCst), Instant::now());
                let sent = client.post(&url).json(&json!({ "query": OFFER, "variables": offers(&batch) })).send().await;
                reads += 1;
                let body: Value = match sent {
                    Ok(r) if r.status().is_success() => r.json().await.unwrap_or(Value::Null),
                    _ => Value::Null,
                };
                if !body["errors"].is_null() || body["data"]["_entities"].as_array().is_none_or(|e| e.len() != 20) {
                    failed += 1;
                    continue;
                }
                let seen: u64 = text_of(&body, &review).and_then(|t| t[1..].parse().ok()).unwrap_or(0);
                if seen < floor {
                    stale.push(sent_at);
                }
            }
            (reads, failed, stale)
        }));
    }
    let writer = {
        let (url, client, acked, stop, review) =
            (a.url("/graphql"), a.client().clone(), acked.clone(), stop.clone(), review.clone());
        tokio::spawn(async move {
            let auth = token("writer", &[]);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) && n < 2_000 {
                n += 1;
                let vars = json!({ "id": review, "text": format!("v{n}") });
                let sent = client
                    .post(&url)
                    .bearer_auth(&auth)
                    .json(&json!({ "query": UPDATE, "variables": vars }))
                    .send()
                    .await;
                let ok = match sent {
                    Ok(r) => {
                        r.json::<Value>().await.is_ok_and(|b| b["data"]["updateReview"]["text"] == format!("v{n}"))
                    }
                    Err(_) => false,
                };
                if ok {
                    acked.store(n, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };

    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.kill(victim);
    let killed = Instant::now();
    let mut promoted = None;
    while killed.elapsed() < Duration::from_secs(30) {
        if cluster.master_of(offer_slot).is_some_and(|(id, _)| id != victim_id) {
            promoted = Some(killed.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let promoted = promoted.expect("the replica was never promoted");
    let promoted_at = killed + promoted;
    tokio::time::sleep(WINDOW + Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    writer.await.unwrap();
    let (mut reads, mut failed, mut stale) = (0, 0, Vec::new());
    for r in readers {
        let (n, f, s) = r.await.unwrap();
        (reads, failed) = (reads + n, failed + f);
        stale.extend(s);
    }
    let after_window = stale.iter().filter(|&&at| at > promoted_at + WINDOW).count();
    let last = stale.iter().max().map(|&at| at.saturating_duration_since(promoted_at));
    eprintln!(
        "failover: replica promoted {promoted:?} after the kill; {reads} reads, {failed} failed; {} stale reads, \
         the last {last:?} after the promotion; {after_window} after the window",
        stale.len()
    );
    assert!(reads > 50, "traffic ran ({reads} reads)");
    assert_eq!(failed, 0, "no read failed while a master died and its replica took over");
    assert_eq!(after_window, 0, "no read after the window missed an acknowledged edit");

    // Every instance, and a new one that has only L2 (now the promoted
    // replica) to start from, serves the last acknowledged edit.
    let last = format!("v{}", acked.load(Ordering::SeqCst));
    let c = TestApp::start_on(&a.db_url, &vars).await;
    for app in [&a, &b, &c] {
        let body = app.gql(OFFER, offers(&batch)).await;
        assert_eq!(text_of(&body, &review).as_deref(), Some(last.as_str()), "{body}");
    }
    assert!(c.metric("ugc_cache_requests_total", &["layer=\"l2\"", "result=\"hit\""]).await > 0.0, "L2 serves again");
}

/// A slot moved by hand between masters, the way `redis-cli --cluster
/// reshard` moves each slot: IMPORTING/MIGRATING, then its keys.
struct Migration {
    slot: String,
    source: u16,
    target: u16,
    target_id: String,
}

impl RedisCluster {
    fn begin_migration(&self, slot: u16) -> Migration {
        let (source_id, source) = self.master_of(slot).unwrap();
        let (target_id, target) = self
            .nodes()
            .into_iter()
            .find(|(id, _, flags, _)| flags.contains("master") && !flags.contains("fail") && *id != source_id)
            .map(|(id, port, ..)| (id, port))
            .unwrap();
        let slot = slot.to_string();
        assert_eq!(self.cli(target, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &source_id]).trim(), "OK");
        assert_eq!(self.cli(source, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &target_id]).trim(), "OK");
        let keys: Vec<String> =
            self.cli(source, &["CLUSTER", "GETKEYSINSLOT", &slot, "1000"]).lines().map(str::to_owned).collect();
        let target_port = target.to_string();
        let mut migrate = vec!["MIGRATE", "127.0.0.1", target_port.as_str(), "", "0", "5000", "KEYS"];
        migrate.extend(keys.iter().map(String::as_str));
        assert_eq!(self.cli(source, &migrate).trim(), "OK", "keys {keys:?}");
        Migration { slot, source, target, target_id }
    }

    fn finish_migration(&self, m: &Migration) {
        for port in self.ports() {
            self.cli(port, &["CLUSTER", "SETSLOT", &m.slot, "NODE", &m.target_id]);
        }
    }
}

#[tokio::test]
async fn slots_migrating_under_the_cache_are_followed_through_ask_and_moved() {
    let cluster = RedisCluster::start();
    let vars = [("REDIS_CLUSTER_URLS", cluster.urls.as_str())];
    let a = TestApp::start_with(&vars).await;
    a.seed(30, 200, 600).await;
    let prefix = a.l2_prefix().await;
    let batch: Vec<String> = (1..=20).map(|i| format!("offer-{i:06}")).collect();
    let count = |b: &Value, i: usize| b["data"]["_entities"][i]["rating"]["count"].as_i64().unwrap();
    let l2_only = async |app: &TestApp, expected: &Value, what: &str| {
        let before = app.read_statements().await;
        let body = app.gql(OFFER, offers(&batch)).await;
        assert_eq!(&body, expected, "{what}");
        assert_eq!(app.read_statements().await, before, "{what}: served from L2, no SQL");
    };

    // Offer 5 has been written to (its tag has a token): every key of its
    // slot moves with it.
    assert!(create(&a, "mover", "offer-000005", 1, "before the move").await["errors"].is_null());
    let first = a.gql(OFFER, offers(&batch)).await;
    assert!(first["errors"].is_null(), "{first}");
    let moving = cluster.begin_migration(cluster.slot(&Tag::Offer("offer-000005".into()).redis_key(&prefix)));
    let entry = CacheKey::Rating("offer-000005".into()).redis_key(&prefix);
    assert!(cluster.cli(moving.target, &["ASKING"]).contains("OK"));
    assert!(cluster.cli(moving.source, &["GET", &entry]).starts_with("ASK"), "the source redirects with ASK");

    // Mid-migration: an instance with only L2 to read from follows the ASK
    // (ASKING + the command at the target).
    l2_only(&TestApp::start_on(&a.db_url, &vars).await, &first, "during the migration").await;
    cluster.finish_migration(&moving);
    assert!(cluster.cli(moving.source, &["GET", &entry]).starts_with("MOVED"), "the source redirects with MOVED");
    // After: clients that knew the old layout follow MOVED.
    let moved = TestApp::start_on(&a.db_url, &vars).await;
    l2_only(&moved, &first, "after the slot moved").await;

    // A write invalidates the entries at their new owner, on every instance.
    assert!(create(&a, "mover-2", "offer-000005", 2, "after the move").await["errors"].is_null());
    let after = TestApp::start_on(&a.db_url, &vars).await.gql(OFFER, offers(&batch)).await;
    assert_eq!(count(&after, 4), count(&first, 4) + 1, "{after}");
    assert_eq!(count(&moved.gql(OFFER, offers(&batch)).await, 4), count(&first, 4) + 1);

    // Offer 7 was never written (no token): mid-migration its slot's
    // multi-key reads get TRYAGAIN (a key is missing at the target), and
    // the cache takes that as a miss: right answers, no error.
    let half = cluster.begin_migration(cluster.slot(&Tag::Offer("offer-000007".into()).redis_key(&prefix)));
    let fresh = TestApp::start_on(&a.db_url, &vars).await;
    assert_eq!(fresh.gql(OFFER, offers(&batch)).await, after, "a half-migrated slot is a miss, never an error");
    cluster.finish_migration(&half);
    l2_only(&TestApp::start_on(&a.db_url, &vars).await, &after, "after the second slot moved").await;

    // A real `redis-cli --cluster reshard` of 1,000 slots under reads.
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = [&a, &moved, &fresh]
        .into_iter()
        .map(|app| {
            let (url, client, stop, expected) =
                (app.url("/graphql"), app.client().clone(), stop.clone(), after.clone());
            let vars = offers(&batch);
            tokio::spawn(async move {
                let (mut reads, mut wrong) = (0u64, 0u64);
                while !stop.load(Ordering::Relaxed) && reads < 50_000 {
                    let sent = client.post(&url).json(&json!({ "query": OFFER, "variables": vars })).send().await;
                    let body = match sent {
                        Ok(r) => r.json::<Value>().await.unwrap_or(Value::Null),
                        Err(_) => Value::Null,
                    };
                    reads += 1;
                    wrong += u64::from(body != expected);
                }
                (reads, wrong)
            })
        })
        .collect();
    let from = cluster.master_of(half.slot.parse().unwrap()).unwrap();
    let to = cluster
        .nodes()
        .into_iter()
        .find(|(id, _, flags, _)| flags.contains("master") && !flags.contains("fail") && *id != from.0)
        .map(|(id, port, ..)| (id, port))
        .unwrap();
    let seed = format!("127.0.0.1:{}", cluster.base);
    let reshard = tokio::task::spawn_blocking(move || {
        Command::new("redis-cli")
            .args(["--cluster", "reshard", &seed, "--cluster-from", &from.0, "--cluster-to", &to.0])
            .args(["--cluster-slots", "1000", "--cluster-yes", "--cluster-pipeline", "50"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    stop.store(true, Ordering::Relaxed);
    assert!(reshard.status.success(), "reshard failed: {}", String::from_utf8_lossy(&reshard.stderr));
    let (mut reads, mut wrong) = (0, 0);
    for r in readers {
        let (n, w) = r.await.unwrap();
        (reads, wrong) = (reads + n, wrong + w);
    }
    eprintln!("reshard of 1000 slots: {reads} reads, {wrong} not the expected answer");
    assert!(reads > 0);
    assert_eq!(wrong, 0, "every read during the reshard answered right");
    l2_only(&TestApp::start_on(&a.db_url, &vars).await, &after, "after the reshard").await;
}
