//! The keep-alive pool of upstream HTTP/1.1 connections that are driven by the request using
//! them, inside the client connection's own task: one pool code for connections over TCP
//! (`plain.rs`) and over TLS (`tls.rs`), each a [`Transport`].
//!
//! hyper-util's pooled client (kept for https upstreams that choose HTTP/2) runs each upstream
//! connection as a task of its own and hands every request and response across channels,
//! so each proxied request costs extra task switches and a pool keyed by a hashed
//! scheme + authority. Here the request's future polls the upstream connection itself and
//! the response body keeps polling it while the client reads, so a proxied request stays in
//! one task from the client's bytes to the upstream's and back. A connection goes back to
//! the pool only once its response has been read to the end and it is ready for another
//! request; one that closed while idle is noticed (and dropped) when it is next taken out.
//! The request polls the connection with a waker of the connection's own (`conn_waker.rs`),
//! so that what the request's own steps wake inside hyper does not schedule its task again.
//! When the client goes away mid-exchange, a TLS connection is kept if the rest of the
//! answer comes soon and is small (it is read by a task of its own; a new connection would
//! cost a handshake); a plain one is closed.
//!
//! A pool holds connections of one transport only, so one scheme only (an `http` and an
//! `https` connection to the same authority live in different pools and cannot mix), and
//! the TLS pools are one per client certificate (`identity.rs`): within a pool, the
//! authority alone is the key.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use foldhash::fast::RandomState;
use http::uri::{Authority, PathAndQuery, Scheme, Uri};
use http::{header, HeaderValue, Method, Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::{http1, TrySendError};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Sleep;

use super::body::{BoxError, ProxyBody};
use super::conn_waker::ConnWaker;
use super::deadline::Deadline;
use super::error::{describe, UpstreamError};
use super::pinned::PinnedAddrs;

/// Idle connections kept per upstream host and port; more are closed when they come back.
const MAX_IDLE_PER_ORIGIN: usize = 1024;
/// Origins with idle connections kept at once: clients name any origin they like through an
/// `unmatched: pass` proxy, so the pool must not grow with every one of them. A connection to
/// one more origin is closed instead of kept.
pub(crate) const MAX_IDLE_ORIGINS: usize = 1024;
/// A pooled connection idle at least this long may be closed by the upstream (its keep-alive
/// timeout: 5 s in Node.js, 75 s in nginx) just as a request goes out on it. A request sent on
/// one keeps a copy, when it can be sent again safely, for one retry on a new connection;
/// under load connections idle for far less, so the hot path copies nothing.
const STALE_RISK_AFTER: Duration = Duration::from_secs(1);
/// A pooled connection idle at least this long is polled for a close before it is reused.
const RECHECK_AFTER: Duration = Duration::from_millis(100);
/// An abandoned exchange is finished in the background (see [`Transport::FINISH_ABANDONED`])
/// only while the rest of its answer comes within this time and within this many body
/// bytes; otherwise the connection is closed, as it always is for plain TCP. Bounded so that
/// clients walking away from large or slow answers cannot keep the proxy reading for them.
const FINISH_ABANDONED_WITHIN: Duration = Duration::from_secs(2);
const FINISH_ABANDONED_MAX_BYTES: usize = 64 * 1024;

/// The byte stream a pooled connection runs on.
pub(crate) trait ByteStream: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send + Sync + 'static> ByteStream for S {}

/// How a pool opens connections: TCP, or TLS over TCP.
pub(crate) trait Transport: Send + Sync + 'static {
    /// The byte stream a connection runs on.
    type Stream: ByteStream;
    /// The scheme of every connection this transport opens.
    const SCHEME: Scheme;
    /// The port of an authority that names none.
    const DEFAULT_PORT: u16;
    /// Whether an exchange its requester gave up on (the client went away) is finished in
    /// the background so that the connection can be kept: worth it where a new connection
    /// costs a handshake (TLS), not for plain TCP.
    const FINISH_ABANDONED: bool;

    /// A new connection to `origin` (`host[:port]`), or to the addresses its host was checked
    /// at; [`Connected::Http2`] when the server speaks HTTP/2, which this pool does not.
    fn connect(
        &self,
        origin: &Authority,
        pinned: Option<&PinnedAddrs>,
    ) -> impl Future<Output = Result<Connected<Self::Stream>, UpstreamError>> + Send;
}

/// What a [`Transport`] opened.
pub(crate) enum Connected<S> {
    /// A connection for HTTP/1.1.
    Http1(S),
    /// The server chose HTTP/2 (ALPN `h2`) on this new connection, or did so before (`None`:
    /// nothing was opened). Its requests go to a client that multiplexes. Boxed: a TLS
    /// stream is a kilobyte, and this type is part of every request's future.
    Http2(Option<Box<S>>),
}

