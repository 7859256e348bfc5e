//! The proxy listener: accepts HTTP/1.1 connections, routes each request (forward or mount
//! form, CONNECT), forwards it with its credential, and logs one line per request.

pub mod activity;
pub mod connect;
pub mod dispatch;
pub mod forward;
pub mod gate;
pub mod headers;
pub mod intercepted;
pub mod limits;
pub mod location;
pub mod replay;
pub mod respond;
pub mod splice;
pub mod target;
pub mod upgrade;

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Method, Request, Response};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use self::activity::{ConnectionTracker, ShutdownSignal, TrackedStream};
use self::gate::Gated;
use self::respond::ProxyError;
use crate::access::Client;
use crate::state::State;
use crate::upstream::ProxyBody;

/// Answers one request received on the proxy listener from a client at `peer`. With
/// `clients.users` set, every request (forward, mount and CONNECT) must name its user in
/// `Proxy-Authorization`, unless its address is made to wait for failing too often.
pub async fn handle(
    state: Arc<State>,
    peer: IpAddr,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let snapshot = state.snapshot();
    let user = match state.auth_throttle.authenticate(
        &snapshot.config.clients,
        peer,
        request.headers(),
    ) {
        Ok(user) => user,
        Err(e) => {
            // At debug: a guessing client would write a line per guess; the throttle logs
            // once per burst.
            tracing::debug!(client = %peer, method = %request.method(), error = %e, "request refused by the proxy");
            return ProxyError::from(e).into_response(None);
        }
    };
    let client = Client { addr: peer, user };
    if request.method() == Method::CONNECT {
        // Boxed so that forward-proxy requests, the common case, do not carry its size.
        return Box::pin(connect::handle(state, client, request)).await;
    }
    let target = target::resolve(&snapshot, request.method(), request.uri());
    dispatch::dispatch(&state, &snapshot, &client, target, request).await
}

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

/// What ends a client connection from outside its own traffic.
enum Control {
    /// Closed to make room under `max_connections` (after its request, if one is in flight).
    Evict,
    /// Shutdown: requests in flight finish first.
    Stop,
    /// Nothing in flight for `client_idle`.
    Idle,
}

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
                        _ = crate::vocab::shutdown::shutdown_requested(&mut shutdown) => break,
                    }
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
            // No hyper header-read timer: hyper would allocate and arm one for every request
            // head. `client_idle` is enforced below instead, by one timer per connection that
            // is only re-armed when it fires.
            let conn = http1::Builder::new()
                .max_buf_size(crate::upstream::CONNECTION_BUFFER)
                .header_read_timeout(None)
                .keep_alive(true)
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            tokio::pin!(conn);
            // Eviction, shutdown and the idle limit, in one future that is polled only when
            // one of them fires, not on each of the connection's wake-ups.
            let control = Gated::new(async {
                let evict = activity.evict.notified();
                let stop = crate::vocab::shutdown::shutdown_requested(&mut shutdown);
                let idle = tokio::time::sleep(client_idle);
                tokio::pin!(evict, stop, idle);
                loop {
                    tokio::select! {
                        biased;
                        () = &mut evict => return Control::Evict,
                        () = &mut stop => return Control::Stop,
                        () = &mut idle => {
                            // No request in flight for `client_idle` (none sent, or only
                            // part of a head): closed, as a head-read timeout would.
                            let idle_for = activity.idle_for();
                            if idle_for >= client_idle {
                                return Control::Idle;
                            }
                            let deadline = tokio::time::Instant::now() + (client_idle - idle_for);
                            idle.as_mut().reset(deadline);
                        }
                    }
                }
            });
            tokio::select! {
                biased;
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(error = %e, "client connection ended with an error");
                    }
                }
                control = control => match control {
                    Control::Evict => {
                        if activity.busy() {
                            conn.as_mut().graceful_shutdown();
                            let _ = conn.await;
                        }
                    }
                    Control::Stop => {
                        conn.as_mut().graceful_shutdown();
                        let _ = conn.await;
                    }
                    Control::Idle => {
                        tracing::debug!(client = %peer, "closing an idle client connection");
                    }
                },
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
    // The access lines of the drained requests, written before the process goes on to exit.
    crate::access_log::flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Context;

    use self::activity::Activity;

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
