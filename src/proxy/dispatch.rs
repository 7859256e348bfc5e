//! The pipeline: every request, whichever way it came in (forward, mount, HTTP/2, inside a
//! CONNECT tunnel, decrypted or plain, a WebSocket handshake), takes the same steps in the
//! same order with one context — admission (`admission.rs`), then a CONNECT is opened
//! (`connect.rs`) and anything else is sent with its credential and replayed when the token
//! is refused (`exchange.rs`), its answer mapped for the client (redirects, protocol switch,
//! body idle limit), then counted and written to the access log. A rule changed in one step
//! changes for every way in.

use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use tracing::Instrument;

use super::admission::{self, Decision};
use super::context::{Admitted, Answer, Connection, RequestContext};
use super::exchange::{Exchange, Leg};
use super::respond::ProxyError;
use super::{connect, headers, location, upgrade};
use crate::access::Client;
use crate::access_log::{self, Outcome, RequestFields as AccessFields};
use crate::upstream::idle::{IdleTimeout, Side};
use crate::upstream::ProxyBody;

/// Answers one request that arrived on `conn`.
pub(crate) fn handle(conn: Arc<Connection>, request: Request<Incoming>) -> Answer {
    Box::pin(async move {
        let mut ctx = RequestContext::new(&conn, request.method());
        match admission::admit(&mut ctx, &request).await {
            Ok(Decision::Forward(admitted)) => forward(ctx, admitted, request).await,
            // Boxed so that requests, the common case, do not carry its size.
            Ok(Decision::Tunnel(plan)) => {
                match Box::pin(connect::open(&ctx, plan, request, handle)).await {
                    Ok(response) => response,
                    Err(e) => refuse(&ctx, e),
                }
            }
            Err(e) => refuse(&ctx, e),
        }
    })
}

/// The proxy's own answer to a request it did not let through.
fn refuse(ctx: &RequestContext, e: ProxyError) -> Response<ProxyBody> {
    let route = match &e {
        ProxyError::ClientNotAllowed(r) | ProxyError::CleartextRefused(r) => Some(r.clone()),
        _ => None,
    };
    let client = &ctx.client;
    let user = client.user.as_deref().unwrap_or("-");
    if matches!(
        e,
        ProxyError::ProxyAuth(_) | ProxyError::ProxyAuthThrottled(_)
    ) {
        // At debug: a guessing client would write a line per guess; the throttle logs once
        // per burst.
        tracing::debug!(client = %client.addr, method = %ctx.method, error = %e, "request refused by the proxy");
    } else {
        tracing::info!(client = %client.addr, user, method = %ctx.method, error = %e, "request refused by the proxy");
    }
    let response = e.into_response(route.as_deref());
    ctx.snapshot
        .unmatched_metrics
        .answered(response.status().as_u16());
    response
}

