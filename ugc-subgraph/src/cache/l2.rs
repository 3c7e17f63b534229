//! L2: Redis, shared by all instances.
//!
//! Every call goes through the instance's [`RedisClient`] (timeout, circuit
//! breaker); a failure is a miss (reads) or a skipped write, plus a metric —
//! never an error to the caller. One `MGET` per batch reads entries *and*
//! their tags' tokens; fills are one `EVAL` per batch that stores each entry
//! only if its tag's token is still the one read before the load (the fence).
//!
//! On a Redis Cluster a command may only name keys of one hash slot. An
//! entry, its lease and its tag's token share a slot (cache/key.rs), so each
//! script and pipeline is split by slot and the parts are sent at once: one
//! command per slot, all in flight together, so a batch costs one round trip
//! per node, not per key. The redis crate splits a cross-slot `MGET` and
//! `DEL` the same way. What must never happen here: a multi-key script whose
//! keys span slots (the cluster refuses it), or reading a token from a
//! replica (it may be behind the fence).

use std::collections::HashMap;
use std::time::Duration;

use deadpool_redis::redis;
use futures::future::{join_all, try_join_all};
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, Slot, SlotAddr};

use crate::redis::{BreakerState as State, Conn, RedisClient};

/// Stores each `(entry, tag)` pair's value only if the tag's token still
/// equals the token read before the load. KEYS: entry1, tag1, entry2, tag2…
/// ARGV: token1, px1, value1, token2, px2, value2…
const FENCED_FILL: &str = r"
local stored = 0
for i = 1, #KEYS, 2 do
  local j = (i - 1) / 2 * 3
  local token = redis.call('GET', KEYS[i + 1]) or '0'
  if token == ARGV[j + 1] then
    redis.call('SET', KEYS[i], ARGV[j + 3], 'PX', ARGV[j + 2])
    stored = stored + 1
  end
end
return stored
";

/// Moves each key's token forward to its own value, never back: a retried
/// or late invalidation with an older id must not revive entries a newer
/// one invalidated. Tokens are compared as decimal strings (length, then
/// text), exact beyond 2^53 where Lua's numbers are not. The TTL is renewed
/// either way. KEYS: tag keys (the watermark first, when it rides along).
/// ARGV: ttl ms, then one token per key.
const ADVANCE_TOKENS: &str = r"
local ttl = ARGV[1]
for i = 1, #KEYS do
  local t = ARGV[i + 1]
  local cur = redis.call('GET', KEYS[i])
  if not cur or #t > #cur or (#t == #cur and t > cur) then
    redis.call('SET', KEYS[i], t, 'PX', ttl)
  else
    redis.call('PEXPIRE', KEYS[i], ttl)
  end
end
return #KEYS
";

/// One fill: the entry, its tag's key, the token read before the load.
pub struct Fill {
    pub entry_key: String,
    pub tag_key: String,
    pub token: u64,
    pub ttl: Duration,
    pub bytes: Vec<u8>,
}

/// What one `MGET` read: entries, their tags' tokens, the watermark.
pub struct Fetched {
    pub values: Vec<Option<Vec<u8>>>,
    pub tokens: Vec<u64>,
    pub watermark: u64,
}

/// A lease reply: the key's index in the batch, whether the lease was
/// taken, the entry as it is now.
type LeaseReply = (usize, bool, Option<Vec<u8>>);

pub struct L2 {
    client: RedisClient,
    /// Invalidations, on a cluster: their `WAIT` blocks its connection.
    invalidations: RedisClient,
}

/// The longest an invalidation waits for a replica's acknowledgement (they
/// come back in well under a millisecond; a master without a replica costs
/// this per invalidation, counted in `ugc_redis_unreplicated_invalidations_total`).
const REPLICA_WAIT: Duration = Duration::from_millis(20);

