//! Which headers describe one connection rather than the message (RFC 9110 §7.6.1): they
//! never cross the proxy, and a credential can never be carried in one.

use http::header::HeaderName;

/// Whether `name` describes one connection, not the message, including `Transfer-Encoding`
/// (which hyper manages) and `HTTP2-Settings` (it belongs to an `Upgrade: h2c` offer, RFC 7540
/// §3.2.1, which is never passed on). The one list of them. Asked of every header of every
/// message: one `match` on the (lower-case) name, which the compiler turns into a switch on
/// its length.
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
    use http::header;

    #[test]
    fn the_hop_by_hop_headers_are_named() {
        for name in [
            "connection",
            "keep-alive",
            "proxy-connection",
            "proxy-authenticate",
            "proxy-authorization",
            "te",
            "trailer",
            "upgrade",
            "http2-settings",
            "transfer-encoding",
        ] {
            assert!(is_hop_by_hop(&HeaderName::from_static(name)), "{name}");
        }
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
