//! One routed request, from admission to the access-log line: the route's own checks (or,
//! for unmatched traffic, where it may go), forwarding (or an upgrade), redirect rewriting
//! and the upstream-body idle limit. Forward-proxy, mount and in-tunnel requests all pass
//! through here.

use std::time::Instant;

use http::{Request, Response};

use hyper::body::Incoming;
use tracing::Instrument;

use super::respond::ProxyError;
use super::target::Target;
use super::{forward, location, target, upgrade};
use crate::access::{Client, DestinationError, DestinationPolicy, UnmatchedReach};
use crate::access_log::{self, Outcome, RequestFields as AccessFields};
use crate::state::State;
use crate::upstream::idle::{IdleTimeout, Side};
use crate::upstream::{PinnedAddrs, ProxyBody};

/// Checks a routed request against its route (clients, methods, paths) or, for unmatched
/// traffic, its destination against the proxy's own addresses, link-local ranges and
/// `unmatched_deny` — before anything is sent.
async fn admit(
    state: &State,
    snapshot: &crate::state::Snapshot,
    client: &Client,
    target: &Target,
    request: &Request<Incoming>,
) -> Result<Option<PinnedAddrs>, ProxyError> {
    if let Some(route) = &target.route {
        return target::check_routed(
            route,
            client.user.as_deref(),
            request.method(),
            request.uri(),
            request.headers(),
        )
        .map(|()| None);
    }
    let host = target.uri.host().unwrap_or_default();
    let default_port = if target.uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
        443
    } else {
        80
    };
    let port = target.uri.port_u16().unwrap_or(default_port);
    allowed_destination(state, host, port, Some(&snapshot.config.unmatched_reach))
        .await
        .map(|addrs| Some(PinnedAddrs(addrs.into())))
}

/// Resolves `host:port` for traffic no route claims (within `timeouts.connect`) and returns
/// its addresses once every one is allowed: never the proxy's own listen or admin address,
/// link-local or unspecified addresses, nor what `unmatched` (`None` for a routed host)
/// refuses.
pub async fn allowed_destination(
    state: &State,
    host: &str,
    port: u16,
    unmatched: Option<&UnmatchedReach>,
) -> Result<Vec<std::net::SocketAddr>, ProxyError> {
    let timeout = state.snapshot().config.timeouts.connect;
    let policy = DestinationPolicy {
        own: state.own_addresses.get().map_or(&[], Vec::as_slice),
        unmatched,
    };
    policy
        .resolve(host, port, timeout)
        .await
        .map_err(|e| match e {
            DestinationError::Denied => ProxyError::DestinationDenied(host.to_string()),
            DestinationError::Unreachable => ProxyError::Unreachable,
            DestinationError::Timeout(d) => {
                ProxyError::UpstreamTimeout(humantime::format_duration(d).to_string())
            }
        })
}

/// Forwards a routed request (or answers its routing error), with a span and an access-log
/// line naming client, route, credential, method, the host the client asked for, the
/// upstream it went to, status, latency and whether it was replayed.
pub async fn dispatch(
    state: &State,
    snapshot: &crate::state::Snapshot,
    client: &Client,
    target: Result<Target, ProxyError>,
    mut request: Request<Incoming>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let method = request.method().clone();
    let checked = match target {
        Ok(t) => admit(state, snapshot, client, &t, &request)
            .await
            .map(|pinned| {
                if let Some(pinned) = pinned {
                    request.extensions_mut().insert(pinned);
                }
                t
            }),
        Err(e) => Err(e),
    };
    let target = match checked {
        Ok(t) => t,
        Err(e) => {
            let route = match &e {
                ProxyError::ClientNotAllowed(r) | ProxyError::CleartextRefused(r) => {
                    Some(r.clone())
                }
                _ => None,
            };
            let response = e.into_response(route.as_deref());
            snapshot
                .unmatched_metrics
                .answered(response.status().as_u16());
            tracing::info!(client = %client.addr, user = client.user.as_deref().unwrap_or("-"), %method, status = response.status().as_u16(), "request refused by the proxy");
            return response;
        }
    };
    let route = target.route.clone();
    // Off at `warn`: then nothing below names the request, and nothing is kept for it.
    let line_on = tracing::enabled!(tracing::Level::INFO);
    // The target is consumed by forwarding; what the line names stays here (shared bytes).
    let kept = line_on.then(|| {
        (
            target.uri.clone(),
            target.client_origin.as_ref().map(|(_, a)| a.clone()),
        )
    });
    let fields = kept.as_ref().map(|(uri, origin)| {
        access_fields(client, route.as_deref(), &method, uri, origin.as_ref())
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
        let redirects = location::Rewrite::for_target(&target);
        // Boxed: the upgrade future is several KB, and every request's future would carry
        // (and move) room for it.
        let forwarded = if upgrade::is_upgrade(request.headers()) {
            Box::pin(upgrade::forward(
                &state.upstream,
                &snapshot.config,
                target,
                request,
            ))
            .await
        } else {
            forward::forward(&state.upstream, &snapshot.config, target, request).await
        };
        match forwarded {
            Ok(mut f) => {
                if let Some(rewrite) = &redirects {
                    rewrite.apply(f.response.headers_mut());
                }
                let idle = snapshot.config.timeouts.upstream_body_idle;
                let response = f
                    .response
                    .map(|body| IdleTimeout::wrap(body, Side::Upstream, idle));
                (response, f.retried)
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
                (e.into_response(route.as_ref().map(|r| &*r.name)), false)
            }
        }
    }
    .instrument(span.clone())
    .await;
    let (response, retried) = answer;
    let status = response.status().as_u16();
    match &route {
        Some(r) => r.metrics.answered(status),
        None => snapshot.unmatched_metrics.answered(status),
    }
    let outcome = Outcome {
        status,
        latency_ms: started.elapsed().as_secs_f64() * 1000.0,
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
#[doc(hidden)]
pub fn access_line_through_tracing(fields: &AccessFields<'_>, outcome: Outcome) {
    request_span(fields).in_scope(|| access_event(outcome));
}
