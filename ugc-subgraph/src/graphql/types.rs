//! GraphQL object types of the contract. Thin views over domain values; the
//! fields that need more data resolve it through the DataLoaders.

use std::sync::Arc;

use async_graphql::{Context, InputValueError, InputValueResult, Object, Scalar, ScalarType, Value, ID};
use chrono::{SecondsFormat, Utc};

use crate::domain::cursor::{Cursor, ListScope, Position};
use crate::domain::{EntityId, Page, PageSize, RatingSummary, Review, ReviewOrder, ReviewStatus};
use crate::error::ApiError;
use crate::loaders::Loaders;
use crate::store::PageKey;

mod direct;

/// RFC 3339 in UTC with milliseconds, e.g. `2026-11-21T10:15:30.123Z`.
pub struct DateTime(pub chrono::DateTime<Utc>);

#[Scalar(name = "DateTime")]
impl ScalarType for DateTime {
    fn parse(value: Value) -> InputValueResult<Self> {
        match &value {
            Value::String(s) => chrono::DateTime::parse_from_rfc3339(s)
                .map(|d| Self(d.with_timezone(&Utc)))
                .map_err(|_| InputValueError::custom("expected an RFC 3339 date-time")),
            _ => Err(InputValueError::expected_type(value)),
        }
    }

    fn to_value(&self) -> Value {
        Value::String(self.0.to_rfc3339_opts(SecondsFormat::Millis, true))
    }
}

/// A review of an offer.
pub struct ReviewObject(pub Arc<Review>);

#[Object(name = "Review")]
impl ReviewObject {
    async fn id(&self) -> ID {
        ID(self.0.id.to_string())
    }

    async fn offer(&self) -> Offer {
        Offer { id: self.0.offer_id.clone() }
    }

    async fn author(&self) -> User {
        User { id: self.0.author_id.clone() }
    }

    /// 1 to 5 stars.
    async fn rating(&self) -> i32 {
        i32::from(self.0.rating)
    }

    async fn text(&self) -> &str {
        &self.0.text
    }

    async fn status(&self) -> ReviewStatus {
        self.0.status
    }

    async fn created_at(&self) -> DateTime {
        DateTime(self.0.created_at)
    }

    async fn updated_at(&self) -> DateTime {
        DateTime(self.0.updated_at)
    }
}

/// The review side of an offer owned by another subgraph.
pub struct Offer {
    pub id: String,
}

#[Object]
impl Offer {
    async fn id(&self) -> ID {
        ID(self.id.clone())
    }

    /// Published reviews of this offer.
    #[graphql(complexity = "page_cost(first, child_complexity)")]
    async fn reviews(
        &self,
        ctx: &Context<'_>,
        #[graphql(default_with = "Some(10)")] first: Option<i32>,
        after: Option<String>,
        #[graphql(default_with = "Some(ReviewOrder::Newest)")] order: Option<ReviewOrder>,
    ) -> Result<direct::Direct<ReviewConnection>, ApiError> {
        let scope = ListScope::Offer(self.id.clone());
        ReviewConnection::load(ctx, scope, order.unwrap_or_default(), first, after).await.map(direct::Direct)
    }

    /// Aggregate over published reviews of this offer.
    async fn rating(&self, ctx: &Context<'_>) -> Result<direct::Direct<OfferRating>, ApiError> {
        Ok(direct::Direct(OfferRating(ctx.data_unchecked::<Loaders>().rating(&self.id).await?)))
    }
}

/// The review side of a user owned by another subgraph.
pub struct User {
    pub id: String,
}

#[Object]
impl User {
    async fn id(&self) -> ID {
        ID(self.id.clone())
    }

    /// Published reviews written by this user.
    #[graphql(complexity = "page_cost(first, child_complexity)")]
    async fn reviews(
        &self,
        ctx: &Context<'_>,
        #[graphql(default_with = "Some(10)")] first: Option<i32>,
        after: Option<String>,
    ) -> Result<direct::Direct<ReviewConnection>, ApiError> {
        let scope = ListScope::Author(self.id.clone());
        ReviewConnection::load(ctx, scope, ReviewOrder::Newest, first, after).await.map(direct::Direct)
    }

