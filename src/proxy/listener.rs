//! The proxy listener: accepts client connections (refused unread outside
//! `clients.allow_from`; at `max_connections` the idlest connection makes room), serves
//! HTTP/1.1 and HTTP/2 with prior knowledge (h2c) on each, and hands every request to the
//! pipeline with its connection's context.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use super::activity::{ConnectionTracker, TrackedStream};
use super::context::Connection;
use super::gate::Gated;
use super::limits;
use crate::state::State;

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
    let tracker = Arc::new(ConnectionTracker::with_gauge(
        state.metrics.client_connections.clone(),
    ));
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
        let local_port = stream.local_addr().ok().map(|a| a.port());
        let (guard, activity) = tracker.track();
        let stream = TrackedStream {
            stream,
            _guard: guard,
        };
        let conn = Arc::new(Connection {
            state: Arc::clone(&state),
            peer: peer.ip(),
            activity,
            shutdown: shutdown.clone(),
            local_port,
            tunnel: None,
        });
        tokio::spawn(serve_connection(conn, stream));
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

/// Serves one client connection until it closes, is evicted, idles out or shutdown. After a
/// protocol switch or CONNECT the socket lives on in its tunnel, which keeps it counted.
async fn serve_connection(conn: Arc<Connection>, stream: TrackedStream) {
    let client_idle = conn.state.snapshot().config.timeouts.client_idle;
    let service_conn = Arc::clone(&conn);
    let service = service_fn(move |request: Request<Incoming>| {
        super::context::serve_counted(&service_conn, request, super::dispatch::handle)
    });
    let activity = &conn.activity;
    let mut shutdown = conn.shutdown.clone();
    // Eviction, shutdown and the idle limit, in one future that is polled only when one of
    // them fires, not on each of the connection's wake-ups.
    let control = Gated::new(async {
        let evict = activity.evicted();
        let stop = crate::vocab::shutdown::shutdown_requested(&mut shutdown);
        let idle = tokio::time::sleep(client_idle);
        tokio::pin!(evict, stop, idle);
        loop {
            tokio::select! {
                biased;
                () = &mut evict => return Control::Evict,
                () = &mut stop => return Control::Stop,
                () = &mut idle => {
                    // No request in flight for `client_idle` (none sent, or only part of a
                    // head): closed, as a head-read timeout would.
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
    tokio::pin!(control);
    let protocol = tokio::select! {
        biased;
        protocol = client_protocol(&stream.stream) => protocol,
        // Evicted, stopping or idle before its first bytes: nothing to finish.
        _ = control.as_mut() => return,
    };
    let io = TokioIo::new(stream);
    match protocol {
        Ok(Some(Protocol::Http1)) => {
            let connection = limits::http1()
                .serve_connection(io, service)
                .with_upgrades();
            // Outside tokio's cooperative budget: counting every socket and channel poll
            // against it was ~150 instructions a request, and this connection yields on its
            // own — hyper's dispatcher after 16 turns of its loop (a client pipelining a flood
            // of requests cannot hold the thread), the pooled upstream after 3 repolls
            // (`conn_waker.rs`). Tunnels and upgraded connections run in tasks of their own,
            // inside the budget; so does HTTP/2, whose frame loop has no such cap.
            let serving = drive(connection, |c| c.graceful_shutdown(), control, &conn);
            tokio::task::unconstrained(serving).await;
        }
        Ok(Some(Protocol::Http2)) => {
            // Boxed: an HTTP/2 connection's state is several KB, and unboxed every
            // connection's task would be that large (and touch that much memory).
            let connection = limits::http2().serve_connection(io, service);
            Box::pin(drive(connection, |c| c.graceful_shutdown(), control, &conn)).await;
        }
        Ok(None) => {}
        Err(e) => tracing::debug!(error = %e, "client connection failed before its first request"),
    }
}

/// What a client connection speaks, told from its first bytes.
enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge (h2c): the connection starts with the HTTP/2 preface.
    Http2,
}

/// The HTTP/2 connection preface (RFC 9113, section 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Tells the protocol from the client's first bytes without consuming them (`None`: closed
/// before sending any), so that each connection is served by hyper's own HTTP/1 or HTTP/2
/// connection. hyper-util's auto-detecting server reads the bytes and replays them through a
/// wrapper instead; measured with 10 000 idle keep-alive connections, that cost 219 MB of RSS
/// where this costs 83 MB.
async fn client_protocol(stream: &tokio::net::TcpStream) -> std::io::Result<Option<Protocol>> {
    let mut first = [0u8; H2_PREFACE.len()];
    let mut pause = PREFACE_PAUSE_FIRST;
    loop {
        let n = stream.peek(&mut first).await?;
        if n == 0 {
            return Ok(None);
        }
        if first[..n] != H2_PREFACE[..n] {
            return Ok(Some(Protocol::Http1));
        }
        if n == H2_PREFACE.len() {
            return Ok(Some(Protocol::Http2));
        }
        // Part of the preface: more is on its way. A peek does not consume, so the socket
        // stays readable; wait rather than spin, longer each time, so that a client that sends
        // a few bytes and stops costs a handful of wake-ups a second until the caller's idle
        // limit closes it.
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(PREFACE_PAUSE_MAX);
    }
}

/// The first wait for the rest of a preface that arrived in pieces, doubled after each look.
const PREFACE_PAUSE_FIRST: Duration = Duration::from_millis(1);
/// The longest wait between two looks at a partial preface.
const PREFACE_PAUSE_MAX: Duration = Duration::from_millis(200);

/// Runs `connection` until it ends, or until `control` fires: then a busy connection (or
/// every connection, at shutdown) finishes its requests first, after `graceful` asked it to.
async fn drive<C>(
    connection: C,
    graceful: impl Fn(Pin<&mut C>),
    control: Pin<&mut Gated<impl Future<Output = Control>>>,
    conn: &Connection,
) where
    C: Future<Output = Result<(), hyper::Error>>,
{
    tokio::pin!(connection);
    tokio::select! {
        biased;
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "client connection ended with an error");
            }
        }
        control = control => match control {
            Control::Evict => {
                if conn.activity.busy() {
                    graceful(connection.as_mut());
                    let _ = connection.await;
                }
            }
            Control::Stop => {
                graceful(connection.as_mut());
                let _ = connection.await;
            }
            Control::Idle => {
                tracing::debug!(client = %conn.peer, "closing an idle client connection");
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Context;

    use super::super::activity::Activity;

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
        old.idle_since
            .fetch_sub(5_000_000_000, std::sync::atomic::Ordering::AcqRel);
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
