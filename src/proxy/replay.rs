//! Request bodies that can be sent twice. A body is kept in memory only when a replay after
//! 401/403 is possible, it is no larger than `retry.max_body_bytes`, and all bodies kept
//! together stay within `retry.max_buffered_total`; anything else streams through (its
//! prefix first) and cannot be replayed. A body that sends nothing for `timeouts.client_body`
//! fails, whether it is being kept or streamed.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::respond::ProxyError;
use crate::config::Config;
use crate::upstream::body::{empty, full};
pub use crate::upstream::budget::{ReplayBudget, Reservation};
use crate::upstream::idle::{IdleTimeout, Side, Stalled};
use crate::upstream::{BoxError, ClientBodyError, ProxyBody};

/// A request body ready to send.
pub enum PreparedBody {
    /// The whole body, in memory: can be sent again. Its bytes count against the replay
    /// budget until this value is dropped.
    Replayable {
        bytes: Bytes,
        /// Held, not read: dropping it gives the bytes back to the budget.
        _reserved: Reservation,
    },
    /// A body too large (or with trailers) to keep: sent once.
    Streaming(ProxyBody),
    /// A streaming body that has been sent: there is nothing to send again, and a replay
    /// must never go out with an empty body in its place.
    Spent,
}

impl PreparedBody {
    /// A body for one send; for `Replayable` the bytes are shared, not copied.
    pub fn take(&mut self) -> ProxyBody {
        match self {
            PreparedBody::Replayable { bytes, .. } => full(bytes.clone()),
            PreparedBody::Streaming(_) => match std::mem::replace(self, PreparedBody::Spent) {
                PreparedBody::Streaming(body) => body,
                _ => empty(),
            },
            PreparedBody::Spent => empty(),
        }
    }

    /// Whether another send is possible (true for kept bytes only, before or after `take`).
    pub fn replayable(&self) -> bool {
        matches!(self, PreparedBody::Replayable { .. })
    }
}

/// The client's body, streamed as is; it fails when the client sends nothing for
/// `timeouts.client_body`.
pub fn streaming(body: Incoming, config: &Config) -> ProxyBody {
    guarded(body, config.timeouts.client_body)
}

fn guarded(body: Incoming, idle: Duration) -> ProxyBody {
    // Most requests have no body: an empty one is a zero-sized box (no allocation) and
    // needs no idle limit.
    if body.is_end_stream() {
        return crate::upstream::body::empty();
    }
    let body = body.map_err(|e| BoxError::from(ClientBodyError(e)));
    IdleTimeout::wrap(body.boxed(), Side::Client, idle)
}

/// Reads the body into memory if it fits in `retry.max_body_bytes` and in what is left of
/// `budget`, otherwise returns a streaming body that starts with what was already read. A
/// client that stops sending for `timeouts.client_body` gets [`ProxyError::ClientBodyTimeout`].
pub async fn prepare(
    body: Incoming,
    headers: &HeaderMap,
    config: &Config,
    budget: &Arc<ReplayBudget>,
) -> Result<PreparedBody, ProxyError> {
    let limit = config.retry.max_body_bytes;
    let cap = config.retry.max_buffered_total;
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if body.is_end_stream() {
        return Ok(PreparedBody::Replayable {
            bytes: Bytes::new(),
            _reserved: Reservation::none(),
        });
    }
    let mut body = guarded(body, config.timeouts.client_body);
    let mut reserved = Reservation::new(budget);
    if declared.is_some_and(|len| len > limit || !reserved.grow_to(len, cap)) {
        return Ok(PreparedBody::Streaming(body));
    }
    // Sized once from the declared length (already within the budget): growing by doubling
    // would briefly hold up to twice the body.
    let mut buffer = BytesMut::with_capacity(declared.map_or(0, |len| len as usize));
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| match Stalled::find(&*e) {
            Some(stalled) => ProxyError::ClientBodyTimeout(stalled.idle),
            None => ProxyError::BadRequest(e.to_string()),
        })?;
        match frame.into_data() {
            Ok(data) => {
                buffer.extend_from_slice(&data);
                let total = buffer.len() as u64;
                if total > limit || !reserved.grow_to(total, cap) {
                    return Ok(PreparedBody::Streaming(
                        PrefixedBody {
                            prefix: Some(buffer.freeze()),
                            pending: None,
                            rest: body,
                        }
                        .boxed(),
                    ));
                }
            }
            Err(trailers) => {
                return Ok(PreparedBody::Streaming(
                    PrefixedBody {
                        prefix: Some(buffer.freeze()),
                        pending: Some(trailers),
                        rest: body,
                    }
                    .boxed(),
                ));
            }
        }
    }
    Ok(PreparedBody::Replayable {
        bytes: buffer.freeze(),
        _reserved: reserved,
    })
}

/// What was read ahead, then the rest of the client's body.
struct PrefixedBody {
    prefix: Option<Bytes>,
    pending: Option<Frame<Bytes>>,
    rest: ProxyBody,
}

impl Body for PrefixedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(prefix) = self.prefix.take() {
            if !prefix.is_empty() {
                return Poll::Ready(Some(Ok(Frame::data(prefix))));
            }
        }
        if let Some(frame) = self.pending.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        Pin::new(&mut self.rest).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.prefix.is_none() && self.pending.is_none() && self.rest.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.rest.size_hint();
        let extra = self.prefix.as_ref().map_or(0, |p| p.len() as u64);
        hint.set_lower(hint.lower() + extra);
        if let Some(upper) = hint.upper() {
            hint.set_upper(upper + extra);
        }
        hint
    }
}

#[cfg(test)]
mod spent_tests {
    use super::*;

    #[test]
    fn a_sent_streaming_body_is_never_replayable() {
        let mut body = PreparedBody::Streaming(full(Bytes::from_static(b"upload")));
        assert!(!body.replayable());
        let _sent = body.take();
        assert!(
            !body.replayable(),
            "a replay would go out with an empty body"
        );
    }
}
