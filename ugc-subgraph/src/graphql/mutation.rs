//! Mutations. Each validates its input into domain values, then makes one
//! store call (one transaction, outbox event included).

use async_graphql::{Context, InputObject, Object, ID};

use super::types::ReviewObject;
use super::RequestAuth;
use crate::config::DomainConfig;
use crate::domain::{parse_review_id, EntityId, InvalidInput, Rating, Review, ReviewStatus, ReviewText, Viewer};
use crate::error::ApiError;
use crate::events::{cascade, Events};
use crate::store::idempotency::{IdempotencyKey, Outcome};
use crate::store::{Committed, NewReview, ReviewPatch, Store, WriteError};

#[derive(InputObject)]
pub struct CreateReviewInput {
    offer_id: ID,
    rating: i32,
    text: String,
}

#[derive(InputObject)]
pub struct UpdateReviewInput {
    rating: Option<i32>,
    text: Option<String>,
}

pub struct Mutation;

fn writer<'c>(ctx: &'c Context<'_>) -> Result<&'c Viewer, ApiError> {
    ctx.data_opt::<RequestAuth>().ok_or_else(|| ApiError::Unauthenticated("authentication required".into()))?.writer()
}

/// Relays the write's event before answering: the caller's next read, on
/// any instance, does not see the old value from a cache.
async fn publish<T>(ctx: &Context<'_>, committed: Committed<T>) -> T {
    if let Some((id, event)) = &committed.event {
        ctx.data_unchecked::<Events>().after_commit(*id, &cascade::tags(event)).await;
    }
    committed.value
}

/// The `Idempotency-Key` header of the request (validated by the HTTP layer).
#[derive(Debug, Clone)]
pub struct IdempotencyHeader(pub String);

/// This write's idempotency key, when the request carries one: scoped to the
/// writer, and fingerprinted with the mutation and its arguments so that a
/// key reused for another write is refused rather than answered wrongly.
fn idempotency_key(ctx: &Context<'_>, viewer: &Viewer, mutation: &str, args: String) -> Option<IdempotencyKey> {
    let header = ctx.data_opt::<IdempotencyHeader>()?;
    let user = viewer.user_id()?.to_owned();
    Some(IdempotencyKey { user, key: header.0.clone(), fingerprint: format!("{mutation}:{args}") })
}

/// The answer of a keyed write: replayed when the key's write committed
/// already (before this one started, or while it waited on the key),
/// otherwise the write itself, published.
async fn keyed<T>(
    ctx: &Context<'_>,
    key: Option<IdempotencyKey>,
    replay: fn(Outcome) -> Option<T>,
    write: impl AsyncFnOnce(Option<&IdempotencyKey>) -> Result<Committed<T>, WriteError>,
) -> Result<T, ApiError> {
    let store = ctx.data_unchecked::<Store>();
    let replayed = async |key: &IdempotencyKey| -> Result<Option<T>, ApiError> {
        let Some(recorded) = store.recorded(key).await? else { return Ok(None) };
        if recorded.fingerprint != key.fingerprint {
            return Err(ApiError::BadUserInput(
                "this Idempotency-Key was used for a different write; use a new key for each write".into(),
            ));
        }
        replay(recorded.outcome).map(Some).ok_or(ApiError::Internal)
    };
    if let Some(key) = &key {
        if let Some(answer) = replayed(key).await? {
            return Ok(answer);
        }
    }
    match write(key.as_ref()).await {
        Ok(committed) => Ok(publish(ctx, committed).await),
        Err(WriteError::Replayed) => match &key {
            Some(key) => replayed(key).await?.ok_or(ApiError::Unavailable),
            None => Err(ApiError::Internal),
        },
        Err(e) => Err(e.into()),
    }
}

fn review_outcome(outcome: Outcome) -> Option<Review> {
    match outcome {
        Outcome::Review(review) => Some(review),
        Outcome::Deleted(_) => None,
    }
}