/// What [`Pool::send`] did with a request.
pub(crate) enum Outcome<S> {
    /// Sent; the response head is in.
    Answered(Response<ProxyBody>),
    /// Not sent: the origin speaks HTTP/2. The request is back in absolute form, with the new
    /// connection that told so, if one was opened.
    SpeaksHttp2(Request<ProxyBody>, Option<Box<S>>),
}

type Driver<S> = Pin<Box<http1::Connection<TokioIo<S>, ProxyBody>>>;

/// One upstream connection: the handle requests are sent on, the future doing its I/O, and
/// the clock of the exchange in progress.
struct Conn<S: ByteStream> {
    sender: http1::SendRequest<ProxyBody>,
    /// `None` once the connection has ended.
    driver: Option<Driver<S>>,
    /// The connection's one timer entry, for its life (a timer per request was a locked
    /// insertion into the timer wheel and a removal, ~500 instructions a request): for the
    /// answer's head of the exchange in progress, then for pauses in its body. See
    /// [`poll_timer`].
    deadline: Pin<Box<Sleep>>,
    /// The `Host` every request on it is sent with: a connection goes to one origin, so it
    /// is made once, not per request.
    host: HeaderValue,
    /// What the request using it polls it with (`conn_waker.rs`).
    waker: ConnWaker,
}

impl<S: ByteStream> Conn<S> {
    /// Moves the connection's I/O forward; false once it has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        drive(&mut self.driver, cx)
    }

    /// Whether it can take another request now. Polls the I/O once, so that a close by the
    /// upstream that has already arrived is seen here rather than by the next request.
    fn reusable(&mut self) -> bool {
        self.drive(&mut Context::from_waker(Waker::noop())) && self.sender.is_ready()
    }

    /// [`Conn::reusable`] for a connection whose answer was just read to the end: the poll
    /// that read the end left it wanting the next request, so it is taken at its word
    /// without another poll (~760 instructions a request, to look for a close that came in
    /// the microseconds since; a close found later hands the next request back unsent, and
    /// [`Pool::send`] sends it on another connection).
    fn ready_after_answer(&mut self) -> bool {
        (self.driver.is_some() && self.sender.is_ready()) || self.reusable()
    }

    /// Hands `request` to the connection; the returned future is polled with
    /// [`Conn::poll_exchange`], which keeps the answer's deadline.
    fn start(
        &mut self,
        mut request: Request<ProxyBody>,
    ) -> impl Future<Output = Sent> + Send + 'static {
        request
            .headers_mut()
            .insert(header::HOST, self.host.clone());
        self.sender.try_send_request(request)
    }

    /// Polls an exchange begun with [`Conn::start`]: drives the connection, then the
    /// response future, then the deadline, all with the connection's own waker (a wake the
    /// poll causes itself is answered in it, not by polling the task again).
    fn poll_exchange(
        &mut self,
        mut response: Pin<&mut (impl Future<Output = Sent> + ?Sized)>,
        deadline: Deadline,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Sent, UpstreamError>> {
        let Self {
            driver,
            deadline: timer,
            waker,
            ..
        } = self;
        waker.poll(cx, |own| {
            drive(driver, own);
            if let Poll::Ready(sent) = response.as_mut().poll(own) {
                return Poll::Ready(Ok(sent));
            }
            poll_timer(timer, deadline.at, own).map(|()| Err(deadline.passed()))
        })
    }
}

/// Moves a connection's I/O forward; false once it has ended (`driver` is then `None`).
fn drive<S: ByteStream>(driver: &mut Option<Driver<S>>, cx: &mut Context<'_>) -> bool {
    if let Some(running) = driver {
        if running.as_mut().poll(cx).is_ready() {
            *driver = None;
        }
    }
    driver.is_some()
}

/// Ready once `due` has passed. The timer is moved only when it would fire after `due`
/// (pulled in: a reload shortened a limit) or fires before it (moved on: it was set for
/// an earlier exchange or body): deadlines in a row are ever later, and each move costs
/// ~120 instructions, so most exchanges move it not at all.
fn poll_timer(
    timer: &mut Pin<Box<Sleep>>,
    due: tokio::time::Instant,
    cx: &mut Context<'_>,
) -> Poll<()> {
    if timer.deadline() > due {
        timer.as_mut().reset(due);
    }
    loop {
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) if tokio::time::Instant::now() >= due => return Poll::Ready(()),
            Poll::Ready(()) => timer.as_mut().reset(due),
            Poll::Pending => return Poll::Pending,
        }
    }
}

/// What hyper made of a request sent on a connection: the response head, or the failure
/// (with the request, when it was not sent at all).
type Sent = Result<Response<Incoming>, TrySendError<Request<ProxyBody>>>;

