//! The proxy listener: accepts HTTP/1.1 connections, routes each request (forward or mount
//! form, CONNECT), forwards it with its credential, and logs one line per request.

pub mod connect;
pub mod forward;
pub mod headers;
pub mod intercepted;
pub mod limits;
pub mod location;
pub mod replay;
pub mod respond;
pub mod target;
pub mod upgrade;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify};
use tracing::Instrument;

use self::respond::ProxyError;
use self::target::Target;
use crate::access::{Client, DestinationError, DestinationPolicy};
use crate::state::State;
use crate::upstream::idle::{IdleTimeout, Side};
use crate::upstream::{BoxError, ProxyBody};

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

/// Open client connections: counted so that shutdown can wait for them (upgraded ones,
/// CONNECT tunnels included, until their tunnel ends) and listed with their activity so that
/// an idle one can be closed to make room under `max_connections`.
#[derive(Default)]
pub struct ConnectionTracker {
    open: AtomicUsize,
    idle: Notify,
    next_id: AtomicU64,
    listed: Mutex<HashMap<u64, Arc<Activity>>>,
}

/// Held by a connection's socket (so also by the tunnel an upgrade hands it to); its drop
/// marks the connection closed.
pub struct ConnectionGuard {
    tracker: Arc<ConnectionTracker>,
    id: u64,
}

impl ConnectionTracker {
    /// Registers a new connection; its activity decides whether it may be closed for room.
    pub fn track(self: &Arc<Self>) -> (ConnectionGuard, Arc<Activity>) {
        self.open.fetch_add(1, Ordering::AcqRel);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let activity = Arc::new(Activity::new());
        self.lock().insert(id, Arc::clone(&activity));
        let guard = ConnectionGuard {
            tracker: Arc::clone(self),
            id,
        };
        (guard, activity)
    }

    /// Connections open now, tunnels included.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    /// Asks the connection idle the longest (no request in flight) to close; false when
    /// every connection is busy.
    pub fn evict_idle(&self) -> bool {
        let mut listed = self.lock();
        let oldest = listed
            .iter()
            .filter(|(_, a)| !a.busy())
            .max_by_key(|(_, a)| a.idle_for())
            .map(|(id, _)| *id);
        match oldest.and_then(|id| listed.remove(&id)) {
            Some(activity) => {
                activity.evict.notify_one();
                true
            }
            None => false,
        }
    }

    /// Takes a connection off the eviction list (its HTTP part ended: it closed, or it
    /// became a tunnel, which is never evicted).
    fn unlist(&self, id: u64) {
        self.lock().remove(&id);
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<u64, Arc<Activity>>> {
        self.listed.lock().unwrap_or_else(PoisonError::into_inner)
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
        self.tracker.unlist(self.id);
        if self.tracker.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.tracker.idle.notify_waiters();
        }
    }
}

/// Requests in flight on one connection (from the request head until its response body has
/// been sent or dropped), and since when there has been none.
pub struct Activity {
    in_flight: AtomicUsize,
    idle_since: Mutex<Instant>,
    evict: Notify,
}

impl Activity {
    /// A connection with nothing in flight yet.
    pub fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
            evict: Notify::new(),
        }
    }

    /// Marks a request in flight until the returned value is dropped.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    /// Whether a request is in flight.
    pub fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
    }

    /// How long the connection has had no request in flight (zero while one is).
    pub fn idle_for(&self) -> Duration {
        if self.busy() {
            return Duration::ZERO;
        }
        self.idle_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed()
    }
}

impl Default for Activity {
    fn default() -> Self {
        Self::new()
    }
}

/// One request in flight; dropping it ends the request.
pub struct InFlight(Arc<Activity>);

impl InFlight {
    /// The response, with its request counted as in flight until its body has been sent or
    /// dropped.
    pub fn until_sent(self, response: Response<ProxyBody>) -> Response<ProxyBody> {
        response.map(|body| {
            InFlightBody {
                body,
                _in_flight: self,
            }
            .boxed()
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut idle_since = self
            .0
            .idle_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            *idle_since = Instant::now();
        }
    }
}

/// A response body that keeps its request counted as in flight until it is done with.
struct InFlightBody {
    body: ProxyBody,
    _in_flight: InFlight,
}

impl Body for InFlightBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// A client socket that holds its connection's [`ConnectionGuard`]: the connection counts
/// as open until the socket is closed, also after an upgrade hands it to a tunnel.
struct TrackedStream {
    stream: TcpStream,
    _guard: ConnectionGuard,
}

impl AsyncRead for TrackedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for TrackedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

/// The shutdown signal, handed to a CONNECT request so that its tunnel can drain on
/// shutdown (an intercepted tunnel finishes its requests in flight, then closes).
#[derive(Clone)]
pub struct ShutdownSignal(pub watch::Receiver<bool>);

/// Allows one log line per second for a repeated event and counts the ones left out, so a
/// flood of accept errors cannot flood the log.
struct Throttle {
    last: Option<Instant>,
    suppressed: u64,
}

impl Throttle {
    fn new() -> Self {
        Self {
            last: None,
            suppressed: 0,
        }
    }

