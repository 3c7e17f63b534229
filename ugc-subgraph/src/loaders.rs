//! DataLoaders: the only way resolvers read data, and the place where the
//! cache and the store meet.
//!
//! A lookup first tries L1 directly ([`Cache::get`]): a hit costs no
//! batching delay. Misses go to one long-lived [`DataLoader`] shared by all
//! requests, so keys are batched within a request *and* across concurrent
//! requests; each batch goes through [`Cache::load`] (L2, then one store
//! call per kind for what is still missing).
//!
//! Loaders never decide visibility. The cached review lookup returns only
//! published reviews (what anyone may see); [`Loaders::review_any_status`]
//! bypasses the cache and is used only for signed-in viewers, whose private
//! view must never enter a shared entry.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_graphql::dataloader::{DataLoader, Loader};
use tracing::Instrument;

use crate::cache::{BoxFuture, Cache, CacheKey, CachedValue, Source, Tag};
use crate::config::Config;
use crate::domain::{Page, RatingSummary, Review, ReviewStatus};
use crate::redis::RedisClient;
use crate::store::{PageKey, Store, StoreError};
use crate::telemetry::metrics::{Metrics, LOADER};

tokio::task_local! {
    /// Set while an entity is rendered for the entity cache: collects every
    /// tag the rendering read, with its token taken before the read.
    static RECORDER: Recorder;
    /// Set while the entity cache prepares a rendering (see [`Preparation`]).
    static PREPARING: Preparation;
}

/// How reads that miss L1 behave while the entity cache prepares the
/// rendering of many entities.
///
/// Why: the DataLoader batches by time (keys arriving within its delay), so
/// whether a hundred entities' keys share one statement depends on how fast
/// they are enqueued. Discovering the keys first (an execution from L1 that
/// notes what it misses), then loading them in one call, costs one statement
/// per kind and per level of nesting, however slow the machine.
#[derive(Clone)]
enum Preparation {
    /// Misses are noted, not loaded; they read as absent.
    Discover(Arc<std::sync::Mutex<HashSet<CacheKey>>>),
    /// Loading them failed: misses fail with this error at once, without
    /// repeating the load (and, with Postgres down, its time-out).
    Failed(LoadError),
}

/// Runs `f` noting, instead of loading, every key it misses in L1.
pub async fn discovering<F: std::future::Future>(f: F) -> (F::Output, Vec<CacheKey>) {
    let keys = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let out = PREPARING.scope(Preparation::Discover(Arc::clone(&keys)), f).await;
    let keys = std::mem::take(&mut *keys.lock().unwrap_or_else(|e| e.into_inner()));
    (out, keys.into_iter().collect())
}

/// Runs `f` with every L1 miss failing with `error`.
pub async fn failing<F: std::future::Future>(error: LoadError, f: F) -> F::Output {
    PREPARING.scope(Preparation::Failed(error), f).await
}

/// What one rendering read (see `graphql/entity_cache.rs`): every tag with
/// its token taken before the read, and when the oldest value it read stops
/// being fresh (`None`: it read nothing cached).
#[derive(Default)]
pub struct Deps {
    pub tags: Vec<(Tag, u64)>,
    pub fresh_until: Option<Instant>,
    /// Something was read that depends on who asks (a signed-in viewer's
    /// look past the public cache): the answer must not be shared.
    pub private: bool,
}

impl Deps {
    /// The tags, each (tag, token) once: a rendering reads an offer's tag
    /// three times (its rating, its page, the page's `totalCount`), and a
    /// fragment checks every dependency on every hit. The same tag with two
    /// tokens stays twice, so that the older one still refuses the fill.
    pub fn distinct_tags(mut self) -> Vec<(Tag, u64)> {
        self.tags.sort_unstable();
        self.tags.dedup();
        self.tags
    }

    fn read(&mut self, fresh_until: Instant) {
        self.fresh_until = Some(self.fresh_until.map_or(fresh_until, |t| t.min(fresh_until)));
    }
}

