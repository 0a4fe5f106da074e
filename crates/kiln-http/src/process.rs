//! How both binaries start: a multi-threaded tokio runtime and `tracing` to stderr, filtered by `RUST_LOG`
//! (default `info`). stdout stays free for the one line a binary prints with its bound address.

use std::future::Future;

/// Initialises logging, builds the runtime and runs `main` on it.
pub fn run<F>(main: impl FnOnce() -> F) -> anyhow::Result<()>
where
    F: Future<Output = anyhow::Result<()>>,
{
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(main());
    // Dropping a runtime waits for every blocking thread: one stuck inside a native library (a GStreamer teardown
    // that never returns) would keep the process from exiting after its work is done. Work still running on one
    // after `main` returned is cut here: kilnd's VOD jobs are stopped by its shutdown before that, and a job cut
    // anyway is queued again from its state on disk at the next start.
    runtime.shutdown_timeout(std::time::Duration::from_secs(10));
    result
}
