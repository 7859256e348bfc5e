//! What the listener knows about its connections: how many are open (for shutdown,
//! `max_connections` and `authrelay_client_connections`), which requests are in flight on
//! each and when bytes last moved (so the idlest one can be closed to make room). A
//! connection stays one connection after a protocol switch or CONNECT: its tunnel keeps it
//! open, counted and evictable, until the socket closes.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::upstream::{BoxError, ProxyBody};

/// Open client connections: counted so that shutdown can wait for them (upgraded ones,
/// CONNECT tunnels included, until their tunnel ends) and listed with their activity so that
/// an idle one — a keep-alive connection, a quiet WebSocket or tunnel — can be closed to make
/// room under `max_connections`.
#[derive(Default)]
pub struct ConnectionTracker {
    open: AtomicUsize,
    idle: Notify,
    next_id: AtomicU64,
    listed: Mutex<HashMap<u64, Arc<Activity>>>,
    /// `authrelay_client_connections`: moves with `open`, so it counts tunnels too.
    gauge: Gauge,
}

/// Held by a connection's socket (so also by the tunnel an upgrade hands it to); its drop
/// marks the connection closed.
pub struct ConnectionGuard {
    tracker: Arc<ConnectionTracker>,
    pub(super) id: u64,
}

impl ConnectionTracker {
    /// A tracker that keeps `gauge` equal to the connections open.
    pub fn with_gauge(gauge: Gauge) -> Self {
        Self {
            gauge,
            ..Self::default()
        }
    }

    /// Registers a new connection; its activity decides whether it may be closed for room.
    pub fn track(self: &Arc<Self>) -> (ConnectionGuard, Arc<Activity>) {
        self.open.fetch_add(1, Ordering::AcqRel);
        self.gauge.inc();
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
        self.tracker.lock().remove(&self.id);
        self.tracker.gauge.dec();
        if self.tracker.open.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.tracker.idle.notify_waiters();
        }
    }
}

/// Requests in flight on one connection (from the request head until its response body has
/// been sent or dropped), and since when there has been none.
pub struct Activity {
    in_flight: AtomicUsize,
    /// When the last request ended or tunnel bytes last moved, in nanoseconds after
    /// `created`. An atomic, not a lock: it is written at the end of every request. Signed,
    /// so that a test can move it before `created`.
    pub(super) idle_since: AtomicI64,
    created: Instant,
    pub(super) evict: Notify,
}

impl Activity {
    /// A connection with nothing in flight yet.
    pub fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicI64::new(0),
            created: Instant::now(),
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

    /// Bytes moved on a tunnel or upgraded connection: it is not idle now.
    pub fn touch(&self) {
        self.idle_since.store(self.now(), Ordering::Release);
    }

    /// Resolves when the listener picks this connection to make room (it was the idlest).
    pub async fn evicted(&self) {
        self.evict.notified().await;
    }

    /// How long the connection has had no request in flight and moved no tunnel bytes (zero
    /// while a request is in flight).
    pub fn idle_for(&self) -> Duration {
        if self.busy() {
            return Duration::ZERO;
        }
        let idle = self
            .now()
            .saturating_sub(self.idle_since.load(Ordering::Acquire));
        Duration::from_nanos(u64::try_from(idle).unwrap_or(0))
    }

    /// Nanoseconds since `created`.
    fn now(&self) -> i64 {
        i64::try_from(self.created.elapsed().as_nanos()).unwrap_or(i64::MAX)
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
    /// dropped. Not boxed again: hyper takes the wrapper's own type (a box per response
    /// less).
    pub fn until_sent(self, response: Response<ProxyBody>) -> Response<InFlightBody> {
        response.map(|body| InFlightBody {
            body,
            _in_flight: self,
        })
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        // Written before the count drops: whoever sees no request in flight sees this time.
        // Written at the end of each request, also while others are in flight (HTTP/2):
        // `idle_for` reads it only when none is.
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A response body that keeps its request counted as in flight until it is done with.
pub struct InFlightBody {
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
pub(super) struct TrackedStream {
    pub(super) stream: TcpStream,
    pub(super) _guard: ConnectionGuard,
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

/// Holds a gauge one higher for as long as it lives, however its task ends.
pub(crate) struct CountedWhileAlive(Gauge);

impl CountedWhileAlive {
    pub(crate) fn new(gauge: Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for CountedWhileAlive {
    fn drop(&mut self) {
        self.0.dec();
    }
}
