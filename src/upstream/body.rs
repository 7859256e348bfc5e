//! The body type every request and response inside the proxy carries, whatever its source.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;

/// Errors boxed for bodies that mix sources.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request sent upstream and every response sent to a client.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// A body of known bytes.
pub fn full(bytes: Bytes) -> ProxyBody {
    use http_body_util::BodyExt;
    http_body_util::Full::new(bytes)
        .map_err(|never| match never {})
        .boxed()
}

/// An empty body.
pub fn empty() -> ProxyBody {
    use http_body_util::BodyExt;
    http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed()
}
