//! The body type every request and response inside the proxy carries, whatever its source.

use bytes::Bytes;
use http_body_util::combinators::BoxBody;

/// Errors boxed for bodies that mix sources.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request sent upstream and every response sent to a client.
pub type ProxyBody = BoxBody<Bytes, BoxError>;
