//! The GraphQL schema: the public contract (`../shared/contract/ugc.graphql`)
//! plus Apollo Federation 2 entities for `Review`, `Offer` and `User`.
//!
//! Resolvers read only through the DataLoaders ([`crate::loaders`]) and write
//! only through the store's mutation methods; they never run SQL. Every error
//! they return is an [`ApiError`], so each carries an `extensions.code`.

pub mod cost;
mod entities;
pub mod entity_cache;
mod mutation;
mod query;
pub mod raw_request;
pub mod types;

use async_graphql::{EmptySubscription, MergedObject, SDLExportOptions, Schema, SchemaBuilder};

use crate::config::{DomainConfig, GraphqlConfig};
use crate::domain::auth::AuthError;
use crate::domain::Viewer;
use crate::error::ApiError;
use crate::events::Events;
use crate::loaders::Loaders;
use crate::store::Store;

pub use mutation::{IdempotencyHeader, Mutation};

#[derive(MergedObject, Default)]
pub struct Query(query::RootQuery, entities::EntityQuery);

pub type UgcSchema = Schema<Query, Mutation, EmptySubscription>;

/// Who sent the request, as established by the HTTP layer (request data).
#[derive(Debug, Clone)]
pub struct RequestAuth(pub Result<Viewer, AuthError>);

impl RequestAuth {
    /// The viewer for reads: a request with a bad token reads as anonymous.
    pub fn reader(&self) -> &Viewer {
        static ANONYMOUS: Viewer = Viewer::Anonymous;
        self.0.as_ref().unwrap_or(&ANONYMOUS)
    }

    /// The viewer for writes: must be a signed-in user.
    pub fn writer(&self) -> Result<&Viewer, ApiError> {
        match &self.0 {
            Ok(Viewer::Anonymous) => Err(AuthError::Missing.into()),
            Ok(viewer) => Ok(viewer),
            Err(e) => Err(e.clone().into()),
        }
    }
}

/// The schema's types without data or limits: enough to print the SDL.
pub fn schema_builder() -> SchemaBuilder<Query, Mutation, EmptySubscription> {
    Schema::build(Query::default(), Mutation, EmptySubscription).enable_federation()
}

/// Builds the schema with its process-wide data (store, loaders, settings).
pub fn build(
    store: Store,
    loaders: Loaders,
    events: Events,
    domain: DomainConfig,
    config: &GraphqlConfig,
) -> UgcSchema {
    let mut builder = schema_builder()
        .limit_depth(config.max_depth)
        .limit_complexity(config.max_complexity)
        .limit_recursive_depth(config.max_depth.max(32))
        .limit_directives(50)
        .data(store)
        .data(loaders)
        .data(events)
        .data(domain);
    if !config.introspection {
        builder = builder.disable_introspection();
    }
    builder.finish()
}

/// The federation SDL, as served by `_service { sdl }` and checked in under
/// `schema/ugc-subgraph.graphql`.
pub fn sdl(schema: &UgcSchema) -> String {
    schema.sdl_with_options(SDLExportOptions::new().federation().compose_directive())
}
