//! Which headers describe one connection rather than the message (RFC 9110 §7.6.1): they
//! never cross the proxy, and a credential can never be carried in one.

use http::header::{self, HeaderName};

/// Headers that describe one connection, not the message (`HTTP2-Settings` belongs to an
/// `Upgrade: h2c` offer, RFC 7540 §3.2.1, which is never passed on).
pub const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
    HeaderName::from_static("http2-settings"),
];

/// Whether `name` is hop-by-hop (including `Transfer-Encoding`, which hyper manages).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::TRANSFER_ENCODING || HOP_BY_HOP.contains(name)
}
