//! The application state, built once at start-up and shared by every
//! request (cheap to clone: everything inside is reference-counted).

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::events::router::RouterInvalidation;
use crate::events::{fanout, Events};
use crate::graphql::cost::CostGuard;
use crate::graphql::entity_cache::EntityCache;
use crate::graphql::{self, UgcSchema};
use crate::http::auth::Authenticator;
use crate::http::client::ClientResolver;
use crate::loaders::{Loaders, ReadCache};
use crate::ratelimit::RateLimits;
use crate::redis::RedisClient;
use crate::store::Store;
use crate::telemetry::metrics::Metrics;

/// How often this instance's hot keys are written to Redis for warm-ups.
const HOT_KEY_RECORD_INTERVAL: Duration = Duration::from_secs(5);
/// How often rate limiters forget clients that went quiet.
const LIMITER_CLEAN_INTERVAL: Duration = Duration::from_secs(60);

/// Cloned for every request, by every `State` extractor and layer: one
/// reference count (a struct of a dozen handles cloned and dropped that
/// often was 7 % of the CPU of an answer from rendered fragments).
#[derive(Clone)]
pub struct AppState(Arc<Shared>);

impl std::ops::Deref for AppState {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.0
    }
}

/// What every request shares: each field is a handle.
pub struct Shared {
    /// Validated settings.
    pub config: Arc<Config>,
    /// Postgres pools; the mutation path and health checks use it directly.
    pub store: Store,
    /// The executable schema, holding the shared DataLoader.
    pub schema: UgcSchema,
    /// Verifies bearer tokens.
    pub auth: Arc<Authenticator>,
    /// The read cache (the schema's loaders hold the same one); the event
    /// pipeline invalidates through it.
    pub cache: ReadCache,
    /// Rendered `_entities` fragments for the gateway's entity fetches.
    pub entity_cache: Arc<EntityCache>,
    /// The event pipeline: relay and fan-out (background), and the
    /// external events endpoint.
    pub events: Events,
    /// Every metric of the process.
    pub metrics: Arc<Metrics>,
    /// Rate limits: per instance, and shared through Redis when it is configured.
    pub limits: Arc<RateLimits>,
    /// Finds the real client of a request behind trusted proxies.
    pub clients: Arc<ClientResolver>,
    /// Query cost limits, with each query text's analysis kept.
    pub cost: Arc<CostGuard>,
    /// Set on SIGTERM: readiness fails while requests are still served.
    pub draining: Arc<std::sync::atomic::AtomicBool>,
}

impl AppState {
    /// Wires the service together. Connects lazily: nothing here needs
    /// Postgres or Redis to be up.
    ///
    /// # Errors
    /// A database or Redis URL that cannot be used.
    pub fn build(config: Config) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::new());
        let store = Store::connect(&config.database, Arc::clone(&metrics))?;
        let redis = match &config.redis {
            Some(target) => Some(RedisClient::new(target, config.cache.redis_timeout, Arc::clone(&metrics))?),
            None => None,
        };
        let loaders = Loaders::build(&config, store.clone(), redis.clone(), Arc::clone(&metrics));
        let limits = Arc::new(RateLimits::new(&config, redis.as_ref(), &metrics));
        let clients = Arc::new(ClientResolver::new(config.auth.trusted_proxies.clone()));
        let cost = Arc::new(CostGuard::new(config.graphql.clone()));
        let cache = loaders.cache.clone();
        let events = Events::new(store.clone(), cache.clone(), Arc::clone(&metrics), &config.coherence).with_router(
            RouterInvalidation::start(&config.router, config.coherence.write_visibility_timeout, &metrics),
        );
        let entity_cache = Arc::new(EntityCache::new(
            config.cache.enabled && config.cache.entity_cache,
            config.router.tags,
            config.cache.l1_max_bytes / 2,
            cache.clone(),
            Arc::clone(&metrics),
        ));
        let schema = graphql::build(store.clone(), loaders, events.clone(), config.domain.clone(), &config.graphql);
        let auth = Arc::new(Authenticator::new(config.auth.jwt_secret.as_deref()));
        Ok(Self(Arc::new(Shared {
            config: Arc::new(config),
            store,
            schema,
            auth,
            cache,
            entity_cache,
            events,
            metrics,
            limits,
            clients,
            cost,
            draining: Arc::default(),
        })))
    }

    /// Starts the background work of an instance: the outbox relay, the
    /// invalidation listener, and hot-key recording. All stop with `stop`.
    pub fn spawn_background(&self, stop: &CancellationToken) -> Vec<JoinHandle<()>> {
        let mut tasks = vec![
            tokio::spawn(self.events.clone().run_relay(stop.clone())),
            tokio::spawn(fanout::run(self.events.clone(), self.store.listen_pool().clone(), stop.clone())),
            tokio::spawn(Arc::clone(self.events.visibility()).run(stop.clone())),
            tokio::spawn(self.store.clone().follow_replica(stop.clone())),
        ];
        let (cache, limits, stop) = (self.cache.clone(), Arc::clone(&self.limits), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut record = tokio::time::interval(HOT_KEY_RECORD_INTERVAL);
            let mut clean = tokio::time::interval(LIMITER_CLEAN_INTERVAL);
            record.tick().await;
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    _ = record.tick() => cache.record_hot_keys().await,
                    _ = clean.tick() => limits.forget_idle(),
                }
            }
        }));
        tasks
    }
}
