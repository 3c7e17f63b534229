//! Process signals: SIGTERM (orchestrators) and Ctrl-C (people).

/// Which signal asked the process to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// An orchestrator: drain first.
    Terminate,
    /// A person at a terminal: stop now.
    Interrupt,
}

/// Completes on SIGTERM or SIGINT.
pub async fn signal() -> Signal {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {
            tracing::info!("SIGINT received, shutting down");
            Signal::Interrupt
        }
        () = terminate => {
            tracing::info!("SIGTERM received, shutting down");
            Signal::Terminate
        }
    }
}
