//! Mutations. Each validates its input into domain values, then makes one
//! store call (one transaction, outbox event included).

use async_graphql::{Context, InputObject, Object, ID};

use super::types::ReviewObject;
use super::RequestAuth;
use crate::config::DomainConfig;
use crate::domain::{parse_review_id, EntityId, InvalidInput, Rating, ReviewStatus, ReviewText, Viewer};
use crate::error::ApiError;
use crate::events::{cascade, Events};
use crate::store::{Committed, NewReview, ReviewPatch, Store};

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
        let committed = ctx.data_unchecked::<Store>().create_review(new).await?;
        Ok(ReviewObject(publish(ctx, committed).await.into()))
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
        let committed = ctx.data_unchecked::<Store>().update_review(viewer, id, patch).await?;
        Ok(ReviewObject(publish(ctx, committed).await.into()))
    }

    /// Soft delete; only the author or a moderator. True when a review was deleted.
    async fn delete_review(&self, ctx: &Context<'_>, id: ID) -> Result<bool, ApiError> {
        let viewer = writer(ctx)?;
        let id = parse_review_id(&id).map_err(|_| unknown_review())?;
        let committed = ctx.data_unchecked::<Store>().delete_review(viewer, id).await?;
        Ok(publish(ctx, committed).await)
    }

    /// Moderators only.
    async fn moderate_review(&self, ctx: &Context<'_>, id: ID, status: ReviewStatus) -> Result<ReviewObject, ApiError> {
        let viewer = writer(ctx)?;
        if !viewer.is_moderator() {
            return Err(ApiError::Forbidden("only moderators may moderate reviews".into()));
        }
        let id = parse_review_id(&id).map_err(|_| unknown_review())?;
        let committed = ctx.data_unchecked::<Store>().moderate_review(id, status).await?;
        Ok(ReviewObject(publish(ctx, committed).await.into()))
    }
}
