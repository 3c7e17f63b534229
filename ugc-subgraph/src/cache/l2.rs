//! L2: Redis, shared by all instances.
//!
//! Every call goes through the instance's [`RedisClient`] (timeout, circuit
//! breaker); a failure is a miss (reads) or a skipped write, plus a metric —
//! never an error to the caller. One `MGET` per batch reads entries *and*
//! their tags' tokens; fills are one `EVAL` per batch that stores each entry
//! only if its tag's token is still the one read before the load (the fence).

use std::time::Duration;

use deadpool_redis::redis;

use crate::redis::{BreakerState as State, RedisClient};

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

/// Moves each tag's token forward to ARGV[1] (an event id), never back: a
/// retried or late invalidation with an older id must not revive entries a
/// newer one invalidated. Ids are compared as decimal strings (length, then
/// text), exact beyond 2^53 where Lua's numbers are not. The TTL is renewed
/// either way. KEYS: tag keys. ARGV: token, ttl ms.
const ADVANCE_TOKENS: &str = r"
local t, ttl = ARGV[1], ARGV[2]
for i = 1, #KEYS do
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

pub struct L2 {
    client: RedisClient,
}

impl L2 {
    pub fn new(client: RedisClient) -> Self {
        Self { client }
    }

    pub fn state(&self) -> State {
        self.client.state()
    }

    async fn call<T, F, Fut>(&self, op: &'static str, f: F) -> Option<T>
    where
        F: FnOnce(redis::aio::MultiplexedConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        self.client.call(op, f).await
    }

    /// Entries and their tags' tokens, in one round trip.
    pub async fn mget(&self, entry_keys: &[String], tag_keys: &[String]) -> Option<(Vec<Option<Vec<u8>>>, Vec<u64>)> {
        let n = entry_keys.len();
        let values: Vec<Option<Vec<u8>>> =
            self.call("mget", |mut c| async move {
                redis::cmd("MGET").arg(entry_keys).arg(tag_keys).query_async(&mut c).await
            })
            .await?;
        if values.len() != n + tag_keys.len() {
            return None;
        }
        let mut values = values;
        let tokens = values.split_off(n).into_iter().map(parse_token).collect();
        Some((values, tokens))
    }

    /// Current tokens of these tags (absent = 0).
    pub async fn tokens(&self, tag_keys: &[String]) -> Option<Vec<u64>> {
        let values: Vec<Option<Vec<u8>>> = self
            .call("mget_tokens", |mut c| async move { redis::cmd("MGET").arg(tag_keys).query_async(&mut c).await })
            .await?;
        Some(values.into_iter().map(parse_token).collect())
    }

    /// Stores the fills whose tag token is unchanged; returns how many were stored.
    pub async fn fill(&self, fills: &[Fill]) -> Option<usize> {
        if fills.is_empty() {
            return Some(0);
        }
        let script = redis::Script::new(FENCED_FILL);
        let stored: i64 = self
            .call("fill", |mut c| async move {
                let mut invocation = script.prepare_invoke();
                for f in fills {
                    invocation.key(&f.entry_key).key(&f.tag_key);
                    invocation.arg(f.token).arg(f.ttl.as_millis().max(1) as u64).arg(&f.bytes);
                }
                invocation.invoke_async(&mut c).await
            })
            .await?;
        Some(usize::try_from(stored).unwrap_or(0))
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
        let replies: Vec<(Option<String>, Option<Vec<u8>>)> = self
            .call("lease", |mut c| async move {
                let mut pipe = redis::pipe();
                for (lease, entry) in lease_keys.iter().zip(entry_keys) {
                    pipe.cmd("SET").arg(lease).arg(owner).arg("NX").arg("PX").arg(ttl.as_millis() as u64);
                    pipe.cmd("GET").arg(entry);
                }
                let flat: Vec<redis::Value> = pipe.query_async(&mut c).await?;
                let mut out = Vec::with_capacity(lease_keys.len());
                for pair in flat.chunks(2) {
                    let taken = redis::from_redis_value::<Option<String>>(pair[0].clone())?;
                    let entry = redis::from_redis_value::<Option<Vec<u8>>>(pair[1].clone())?;
                    out.push((taken, entry));
                }
                Ok(out)
            })
            .await?;
        Some(replies.into_iter().map(|(taken, entry)| (taken.is_some(), entry)).collect())
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
    pub async fn invalidate(&self, tag_keys: &[String], token: u64, ttl: Duration) -> bool {
        let script = redis::Script::new(ADVANCE_TOKENS);
        self.call("invalidate", |mut c| async move {
            let mut invocation = script.prepare_invoke();
            for key in tag_keys {
                invocation.key(key);
            }
            invocation.arg(token.to_string()).arg(ttl.as_millis().max(1) as u64);
            invocation.invoke_async::<i64>(&mut c).await
        })
        .await
        .is_some()
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

fn parse_token(raw: Option<Vec<u8>>) -> u64 {
    raw.and_then(|b| std::str::from_utf8(&b).ok()?.parse().ok()).unwrap_or(0)
}
