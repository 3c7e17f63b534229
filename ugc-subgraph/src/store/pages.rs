//! Keyset-paginated review lists, many lists per statement.
//!
//! Keys that share (list kind, order, page size) are served by one statement:
//! the lists' scope ids and cursor positions go in as parallel arrays,
//! `unnest … WITH ORDINALITY` turns them into rows, and a `LATERAL` subquery
//! seeks each list's partial index to its cursor and reads `size + 1` rows
//! (the extra row says whether a next page exists). A first page uses a
//! sentinel position beyond every real row, so the seek condition is the same
//! row-value comparison with or without a cursor and always uses the index.

use std::collections::HashMap;
use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use sqlx::Row;

use super::{review_from_row, Store, StoreError, REVIEW_COLUMNS};
use crate::domain::cursor::{ListScope, PageKey, Position};
use crate::domain::{Page, PageSize, Review, ReviewOrder};

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum ListKind {
    Offer,
    Author,
}

/// (list kind, order) → statement. Authors' lists are newest first only.
static STATEMENTS: LazyLock<HashMap<(ListKind, ReviewOrder), String>> = LazyLock::new(|| {
    let mut m = HashMap::new();
    for order in [ReviewOrder::Newest, ReviewOrder::Oldest, ReviewOrder::HighestRating, ReviewOrder::LowestRating] {
        m.insert((ListKind::Offer, order), page_sql("offer_id", order));
    }
    m.insert((ListKind::Author, ReviewOrder::Newest), page_sql("author_id", ReviewOrder::Newest));
    m
});

fn page_sql(scope_column: &str, order: ReviewOrder) -> String {
    let (seek, order_by) = match order {
        ReviewOrder::Newest => ("(r.created_at, r.id) < (k.c_ts, k.c_id)", "r.created_at DESC, r.id DESC"),
        ReviewOrder::Oldest => ("(r.created_at, r.id) > (k.c_ts, k.c_id)", "r.created_at ASC, r.id ASC"),
        ReviewOrder::HighestRating => (
            "(r.rating, r.created_at, r.id) < (k.c_rating, k.c_ts, k.c_id)",
            "r.rating DESC, r.created_at DESC, r.id DESC",
        ),
        // (-rating) matches the expression index reviews_offer_low.
        ReviewOrder::LowestRating => (
            "(-r.rating, r.created_at, r.id) < (-k.c_rating, k.c_ts, k.c_id)",
            "(-r.rating) DESC, r.created_at DESC, r.id DESC",
        ),
    };
    format!(
        "SELECT k.ord, {REVIEW_COLUMNS} \
         FROM unnest($1::text[], $2::smallint[], $3::timestamptz[], $4::bigint[]) \
              WITH ORDINALITY AS k(scope_id, c_rating, c_ts, c_id, ord) \
         CROSS JOIN LATERAL ( \
             SELECT * FROM reviews r \
             WHERE r.{scope_column} = k.scope_id AND r.status = 'PUBLISHED' AND r.deleted_at IS NULL \
               AND {seek} \
             ORDER BY {order_by} LIMIT $5) r"
    )
}

/// A position beyond every row in `order`, for first pages.
fn sentinel(order: ReviewOrder) -> Position {
    let far_future = DateTime::<Utc>::from_timestamp(253_402_300_799, 0).unwrap_or_default(); // 9999-12-31
    let far_past = DateTime::<Utc>::from_timestamp(-62_135_596_800, 0).unwrap_or_default(); // 0001-01-01
    let (rating, at, id) = match order {
        ReviewOrder::Newest => (0, far_future, i64::MAX),
        ReviewOrder::Oldest => (0, far_past, 0),
        ReviewOrder::HighestRating => (6, far_future, i64::MAX),
        ReviewOrder::LowestRating => (0, far_future, i64::MAX),
    };
    Position { rating, created_at_micros: at.timestamp_micros(), id }
}

/// Total order of `order` over reviews, used to put each list's rows back in
/// order (LATERAL output order is not guaranteed by SQL).
fn compare(order: ReviewOrder, a: &Review, b: &Review) -> std::cmp::Ordering {
    let newest_first = (b.created_at, b.id).cmp(&(a.created_at, a.id));
    match order {
        ReviewOrder::Newest => newest_first,
        ReviewOrder::Oldest => newest_first.reverse(),
        ReviewOrder::HighestRating => b.rating.cmp(&a.rating).then(newest_first),
        ReviewOrder::LowestRating => a.rating.cmp(&b.rating).then(newest_first),
    }
}

impl Store {
    /// Loads every requested page; one statement per distinct
    /// (list kind, order, page size) among the keys.
    ///
    /// # Errors
    /// Postgres unavailable or failing.
    pub async fn pages(&self, keys: &[PageKey]) -> Result<HashMap<PageKey, Page>, StoreError> {
        let mut groups: HashMap<(ListKind, ReviewOrder, PageSize), Vec<&PageKey>> = HashMap::new();
        for key in keys {
            let kind = match key.scope {
                ListScope::Offer(_) => ListKind::Offer,
                ListScope::Author(_) => ListKind::Author,
            };
            groups.entry((kind, key.order, key.size)).or_default().push(key);
        }
        let mut out = HashMap::with_capacity(keys.len());
        for ((kind, order, size), group) in groups {
            out.extend(self.page_group(kind, order, size, &group).await?);
        }
        Ok(out)
    }

    async fn page_group(
        &self,
        kind: ListKind,
        order: ReviewOrder,
        size: PageSize,
        keys: &[&PageKey],
    ) -> Result<Vec<(PageKey, Page)>, StoreError> {
        let order = if kind == ListKind::Author { ReviewOrder::Newest } else { order };
        let (statement, name) = match kind {
            ListKind::Offer => (&STATEMENTS[&(ListKind::Offer, order)], "offer_review_pages"),
            ListKind::Author => (&STATEMENTS[&(ListKind::Author, ReviewOrder::Newest)], "author_review_pages"),
        };
        let n = keys.len();
        let (mut scope_ids, mut ratings, mut times, mut ids) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        for key in keys {
            let (ListScope::Offer(id) | ListScope::Author(id)) = &key.scope;
            let p = key.after.unwrap_or_else(|| sentinel(order));
            scope_ids.push(id.as_str());
            ratings.push(p.rating);
            times.push(p.created_at());
            ids.push(p.id);
        }
        let limit = size.get() as i64 + 1;
        let rows = self
            .read(name, |pool| {
                let (scope_ids, ratings, times, ids) = (&scope_ids, &ratings, &times, &ids);
                async move {
                    sqlx::query(statement)
                        .bind(scope_ids)
                        .bind(ratings)
                        .bind(times)
                        .bind(ids)
                        .bind(limit)
                        .fetch_all(&pool)
                        .await
                }
            })
            .await?;
        let mut lists: Vec<Vec<Review>> = vec![Vec::new(); n];
        for row in &rows {
            let ord: i64 = row.try_get("ord").map_err(|e| StoreError::Corrupt(e.to_string()))?;
            let slot = usize::try_from(ord - 1).ok().and_then(|i| lists.get_mut(i));
            slot.ok_or_else(|| StoreError::Corrupt(format!("ordinality {ord} out of range")))?
                .push(review_from_row(row)?);
        }
        Ok(keys
            .iter()
            .zip(lists)
            .map(|(key, mut reviews)| {
                reviews.sort_by(|a, b| compare(order, a, b));
                let has_next = reviews.len() > size.get();
                reviews.truncate(size.get());
                ((*key).clone(), Page { reviews: reviews.into_iter().map(Into::into).collect(), has_next })
            })
            .collect())
    }
}