    async fn review_count(&self, ctx: &Context<'_>) -> Result<i32, ApiError> {
        Ok(clamp_count(ctx.data_unchecked::<Loaders>().author_count(&self.id).await?))
    }
}

/// Complexity of a list field: its children, once per item it may return.
fn page_cost(first: Option<i32>, child_complexity: usize) -> usize {
    let items = first.unwrap_or(10).clamp(0, crate::domain::MAX_PAGE_SIZE) as usize;
    1 + items.max(1) * child_complexity
}

fn clamp_count(n: i64) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

pub struct OfferRating(RatingSummary);

#[Object]
impl OfferRating {
    /// Mean of published ratings; null when there are none.
    async fn average(&self) -> Option<f64> {
        self.0.average()
    }

    async fn count(&self) -> i32 {
        clamp_count(self.0.count)
    }

    /// Exactly five numbers: how many published reviews gave 1, 2, 3, 4 and 5 stars.
    async fn distribution(&self) -> Vec<i32> {
        self.0.distribution.iter().copied().map(clamp_count).collect()
    }
}

/// One page of a review list.
pub struct ReviewConnection {
    page: Arc<Page>,
    scope: Arc<ListScope>,
    order: ReviewOrder,
    /// Loaded with the page when the query selects `totalCount`, so the
    /// count joins the same loader round as the page (and as `rating`).
    total: Option<i64>,
}

impl ReviewConnection {
    async fn load(
        ctx: &Context<'_>,
        scope: ListScope,
        order: ReviewOrder,
        first: Option<i32>,
        after: Option<String>,
    ) -> Result<Self, ApiError> {
        let (ListScope::Offer(id) | ListScope::Author(id)) = &scope;
        EntityId::new(id, "id")?;
        let size = PageSize::new(i64::from(first.unwrap_or(10)))?;
        let after = match after.as_deref() {
            None => None,
            Some(raw) => Some(Cursor::decode(raw, &scope, order)?.position),
        };
        let key = PageKey { scope: scope.clone(), order, size, after };
        let loaders = ctx.data_unchecked::<Loaders>();
        let (page, total) = if ctx.look_ahead().field("totalCount").exists() {
            let (page, total) = futures::future::try_join(loaders.page(key), total_count(loaders, &scope)).await?;
            (page, Some(total))
        } else {
            (loaders.page(key).await?, None)
        };
        Ok(Self { page, scope: Arc::new(scope), order, total })
    }

    fn cursor(&self, review: &Review) -> String {
        Cursor { scope: (*self.scope).clone(), order: self.order, position: Position::of(review) }.encode()
    }
}

#[Object]
impl ReviewConnection {
    async fn edges(&self) -> Vec<ReviewEdge<'_>> {
        self.page.reviews.iter().map(|review| ReviewEdge { connection: self, review }).collect()
    }

    async fn page_info(&self) -> PageInfo {
        PageInfo { has_next_page: self.page.has_next, end_cursor: self.page.reviews.last().map(|r| self.cursor(r)) }
    }

    /// All published reviews of the list, not just this page.
    async fn total_count(&self, ctx: &Context<'_>) -> Result<i32, ApiError> {
        let n = match self.total {
            Some(n) => n,
            None => total_count(ctx.data_unchecked::<Loaders>(), &self.scope).await?,
        };
        Ok(clamp_count(n))
    }
}

/// Published reviews in a list: the offer's rating count or the author's count.
async fn total_count(loaders: &Loaders, scope: &ListScope) -> Result<i64, crate::loaders::LoadError> {
    match scope {
        ListScope::Offer(id) => Ok(loaders.rating(id).await?.count),
        ListScope::Author(id) => loaders.author_count(id).await,
    }
}

pub struct ReviewEdge<'a> {
    connection: &'a ReviewConnection,
    review: &'a Arc<Review>,
}

#[Object]
impl ReviewEdge<'_> {
    async fn cursor(&self) -> String {
        self.connection.cursor(self.review)
    }

    async fn node(&self) -> ReviewObject {
        ReviewObject(Arc::clone(self.review))
    }
}

#[derive(async_graphql::SimpleObject)]
pub struct PageInfo {
    has_next_page: bool,
    end_cursor: Option<String>,
}
