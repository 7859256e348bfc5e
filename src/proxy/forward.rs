//! Sending a routed request upstream: header hygiene, credential injection, and the one
//! refresh-and-replay after a 401/403.

use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderMap};
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;

use super::headers::strip_hop_by_hop;
use super::replay::{self, PreparedBody};
use super::respond::ProxyError;
use super::target::Target;
use crate::config::Config;
use crate::metrics::RetryOutcome;
use crate::token_store::{CredentialSlot, IssuedToken};
use crate::upstream::{ProxyBody, UpstreamClient};

/// What happened to a forwarded request, for the access log.
pub struct Forwarded {
    /// The response to send to the client.
    pub response: Response<ProxyBody>,
    /// Whether the request was replayed after a 401/403.
    pub retried: bool,
}

/// Forwards `request` to `target`, injecting the route's credential.
pub async fn forward(
    upstream: &UpstreamClient,
    config: &Config,
    target: Target,
    request: Request<Incoming>,
) -> Result<Forwarded, ProxyError> {
    let Target { route, uri } = target;
    let (mut parts, body) = request.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    parts.headers.remove(header::HOST);

    let slot = route.as_ref().and_then(|r| r.credential.clone());
    let token = match &slot {
        Some(s) => Some(s.get().await?),
        None => None,
    };
    let may_retry = route
        .as_ref()
        .is_some_and(|r| r.refreshes_on_unauthorized());
    let mut body = if may_retry {
        replay::prepare(body, &parts.headers, config, upstream.replay_budget()).await?
    } else {
        PreparedBody::Streaming(replay::streaming(body, config))
    };
    let keep_headers = may_retry && body.replayable();
    let headers = if keep_headers {
        parts.headers.clone()
    } else {
        std::mem::take(&mut parts.headers)
    };

    let injection = slot.as_ref().zip(token.as_ref());
    let first = build(&parts.method, &uri, headers, injection, body.take());
    let started = Instant::now();
    let response = upstream.send(first, config.timeouts.upstream).await?;
    if let Some(r) = &route {
        r.metrics.upstream_latency(started.elapsed());
    }

    let rejected = matches!(
        response.status(),
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
    );
    if let (true, true, Some(slot), Some(token), Some(route)) =
        (rejected, keep_headers, &slot, &token, &route)
    {
        match slot.refresh_after_rejection(token).await {
            Ok(Some(fresh)) => {
                drop(response);
                tracing::info!(credential = %slot.name(), "upstream refused the token; replaying with a fresh one");
                let again = build(
                    &parts.method,
                    &uri,
                    parts.headers,
                    Some((slot, &fresh)),
                    body.take(),
                );
                let started = Instant::now();
                let response = upstream.send(again, config.timeouts.upstream).await?;
                route.metrics.upstream_latency(started.elapsed());
                let outcome = if matches!(
                    response.status(),
                    StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN
                ) {
                    RetryOutcome::Failed
                } else {
                    RetryOutcome::Success
                };
                route.metrics.retried(outcome);
                return Ok(Forwarded {
                    response: finish(response),
                    retried: true,
                });
            }
            Ok(None) => {}
            Err(unavailable) => {
                route.metrics.retried(RetryOutcome::Unavailable);
                return Err(unavailable.into());
            }
        }
    }
    Ok(Forwarded {
        response: finish(response),
        retried: false,
    })
}

fn build(
    method: &Method,
    uri: &Uri,
    mut headers: HeaderMap,
    injection: Option<(&Arc<CredentialSlot>, &Arc<IssuedToken>)>,
    body: ProxyBody,
) -> Request<ProxyBody> {
    if let Some((slot, token)) = injection {
        inject(&mut headers, slot.header(), token.header_value());
    }
    let mut request = Request::new(body);
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri.clone();
    *request.headers_mut() = headers;
    request
}

/// Sets the credential header, replacing whatever the client sent under that name.
pub fn inject(headers: &mut HeaderMap, name: &HeaderName, value: &HeaderValue) {
    headers.insert(name.clone(), value.clone());
}

/// The upstream's response as sent to the client: hop-by-hop headers removed.
fn finish(mut response: Response<ProxyBody>) -> Response<ProxyBody> {
    strip_hop_by_hop(response.headers_mut());
    *response.version_mut() = http::Version::HTTP_11;
    response
}
