//! The application state, built once at start-up and shared by every
//! request (cheap to clone: everything inside is reference-counted).

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::events::{fanout, Events};
use crate::graphql::entity_cache::EntityCache;
use crate::graphql::{self, UgcSchema};
use crate::http::auth::Authenticator;
use crate::loaders::{Loaders, ReadCache};
use crate::store::Store;
use crate::telemetry::metrics::Metrics;

/// How often this instance's hot keys are written to Redis for warm-ups.
const HOT_KEY_RECORD_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct AppState {
    /// Validated settings.
    pub config: Arc<Config>,
    /// Postgres pools; the mutation path and health checks use it directly.
    pub store: Store,
    /// The executable schema, holding the shared DataLoader.
    pub schema: UgcSchema,
    /// Verifies bearer tokens.
    pub auth: Authenticator,
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
        let loaders = Loaders::build(&config, store.clone(), Arc::clone(&metrics))?;
        let cache = loaders.cache.clone();
        let events = Events::new(store.clone(), cache.clone(), Arc::clone(&metrics));
        let entity_cache = Arc::new(EntityCache::new(
            config.cache.enabled && config.cache.entity_cache,
            config.cache.l1_max_bytes / 2,
            cache.clone(),
            Arc::clone(&metrics),
        ));
        let schema = graphql::build(store.clone(), loaders, events.clone(), config.domain.clone(), &config.graphql);
        let auth = Authenticator::new(config.auth.jwt_secret.as_deref());
        Ok(Self { config: Arc::new(config), store, schema, auth, cache, entity_cache, events, metrics })
    }

    /// Starts the background work of an instance: the outbox relay, the
    /// invalidation listener, and hot-key recording. All stop with `stop`.
    pub fn spawn_background(&self, stop: &CancellationToken) -> Vec<JoinHandle<()>> {
        let mut tasks = vec![
            tokio::spawn(self.events.clone().run_relay(stop.clone())),
            tokio::spawn(fanout::run(self.events.clone(), self.store.listen_pool().clone(), stop.clone())),
        ];
        let (cache, stop) = (self.cache.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(HOT_KEY_RECORD_INTERVAL) => cache.record_hot_keys().await,
                }
            }
        }));
        tasks
    }
}