/// Forwards an admitted request (or answers why it failed), with a span and an access-log
/// line naming client, route, credential, method, the host the client asked for, the
/// upstream it went to, status, latency and whether it was replayed.
async fn forward(
    ctx: RequestContext,
    admitted: Admitted,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let Admitted { target, pinned } = admitted;
    let snapshot = &ctx.snapshot;
    let route = target.route.as_ref();
    // Off at `warn`: then nothing below names the request, and nothing is kept for it.
    let fields = tracing::enabled!(tracing::Level::INFO).then(|| {
        let origin = target.client_origin.as_ref().map(|(_, a)| a);
        access_fields(
            &ctx.client,
            route.map(|r| &**r),
            &ctx.method,
            &target.uri,
            origin,
        )
    });
    // With the binary's access log installed and the line on at `info` (and `debug` off),
    // the line is formatted here and written by the access-log thread, and the request gets
    // no `tracing` span: the span's fields are formatted once, into the line (a failure's
    // warning still gets the span). Otherwise (log capture in tests, a terminal, `debug`)
    // the request runs in a `request` span and the line is a `tracing` event, as documented
    // in docs/operations.md.
    let fast = access_log::installed()
        .filter(|_| fields.is_some() && !tracing::enabled!(tracing::Level::DEBUG));
    let (span, fast_span) = match (&fields, fast) {
        (Some(f), Some(log)) => (tracing::Span::none(), Some(f.span(log.format()))),
        (Some(f), None) => (request_span(f), None),
        (None, _) => (tracing::Span::none(), None),
    };
    let on_demand = || match (&fast_span, &fields) {
        (Some(_), Some(f)) => request_span(f),
        _ => span.clone(),
    };
    let answer = async {
        let (mut parts, body) = request.into_parts();
        let websocket = upgrade::is_websocket(parts.version, &parts.headers)
            .then(|| parts.extensions.remove::<OnUpgrade>())
            .flatten();
        headers::for_upstream(&mut parts, websocket.is_some());
        let exchange = Exchange {
            upstream: &ctx.state().upstream,
            config: &snapshot.config,
            target: &target,
            pinned: pinned.as_ref(),
            leg: if websocket.is_some() {
                Leg::Upgrade
            } else {
                Leg::Request
            },
        };
        match exchange.run(parts, body).await {
            Ok(forwarded) => {
                let mut response = match websocket {
                    Some(client_side) => {
                        upgrade::switch(forwarded.response, client_side, &ctx.conn)
                    }
                    None => headers::for_client(forwarded.response),
                };
                if let Some(rewrite) = location::Rewrite::for_target(&target) {
                    rewrite.apply(response.headers_mut());
                }
                let idle = snapshot.config.timeouts.upstream_body_idle;
                let response = response.map(|body| IdleTimeout::wrap(body, Side::Upstream, idle));
                (response, forwarded.retried)
            }
            Err(ProxyError::Upstream(detail)) if route.is_none() => {
                tracing::debug!(error = %detail, "unmatched request: upstream unreachable");
                (ProxyError::Unreachable.into_response(None), false)
            }
            Err(e) => {
                if matches!(
                    e,
                    ProxyError::Credential(_)
                        | ProxyError::Upstream(_)
                        | ProxyError::UpstreamTimeout(_)
                ) {
                    on_demand().in_scope(|| tracing::warn!(error = %e, "request failed"));
                }
                (e.into_response(route.map(|r| &*r.name)), false)
            }
        }
    }
    .instrument(span.clone())
    .await;
    let (response, retried) = answer;
    let status = response.status().as_u16();
    match route {
        Some(r) => r.metrics.answered(status),
        None => snapshot.unmatched_metrics.answered(status),
    }
    let outcome = Outcome {
        status,
        latency_ms: ctx.started.elapsed().as_secs_f64() * 1000.0,
        retried,
    };
    match (fast, &fast_span) {
        (Some(log), Some(line_span)) => log.log(line_span, outcome),
        _ => span.in_scope(|| access_event(outcome)),
    }
    response
}

/// What the access line names about a request.
fn access_fields<'a>(
    client: &'a Client,
    route: Option<&'a crate::routes::Route>,
    method: &'a http::Method,
    uri: &'a http::Uri,
    origin: Option<&'a http::uri::Authority>,
) -> AccessFields<'a> {
    AccessFields {
        client: client.addr,
        user: client.user.as_deref().unwrap_or("-"),
        route: route.map_or("-", |r| &*r.name),
        credential: route
            .and_then(|r| r.credential.as_ref())
            .map_or("-", |c| &**c.name()),
        method: method.as_str(),
        host: origin.map_or_else(|| uri.host().unwrap_or("-"), |a| a.host()),
        upstream: uri.authority().map_or("-", |a| a.as_str()),
    }
}

/// The `request` span of the documented access-log format.
fn request_span(f: &AccessFields<'_>) -> tracing::Span {
    tracing::info_span!(
        "request",
        client = %f.client,
        user = f.user,
        route = f.route,
        credential = f.credential,
        method = %f.method,
        host = f.host,
        upstream = f.upstream
    )
}

/// The access line as a `tracing` event, inside the request's span.
fn access_event(outcome: Outcome) {
    tracing::info!(
        status = outcome.status,
        latency_ms = outcome.latency_ms,
        retried = outcome.retried,
        "request"
    );
}

/// The access line of `fields` through `tracing` (span and event), for the test that holds
/// the access-log thread's lines to what `tracing` prints.
#[cfg(test)]
pub(crate) fn access_line_through_tracing(fields: &AccessFields<'_>, outcome: Outcome) {
    request_span(fields).in_scope(|| access_event(outcome));
}
