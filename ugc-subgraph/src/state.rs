//! The application state, built once at start-up and shared by every
//! request (cheap to clone: everything inside is reference-counted).

use std::sync::Arc;

use crate::config::Config;
use crate::graphql::{self, UgcSchema};
use crate::http::auth::Authenticator;
use crate::loaders;
use crate::store::{Store, StoreError};
use crate::telemetry::metrics::Metrics;

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
    /// Every metric of the process.
    pub metrics: Arc<Metrics>,
}

impl AppState {
    /// Wires the service together. Connects lazily: nothing here needs
    /// Postgres to be up.
    ///
    /// # Errors
    /// A database URL that does not parse.
    pub fn build(config: Config) -> Result<Self, StoreError> {
        let metrics = Arc::new(Metrics::new());
        let store = Store::connect(&config.database, Arc::clone(&metrics))?;
        let loaders = loaders::build(
            store.clone(),
            Arc::clone(&metrics),
            config.graphql.loader_delay,
        );
        let schema = graphql::build(
            store.clone(),
            loaders,
            config.domain.clone(),
            &config.graphql,
        );
        let auth = Authenticator::new(config.auth.jwt_secret.as_deref());
        Ok(Self {
            config: Arc::new(config),
            store,
            schema,
            auth,
            metrics,
        })
    }
}
