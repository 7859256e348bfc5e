//! The proxy listener: accepts HTTP/1.1 connections, routes each request (forward or mount
//! form, CONNECT), forwards it with its credential, and logs one line per request.

pub mod connect;
pub mod forward;
pub mod headers;
pub mod intercepted;
pub mod location;
pub mod replay;
pub mod respond;
pub mod target;
pub mod upgrade;

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tracing::Instrument;

use self::respond::ProxyError;
use self::target::Target;
use crate::access::{Client, DestinationError, DestinationPolicy};
use crate::state::State;
use crate::upstream::ProxyBody;

/// Answers one request received on the proxy listener from a client at `peer`. With
/// `clients.users` set, every request (forward, mount and CONNECT) must name its user in
/// `Proxy-Authorization`.
pub async fn handle(
    state: Arc<State>,
    peer: IpAddr,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let snapshot = state.snapshot();
    let user = match snapshot.config.clients.authenticate(request.headers()) {
        Ok(user) => user,
        Err(e) => {
            tracing::info!(client = %peer, method = %request.method(), error = %e, "request refused by the proxy");
            return ProxyError::from(e).into_response(None);
        }
    };
    let client = Client { addr: peer, user };
    if request.method() == Method::CONNECT {
        return connect::handle(state, client, request).await;
    }
    let target = target::resolve(&snapshot, request.method(), request.uri());
    dispatch(&state, &snapshot, &client, target, request).await
}

/// Checks a routed request against its route (clients, methods, paths) or, for unmatched
/// traffic, its destination against the proxy's own addresses, link-local ranges and
/// `unmatched_deny` — before anything is sent.
async fn admit(
    state: &State,
    snapshot: &crate::state::Snapshot,
    client: &Client,
    target: &Target,
    request: &Request<Incoming>,
) -> Result<(), ProxyError> {
    if let Some(route) = &target.route {
        return target::check_routed(
            route,
            client.user.as_deref(),
            request.method(),
            request.uri(),
            request.headers(),
        );
    }
    let host = target.uri.host().unwrap_or_default();
    let default_port = if target.uri.scheme() == Some(&http::uri::Scheme::HTTPS) {
        443
    } else {
        80
    };
    let port = target.uri.port_u16().unwrap_or(default_port);
    allowed_destination(state, host, port, &snapshot.config.unmatched_deny)
        .await
        .map(drop)
}

/// Resolves `host:port` for traffic no route claims (within `timeouts.connect`) and returns
/// its addresses once every one is allowed: never the proxy's own listen or admin address,
/// link-local or unspecified addresses, or the `deny` ranges.
async fn allowed_destination(
    state: &State,
    host: &str,
    port: u16,
    deny: &[ipnet::IpNet],
) -> Result<Vec<std::net::SocketAddr>, ProxyError> {
    let timeout = state.snapshot().config.timeouts.connect;
    let policy = DestinationPolicy {
        own: state.own_addresses.get().map_or(&[], Vec::as_slice),
        deny,
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
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let started = Instant::now();
    let method = request.method().clone();
    let checked = match target {
        Ok(t) => admit(state, snapshot, client, &t, &request)
            .await
            .map(|()| t),
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
    let route_name = route.as_ref().map_or("-", |r| &*r.name);
    let credential = route
        .as_ref()
        .and_then(|r| r.credential.as_ref())
        .map_or("-", |c| &**c.name());
    let span = tracing::info_span!(
        "request",
        client = %client.addr,
        user = client.user.as_deref().unwrap_or("-"),
        route = route_name,
        credential,
        %method,
        host = target
            .client_origin
            .as_ref()
            .map_or_else(|| target.uri.host().unwrap_or("-"), |(_, a)| a.host()),
        upstream = target.uri.authority().map_or("-", |a| a.as_str())
    );
    async {
        let redirects = location::Rewrite::for_target(&target);
        let forwarded = if upgrade::is_upgrade(request.headers()) {
            upgrade::forward(&state.upstream, &snapshot.config, target, request).await
        } else {
            forward::forward(&state.upstream, &snapshot.config, target, request).await
        };
        let (response, retried) = match forwarded {
            Ok(mut f) => {
                if let Some(rewrite) = &redirects {
                    rewrite.apply(f.response.headers_mut());
                }
                (f.response, f.retried)
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
                    tracing::warn!(error = %e, "request failed");
                }
                (e.into_response(route.as_ref().map(|r| &*r.name)), false)
            }
        };
        let status = response.status().as_u16();
        match &route {
            Some(r) => r.metrics.answered(status),
            None => snapshot.unmatched_metrics.answered(status),
        }
        tracing::info!(
            status,
            latency_ms = started.elapsed().as_secs_f64() * 1000.0,
            retried,
            "request"
        );
        response
    }
    .instrument(span)
    .await
}

/// Counts open connections so that shutdown can wait for them.
#[derive(Default)]
pub struct ConnectionTracker {
    open: AtomicUsize,
    idle: Notify,
}

/// Held by a connection task; its drop marks the connection closed.
pub struct ConnectionGuard(Arc<ConnectionTracker>);

impl ConnectionTracker {
    /// Registers a new connection.
    pub fn track(self: &Arc<Self>) -> ConnectionGuard {
        self.open.fetch_add(1, Ordering::AcqRel);
        ConnectionGuard(Arc::clone(self))
    }

    /// Waits until no connection is open.
    pub async fn wait_idle(&self) {
        loop {
            let notified = self.idle.notified();
            if self.open.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if self.0.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

/// Accepts connections until `shutdown` turns true, then stops accepting, lets requests in
/// flight finish for at most `drain`, and returns.
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let tracker = Arc::new(ConnectionTracker::default());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::vocab::shutdown::shutdown_requested(&mut shutdown) => break,
        };
        if !state.snapshot().config.clients.admits(peer.ip()) {
            // Closed before a byte is read: a client outside `clients.allow_from` learns
            // nothing, not even that an HTTP proxy listens here.
            state.metrics.refused_clients.inc();
            tracing::debug!(client = %peer.ip(), "connection refused: address not in clients.allow_from");
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let guard = tracker.track();
        let state = Arc::clone(&state);
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _guard = guard;
            let gauge = state.metrics.client_connections.clone();
            gauge.inc();
            let client_idle = state.snapshot().config.timeouts.client_idle;
            let service_state = Arc::clone(&state);
            // The request future is boxed: hyper keeps room for one in-flight future in
            // every connection, and an unboxed `handle` future (~3 KB) would cost that much
            // memory per idle keep-alive connection.
            let peer = peer.ip();
            let service = service_fn(move |req| {
                let state = Arc::clone(&service_state);
                let answer: Pin<Box<dyn Future<Output = _> + Send>> =
                    Box::pin(async move { Ok::<_, Infallible>(handle(state, peer, req).await) });
                answer
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(client_idle)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "client connection ended with an error");
                    }
                }
                _ = crate::vocab::shutdown::shutdown_requested(&mut shutdown) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            gauge.dec();
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, tracker.wait_idle())
        .await
        .is_err()
    {
        tracing::warn!(drain = ?drain, "requests still in flight after the drain timeout; closing");
    }
}
