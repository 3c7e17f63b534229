//! Federation entity resolvers (`_entities`) for `Review`, `Offer`, `User`.
//!
//! `Offer` and `User` are owned by other subgraphs: any id yields a stub whose
//! review fields this subgraph resolves. A `Review` the viewer may not see
//! resolves to null, as in `Query.review`.

use async_graphql::{Context, Object, ID};

use super::query::visible_review;
use super::types::{Offer, ReviewObject, User};
use crate::domain::{parse_review_id, EntityId};
use crate::error::ApiError;

#[derive(Default)]
pub struct EntityQuery;

#[Object]
impl EntityQuery {
    #[graphql(entity)]
    async fn find_review_by_id(&self, ctx: &Context<'_>, id: ID) -> Result<Option<ReviewObject>, ApiError> {
        // A representation with a malformed id names no review.
        match parse_review_id(&id) {
            Ok(id) => visible_review(ctx, id).await,
            Err(_) => Ok(None),
        }
    }

    #[graphql(entity)]
    async fn find_offer_by_id(&self, id: ID) -> Result<Offer, ApiError> {
        Ok(Offer { id: EntityId::new(&id, "id")?.into_string() })
    }

    #[graphql(entity)]
    async fn find_user_by_id(&self, id: ID) -> Result<User, ApiError> {
        Ok(User { id: EntityId::new(&id, "id")?.into_string() })
    }
}
