//! Which headers describe one connection rather than the message (RFC 9110 §7.6.1): they
//! never cross the proxy, and a credential can never be carried in one.

use http::header::{self, HeaderName};

/// Headers that describe one connection, not the message (`HTTP2-Settings` belongs to an
/// `Upgrade: h2c` offer, RFC 7540 §3.2.1, which is never passed on). A `static`: a `const`
/// array of `HeaderName`s would be built and dropped at every use, on every request.
pub static HOP_BY_HOP: [HeaderName; 9] = [
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

/// Whether `name` is hop-by-hop (including `Transfer-Encoding`, which hyper manages). Asked
/// of every header of every message: one `match` on the (lower-case) name, which the
/// compiler turns into a switch on its length, instead of ten comparisons.
pub fn is_hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "upgrade"
            | "http2-settings"
            | "transfer-encoding"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_and_the_match_agree() {
        for name in &HOP_BY_HOP {
            assert!(is_hop_by_hop(name), "{name}");
        }
        assert!(is_hop_by_hop(&header::TRANSFER_ENCODING));
        for name in [
            header::AUTHORIZATION,
            header::HOST,
            header::CONTENT_LENGTH,
            header::TRAILER,
        ] {
            assert_eq!(is_hop_by_hop(&name), name == header::TRAILER, "{name}");
        }
        assert!(!is_hop_by_hop(&HeaderName::from_static("x-connection")));
    }
}
