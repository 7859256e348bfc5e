//! Protocol upgrades (`Connection: upgrade`, `Upgrade: websocket`) on routed requests, in
//! forward, mount and tunnel mode. The handshake is an ordinary request for routing: it gets
//! the route's credential, and a 401/403 answer is refreshed and retried once like any
//! bodiless request. After `101 Switching Protocols` the client's and the upstream's
//! connections are spliced with bounded buffers until either side closes or nothing moves
//! for `connect.idle_timeout`. Only the handshake carries the credential.

use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap, HeaderValue};
use http::{Request, Response, StatusCode};
use http_body::Body as _;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;

use super::forward::{inject, verdict, Forwarded, TokenVerdict};
use super::headers::strip_hop_by_hop;
use super::replay;
use super::respond::ProxyError;
use super::splice::splice;
use super::target::Target;
use crate::config::Config;
use crate::metrics::RetryOutcome;
use crate::token_store::IssuedToken;
use crate::upstream::{BoxError, PinnedAddrs, ProxyBody, UpstreamClient};

/// Whether `headers` ask for a protocol upgrade: an `Upgrade` header and the `upgrade` token
/// in `Connection` (RFC 9110 §7.8).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|token| token.trim().eq_ignore_ascii_case("upgrade"))
}

/// Forwards an upgrade handshake to `target` and, after a 101, splices the two sides.
pub async fn forward(
    upstream: &UpstreamClient,
    config: &Config,
    target: Target,
    request: Request<Incoming>,
) -> Result<Forwarded, ProxyError> {
    let Target { route, uri, .. } = target;
    let (mut parts, body) = request.into_parts();
    if !body.is_end_stream() {
        return Err(ProxyError::BadRequest(
            "an upgrade request must not have a body".into(),
        ));
    }
    let client_side = parts.extensions.remove::<OnUpgrade>().ok_or_else(|| {
        ProxyError::BadRequest("this connection cannot be upgraded (HTTP/2?)".into())
    })?;
    let pinned = parts.extensions.remove::<PinnedAddrs>();
    let protocol = parts.headers.get(header::UPGRADE).cloned();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);
    if let Some(protocol) = protocol {
        parts.headers.insert(header::UPGRADE, protocol);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }

    let slot = route.as_ref().and_then(|r| r.credential.clone());
    let mut token: Option<Arc<IssuedToken>> = match &slot {
        Some(s) => Some(s.get().await?),
        None => None,
    };
    let may_retry = route
        .as_ref()
        .is_some_and(|r| r.refreshes_on_unauthorized());
    let mut retried = false;
    let response = loop {
        let mut headers = parts.headers.clone();
        if let (Some(slot), Some(token)) = (&slot, &token) {
            inject(&mut headers, slot.header(), token.header_value());
        }
        let mut handshake = Request::new(replay::empty());
        *handshake.method_mut() = parts.method.clone();
        *handshake.uri_mut() = uri.clone();
        *handshake.headers_mut() = headers;
        if let Some(pinned) = &pinned {
            handshake.extensions_mut().insert(pinned.clone());
        }
        let started = Instant::now();
        let response = upstream
            .send_upgrade(handshake, config.timeouts.upstream)
            .await?;
        if let Some(r) = &route {
            r.metrics.upstream_latency(started.elapsed());
        }
        let (Some(slot), Some(sent), Some(route)) = (&slot, &token, &route) else {
            break response;
        };
        match verdict(route, &response) {
            TokenVerdict::Accepted => {
                slot.upstream_accepted(&route.name);
                if retried {
                    route.metrics.retried(RetryOutcome::Success);
                }
                break response;
            }
            TokenVerdict::Refused if retried => {
                slot.replay_refused(&route.name);
                route.metrics.retried(RetryOutcome::Failed);
                break response;
            }
            TokenVerdict::Refused if may_retry => {
                match slot.refresh_after_rejection(&route.name, sent).await {
                    Ok(Some(fresh)) => {
                        tracing::info!(credential = %slot.name(), "upstream refused the upgrade's token; retrying with a fresh one");
                        token = Some(fresh);
                        retried = true;
                    }
                    Ok(None) => break response,
                    Err(unavailable) => {
                        route.metrics.retried(RetryOutcome::Unavailable);
                        return Err(unavailable.into());
                    }
                }
            }
            TokenVerdict::Refused | TokenVerdict::NotTheToken => break response,
        }
    };
    Ok(Forwarded {
        response: switch(response, client_side, config),
        retried,
    })
}

/// The answer for the client. After a 101 the splice is started; any other answer is
/// passed on like a normal response.
fn switch(
    mut response: Response<Incoming>,
    client_side: OnUpgrade,
    config: &Config,
) -> Response<ProxyBody> {
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        strip_hop_by_hop(response.headers_mut());
        return response.map(|body| body.map_err(BoxError::from).boxed());
    }
    let upstream_side = hyper::upgrade::on(&mut response);
    let idle = config.connect.idle_timeout;
    tokio::spawn(async move {
        match tokio::try_join!(client_side, upstream_side) {
            Ok((client, upstream)) => {
                if let Err(e) = splice(TokioIo::new(client), TokioIo::new(upstream), idle).await {
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
    Response::from_parts(parts, replay::empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upgrade_needs_both_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(!is_upgrade(&h));
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(is_upgrade(&h));
        h.remove(header::UPGRADE);
        assert!(!is_upgrade(&h));
    }
}
