//! The GraphiQL page (`UGC_GRAPHIQL=on`; off by default in production).
//! Its scripts are pinned to exact versions by integrity hashes (see the
//! page), so a compromised CDN cannot run code against this service's users.

use axum::http::header;
use axum::response::{Html, IntoResponse};

const PAGE: &str = include_str!("graphiql.html");

pub async fn page() -> impl IntoResponse {
    (
        [
            // The inline bootstrap script and the pinned CDN files only.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'self' 'unsafe-inline' https://unpkg.com; \
                 style-src 'self' 'unsafe-inline' https://unpkg.com; img-src 'self' data:; connect-src 'self'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        Html(PAGE),
    )
}