/// Indices of `keys` grouped by hash slot, in first-seen order; one group
/// of all of them when Redis is a single server.
fn by_slot<'a>(cluster: bool, keys: impl Iterator<Item = &'a str>) -> Vec<Vec<usize>> {
    if !cluster {
        return vec![keys.enumerate().map(|(i, _)| i).collect()];
    }
    let mut groups: Vec<Vec<usize>> = Vec::new();
    let mut slots: HashMap<Slot, usize> = HashMap::new();
    for (i, key) in keys.enumerate() {
        let group = *slots.entry(Slot::for_key(key)).or_insert_with(|| {
            groups.push(Vec::new());
            groups.len() - 1
        });
        groups[group].push(i);
    }
    groups
}

impl L2 {
    pub fn new(client: RedisClient) -> Self {
        let invalidations = if client.is_cluster() { client.separate() } else { client.clone() };
        Self { client, invalidations }
    }

    pub fn state(&self) -> State {
        self.client.state()
    }

    async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Option<T>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        self.client.call(op, f).await
    }

    fn by_slot<'a>(&self, keys: impl Iterator<Item = &'a str>) -> Vec<Vec<usize>> {
        by_slot(self.client.is_cluster(), keys)
    }

    /// Entries, their tags' tokens and the write-position watermark, in one
    /// round trip. The watermark is set before any token it covers moves,
    /// so a token that has moved must come with a watermark at least as
    /// new: one `MGET` gives that on a single server; on a cluster the
    /// watermark lives on another node and is read after the tokens.
    /// Without `watermark_key` it reads entries and tokens only (watermark 0).
    pub async fn mget(
        &self,
        entry_keys: &[String],
        tag_keys: &[String],
        watermark_key: Option<&str>,
    ) -> Option<Fetched> {
        let n = entry_keys.len();
        let together = watermark_key.filter(|_| !self.client.is_cluster());
        let mut values: Vec<Option<Vec<u8>>> = self
            .call("mget", |mut c| async move {
                redis::cmd("MGET").arg(entry_keys).arg(tag_keys).arg(together).query_async(&mut c).await
            })
            .await?;
        let watermark = match (watermark_key, together) {
            (None, _) => 0,
            (Some(_), Some(_)) => values.pop()?.map_or(0, parse),
            (Some(key), None) => self.watermark(key).await?,
        };
        if values.len() != n + tag_keys.len() {
            return None;
        }
        let tokens = values.split_off(n).into_iter().map(|t| t.map_or(0, parse)).collect();
        Some(Fetched { values, tokens, watermark })
    }

    /// Current tokens of these tags (absent = 0) and the watermark, read as
    /// in [`L2::mget`].
    pub async fn tokens(&self, tag_keys: &[String], watermark_key: &str) -> Option<(Vec<u64>, u64)> {
        let cluster = self.client.is_cluster();
        let together = (!cluster).then_some(watermark_key);
        let mut values: Vec<Option<Vec<u8>>> = self
            .call("mget_tokens", |mut c| async move {
                redis::cmd("MGET").arg(tag_keys).arg(together).query_async(&mut c).await
            })
            .await?;
        let watermark = if cluster { self.watermark(watermark_key).await? } else { values.pop()?.map_or(0, parse) };
        Some((values.into_iter().map(|t| t.map_or(0, parse)).collect(), watermark))
    }

    async fn watermark(&self, key: &str) -> Option<u64> {
        let raw: Option<Vec<u8>> = self
            .call("get_watermark", |mut c| async move { redis::cmd("GET").arg(key).query_async(&mut c).await })
            .await?;
        Some(raw.map_or(0, parse))
    }

    /// Stores the fills whose tag token is unchanged; returns how many were stored.
    pub async fn fill(&self, fills: &[Fill]) -> Option<usize> {
        if fills.is_empty() {
            return Some(0);
        }
        let script = redis::Script::new(FENCED_FILL);
        let groups = self.by_slot(fills.iter().map(|f| f.entry_key.as_str()));
        let stored: Vec<i64> = self
            .call("fill", |c| {
                try_join_all(groups.iter().map(|group| {
                    let mut invocation = script.prepare_invoke();
                    for f in group.iter().map(|&i| &fills[i]) {
                        invocation.key(&f.entry_key).key(&f.tag_key);
                        invocation.arg(f.token).arg(f.ttl.as_millis().max(1) as u64).arg(&f.bytes);
                    }
                    let mut c = c.clone();
                    async move { invocation.invoke_async(&mut c).await }
                }))
            })
            .await?;
        Some(stored.into_iter().map(|n| usize::try_from(n).unwrap_or(0)).sum())
    }

    /// Tries to take the load lease of each key and, in the same round
    /// trip, re-reads its entry: a holder may have filled it and released
    /// its lease between our `MGET` and now (double-checked locking).
    pub async fn lease(
        &self,
        lease_keys: &[String],
        entry_keys: &[String],
        ttl: Duration,
        owner: &str,
    ) -> Option<Vec<(bool, Option<Vec<u8>>)>> {
        let groups = self.by_slot(lease_keys.iter().map(String::as_str));
        let replies: Vec<Vec<LeaseReply>> = self
            .call("lease", |c| {
                try_join_all(groups.iter().map(|group| {
                    let mut pipe = redis::pipe();
                    for &i in group {
                        pipe.cmd("SET").arg(&lease_keys[i]).arg(owner).arg("NX").arg("PX").arg(ttl.as_millis() as u64);
                        pipe.cmd("GET").arg(&entry_keys[i]);
                    }
                    let mut c = c.clone();
                    async move {
                        let flat: Vec<redis::Value> = pipe.query_async(&mut c).await?;
                        let mut out = Vec::with_capacity(group.len());
                        for (&i, pair) in group.iter().zip(flat.chunks(2)) {
                            let taken = redis::from_redis_value::<Option<String>>(pair[0].clone())?;
                            let entry = redis::from_redis_value::<Option<Vec<u8>>>(pair[1].clone())?;
                            out.push((i, taken.is_some(), entry));
                        }
                        Ok(out)
                    }
                }))
            })
            .await?;
        let mut out: Vec<(bool, Option<Vec<u8>>)> = vec![(false, None); lease_keys.len()];
        for (i, taken, entry) in replies.into_iter().flatten() {
            out[i] = (taken, entry);
        }
        Some(out)
    }

    /// Releases leases (best effort: they expire anyway).
    pub async fn release(&self, lease_keys: &[String]) {
        if lease_keys.is_empty() {
            return;
        }
        let _: Option<()> = self
            .call("release", |mut c| async move { redis::cmd("DEL").arg(lease_keys).query_async(&mut c).await })
            .await;
    }

    /// Moves each tag's token forward to `token` (unique and increasing: an
    /// outbox event id), atomically and never back, which invalidates every
    /// entry filled under an older token. The token outlives every entry
    /// (`ttl`), so an expired token can never bring an old entry back.
    ///
    /// On a cluster it then waits (`WAIT`, at most [`REPLICA_WAIT`]) until a
    /// replica of each master written to has the new tokens: replication is
    /// asynchronous, and a master that failed over before passing a token
    /// on would leave its replica serving entries the token had fenced off.
    /// A master without a replica in time is counted, not retried for ever.
    ///
    /// `watermark`, when given, is advanced first (see [`L2::mget`]): on a
    /// single server in the same script, so a write's invalidation costs
    /// one round trip; on a cluster it lives on another node and is
    /// advanced by a call of its own before the tokens move. Its failure
    /// does not hold the tokens back: a master that is down must not keep
    /// every other entry from being invalidated. Until the instances raise
    /// their own watermarks from the relay's notifications, a load may then
    /// read a replica that lacks the write (the relay took that trade before
    /// the watermark rode along, too).
    pub async fn invalidate(
        &self,
        watermark: Option<(&str, u64)>,
        tag_keys: &[String],
        token: u64,
        ttl: Duration,
    ) -> bool {
        let token = token.to_string();
        let mut keys: Vec<(&str, String)> = Vec::with_capacity(tag_keys.len() + 1);
        if let Some((key, lsn)) = watermark {
            if self.client.is_cluster() {
                self.advance(&[(key, lsn.to_string())], ttl).await;
            } else {
                keys.push((key, lsn.to_string()));
            }
        }
        keys.extend(tag_keys.iter().map(|k| (k.as_str(), token.clone())));
        self.advance(&keys, ttl).await
    }

    async fn advance(&self, keys: &[(&str, String)], ttl: Duration) -> bool {
        let script = redis::Script::new(ADVANCE_TOKENS);
        let groups = self.by_slot(keys.iter().map(|(k, _)| *k));
        let cluster = self.client.is_cluster();
        let wait_ms = REPLICA_WAIT.min(self.client.timeout() / 2).as_millis().max(1) as u64;
        let replicated: Option<Vec<bool>> = self
            .invalidations
            .call("invalidate", |c| async move {
                // Every slot's part runs to its end even when another
                // fails: a master that is down must not keep the others'
                // entries from being invalidated (they are read meanwhile).
                let parts = join_all(groups.iter().map(|group| {
                    let mut invocation = script.prepare_invoke();
                    invocation.arg(ttl.as_millis().max(1) as u64);
                    for &i in group {
                        invocation.key(keys[i].0).arg(&keys[i].1);
                    }
                    let mut c = c.clone();
                    let first = group.first().map(|&i| keys[i].0);
                    async move {
                        invocation.invoke_async::<i64>(&mut c).await?;
                        match (c, first) {
                            (Conn::Cluster(mut c), Some(key)) if cluster => {
                                Ok(wait_for_replica(&mut c, key, wait_ms).await)
                            }
                            _ => Ok(true),
                        }
                    }
                }))
                .await;
                parts.into_iter().collect::<redis::RedisResult<Vec<bool>>>()
            })
            .await;
        match replicated {
            Some(acks) => {
                if acks.contains(&false) {
                    self.invalidations.unreplicated();
                }
                true
            }
            None => false,
        }
    }

    /// Records hot keys (encoded) with their rates in a sorted set.
    pub async fn record_hot(&self, set_key: &str, members: &[(Vec<u8>, u32)]) {
        if members.is_empty() {
            return;
        }
        let _: Option<()> = self
            .call("record_hot", |mut c| async move {
                let mut pipe = redis::pipe();
                for (member, score) in members {
                    pipe.cmd("ZADD").arg(set_key).arg(*score).arg(member).ignore();
                }
                pipe.cmd("ZREMRANGEBYRANK").arg(set_key).arg(0).arg(-(super::hot::MAX_HOT as i64) - 1).ignore();
                pipe.cmd("EXPIRE").arg(set_key).arg(3600).ignore();
                pipe.query_async(&mut c).await
            })
            .await;
    }

    /// The recorded hot keys, hottest first.
    pub async fn hot_members(&self, set_key: &str, limit: usize) -> Vec<Vec<u8>> {
        self.call("hot_members", |mut c| async move {
            redis::cmd("ZREVRANGE").arg(set_key).arg(0).arg(limit.saturating_sub(1)).query_async(&mut c).await
        })
        .await
        .unwrap_or_default()
    }

    pub async fn ping(&self) -> bool {
        self.client.ping().await
    }
}

