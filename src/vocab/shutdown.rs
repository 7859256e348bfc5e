//! The shutdown signal every long-running task watches.

use tokio::sync::watch;

/// Resolves once `signal` turns true (or its sender is gone). Used by every task that must
/// stop on shutdown.
pub async fn shutdown_requested(signal: &mut watch::Receiver<bool>) {
    let _ = signal.wait_for(|stop| *stop).await;
}