/// Collects the [`Deps`] of one rendering.
#[derive(Clone, Default)]
pub struct Recorder(Arc<std::sync::Mutex<Deps>>);

impl Recorder {
    pub fn take(&self) -> Deps {
        std::mem::take(&mut *self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Deps> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Runs `f` recording the tags its reads depend on.
pub async fn recording<F: std::future::Future>(recorder: Recorder, f: F) -> F::Output {
    RECORDER.scope(recorder, f).await
}

/// Errors are shared by every request waiting on a batch.
pub type LoadError = Arc<StoreError>;

/// The read cache over the store.
pub type ReadCache = Cache<StoreSource>;

/// Loads cache keys from Postgres: one statement per kind in the batch, run
/// concurrently.
pub struct StoreSource {
    store: Store,
    metrics: Arc<Metrics>,
}

impl StoreSource {
    fn observe(&self, loader: &'static str, keys: usize) {
        self.metrics.loader_batch_size.get_or_create(&[(LOADER, loader)]).observe(keys as f64);
    }

    async fn load_all(&self, keys: Vec<CacheKey>) -> Result<HashMap<CacheKey, CachedValue>, LoadError> {
        let (mut reviews, mut ratings, mut counts, mut pages) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for key in keys {
            match key {
                CacheKey::Review(id) => reviews.push(id),
                CacheKey::Rating(offer) => ratings.push(offer),
                CacheKey::AuthorCount(author) => counts.push(author),
                CacheKey::Page(page) => pages.push(page),
            }
        }
        let reviews_fut = async {
            if reviews.is_empty() {
                return Ok(Vec::new());
            }
            self.observe("review", reviews.len());
            let found: HashMap<i64, Review> =
                self.store.reviews_by_ids(&reviews).await?.into_iter().map(|r| (r.id, r)).collect();
            // Public view: anything not published is cached as absent.
            Ok::<_, StoreError>(
                reviews
                    .iter()
                    .map(|id| {
                        let public = found.get(id).filter(|r| r.status == ReviewStatus::Published).cloned();
                        (CacheKey::Review(*id), CachedValue::Review(public.map(Arc::new)))
                    })
                    .collect(),
            )
        };
        let ratings_fut = async {
            if ratings.is_empty() {
                return Ok(Vec::new());
            }
            self.observe("offer_rating", ratings.len());
            let found = self.store.offer_ratings(&ratings).await?;
            Ok(found.into_iter().map(|(id, s)| (CacheKey::Rating(id), CachedValue::Rating(s))).collect())
        };
        let counts_fut = async {
            if counts.is_empty() {
                return Ok(Vec::new());
            }
            self.observe("author_review_count", counts.len());
            let found = self.store.author_review_counts(&counts).await?;
            Ok(found.into_iter().map(|(id, n)| (CacheKey::AuthorCount(id), CachedValue::Count(n))).collect())
        };
        let pages_fut = async {
            if pages.is_empty() {
                return Ok(Vec::new());
            }
            self.observe("review_page", pages.len());
            let found = self.store.pages(&pages).await?;
            Ok(found.into_iter().map(|(k, p)| (CacheKey::Page(k), CachedValue::Page(Arc::new(p)))).collect())
        };
        let (a, b, c, d) = futures::future::try_join4(reviews_fut, ratings_fut, counts_fut, pages_fut).await?;
        Ok(a.into_iter().chain(b).chain(c).chain(d).collect())
    }
}

impl Source for StoreSource {
    type Error = LoadError;

    fn load(&self, keys: Vec<CacheKey>) -> BoxFuture<'_, Result<HashMap<CacheKey, CachedValue>, LoadError>> {
        Box::pin(self.load_all(keys))
    }

    fn require(&self, watermark: u64) {
        self.store.require(watermark);
    }
}

/// The DataLoader's batch function: cache (L2 + single-flight) → store.
pub struct Batches {
    cache: ReadCache,
}

impl Loader<CacheKey> for Batches {
    type Value = CachedValue;
    type Error = LoadError;

    async fn load(&self, keys: &[CacheKey]) -> Result<HashMap<CacheKey, CachedValue>, LoadError> {
        let span = crate::child_span!("dataloader.batch", kind = "cache", size = keys.len());
        self.cache.load(keys).instrument(span).await
    }
}

/// A review by id in any status, straight from the store (never cached).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PrivateReviewKey(pub i64);

pub struct PrivateReviews {
    store: Store,
}

impl Loader<PrivateReviewKey> for PrivateReviews {
    type Value = Arc<Review>;
    type Error = LoadError;

    async fn load(&self, keys: &[PrivateReviewKey]) -> Result<HashMap<PrivateReviewKey, Arc<Review>>, LoadError> {
        let ids: Vec<i64> = keys.iter().map(|k| k.0).collect();
        let span = crate::child_span!("dataloader.batch", kind = "private_review", size = ids.len());
        let found = self.store.reviews_by_ids(&ids).instrument(span).await?;
        Ok(found.into_iter().map(|r| (PrivateReviewKey(r.id), Arc::new(r))).collect())
    }
}

/// Runs a batch in the span of the request that started it, so that a
/// trace shows the batch under its operation.
fn spawn_in_current_span(batch: futures::future::BoxFuture<'static, ()>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(batch.in_current_span())
}

/// What resolvers hold: typed lookups over the cache and the loaders.
pub struct Loaders {
    pub cache: ReadCache,
    batches: DataLoader<Batches>,
    private: DataLoader<PrivateReviews>,
    detector: StaleReadDetector,
}

/// Samples cache hits and checks the reviews they hold against Postgres: a
/// hit showing an older version (or a review no longer public) whose change
/// committed more than `window` ago is a stale read — an invalidation that
/// did not happen. Runs off the request path.
struct StaleReadDetector {
    store: Store,
    metrics: Arc<Metrics>,
    rate: f64,
    window: Duration,
}

impl StaleReadDetector {
    fn sample(&self, value: &CachedValue) {
        if self.rate <= 0.0 || rand::random::<f64>() >= self.rate {
            return;
        }
        let cached: Vec<(i64, i64)> = match value {
            CachedValue::Review(Some(r)) => vec![(r.id, r.version)],
            CachedValue::Page(p) => p.reviews.iter().map(|r| (r.id, r.version)).collect(),
            _ => return,
        };
        if cached.is_empty() {
            return;
        }
        let (store, metrics, window) = (self.store.clone(), Arc::clone(&self.metrics), self.window);
        tokio::spawn(async move {
            let ids: Vec<i64> = cached.iter().map(|(id, _)| *id).collect();
            let Ok(rows) = store.review_versions(&ids).await else { return };
            metrics.stale_read_checks.inc();
            let settled = chrono::Utc::now() - window;
            for row in rows {
                let Some((_, seen)) = cached.iter().find(|(id, _)| *id == row.id) else { continue };
                if (row.version > *seen || !row.public) && row.updated_at < settled {
                    metrics.stale_reads.inc();
                    tracing::warn!(review = row.id, cached = seen, current = row.version, "stale read detected");
                }
            }
        });
    }
}

impl Loaders {
    /// Builds the process-wide loaders and their cache (L2 on `redis`).
    pub fn build(config: &Config, store: Store, redis: Option<RedisClient>, metrics: Arc<Metrics>) -> Self {
        let cache_metrics = Arc::clone(&metrics);
        let source = StoreSource { store: store.clone(), metrics: Arc::clone(&metrics) };
        let cache = Cache::new(config.cache.clone(), redis, source, metrics);
        let delay: Duration = config.graphql.loader_delay;
        let detector = StaleReadDetector {
            store: store.clone(),
            metrics: Arc::clone(&cache_metrics),
            rate: config.cache.stale_check_rate,
            window: config.cache.stale_window,
        };
        Self {
            detector,
            batches: DataLoader::new(Batches { cache: cache.clone() }, spawn_in_current_span)
                .delay(delay)
                .max_batch_size(500),
            private: DataLoader::new(PrivateReviews { store }, spawn_in_current_span).delay(delay),
            cache,
        }
    }

    async fn get(&self, key: CacheKey) -> Result<Option<CachedValue>, LoadError> {
        // Inside a recorded rendering: note the tag and its token *before*
        // reading, so that an invalidation during the read is caught.
        let recorder = RECORDER.try_with(|r| {
            let tag = key.tag();
            let token = self.cache.token(&tag);
            r.lock().tags.push((tag, token));
            r.clone()
        });
        let (value, fresh_until) = match self.cache.get(&key).await {
            Some((value, fresh_until)) => (Some(value), Some(fresh_until)),
            None => match PREPARING.try_with(Clone::clone) {
                Ok(Preparation::Discover(keys)) => {
                    keys.lock().unwrap_or_else(|e| e.into_inner()).insert(key);
                    return Ok(None);
                }
                Ok(Preparation::Failed(error)) => return Err(error),
                Err(_) => (self.batches.load_one(key.clone()).await?, None),
            },
        };
        if let Ok(recorder) = recorder {
            // How long what was just read stays fresh (its L1 entry; a value
            // not in L1 any more is as old as can be: now).
            let until = match fresh_until {
                Some(until) => until,
                None => self.cache.fresh_until(&key).await.unwrap_or_else(Instant::now),
            };
            recorder.lock().read(until);
        }
        // Whichever layer answered (L1, L2 or Postgres), sample it.
        if let Some(value) = &value {
            self.detector.sample(value);
        }
        Ok(value)
    }

    /// A published review (what anyone may see).
    pub async fn public_review(&self, id: i64) -> Result<Option<Arc<Review>>, LoadError> {
        Ok(match self.get(CacheKey::Review(id)).await? {
            Some(CachedValue::Review(review)) => review,
            _ => None,
        })
    }

    /// A live review in any status: for signed-in viewers only, uncached.
    pub async fn review_any_status(&self, id: i64) -> Result<Option<Arc<Review>>, LoadError> {
        self.depends_on_viewer();
        self.private.load_one(PrivateReviewKey(id)).await
    }

    /// Marks what is being answered as one the viewer could change (a
    /// review that is not public: its author or a moderator would see it).
    pub fn depends_on_viewer(&self) {
        let _ = RECORDER.try_with(|r| r.lock().private = true);
    }

    pub async fn rating(&self, offer_id: &str) -> Result<RatingSummary, LoadError> {
        Ok(match self.get(CacheKey::Rating(offer_id.to_owned())).await? {
            Some(CachedValue::Rating(summary)) => summary,
            _ => RatingSummary::default(),
        })
    }

    pub async fn author_count(&self, author_id: &str) -> Result<i64, LoadError> {
        Ok(match self.get(CacheKey::AuthorCount(author_id.to_owned())).await? {
            Some(CachedValue::Count(n)) => n,
            _ => 0,
        })
    }

    pub async fn page(&self, key: PageKey) -> Result<Arc<Page>, LoadError> {
        Ok(match self.get(CacheKey::Page(key)).await? {
            Some(CachedValue::Page(page)) => page,
            _ => Arc::default(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rendering_keeps_each_dependency_once_and_every_token_of_a_tag() {
        let offer = || Tag::Offer("offer-1".into());
        let deps = Deps {
            tags: vec![(offer(), 4), (Tag::Review(7), 1), (offer(), 4), (offer(), 5), (offer(), 4)],
            ..Deps::default()
        };
        let tags = deps.distinct_tags();
        assert_eq!(tags.len(), 3, "{tags:?}");
        assert!(tags.contains(&(offer(), 4)) && tags.contains(&(offer(), 5)), "an invalidated read still fences");
        assert!(tags.contains(&(Tag::Review(7), 1)));
    }
}