struct IdleConn<S: ByteStream> {
    conn: Conn<S>,
    since: Instant,
}

/// Idle connections by authority (randomly seeded: clients may choose the keys).
type IdleMap<S> = HashMap<Box<str>, Vec<IdleConn<S>>, RandomState>;

struct PoolInner<T: Transport> {
    idle: Mutex<IdleMap<T::Stream>>,
    transport: T,
    idle_timeout: Duration,
    max_origins: usize,
    sweeper_started: AtomicBool,
}

/// A pool of upstream HTTP/1.1 connections opened by `T`. Cheap to clone.
pub(crate) struct Pool<T: Transport> {
    inner: Arc<PoolInner<T>>,
}

impl<T: Transport> Clone for Pool<T> {
    fn clone(&self) -> Self {
        Self {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<T: Transport> Pool<T> {
    /// A pool opening connections with `transport` and closing those idle longer than
    /// `idle_timeout`.
    pub(crate) fn new(transport: T, idle_timeout: Duration) -> Self {
        Self::with_max_origins(transport, idle_timeout, MAX_IDLE_ORIGINS)
    }

    fn with_max_origins(transport: T, idle_timeout: Duration, max: usize) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                idle: Mutex::new(HashMap::default()),
                transport,
                idle_timeout,
                max_origins: max,
                sweeper_started: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `request` (absolute URI of `T`'s scheme) and returns the response once its head
    /// has arrived; its body keeps the connection going and hands it back to the pool at its
    /// end. A new connection on which the server chose HTTP/2 gives the request back.
    ///
    /// A request that a pooled connection could not even start sending (the upstream had
    /// closed it) is sent again on another connection. One that went out on a connection
    /// idle for [`STALE_RISK_AFTER`] and met a close before any answer is sent once more on a
    /// new connection if it is idempotent and has no body (as nginx's `proxy_next_upstream
    /// error`); any other request that may have reached the upstream is not.
    ///
    /// Connecting and the answer's head, retries included, are due by `deadline`.
    ///
    /// Not an `async fn`, and the request is rewritten in place: its future would otherwise
    /// keep the request twice.
    #[allow(clippy::manual_async_fn)] // see above: not an `async fn` on purpose
    pub(crate) fn send<'a>(
        &'a self,
        mut request: Request<ProxyBody>,
        pinned: Option<&'a PinnedAddrs>,
        deadline: Deadline,
    ) -> impl Future<Output = Result<Outcome<T::Stream>, UpstreamError>> + Send + 'a {
        async move {
            let origin = origin_form(&mut request)?;
            let mut pooled_ok = true;
            // The first checkout measures idle time from when the exchange set out (read
            // microseconds ago); a retry reads the clock.
            let mut set_out = Some(deadline.start);
            loop {
                // A temporary, not a local: a local would be kept in every later state of this
                // future (120 bytes moved with each request's) after its connection moved out.
                let (mut conn, idle) = match if pooled_ok {
                    let now = set_out.take().unwrap_or_else(Instant::now);
                    self.inner.checkout(origin.as_str(), now)
                } else {
                    None
                } {
                    Some((conn, idle)) => (conn, Some(idle)),
                    // Boxed: a new connection is the exception under load, and its future would
                    // otherwise be part of (and moved with) every request's.
                    None => match Box::pin(
                        deadline.bound(self.inner.connect(&origin, pinned, deadline)),
                    )
                    .await?
                    {
                        Ok(conn) => (conn, None),
                        Err(http2) => {
                            let request = absolute_form(request, T::SCHEME, origin)?;
                            return Ok(Outcome::SpeaksHttp2(request, http2));
                        }
                    },
                };
                let copy = idle
                    .filter(|idle| *idle >= STALE_RISK_AFTER)
                    .and_then(|_| replayable_copy(&request));
                // Started here, not inside the futures below: they would keep the request
                // too, beside the hyper future that holds it.
                let sent = if T::FINISH_ABANDONED {
                    let response = Box::pin(conn.start(request));
                    let (back, sent) =
                        exchange_or_finish(conn, response, deadline, &origin, &self.inner).await?;
                    conn = back;
                    sent
                } else {
                    let mut response = pin!(conn.start(request));
                    poll_fn(|cx| conn.poll_exchange(response.as_mut(), deadline, cx)).await?
                };
                match sent {
                    Ok(response) => {
                        let pool = Arc::downgrade(&self.inner);
                        return Ok(Outcome::Answered(response.map(|body| {
                            PooledBody {
                                body: Some(body),
                                finished: false,
                                stalls_at: None,
                                idle: deadline.body_idle,
                                conn: Some(conn),
                                origin,
                                pool,
                            }
                            .boxed()
                        })));
                    }
                    Err(mut failed) => match (failed.take_message(), copy) {
                        (Some(unsent), _) if idle.is_some() => request = unsent,
                        (_, Some(copy)) if closed_before_answer(failed.error()) => {
                            tracing::debug!(
                                "the upstream closed an idle connection as the request went out; sending it on a new one"
                            );
                            request = *copy;
                            pooled_ok = false;
                        }
                        _ => return Err(super::idle::exchange_error(&failed.into_error())),
                    },
                }
            }
        }
    }

    /// Idle connections held now, for tests and diagnostics.
    pub(crate) fn idle_connections(&self) -> usize {
        self.inner.lock().values().map(Vec::len).sum()
    }

    /// Origins with an entry in the idle map, for tests.
    #[cfg(test)]
    fn idle_origins(&self) -> usize {
        self.inner.lock().len()
    }
}

impl<T: Transport> PoolInner<T> {
    fn lock(&self) -> MutexGuard<'_, IdleMap<T::Stream>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used idle connection to `origin` that is still open and fresh, and
    /// how long it was idle at `now`.
    fn checkout(&self, origin: &str, now: Instant) -> Option<(Conn<T::Stream>, Duration)> {
        loop {
            let mut entry = {
                // An emptied list stays (the sweeper removes it): a request at a time to one
                // origin would otherwise free and allocate its entry on every request.
                self.lock().get_mut(origin)?.pop()?
            };
            let idle = now.saturating_duration_since(entry.since);
            // Checked for a close only after a pause: it was checked when it came back, and a
            // close that arrived since makes hyper hand the request back unsent, which `send`
            // then sends on another connection. Under load, connections idle for microseconds
            // and the check (a poll of the connection) was a fifth of the pool's cost.
            if idle < self.idle_timeout && (idle < RECHECK_AFTER || entry.conn.reusable()) {
                return Some((entry.conn, idle));
            }
        }
    }

    fn checkin(self: &Arc<Self>, origin: &Authority, conn: Conn<T::Stream>) {
        conn.waker.forget_task();
        let mut idle = self.lock();
        let entry = IdleConn {
            conn,
            since: Instant::now(),
        };
        if idle.len() >= self.max_origins && !idle.contains_key(origin.as_str()) {
            // Lists emptied by checkouts count until dropped here (or by the sweeper).
            idle.retain(|_, list| !list.is_empty());
        }
        let full = idle.len() >= self.max_origins;
        match idle.get_mut(origin.as_str()) {
            Some(list) if list.len() >= MAX_IDLE_PER_ORIGIN => return,
            Some(list) => list.push(entry),
            None if full => return,
            None => {
                idle.insert(origin.as_str().into(), vec![entry]);
            }
        }
        drop(idle);
        self.start_sweeper();
    }

    /// Starts (once) the task that closes connections idle longer than the idle timeout, so
    /// that sockets do not linger after traffic stops. It ends when the pool is dropped.
    fn start_sweeper(self: &Arc<Self>) {
        // Every checkin asks; a load answers it without the locked exchange a swap costs.
        if self.sweeper_started.load(Ordering::Acquire)
            || self.sweeper_started.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.sweeper_started.store(false, Ordering::Release);
            return;
        };
        let pool = Arc::downgrade(self);
        let period = (self.idle_timeout / 2).max(Duration::from_millis(50));
        runtime.spawn(sweep_every(pool, period));
    }

    fn sweep(&self) {
        let mut idle = self.lock();
        for list in idle.values_mut() {
            list.retain_mut(|e| e.since.elapsed() < self.idle_timeout && e.conn.reusable());
        }
        idle.retain(|_, list| !list.is_empty());
    }

    /// A new HTTP/1.1 connection to `origin`, or to the addresses its host was checked at;
    /// `Err` when the server speaks HTTP/2 (with the new connection that told so, if any).
    async fn connect(
        &self,
        origin: &Authority,
        pinned: Option<&PinnedAddrs>,
        deadline: Deadline,
    ) -> Result<Result<Conn<T::Stream>, Option<Box<T::Stream>>>, UpstreamError> {
        let host = host_header(origin, T::DEFAULT_PORT)?;
        let stream = match self.transport.connect(origin, pinned).await? {
            Connected::Http1(stream) => stream,
            Connected::Http2(stream) => return Ok(Err(stream)),
        };
        let (sender, driver) = http1::Builder::new()
            .max_buf_size(super::budget::CONNECTION_BUFFER)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::Failed(describe(&e)))?;
        Ok(Ok(Conn {
            sender,
            driver: Some(Box::pin(driver)),
            deadline: Box::pin(tokio::time::sleep_until(deadline.at)),
            host,
            waker: ConnWaker::new(),
        }))
    }
}

