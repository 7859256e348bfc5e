//! A body that fails once its sender has sent nothing for a while: a stalled client upload
//! (`timeouts.client_body`) or a stalled upstream response (`timeouts.upstream_body_idle`)
//! must not hold memory, a connection or the other side forever.
//!
//! The clock runs only while the body is being waited for: a reader that is itself slow
//! (back-pressure from the other side) does not count against the sender.
//!
//! A response from a pooled HTTP/1.1 connection keeps this limit itself, on the connection's
//! timer (`pool.rs`); the other legs (HTTP/2, a connection of the request's own) are wrapped
//! here.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::time::{Instant, Sleep};

use super::body::{BoxError, ProxyBody};
use super::deadline::{instant_after, Deadline};
use super::error::{describe, find, ClientBodyError, UpstreamError};

/// Which side stopped sending; decides the answer (408 for the client, a cut connection for
/// the upstream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client's request body.
    Client,
    /// The upstream's response body.
    Upstream,
}

/// The error a stalled body ends with.
#[derive(Debug, thiserror::Error)]
#[error("{} body sent nothing for {}", match .side { Side::Client => "request", Side::Upstream => "upstream response" }, humantime::format_duration(*.idle))]
pub struct Stalled {
    /// Who stopped sending.
    pub side: Side,
    /// The configured idle limit.
    pub idle: Duration,
}

impl Stalled {
    /// The `Stalled` error among `error` and its causes, if there is one.
    pub fn find<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Stalled> {
        find(error)
    }
}

/// `inner`, failing with [`Stalled`] when no frame arrives for `idle` while it is polled.
pub struct IdleTimeout {
    inner: ProxyBody,
    stalled: Stalled,
    /// Made on the first wait, so that a body whose frames are always ready costs no timer.
    deadline: Option<Pin<Box<Sleep>>>,
    waiting: bool,
    failed: bool,
}

impl IdleTimeout {
    /// Wraps `inner`; boxed, as every body the proxy sends.
    pub fn wrap(inner: ProxyBody, side: Side, idle: Duration) -> ProxyBody {
        if inner.is_end_stream() {
            return inner;
        }
        IdleTimeout {
            inner,
            stalled: Stalled { side, idle },
            deadline: None,
            waiting: false,
            failed: false,
        }
        .boxed()
    }
}

impl Body for IdleTimeout {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.failed {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(frame) => {
                this.waiting = false;
                Poll::Ready(frame)
            }
            Poll::Pending => {
                let idle = this.stalled.idle;
                let deadline = this
                    .deadline
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(idle)));
                if !this.waiting {
                    this.waiting = true;
                    deadline.as_mut().reset(instant_after(Instant::now(), idle));
                }
                this.poll_deadline(cx)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl IdleTimeout {
    /// Pending until the deadline passes, then the [`Stalled`] error.
    fn poll_deadline(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let Some(deadline) = self.deadline.as_mut() else {
            return Poll::Pending;
        };
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => {
                self.failed = true;
                Poll::Ready(Some(Err(match self.stalled.side {
                    Side::Upstream => upstream_stalled(self.stalled.idle),
                    Side::Client => Box::new(Stalled {
                        side: Side::Client,
                        idle: self.stalled.idle,
                    }),
                })))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The error an upstream response body ends with when it sent nothing for `idle`; says so
/// in the log (the client only sees its connection cut).
pub(crate) fn upstream_stalled(idle: Duration) -> BoxError {
    tracing::warn!(idle = ?idle, "the upstream stopped sending its response body; closing the client connection");
    Box::new(Stalled {
        side: Side::Upstream,
        idle,
    })
}

/// A response body from a connection outside the HTTP/1.1 pools (HTTP/2, upgrades, a
/// pinned request's own connection), with the idle limit the pooled connections keep
/// themselves: the one place those legs get it.
pub(crate) fn upstream_body(body: hyper::body::Incoming, deadline: Deadline) -> ProxyBody {
    IdleTimeout::wrap(
        body.map_err(BoxError::from).boxed(),
        Side::Upstream,
        deadline.body_idle,
    )
}

/// The error for a failed exchange: a stalled client body is the client's fault (408),
/// anything else the upstream's.
pub fn exchange_error(e: &(dyn std::error::Error + 'static)) -> UpstreamError {
    match Stalled::find(e) {
        Some(stalled) if stalled.side == Side::Client => {
            UpstreamError::ClientBodyStalled(stalled.idle)
        }
        _ => match find::<ClientBodyError>(e) {
            Some(client) => UpstreamError::ClientBody(client.to_string()),
            None => UpstreamError::Failed(describe(e)),
        },
    }
}
