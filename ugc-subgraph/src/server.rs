//! Serving: binds nothing itself, so tests pass a listener on port 0.

use std::future::Future;

use tokio::net::TcpListener;

use crate::http::build_router;
use crate::state::AppState;

/// Serves until `shutdown` completes, then stops accepting connections and
/// finishes the requests in flight.
///
/// # Errors
/// The listener failed.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, build_router(state)).with_graceful_shutdown(shutdown).await
}
