//! The deadline of an upstream exchange, carried from the pipeline down to the connection.

use std::future::Future;
use std::time::Duration;

use super::error::UpstreamError;

/// When the head of an upstream's answer must have arrived: `timeouts.upstream` after the
/// request set out. Carried down to the connection, so that a pooled one keeps one timer
/// entry for its life instead of one per request.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub(super) at: tokio::time::Instant,
    timeout: Duration,
}

impl Deadline {
    /// `timeout` after `start`.
    pub fn after(timeout: Duration, start: std::time::Instant) -> Self {
        let start = tokio::time::Instant::from_std(start);
        // As tokio's own `timeout` does: a limit past what the clock can hold is no limit.
        let at = start
            .checked_add(timeout)
            .unwrap_or_else(|| start + Duration::from_secs(86_400 * 365 * 30));
        Self { at, timeout }
    }

    /// `work`, given up with [`Deadline::passed`] when the deadline comes first.
    pub(crate) async fn bound<T>(
        self,
        work: impl Future<Output = Result<T, UpstreamError>>,
    ) -> Result<T, UpstreamError> {
        tokio::time::timeout_at(self.at, work)
            .await
            .unwrap_or_else(|_| Err(self.passed()))
    }

    /// The error of an exchange still unanswered at the deadline.
    pub(crate) fn passed(&self) -> UpstreamError {
        UpstreamError::Timeout(self.timeout)
    }
}
