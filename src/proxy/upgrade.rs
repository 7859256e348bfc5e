//! Protocol upgrades. Only `Upgrade: websocket` (any case, with `upgrade` in `Connection`)
//! switches protocols; any other token (`h2c` from Java's `HttpClient` and `curl --http2`,
//! `TLS/1.2`, …) is dropped with the hop-by-hop headers and the request goes on as an
//! ordinary one, body included. A WebSocket handshake is an ordinary request for admission,
//! credentials and replay (the same driver, `exchange.rs`); it only goes out on a connection
//! of its own. After `101 Switching Protocols` the two sides are spliced with bounded
//! buffers; the client's connection stays one connection — counted, and evicted when it is
//! the idlest at `max_connections` — until either side closes or nothing moves for
//! `connect.idle_timeout`. Only the handshake carries the credential.

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::activity::CountedWhileAlive;
use super::context::Connection;
use super::headers::{for_client, strip_hop_by_hop};
use super::splice::splice;
use crate::upstream::{body, ProxyBody};

/// Whether `headers` (of an HTTP/1.1 request) ask to switch to WebSocket: an `Upgrade`
/// header naming `websocket` and the `upgrade` token in `Connection` (RFC 9110 §7.8).
pub fn is_websocket(version: Version, headers: &HeaderMap) -> bool {
    version == Version::HTTP_11
        && tokens(headers, header::UPGRADE).any(|t| t.eq_ignore_ascii_case("websocket"))
        && tokens(headers, header::CONNECTION).any(|t| t.eq_ignore_ascii_case("upgrade"))
}

/// The comma-separated tokens of every `name` header.
fn tokens(headers: &HeaderMap, name: header::HeaderName) -> impl Iterator<Item = &str> {
    headers
        .get_all(name)
        .into_iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
}

/// The answer to a WebSocket handshake. After a 101 both sides are spliced in a task of
/// their own; any other answer is passed on like a normal response.
pub(crate) fn switch(
    mut response: Response<ProxyBody>,
    client_side: OnUpgrade,
    conn: &Arc<Connection>,
) -> Response<ProxyBody> {
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return for_client(response);
    }
    let upstream_side = hyper::upgrade::on(&mut response);
    let idle = conn.state.snapshot().config.connect.idle_timeout;
    let activity = Arc::clone(&conn.activity);
    let gauge = CountedWhileAlive::new(conn.state.metrics.upgraded_connections.clone());
    tokio::spawn(async move {
        let _counted = gauge;
        match tokio::try_join!(client_side, upstream_side) {
            Ok((client, upstream)) => {
                let ends = splice(
                    TokioIo::new(client),
                    TokioIo::new(upstream),
                    idle,
                    &activity,
                );
                if let Err(e) = ends.await {
                    tracing::debug!(error = %e, "upgraded connection closed");
                }
            }
            Err(e) => tracing::debug!(error = %e, "upgrade not completed"),
        }
    });
    let protocol = response.headers().get(header::UPGRADE).cloned();
    let (mut parts, _) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if let Some(protocol) = protocol {
        parts.headers.insert(header::UPGRADE, protocol);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    Response::from_parts(parts, body::empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_websocket_switches_protocols() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        assert!(
            !is_websocket(Version::HTTP_11, &h),
            "no Connection: upgrade"
        );
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(is_websocket(Version::HTTP_11, &h));
        assert!(!is_websocket(Version::HTTP_2, &h));
        for other in ["h2c", "TLS/1.2", "websocketx"] {
            h.insert(header::UPGRADE, HeaderValue::from_str(other).unwrap());
            assert!(!is_websocket(Version::HTTP_11, &h), "{other}");
        }
        h.remove(header::UPGRADE);
        assert!(!is_websocket(Version::HTTP_11, &h));
    }
}
