//! Request bodies that can be sent twice. A body is kept in memory only when a replay after
//! 401/403 is possible and it is no larger than `retry.max_body_bytes`; anything larger
//! streams through (its prefix first) and cannot be replayed.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;

use super::respond::ProxyError;
use crate::upstream::{BoxError, ProxyBody};

/// A request body ready to send.
pub enum PreparedBody {
    /// The whole body, in memory: can be sent again.
    Replayable(Bytes),
    /// A body too large (or with trailers) to keep: sent once.
    Streaming(ProxyBody),
}

impl PreparedBody {
    /// A body for one send; for `Replayable` the bytes are shared, not copied.
    pub fn take(&mut self) -> ProxyBody {
        match self {
            PreparedBody::Replayable(bytes) => full(bytes.clone()),
            PreparedBody::Streaming(_) => {
                match std::mem::replace(self, PreparedBody::Replayable(Bytes::new())) {
                    PreparedBody::Streaming(body) => body,
                    PreparedBody::Replayable(_) => empty(),
                }
            }
        }
    }

    /// Whether another send is possible.
    pub fn replayable(&self) -> bool {
        matches!(self, PreparedBody::Replayable(_))
    }
}

/// A body of known bytes.
pub fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// An empty body.
pub fn empty() -> ProxyBody {
    Empty::new().map_err(|never| match never {}).boxed()
}

/// The client's body, streamed as is.
pub fn streaming(body: Incoming) -> ProxyBody {
    body.map_err(BoxError::from).boxed()
}

/// Reads the body into memory if it fits in `limit` bytes, otherwise returns a streaming body
/// that starts with what was already read.
pub async fn prepare(
    mut body: Incoming,
    headers: &HeaderMap,
    limit: u64,
) -> Result<PreparedBody, ProxyError> {
    let declared = headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Ok(PreparedBody::Streaming(streaming(body)));
    }
    if body.is_end_stream() {
        return Ok(PreparedBody::Replayable(Bytes::new()));
    }
    let mut buffer = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ProxyError::BadRequest(format!("request body could not be read: {e}")))?;
        match frame.into_data() {
            Ok(data) => {
                buffer.extend_from_slice(&data);
                if buffer.len() as u64 > limit {
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
    Ok(PreparedBody::Replayable(buffer.freeze()))
}

/// What was read ahead, then the rest of the client's body.
struct PrefixedBody {
    prefix: Option<Bytes>,
    pending: Option<Frame<Bytes>>,
    rest: Incoming,
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
        Pin::new(&mut self.rest)
            .poll_frame(cx)
            .map(|f| f.map(|r| r.map_err(BoxError::from)))
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
