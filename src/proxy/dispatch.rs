//! The pipeline: every request, whichever way it came in (forward, mount, HTTP/2, inside a
//! CONNECT tunnel, decrypted or plain, a WebSocket handshake), takes the same steps in the
//! same order with one context — admission (`admission.rs`), then a CONNECT is opened
//! (`connect.rs`) and anything else is sent with its credential and replayed when the token
//! is refused (`exchange.rs`), its answer mapped for the client (redirects, protocol
//! switch; the body's idle limit comes with it from the upstream client), then counted and
//! written to the access log. A rule changed in one step changes for every way in.

use std::future::Future;
use std::sync::Arc;

use http::request::Parts;
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
use crate::upstream::authority::host_and_port;
use crate::upstream::ProxyBody;

/// Answers one request that arrived on `conn`. Every answer — forwarded, refused, a tunnel
/// opened — ends in the same step: the route's (or `unmatched`) metrics and one access line.
///
/// The request's head and its decision live here, in this future, and the steps below
/// borrow them: passed down by value, each step's future would keep its own copy (hundreds of
/// bytes each, moved with the future).
pub(crate) fn handle(conn: Arc<Connection>, request: Request<Incoming>) -> Answer {
    let (mut head, body) = request.into_parts();
    Box::pin(async move {
        let mut ctx = RequestContext::new(&conn, &head.method);
        match admission::admit(&mut ctx, &head).await {
            Ok(Decision::Forward(ref admitted)) => forward(&ctx, admitted, &mut head, body).await,
            Ok(Decision::Tunnel(plan)) => tunnel(ctx, plan, Request::from_parts(head, body)).await,
            Err(e) => refused(&ctx, e, &head.uri),
        }
    })
}

/// Opens the CONNECT tunnel admission planned (the opening is boxed: requests, the common
/// case, do not carry its size).
async fn tunnel(
    ctx: RequestContext,
    plan: admission::TunnelPlan,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let (uri, authority) = (request.uri().clone(), plan.authority.clone());
    let host = host_and_port(authority.as_str()).0;
    let line = AccessLine::start(&ctx, None, None, &uri, Some(host));
    let response = match Box::pin(connect::open(&ctx, plan, request, handle)).await {
        Ok(response) => response,
        Err(e) => refusal(&ctx, e),
    };
    line.finish(&ctx, None, response, false)
}

/// Answers a request admission refused. A refusal that knows its route (client not
/// allowed, cleartext) is counted and logged under it, not under `unmatched`.
fn refused(ctx: &RequestContext, e: ProxyError, uri: &http::Uri) -> Response<ProxyBody> {
    let snapshot = Arc::clone(&ctx.snapshot);
    let route = e.route_name().and_then(|name| {
        snapshot
            .routes
            .iter()
            .find(|r| *r.name == *name)
            .map(|r| &**r)
    });
    let line = AccessLine::start(ctx, route, None, uri, None);
    let response = refusal(ctx, e);
    line.finish(ctx, route, response, false)
}

/// The proxy's own answer to a request it did not let through.
fn refusal(ctx: &RequestContext, e: ProxyError) -> Response<ProxyBody> {
    let route = e.route_name().map(str::to_string);
    // At debug: the access line records every refusal, and a guessing client would write a
    // line per guess (the login throttle logs once per burst).
    tracing::debug!(client = %ctx.client.addr, method = %ctx.method, error = %e, "request refused by the proxy");
    e.into_response(route.as_deref())
}

/// One request's access line, from the moment the pipeline knows where it goes to its answer.
/// With the binary's access log installed and the line on at `info` (and `debug` off), the
/// line is formatted here and written by the access-log thread, and the request gets no
/// `tracing` span: the span's fields are formatted once, into the line (a failure's warning
/// still gets the span). Otherwise (log capture in tests, a terminal, `debug`) the request
/// runs in a `request` span and the line is a `tracing` event, as documented in
/// docs/operations.md. Off at `warn`: then nothing names the request, and nothing is kept.
struct AccessLine<'a> {
    /// What the line names (`None` at `warn`).
    fields: Option<AccessFields<'a>>,
    /// The `request` span (none on the fast path or at `warn`).
    span: tracing::Span,
    /// The fast path: the access log the line is formatted into when the answer is known.
    fast: Option<&'static access_log::AccessLog>,
}

impl<'a> AccessLine<'a> {
    fn start(
        ctx: &'a RequestContext,
        route: Option<&'a crate::routes::Route>,
        credential: Option<&'a crate::token_store::CredentialSlot>,
        uri: &'a http::Uri,
        host: Option<&'a str>,
    ) -> Self {
        // `started` is read only when the line is on (one level check per request).
        if ctx.started.is_none() {
            return Self {
                fields: None,
                span: tracing::Span::none(),
                fast: None,
            };
        }
        let fields = access_fields(&ctx.client, route, credential, &ctx.method, uri, host);
        match access_log::installed().filter(|_| !tracing::enabled!(tracing::Level::DEBUG)) {
            Some(log) => Self {
                fast: Some(log),
                span: tracing::Span::none(),
                fields: Some(fields),
            },
            None => Self {
                span: request_span(&fields),
                fast: None,
                fields: Some(fields),
            },
        }
    }

