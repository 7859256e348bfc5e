//! Which headers describe one connection rather than the message (RFC 9110 §7.6.1): they
//! never cross the proxy, and a credential can never be carried in one.

use http::header::{self, HeaderName};

/// Headers that describe one connection, not the message.
pub const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::UPGRADE,
];

/// Whether `name` is hop-by-hop (including `Transfer-Encoding`, which hyper manages).
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::TRANSFER_ENCODING || HOP_BY_HOP.contains(name)
}