async fn sweep_every<T: Transport>(pool: Weak<PoolInner<T>>, period: Duration) {
    loop {
        tokio::time::sleep(period).await;
        match pool.upgrade() {
            Some(pool) => pool.sweep(),
            None => return,
        }
    }
}

/// Rewrites an absolute-form request for an origin server: origin-form request target,
/// HTTP/1.1. Returns the origin it goes to; `Host` is the connection's to set
/// ([`host_header`]).
pub(crate) fn origin_form(request: &mut Request<ProxyBody>) -> Result<Authority, UpstreamError> {
    let parts = std::mem::take(request.uri_mut()).into_parts();
    let origin = parts
        .authority
        .ok_or_else(|| UpstreamError::Failed("the upstream URI names no host".into()))?;
    let target = parts
        .path_and_query
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *request.uri_mut() = Uri::from(target);
    *request.version_mut() = Version::HTTP_11;
    Ok(origin)
}

/// The `Host` an origin server is sent: `origin` without the scheme's `default_port`.
pub(crate) fn host_header(
    origin: &Authority,
    default_port: u16,
) -> Result<HeaderValue, UpstreamError> {
    // No user info to strip: admission refuses it in requests, the config in upstream URLs.
    let host = super::authority::without_default_port(origin.as_str(), default_port);
    HeaderValue::from_str(host)
        .map_err(|_| UpstreamError::Failed("the upstream host is not a valid header".into()))
}