    /// The span a failure's warning is logged in (made then on the fast path).
    fn warning_span(&self) -> tracing::Span {
        match (&self.fast, &self.fields) {
            (Some(_), Some(fields)) => request_span(fields),
            _ => self.span.clone(),
        }
    }

    /// Counts the answer on its route (or `unmatched`) and writes the line.
    fn finish(
        self,
        ctx: &RequestContext,
        route: Option<&crate::routes::Route>,
        response: Response<ProxyBody>,
        retried: bool,
    ) -> Response<ProxyBody> {
        let status = response.status().as_u16();
        match route {
            Some(r) => r.metrics.answered(status),
            None => ctx.snapshot.unmatched_metrics.answered(status),
        }
        let outcome = Outcome {
            status,
            latency_nanos: ctx.started.map_or(0, |started| {
                u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX)
            }),
            retried,
        };
        match (self.fast, &self.fields) {
            (Some(log), Some(fields)) => log.log(fields, outcome),
            _ => self.span.in_scope(|| access_event(outcome)),
        }
        response
    }
}

/// Forwards an admitted request (or answers why it failed), with a span and an access-log
/// line naming client, route, the credential chosen for the client, method, the host the client asked for, the
/// upstream it went to, status, latency and whether it was replayed.
///
/// Not an `async fn`: its arguments would be kept twice in its future (as arguments and as
/// the body's locals), and the pipeline moves that future.
fn forward<'a>(
    ctx: &'a RequestContext,
    admitted: &'a Admitted,
    parts: &'a mut Parts,
    body: Incoming,
) -> impl Future<Output = Response<ProxyBody>> + Send + 'a {
    let Admitted {
        target,
        pinned,
        credential,
    } = admitted;
    let hop_by_hop = headers::any_hop_by_hop(&parts.headers);
    let websocket = (hop_by_hop && upgrade::is_websocket(parts.version, &parts.headers))
        .then(|| parts.extensions.remove::<OnUpgrade>())
        .flatten();
    headers::for_upstream(parts, hop_by_hop, websocket.is_some());
    async move {
        let snapshot = &ctx.snapshot;
        let route = target.route.as_ref();
        let line = AccessLine::start(
            ctx,
            route.map(|r| &**r),
            credential.as_deref(),
            &target.uri,
            target.named_host(),
        );
        let exchange = Exchange {
            upstream: &ctx.state().upstream,
            config: &snapshot.config,
            target,
            credential: credential.as_ref(),
            pinned: pinned.as_ref(),
            leg: if websocket.is_some() {
                Leg::Upgrade
            } else {
                Leg::Request
            },
        };
        // At `warn` (and on the access log's fast path) there is no span: polled bare, the
        // exchange skips the instrumentation's enter and exit on each of its polls. Awaited
        // here, not in a block of its own: such a block would keep another copy of the
        // request in the future.
        let result = if line.span.is_none() {
            exchange.run(parts, body).await
        } else {
            exchange
                .run(parts, body)
                .instrument(line.span.clone())
                .await
        };
        let (response, retried) = match result {
            Ok(forwarded) => {
                let mut response = match websocket {
                    Some(client_side) => {
                        upgrade::switch(forwarded.response, client_side, &ctx.conn)
                    }
                    None => headers::for_client(forwarded.response),
                };
                if let Some(rewrite) = location::Rewrite::for_target(target) {
                    rewrite.apply(response.headers_mut());
                }
                // The body keeps `timeouts.upstream_body_idle` from the upstream client.
                (response, forwarded.retried)
            }
            Err(ProxyError::Upstream(detail)) if route.is_none() => {
                line.span.in_scope(|| {
                    tracing::debug!(error = %detail, "unmatched request: upstream unreachable");
                });
                (ProxyError::Unreachable.into_response(None), false)
            }
            Err(e) => {
                if matches!(
                    e,
                    ProxyError::Credential(_)
                        | ProxyError::Upstream(_)
                        | ProxyError::UpstreamTimeout(_)
                ) {
                    line.warning_span()
                        .in_scope(|| tracing::warn!(error = %e, "request failed"));
                }
                (e.into_response(route.map(|r| &*r.name)), false)
            }
        };
        line.finish(ctx, route.map(|r| &**r), response, retried)
    }
}

/// What the access line names about a request.
fn access_fields<'a>(
    client: &'a Client,
    route: Option<&'a crate::routes::Route>,
    credential: Option<&'a crate::token_store::CredentialSlot>,
    method: &'a http::Method,
    uri: &'a http::Uri,
    host: Option<&'a str>,
) -> AccessFields<'a> {
    AccessFields {
        client: client.addr,
        user: client.user.as_deref().unwrap_or("-"),
        route: route.map_or("-", |r| &*r.name),
        credential: credential.map_or("-", |c| &**c.name()),
        method: method.as_str(),
        // The host the client named, as routing (or the tunnel) read it; else the upstream's
        // (mount requests, refusals), by the request path's one authority parser (the `http`
        // crate's `host()` searches with `str` patterns).
        host: host
            .or_else(|| uri.authority().map(|a| host_and_port(a.as_str()).0))
            .unwrap_or("-"),
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
        latency_ms = outcome.latency_ms(),
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
