//! Process signals: the first SIGINT or SIGTERM starts a graceful stop (the future resolves); a second signal
//! during the grace period exits at once with status 130, so an operator is never stuck behind a slow drain.

/// Resolves on the first SIGINT/SIGTERM; from then on a second SIGINT/SIGTERM exits the process.
pub async fn shutdown_signal() {
    first_signal().await;
    tracing::info!("signal received: stopping gracefully (a second signal exits at once)");
    tokio::spawn(async {
        first_signal().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
}

async fn first_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "no SIGTERM handler: only SIGINT stops the process");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
