//! The agent's one stop signal: a `watch::Receiver<bool>` that becomes `true` once, for a
//! shutdown (SIGTERM), a link closing, or a health gate cancelled. Every task waits on it the same
//! way, through [`StopFlag`]: resolve when the flag is (or becomes) true, and never when its
//! sender is gone while it is false (a dropped sender is not a stop request).

use std::future::Future;

use tokio::sync::watch;

pub trait StopFlag {
    /// Resolves once the flag is true.
    fn stopped(&mut self) -> impl Future<Output = ()> + Send + '_;
    /// The same on an owned receiver (a clone moved into a `select!` branch).
    fn into_stopped(self) -> impl Future<Output = ()> + Send + 'static;
}

impl StopFlag for watch::Receiver<bool> {
    async fn stopped(&mut self) {
        if self.wait_for(|v| *v).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    async fn into_stopped(mut self) {
        self.stopped().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn resolves_on_true_at_once_or_later_and_never_on_a_dropped_sender() {
        let (tx, mut rx) = watch::channel(false);
        let waiting = tokio::time::timeout(Duration::from_secs(1), rx.stopped()).await;
        assert!(waiting.is_err(), "false: still waiting");
        tx.send_replace(true);
        rx.stopped().await;
        rx.clone().into_stopped().await;
        drop(tx);
        rx.stopped().await; // true, sender gone: still stopped

        let (tx, rx) = watch::channel(false);
        drop(tx);
        let never = tokio::time::timeout(Duration::from_secs(3600), rx.into_stopped()).await;
        assert!(never.is_err(), "a dropped sender is not a stop request");
    }
}