fn deleted_outcome(outcome: Outcome) -> Option<bool> {
    match outcome {
        Outcome::Deleted(deleted) => Some(deleted),
        Outcome::Review(_) => None,
    }
}

/// An id the service did not issue names no review.
fn unknown_review() -> ApiError {
    ApiError::NotFound("review not found".into())
}

#[Object]
impl Mutation {
    /// The caller (JWT subject) reviews an offer; one review per user and offer.
    async fn create_review(&self, ctx: &Context<'_>, input: CreateReviewInput) -> Result<ReviewObject, ApiError> {
        let viewer = writer(ctx)?;
        let author = viewer.user_id().ok_or_else(|| ApiError::Unauthenticated("authentication required".into()))?;
        let moderated = ctx.data_unchecked::<DomainConfig>().moderate_on_create;
        let new = NewReview {
            offer_id: EntityId::new(&input.offer_id, "offerId")?,
            author_id: EntityId::new(author, "sub")?,
            rating: Rating::new(input.rating.into())?,
            text: ReviewText::new(&input.text)?,
            status: if moderated { ReviewStatus::Pending } else { ReviewStatus::Published },
        };
        let args = format!("{}:{}:{}", new.offer_id.as_str(), new.rating.get(), new.text.as_str());
        let key = idempotency_key(ctx, viewer, "createReview", args);
        let store = ctx.data_unchecked::<Store>();
        let review = keyed(ctx, key, review_outcome, async |key| store.create_review(new, key).await).await?;
        Ok(ReviewObject(review.into()))
    }

    /// Only the author or a moderator.
    async fn update_review(
        &self,
        ctx: &Context<'_>,
        id: ID,
        input: UpdateReviewInput,
    ) -> Result<ReviewObject, ApiError> {
        let viewer = writer(ctx)?;
        let id = parse_review_id(&id).map_err(|_| unknown_review())?;
        let patch = ReviewPatch {
            rating: input.rating.map(|r| Rating::new(r.into())).transpose()?,
            text: input.text.as_deref().map(ReviewText::new).transpose()?,
        };
        if patch.rating.is_none() && patch.text.is_none() {
            return Err(InvalidInput::EmptyUpdate.into());
        }
        let args =
            format!("{id}:{:?}:{:?}", patch.rating.map(Rating::get), patch.text.as_ref().map(ReviewText::as_str));
        let key = idempotency_key(ctx, viewer, "updateReview", args);
        let store = ctx.data_unchecked::<Store>();
        let review =
            keyed(ctx, key, review_outcome, async |key| store.update_review(viewer, id, patch, key).await).await?;
        Ok(ReviewObject(review.into()))
    }

    /// Soft delete; only the author or a moderator. True when a review was deleted.
    async fn delete_review(&self, ctx: &Context<'_>, id: ID) -> Result<bool, ApiError> {
        let viewer = writer(ctx)?;
        let id = parse_review_id(&id).map_err(|_| unknown_review())?;
        let key = idempotency_key(ctx, viewer, "deleteReview", id.to_string());
        let store = ctx.data_unchecked::<Store>();
        keyed(ctx, key, deleted_outcome, async |key| store.delete_review(viewer, id, key).await).await
    }

    /// Moderators only.
    async fn moderate_review(&self, ctx: &Context<'_>, id: ID, status: ReviewStatus) -> Result<ReviewObject, ApiError> {
        let viewer = writer(ctx)?;
        if !viewer.is_moderator() {
            return Err(ApiError::Forbidden("only moderators may moderate reviews".into()));
        }
        let id = parse_review_id(&id).map_err(|_| unknown_review())?;
        let key = idempotency_key(ctx, viewer, "moderateReview", format!("{id}:{}", status.as_str()));
        let store = ctx.data_unchecked::<Store>();
        let review = keyed(ctx, key, review_outcome, async |key| store.moderate_review(id, status, key).await).await?;
        Ok(ReviewObject(review.into()))
    }
}