/// Undoes [`origin_form`] for a client that wants absolute form: the URI names `scheme` and
/// `origin` again and `Host` goes (HTTP/2 names the host in `:authority`).
fn absolute_form(
    mut request: Request<ProxyBody>,
    scheme: Scheme,
    origin: Authority,
) -> Result<Request<ProxyBody>, UpstreamError> {
    request.headers_mut().remove(header::HOST);
    let mut parts = std::mem::take(request.uri_mut()).into_parts();
    parts.scheme = Some(scheme);
    parts.authority = Some(origin);
    *request.uri_mut() = Uri::from_parts(parts)
        .map_err(|_| UpstreamError::Failed("the upstream URI cannot be rebuilt".into()))?;
    Ok(request)
}

/// A copy of `request` to send again, if that is safe: an idempotent method (RFC 9110
/// §9.2.2) and no body.
/// Boxed: made only for a connection idle long enough to risk a close (rare under load),
/// and every request's future would otherwise keep room for a whole request.
fn replayable_copy(request: &Request<ProxyBody>) -> Option<Box<Request<ProxyBody>>> {
    let idempotent = matches!(
        *request.method(),
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    );
    if !idempotent || !request.body().is_end_stream() {
        return None;
    }
    let mut copy = Request::new(Empty::new().map_err(|never| match never {}).boxed());
    *copy.method_mut() = request.method().clone();
    *copy.uri_mut() = request.uri().clone();
    *copy.version_mut() = request.version();
    *copy.headers_mut() = request.headers().clone();
    Some(Box::new(copy))
}

/// Whether the connection ended before any of the response arrived: closed (with or without
/// TLS's close_notify), or reset.
fn closed_before_answer(error: &hyper::Error) -> bool {
    if error.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(error);
    while let Some(e) = source {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    // TLS: the peer closed the TCP connection without a close_notify.
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = e.source();
    }
    false
}

/// A response body from a pooled connection: reading it drives the connection, and the
/// connection returns to the pool when the body was read to the end. It fails with
/// [`super::idle::Stalled`] when the upstream sends nothing for `idle` while it is waited
/// for, timed by the connection's own timer (free once the head is in): no wrapper, box or
/// timer entry per response.
struct PooledBody<T: Transport> {
    /// `None` once dropped (handed to the task that finishes it) or stalled.
    body: Option<Incoming>,
    finished: bool,
    /// While the body is being waited for: when the wait fails.
    stalls_at: Option<tokio::time::Instant>,
    /// `timeouts.upstream_body_idle`.
    idle: Duration,
    /// `None` once dropped or stalled (then closed).
    conn: Option<Conn<T::Stream>>,
    origin: Authority,
    pool: Weak<PoolInner<T>>,
}

