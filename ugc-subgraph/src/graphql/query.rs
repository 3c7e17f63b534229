//! Root query fields of the contract.

use async_graphql::{Context, Object, ID};

use super::types::{Offer, ReviewObject, User};
use super::RequestAuth;
use crate::domain::{parse_review_id, EntityId, Viewer};
use crate::error::ApiError;
use crate::loaders::Loaders;

#[derive(Default)]
pub struct RootQuery;

#[Object]
impl RootQuery {
    /// A published review, or any review to its author and to moderators; null otherwise.
    async fn review(&self, ctx: &Context<'_>, id: ID) -> Result<Option<ReviewObject>, ApiError> {
        // An id the service did not issue, whatever its shape, names no review.
        match parse_review_id(&id) {
            Ok(id) => visible_review(ctx, id).await,
            Err(_) => Ok(None),
        }
    }

    /// The review-side view of an offer (an entity stub: any id is valid).
    async fn offer(&self, id: ID) -> Result<Offer, ApiError> {
        Ok(Offer { id: EntityId::new(&id, "id")?.into_string() })
    }

    /// The review-side view of a user (an entity stub: any id is valid).
    async fn user(&self, id: ID) -> Result<User, ApiError> {
        Ok(User { id: EntityId::new(&id, "id")?.into_string() })
    }
}

/// The review with this id if the request's viewer may see it. Anyone gets
/// the published review from the cache; only a signed-in viewer's miss looks
/// further (uncached), for a pending or rejected review of their own or, for
/// moderators, of anyone.
pub(super) async fn visible_review(ctx: &Context<'_>, id: i64) -> Result<Option<ReviewObject>, ApiError> {
    let viewer: &Viewer = ctx.data_opt::<RequestAuth>().map_or(&Viewer::Anonymous, RequestAuth::reader);
    let loaders = ctx.data_unchecked::<Loaders>();
    if let Some(review) = loaders.public_review(id).await? {
        return Ok(Some(ReviewObject(review)));
    }
    // Not public: someone else (its author, a moderator) may see it.
    loaders.depends_on_viewer();
    if viewer.user_id().is_none() {
        return Ok(None);
    }
    let review = loaders.review_any_status(id).await?;
    Ok(review.filter(|r| viewer.can_see(r)).map(ReviewObject))
}