/// `WAIT 1` at the master of `key`'s slot, on the connection that wrote
/// to it: whether a replica has everything written there so far. The
/// tokens are applied whatever it says; a failed `WAIT` is a `false`.
async fn wait_for_replica(c: &mut redis::cluster_async::ClusterConnection, key: &str, wait_ms: u64) -> bool {
    let mut wait = redis::cmd("WAIT");
    wait.arg(1).arg(wait_ms);
    let master = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(Route::with_key(key, SlotAddr::Master)));
    c.route_command(wait, master).await.is_ok_and(|acks| redis::from_redis_value::<i64>(acks).is_ok_and(|n| n >= 1))
}

/// A token or watermark (absent or unreadable = 0).
fn parse(raw: Vec<u8>) -> u64 {
    std::str::from_utf8(&raw).ok().and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_single_server_takes_a_batch_whole_and_a_cluster_one_command_per_slot() {
        let keys = ["p:g:{o:1}", "p:v2:rt:{o:1}", "p:g:{o:2}", "p:v2:po:n:5:-:{o:1}", "p:g:{o:2}"];
        assert_eq!(by_slot(false, keys.into_iter()), vec![vec![0, 1, 2, 3, 4]]);
        assert_eq!(by_slot(true, keys.into_iter()), vec![vec![0, 1, 3], vec![2, 4]]);
        assert!(by_slot(true, std::iter::empty()).is_empty());
    }
}