impl<T: Transport> Body for PooledBody<T> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        let (Some(conn), Some(body)) = (&mut this.conn, &mut this.body) else {
            return Poll::Ready(None);
        };
        let Conn {
            driver,
            deadline: timer,
            waker,
            ..
        } = conn;
        let (stalls_at, idle) = (&mut this.stalls_at, this.idle);
        let polled = waker.poll(cx, |own| {
            // A frame an earlier poll of the connection read is taken without polling it
            // again: it stops reading while the body holds a frame, so that poll would find
            // nothing to do. One fewer poll of the connection a response.
            if let Poll::Ready(frame) = Pin::new(&mut *body).poll_frame(own) {
                return Poll::Ready(Some(frame));
            }
            drive(driver, own);
            match Pin::new(&mut *body).poll_frame(own) {
                Poll::Ready(frame) => Poll::Ready(Some(frame)),
                // Pending while the upstream may still send; past `idle` without a byte, the
                // connection is closed (the rest of its answer may still come).
                Poll::Pending => {
                    let due = *stalls_at.get_or_insert_with(|| {
                        super::deadline::instant_after(tokio::time::Instant::now(), idle)
                    });
                    poll_timer(timer, due, own).map(|()| None)
                }
            }
        });
        match polled {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(frame)) => {
                this.stalls_at = None;
                if frame.is_none() {
                    this.finished = true;
                }
                Poll::Ready(frame.map(|frame| frame.map_err(BoxError::from)))
            }
            Poll::Ready(None) => {
                this.body = None;
                this.conn = None;
                Poll::Ready(Some(Err(super::idle::upstream_stalled(this.idle))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished || self.body.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.body
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

impl<T: Transport> Drop for PooledBody<T> {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if !self.is_end_stream() {
            // The client stopped reading before the end.
            if let (true, Some(body)) = (T::FINISH_ABANDONED, self.body.take()) {
                let abandoned = Abandoned::Body(body);
                finish_in_background(conn, abandoned, self.origin.clone(), self.pool.clone());
            }
            return;
        }
        if !conn.ready_after_answer() {
            return;
        }
        if let Some(pool) = self.pool.upgrade() {
            pool.checkin(&self.origin, conn);
        }
    }
}

/// The response future of an exchange, boxed so that it can outlive its requester.
type ResponseFuture = Pin<Box<dyn Future<Output = Sent> + Send>>;

/// What is left of an exchange its requester gave up on.
enum Abandoned {
    /// The answer's head has not arrived.
    Head(ResponseFuture),
    /// The head arrived; the body was not read to the end.
    Body(Incoming),
}

/// An exchange in flight on a connection of a transport that finishes abandoned exchanges:
/// dropped before the answer's head arrived (the requester went away), it hands the
/// connection and the exchange to [`finish_in_background`]. It borrows the origin and the
/// pool, and copies them only then: an exchange that ends normally (nearly all) pays no
/// reference count for them.
struct PendingExchange<'a, T: Transport> {
    /// `None` once the exchange has ended (or was given up).
    in_flight: Option<(Conn<T::Stream>, ResponseFuture)>,
    origin: &'a Authority,
    pool: &'a Arc<PoolInner<T>>,
}

impl<T: Transport> Drop for PendingExchange<'_, T> {
    fn drop(&mut self) {
        if let Some((conn, response)) = self.in_flight.take() {
            let abandoned = Abandoned::Head(response);
            finish_in_background(
                conn,
                abandoned,
                self.origin.clone(),
                Arc::downgrade(self.pool),
            );
        }
    }
}

/// Drives the exchange `conn` started (`response`) until its answer's head is in, for
/// transports that finish abandoned exchanges: the connection is handed back with the
/// outcome, or, if this future is dropped first, finished in the background. Past
/// `deadline` the connection is closed: the upstream is too slow to wait for.
async fn exchange_or_finish<T: Transport>(
    conn: Conn<T::Stream>,
    response: ResponseFuture,
    deadline: Deadline,
    origin: &Authority,
    pool: &Arc<PoolInner<T>>,
) -> Result<(Conn<T::Stream>, Sent), UpstreamError> {
    let mut pending = PendingExchange {
        in_flight: Some((conn, response)),
        origin,
        pool,
    };
    let sent = poll_fn(|cx| match &mut pending.in_flight {
        Some((conn, response)) => conn.poll_exchange(response.as_mut(), deadline, cx),
        None => Poll::Ready(Err(UpstreamError::Failed(
            "the upstream connection was given up".into(),
        ))),
    })
    .await;
    let in_flight = pending.in_flight.take();
    match (in_flight, sent) {
        (Some((conn, _)), Ok(sent)) => Ok((conn, sent)),
        (_, Err(e)) => Err(e),
        (None, Ok(_)) => Err(UpstreamError::Failed(
            "the upstream connection was given up".into(),
        )),
    }
}

