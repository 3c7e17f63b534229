//! The HTTP limit of this machine for the bench (`make bench`, "fast path"
//! table): an axum server answering every `POST /graphql` with the same
//! prepared bytes (a real 20-offer `_entities` answer the bench captured),
//! so that the service's fragment path can be compared with doing nothing
//! but HTTP.
//!
//!   PREPARED_FILE=body.json PREPARED_LISTEN=127.0.0.1:4199 prepared_bytes

use axum::body::Bytes;
use axum::http::header;
use axum::routing::post;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let file = std::env::var("PREPARED_FILE").map_err(|_| std::io::Error::other("PREPARED_FILE is required"))?;
    let listen = std::env::var("PREPARED_LISTEN").unwrap_or_else(|_| "127.0.0.1:4199".to_owned());
    let body = Bytes::from(std::fs::read(file)?);
    let app = axum::Router::new().route(
        "/graphql",
        post(move |_request: Bytes| {
            let body = body.clone();
            async move { ([(header::CONTENT_TYPE, "application/json")], body) }
        }),
    );
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    axum::serve(listener, app).await
}