    /// `Some(events left out since the last line)` when a line may be logged now.
    fn ready(&mut self) -> Option<u64> {
        if self
            .last
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(Instant::now());
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// Most bytes hyper buffers per client connection (and so the longest request head: 431
/// beyond it). hyper's default, about 400 KiB, would let every streaming upload hold that
/// much; nginx allows 32 KiB of headers by default.
pub const CONNECTION_BUFFER: usize = 64 * 1024;

/// Longest pause after failed accepts (out of descriptors); doubles from 10 ms up to it.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts connections until `shutdown` turns true, then stops accepting, lets requests in
/// flight finish for at most `drain`, and returns. At `max_connections` open connections, a
/// new one replaces the connection idle the longest (or is closed when all are busy); failed
/// accepts back off and are logged at most once a second.
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
) {
    let tracker = Arc::new(ConnectionTracker::default());
    let max_connections = state
        .snapshot()
        .config
        .max_connections
        .unwrap_or_else(|| limits::default_max_connections(limits::fd_limit()));
    tracing::debug!(max_connections, "connection limit");
    let mut backoff = Duration::ZERO;
    let (mut accept_log, mut limit_log) = (Throttle::new(), Throttle::new());
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    backoff = (backoff * 2).clamp(Duration::from_millis(10), MAX_ACCEPT_BACKOFF);
                    let freed = rustix::io::Errno::from_io_error(&e)
                        .is_some_and(|n| n == rustix::io::Errno::MFILE || n == rustix::io::Errno::NFILE)
                        && tracker.evict_idle();
                    if let Some(suppressed) = accept_log.ready() {
                        tracing::warn!(error = %e, suppressed, closed_an_idle_connection = freed, backoff = ?backoff, "accept failed; backing off");
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => continue,
                        _ = crate::shutdown_requested(&mut shutdown) => break,
                    }
                }
            },
            _ = crate::shutdown_requested(&mut shutdown) => break,
        };
        if !state.snapshot().config.clients.admits(peer.ip()) {
            // Closed before a byte is read: a client outside `clients.allow_from` learns
            // nothing, not even that an HTTP proxy listens here.
            state.metrics.refused_clients.inc();
            tracing::debug!(client = %peer.ip(), "connection refused: address not in clients.allow_from");
            drop(stream);
            continue;
        }
        backoff = Duration::ZERO;
        if tracker.open() >= max_connections {
            let evicted = tracker.evict_idle();
            if let Some(suppressed) = limit_log.ready() {
                tracing::warn!(
                    max_connections,
                    suppressed,
                    "connection limit reached: {}",
                    if evicted {
                        "closing the connection idle the longest"
                    } else {
                        "every connection is busy; refusing the new one"
                    }
                );
            }
            if !evicted {
                continue;
            }
        }
        let _ = stream.set_nodelay(true);
        let (guard, activity) = tracker.track();
        let id = guard.id;
        let stream = TrackedStream {
            stream,
            _guard: guard,
        };
        let state = Arc::clone(&state);
        let tracker = Arc::clone(&tracker);
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let gauge = state.metrics.client_connections.clone();
            gauge.inc();
            let client_idle = state.snapshot().config.timeouts.client_idle;
            let service_state = Arc::clone(&state);
            let service_activity = Arc::clone(&activity);
            let service_shutdown = shutdown.clone();
            // The request future is boxed: hyper keeps room for one in-flight future in
            // every connection, and an unboxed `handle` future (~3 KB) would cost that much
            // memory per idle keep-alive connection.
            let peer = peer.ip();
            let service = service_fn(move |mut req: Request<Incoming>| {
                let state = Arc::clone(&service_state);
                let in_flight = service_activity.begin();
                if req.method() == Method::CONNECT {
                    req.extensions_mut()
                        .insert(ShutdownSignal(service_shutdown.clone()));
                }
                let answer: Pin<Box<dyn Future<Output = _> + Send>> = Box::pin(async move {
                    let response = handle(state, peer, req).await;
                    Ok::<_, Infallible>(in_flight.until_sent(response))
                });
                answer
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .max_buf_size(CONNECTION_BUFFER)
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
                _ = activity.evict.notified() => {
                    if activity.busy() {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                }
                _ = crate::shutdown_requested(&mut shutdown) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
            tracker.unlist(id);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_repeated_event_is_logged_once_a_second_with_the_count_left_out() {
        let mut throttle = Throttle::new();
        assert_eq!(throttle.ready(), Some(0));
        assert_eq!(throttle.ready(), None);
        assert_eq!(throttle.ready(), None);
        throttle.last = Instant::now().checked_sub(Duration::from_secs(2));
        assert_eq!(throttle.ready(), Some(2));
        assert_eq!(throttle.ready(), None);
    }

    #[test]
    fn the_connection_idle_the_longest_is_evicted_never_a_busy_one() {
        let tracker = Arc::new(ConnectionTracker::default());
        let (_busy_guard, busy) = tracker.track();
        let _request = busy.begin();
        assert!(
            !tracker.evict_idle(),
            "a connection with a request in flight stays"
        );
        let (_old_guard, old) = tracker.track();
        *old.idle_since.lock().unwrap() -= Duration::from_secs(5);
        let (_new_guard, new) = tracker.track();
        assert_eq!(tracker.open(), 3);
        assert!(tracker.evict_idle());
        let evicted = |a: &Activity| {
            let mut notified = std::pin::pin!(a.evict.notified());
            std::future::Future::poll(
                notified.as_mut(),
                &mut Context::from_waker(std::task::Waker::noop()),
            )
            .is_ready()
        };
        assert!(evicted(&old), "the one idle the longest");
        assert!(!evicted(&new));
        assert!(tracker.evict_idle(), "then the next idle one");
        assert!(evicted(&new));
        assert!(!tracker.evict_idle());
    }
}
