//! DataLoaders: the only way resolvers read data.
//!
//! One long-lived [`DataLoader`] is shared by all requests, so keys are
//! batched within a request *and* across concurrent requests: every batch of
//! one key type becomes one store call (one SQL statement per batch, one per
//! page shape for pages). Each key type is a newtype so that batches of
//! different kinds never mix.
//!
//! Loaders never decide visibility: they return what is stored (reviews in
//! any status); resolvers apply [`crate::domain::Viewer`] rules.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_graphql::dataloader::{DataLoader, Loader};

use crate::domain::{Page, RatingSummary, Review};
use crate::store::{PageKey, Store, StoreError};
use crate::telemetry::metrics::{Metrics, LOADER};

/// A review by id (live, any status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReviewKey(pub i64);
/// The rating aggregate of an offer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RatingKey(pub String);
/// The published review count of an author.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AuthorCountKey(pub String);

/// Errors are shared by every request waiting on a batch.
pub type LoadError = Arc<StoreError>;

/// The batch functions behind the loader.
pub struct Reads {
    store: Store,
    metrics: Arc<Metrics>,
}

pub type Loaders = DataLoader<Reads>;

/// Builds the process-wide loader.
pub fn build(store: Store, metrics: Arc<Metrics>, delay: Duration) -> Loaders {
    DataLoader::new(Reads { store, metrics }, tokio::spawn)
        .delay(delay)
        .max_batch_size(500)
}

impl Reads {
    fn observe(&self, loader: &'static str, keys: usize) {
        self.metrics
            .loader_batch_size
            .get_or_create(&[(LOADER, loader)])
            .observe(keys as f64);
    }
}

impl Loader<ReviewKey> for Reads {
    type Value = Arc<Review>;
    type Error = LoadError;

    async fn load(
        &self,
        keys: &[ReviewKey],
    ) -> Result<HashMap<ReviewKey, Self::Value>, Self::Error> {
        self.observe("review", keys.len());
        let ids: Vec<i64> = keys.iter().map(|k| k.0).collect();
        let reviews = self.store.reviews_by_ids(&ids).await?;
        Ok(reviews
            .into_iter()
            .map(|r| (ReviewKey(r.id), Arc::new(r)))
            .collect())
    }
}

impl Loader<RatingKey> for Reads {
    type Value = RatingSummary;
    type Error = LoadError;

    async fn load(
        &self,
        keys: &[RatingKey],
    ) -> Result<HashMap<RatingKey, Self::Value>, Self::Error> {
        self.observe("offer_rating", keys.len());
        let ids: Vec<String> = keys.iter().map(|k| k.0.clone()).collect();
        let found = self.store.offer_ratings(&ids).await?;
        Ok(found
            .into_iter()
            .map(|(id, s)| (RatingKey(id), s))
            .collect())
    }
}

impl Loader<AuthorCountKey> for Reads {
    type Value = i64;
    type Error = LoadError;

    async fn load(
        &self,
        keys: &[AuthorCountKey],
    ) -> Result<HashMap<AuthorCountKey, Self::Value>, Self::Error> {
        self.observe("author_review_count", keys.len());
        let ids: Vec<String> = keys.iter().map(|k| k.0.clone()).collect();
        let found = self.store.author_review_counts(&ids).await?;
        Ok(found
            .into_iter()
            .map(|(id, n)| (AuthorCountKey(id), n))
            .collect())
    }
}

impl Loader<PageKey> for Reads {
    type Value = Arc<Page>;
    type Error = LoadError;

    async fn load(&self, keys: &[PageKey]) -> Result<HashMap<PageKey, Self::Value>, Self::Error> {
        self.observe("review_page", keys.len());
        let pages = self.store.pages(keys).await?;
        Ok(pages.into_iter().map(|(k, p)| (k, Arc::new(p))).collect())
    }
}