/// Reads the rest of an abandoned exchange's answer in a task of its own, within
/// [`FINISH_ABANDONED_WITHIN`] and [`FINISH_ABANDONED_MAX_BYTES`], and puts the connection
/// back in the pool if it is then ready for another request; otherwise closes it.
fn finish_in_background<T: Transport>(
    mut conn: Conn<T::Stream>,
    abandoned: Abandoned,
    origin: Authority,
    pool: Weak<PoolInner<T>>,
) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        let finished = tokio::time::timeout(
            FINISH_ABANDONED_WITHIN,
            read_to_the_end(&mut conn, abandoned),
        )
        .await;
        if finished != Ok(true) || !conn.reusable() {
            return;
        }
        if let Some(pool) = pool.upgrade() {
            tracing::debug!("an abandoned exchange was finished; its connection is kept");
            pool.checkin(&origin, conn);
        }
    });
}

/// Drives `conn` until the abandoned answer has been read to its end: false on an error,
/// or past [`FINISH_ABANDONED_MAX_BYTES`] of body.
async fn read_to_the_end<S: ByteStream>(conn: &mut Conn<S>, abandoned: Abandoned) -> bool {
    let mut body = match abandoned {
        Abandoned::Body(body) => body,
        Abandoned::Head(mut response) => {
            let head = poll_fn(|cx| {
                conn.drive(cx);
                response.as_mut().poll(cx)
            })
            .await;
            match head {
                Ok(response) => response.into_body(),
                Err(_) => return false,
            }
        }
    };
    let mut read = 0;
    loop {
        let frame = poll_fn(|cx| {
            conn.drive(cx);
            Pin::new(&mut body).poll_frame(cx)
        })
        .await;
        match frame {
            None => return true,
            Some(Err(_)) => return false,
            Some(Ok(frame)) => {
                read += frame.data_ref().map_or(0, Bytes::len);
                if read > FINISH_ABANDONED_MAX_BYTES {
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::plain::{PlainPool, Tcp};
    use http_body_util::Full;
    use std::sync::atomic::AtomicUsize;
    use tokio::net::TcpListener;

    impl<S> Outcome<S> {
        fn answered(self) -> Response<ProxyBody> {
            match self {
                Outcome::Answered(response) => response,
                Outcome::SpeaksHttp2(..) => panic!("a plain connection switched to HTTP/2"),
            }
        }
    }

    /// An origin on 127.0.0.1 that answers every request `200 ok` on keep-alive connections.
    async fn origin() -> std::net::SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            "ok",
                        ))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        addr
    }

    /// `GET http://{addr}{path}` with no body.
    fn get_request(addr: std::net::SocketAddr, path: &str) -> Request<ProxyBody> {
        Request::get(format!("http://{addr}{path}"))
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .unwrap()
    }

    /// A deadline no test here reaches.
    fn soon() -> Deadline {
        Deadline::after(
            Duration::from_secs(30),
            Duration::from_secs(30),
            std::time::Instant::now(),
        )
    }

    /// An origin on 127.0.0.1 that answers `/hang` never, `/slow` `200 ok` after 300 ms and
    /// anything else `200 ok` at once,
    /// on keep-alive connections; counts the connections it accepted.
    async fn origin_that_hangs_on_request() -> (std::net::SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                        match req.uri().path() {
                            "/hang" => std::future::pending::<()>().await,
                            "/slow" => tokio::time::sleep(Duration::from_millis(300)).await,
                            _ => {}
                        }
                        Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                            "ok",
                        ))))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (addr, accepted)
    }

    /// The deadline lives with the pooled connection and is moved on per request: a request
    /// that outlives it fails with a timeout, and one sent after the clock went off while the
    /// connection sat idle is not failed by the old deadline.
    #[tokio::test]
    async fn the_pooled_connections_deadline_is_per_request() {
        let (addr, accepted) = origin_that_hangs_on_request().await;
        let pool = PlainPool::new(Tcp::new(Duration::from_secs(5)), Duration::from_secs(60));
        let hang = get_request(addr, "/hang");
        let short = || {
            Deadline::after(
                Duration::from_millis(150),
                Duration::from_secs(30),
                std::time::Instant::now(),
            )
        };

        // Answered well within its deadline; the connection goes back to the pool.
        get_within(&pool, addr, short()).await;
        assert_eq!(pool.idle_connections(), 1);

        // The first deadline passes while the connection is idle; the next request on the
        // same connection gets a deadline of its own and is answered.
        tokio::time::sleep(Duration::from_millis(300)).await;
        get_within(&pool, addr, short()).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection, reused");

        // Never answered: a timeout naming the configured limit, and the connection is
        // closed rather than pooled.
        match pool.send(hang, None, short()).await {
            Err(UpstreamError::Timeout(limit)) => assert_eq!(limit, Duration::from_millis(150)),
            Err(other) => panic!("expected a timeout, got {other}"),
            Ok(_) => panic!("expected a timeout, got an answer"),
        }
        assert_eq!(pool.idle_connections(), 0);
        get_within(&pool, addr, short()).await;
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            2,
            "the timed-out one was not reused"
        );
    }

    /// The connection's timer is moved only when it must be: one set by an earlier request
    /// with a short limit fires early and is moved on (the later request is answered, though
    /// slower than that limit), and one set far ahead is pulled in for a shorter limit (a
    /// reload that shortened `timeouts.upstream` applies at once).
    #[tokio::test]
    async fn the_connections_timer_is_moved_when_it_would_fire_early_or_late() {
        let (addr, accepted) = origin_that_hangs_on_request().await;
        let pool = PlainPool::new(Tcp::new(Duration::from_secs(5)), Duration::from_secs(60));
        let slow = get_request(addr, "/slow");
        let after = |ms| {
            Deadline::after(
                Duration::from_millis(ms),
                Duration::from_secs(30),
                std::time::Instant::now(),
            )
        };

        // The timer is set 100 ms ahead; the next request may take 5 s, and its answer
        // comes after 300 ms: the timer fired for the earlier deadline and was moved on.
        get_within(&pool, addr, after(100)).await;
        let response = pool.send(slow, None, after(5_000)).await;
        let response = response.unwrap().answered();
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            "ok"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection, reused");

        // Now set 60 s ahead; a request with a 150 ms limit that is never answered times
        // out on its own limit.
        get_within(&pool, addr, after(60_000)).await;
        let hang = get_request(addr, "/hang");
        let started = std::time::Instant::now();
        match pool.send(hang, None, after(150)).await {
            Err(UpstreamError::Timeout(limit)) => assert_eq!(limit, Duration::from_millis(150)),
            Err(other) => panic!("expected a timeout, got {other}"),
            Ok(_) => panic!("expected a timeout, got an answer"),
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the shorter limit applied, not the timer's old setting"
        );
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "still the one connection"
        );
    }

    async fn get(pool: &PlainPool, addr: std::net::SocketAddr) {
        get_within(pool, addr, soon()).await;
    }

    /// `GET /` on `pool`, answered `ok` by `deadline`.
    async fn get_within(pool: &PlainPool, addr: std::net::SocketAddr, deadline: Deadline) {
        let request = get_request(addr, "/");
        let response = pool.send(request, None, deadline).await.unwrap().answered();
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            "ok"
        );
    }

    /// A request carrying the addresses its host was checked at connects there, not to what
    /// DNS says now: `pinned.invalid` resolves to nothing, yet the request reaches the origin.
    #[tokio::test]
    async fn a_pinned_request_connects_to_the_checked_address_not_a_new_dns_answer() {
        let addr = origin().await;
        let pool = PlainPool::new(Tcp::new(Duration::from_secs(5)), Duration::from_secs(60));
        let request = || {
            Request::get(format!("http://pinned.invalid:{}/", addr.port()))
                .body(Empty::new().map_err(|never| match never {}).boxed())
                .unwrap()
        };
        assert!(
            pool.send(request(), None, soon()).await.is_err(),
            "the name resolves to nothing"
        );
        let pinned = PinnedAddrs(vec![addr].into());
        let response = pool
            .send(request(), Some(&pinned), soon())
            .await
            .unwrap()
            .answered();
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            "ok"
        );
    }

    #[tokio::test]
    async fn the_idle_map_holds_origins_up_to_a_cap_and_emptied_ones_give_way() {
        let pool = PlainPool::with_max_origins(
            Tcp::new(Duration::from_secs(5)),
            Duration::from_secs(60),
            2,
        );
        let origins = [origin().await, origin().await, origin().await];
        for addr in origins {
            get(&pool, addr).await;
        }
        assert_eq!(pool.idle_origins(), 2, "a third origin is not kept");
        assert_eq!(pool.idle_connections(), 2);

        // Taking the only idle connection of an origin leaves its entry, empty (a request at
        // a time to one origin would otherwise free and allocate it each time); an empty
        // entry does not hold a place against another origin's connection.
        let request = Request::get(format!("http://{}/", origins[0]))
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .unwrap();
        let response = pool.send(request, None, soon()).await.unwrap().answered();
        assert_eq!(pool.idle_origins(), 2, "the emptied entry stays");
        assert_eq!(pool.idle_connections(), 1);
        get(&pool, origins[2]).await;
        assert_eq!(pool.idle_origins(), 2, "the emptied entry made room");
        assert_eq!(
            pool.idle_connections(),
            2,
            "the third origin's connection is kept"
        );
        drop(response.into_body().collect().await.unwrap());
        assert_eq!(pool.idle_origins(), 2, "no room for the first origin again");
        assert_eq!(pool.idle_connections(), 2);
    }
}
