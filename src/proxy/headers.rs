//! Header hygiene between client and upstream: hop-by-hop headers (RFC 9110 §7.6.1), those a
//! `Connection` header names, and the client's proxy credentials never cross the proxy.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::{Response, Version};

use crate::upstream::ProxyBody;

pub use crate::vocab::hop_by_hop::is_hop_by_hop;

/// Whether any hop-by-hop header is present. Most messages carry none: one pass over the
/// names is cheaper than nine removals, or than looking up `Upgrade` for a WebSocket
/// handshake (`Upgrade` and `Connection` are hop-by-hop).
pub fn any_hop_by_hop(headers: &HeaderMap) -> bool {
    headers.keys().any(is_hop_by_hop)
}

/// Removes hop-by-hop headers and every header listed in `Connection`.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if any_hop_by_hop(headers) {
        remove_hop_by_hop(headers);
    }
}

/// [`strip_hop_by_hop`] for headers already known to hold one (many HTTP/1.1 clients send
/// `Connection: keep-alive` on every request): without looking for one again.
fn remove_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .chain(headers.keys().filter(|name| is_hop_by_hop(name)).cloned())
        .collect();
    for name in named {
        headers.remove(name);
    }
}

/// A client's request head made ready for the upstream: hop-by-hop headers gone (when
/// `hop_by_hop`, [`any_hop_by_hop`] of its headers, says there are any), a WebSocket
/// handshake asking for the switch again, and an HTTP/2 client's `te: trailers` kept (gRPC
/// needs it, and it is the one `TE` value HTTP/2 allows).
///
/// The client's `Host` stays here and never reaches an upstream: every leg puts the
/// connection's own in its place (the pool when it sends, the upgrade leg when it connects)
/// or removes it (HTTP/2 names the host in `:authority`), and the signing path removes it
/// before it signs. Removing it here too was ~200 instructions a request.
pub(crate) fn for_upstream(parts: &mut Parts, hop_by_hop: bool, websocket: bool) {
    let trailers = parts.version == Version::HTTP_2
        && parts
            .headers
            .get(header::TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    if hop_by_hop {
        remove_hop_by_hop(&mut parts.headers);
    }
    if websocket {
        ask_for_websocket(&mut parts.headers);
    }
    if trailers {
        parts
            .headers
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Asks the upstream for the WebSocket switch again after the hop-by-hop headers are gone.
pub(crate) fn ask_for_websocket(headers: &mut HeaderMap) {
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
}

/// The upstream's response as sent to the client: hop-by-hop headers removed.
pub(crate) fn for_client(mut response: Response<ProxyBody>) -> Response<ProxyBody> {
    strip_hop_by_hop(response.headers_mut());
    *response.version_mut() = Version::HTTP_11;
    response
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn strips_standard_and_connection_named_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, X-Secret-Hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::PROXY_AUTHORIZATION,
            HeaderValue::from_static("Basic abc"),
        );
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-end-to-end"));
    }
}
