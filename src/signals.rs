//! SIGTERM / SIGINT as a future: the shutdown signal handed to [`crate::agent::run`].
//! The handlers are installed when this is called (inside the runtime), not when the future is
//! first polled, so a signal that arrives during start-up recovery drains instead of killing.

use std::future::Future;

pub fn terminated() -> impl Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut term), Ok(mut int)) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM"),
                    _ = int.recv() => tracing::info!("SIGINT"),
                }
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM/SIGINT");
                std::future::pending::<()>().await
            }
        }
    }
}
