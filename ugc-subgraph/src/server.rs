//! Serving: binds nothing itself, so tests pass a listener on port 0.
//!
//! The connection loop is written out (rather than `axum::serve`) for what
//! a service on the open network needs and `axum::serve` does not offer:
//! a cap on open connections (`UGC_MAX_CONNECTIONS`; more wait in the
//! kernel's accept queue), a header-read timeout (`UGC_HEADER_READ_TIMEOUT_MS`:
//! a client sending its headers a byte a second is dropped, not held open
//! forever), and the peer address on every request for the rate limits.
//! On shutdown it stops accepting, lets idle keep-alive connections go and
//! finishes the requests in flight.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

use crate::config::HttpConfig;
use crate::http::build_router;
use crate::http::state::AppState;

/// After a failed `accept` (e.g. out of file descriptors), wait this long.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

/// Serves the service's router until `shutdown` completes, then stops
/// accepting connections and finishes the requests in flight.
///
/// # Errors
/// The listener failed.
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let http = state.config.http.clone();
    serve_router(listener, build_router(state), &http, shutdown).await
}

/// Serves any router with the connection limits of `http`.
///
/// # Errors
/// The listener failed.
pub async fn serve_router(
    listener: TcpListener,
    router: Router,
    http: &HttpConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let connections = Arc::new(Semaphore::new(http.max_connections));
    let graceful = GracefulShutdown::new();
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(http.header_read_timeout).keep_alive(true);
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            permit = Arc::clone(&connections).acquire_owned() => permit.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let service = router.clone().map_request(move |request: hyper::Request<hyper::body::Incoming>| {
            let mut request = request.map(axum::body::Body::new);
            request.extensions_mut().insert(ConnectInfo::<SocketAddr>(peer));
            request
        });
        let connection = builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            // Errors here are the client's (reset, timeout): nothing to do.
            let _ = connection.await;
            drop(permit);
        });
    }
    drop(listener);
    graceful.shutdown().await;
    Ok(())
}
