//! The limits of an upstream exchange, carried from the pipeline down to the connection.

use std::future::Future;
use std::time::Duration;

use super::error::UpstreamError;

/// When the head of an upstream's answer must have arrived (`timeouts.upstream` after the
/// request set out), and how long its body may then pause (`timeouts.upstream_body_idle`).
/// Carried down to the connection, so that a pooled one keeps one timer entry for its life
/// for both, instead of one per request and one per response body.
#[derive(Debug, Clone, Copy)]
pub struct Deadline {
    pub(super) at: tokio::time::Instant,
    /// When the exchange set out: the pool measures how long a connection sat idle against
    /// it instead of reading the clock once more.
    pub(super) start: std::time::Instant,
    timeout: Duration,
    /// The longest pause in the answer's body.
    pub(super) body_idle: Duration,
}

impl Deadline {
    /// `timeout` after `start`, with bodies that may pause for `body_idle`.
    pub fn after(timeout: Duration, body_idle: Duration, start: std::time::Instant) -> Self {
        Self {
            at: instant_after(tokio::time::Instant::from_std(start), timeout),
            start,
            timeout,
            body_idle,
        }
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

/// `limit` after `start`; as tokio's own `timeout` does, a limit past what the clock can hold
/// is no limit (30 years).
pub(crate) fn instant_after(start: tokio::time::Instant, limit: Duration) -> tokio::time::Instant {
    start
        .checked_add(limit)
        .unwrap_or_else(|| start + Duration::from_secs(86_400 * 365 * 30))
}
