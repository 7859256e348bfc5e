//! Plain-HTTP upstreams: a keep-alive pool of HTTP/1.1 connections that are driven by the
//! request using them, inside the client connection's own task.
//!
//! hyper-util's pooled client (kept for https, where ALPN may pick HTTP/2) runs each upstream
//! connection as a task of its own and hands every request and response across channels,
//! so each proxied request costs extra task switches and a pool keyed by a hashed
//! scheme + authority. Here the request's future polls the upstream connection itself and
//! the response body keeps polling it while the client reads, so a proxied request stays in
//! one task from the client's bytes to the upstream's and back. A connection goes back to
//! the pool only once its response has been read to the end and it is ready for another
//! request; one that closed while idle is noticed (and dropped) when it is next taken out.

use std::collections::HashMap;
use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Uri};
use http::{header, HeaderValue, Method, Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::{http1, TrySendError};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::{BoxError, ProxyBody};
use super::error::{describe, UpstreamError};
use super::pinned::PinnedAddrs;

/// Idle connections kept per upstream host and port; more are closed when they come back.
const MAX_IDLE_PER_ORIGIN: usize = 1024;
/// Origins with idle connections kept at once: clients name any origin they like through an
/// `unmatched: pass` proxy, so the pool must not grow with every one of them. A connection to
/// one more origin is closed instead of kept.
const MAX_IDLE_ORIGINS: usize = 1024;
/// TCP keep-alive probes on upstream connections, so that a dead peer is noticed.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// A pooled connection idle at least this long may be closed by the upstream (its keep-alive
/// timeout: 5 s in Node.js, 75 s in nginx) just as a request goes out on it. A request sent on
/// one keeps a copy, when it can be sent again safely, for one retry on a new connection;
/// under load connections idle for far less, so the hot path copies nothing.
const STALE_RISK_AFTER: Duration = Duration::from_secs(1);
/// A pooled connection idle at least this long is polled for a close before it is reused.
const RECHECK_AFTER: Duration = Duration::from_millis(100);

type Driver = Pin<Box<http1::Connection<TokioIo<TcpStream>, ProxyBody>>>;

/// One upstream connection: the handle requests are sent on and the future doing its I/O.
struct Conn {
    sender: http1::SendRequest<ProxyBody>,
    /// `None` once the connection has ended.
    driver: Option<Driver>,
}

impl Conn {
    /// Moves the connection's I/O forward; false once it has ended.
    fn drive(&mut self, cx: &mut Context<'_>) -> bool {
        if let Some(driver) = &mut self.driver {
            if driver.as_mut().poll(cx).is_ready() {
                self.driver = None;
            }
        }
        self.driver.is_some()
    }

    /// Whether it can take another request now. Polls the I/O once, so that a close by the
    /// upstream that has already arrived is seen here rather than by the next request.
    fn reusable(&mut self) -> bool {
        self.drive(&mut Context::from_waker(Waker::noop())) && self.sender.is_ready()
    }
}

struct IdleConn {
    conn: Conn,
    since: Instant,
}

struct PoolInner {
    idle: Mutex<HashMap<Box<str>, Vec<IdleConn>>>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    max_origins: usize,
    sweeper_started: AtomicBool,
}

/// The pool of plain-HTTP upstream connections. Cheap to clone.
#[derive(Clone)]
pub struct PlainPool {
    inner: Arc<PoolInner>,
}

impl PlainPool {
    /// A pool connecting within `connect_timeout` and closing connections idle longer than
    /// `idle_timeout`.
    pub fn new(connect_timeout: Duration, idle_timeout: Duration) -> Self {
        Self::with_max_origins(connect_timeout, idle_timeout, MAX_IDLE_ORIGINS)
    }

    fn with_max_origins(connect_timeout: Duration, idle_timeout: Duration, max: usize) -> Self {
        Self {
            inner: Arc::new(PoolInner {
                idle: Mutex::new(HashMap::new()),
                connect_timeout,
                idle_timeout,
                max_origins: max,
                sweeper_started: AtomicBool::new(false),
            }),
        }
    }

    /// Sends `request` (absolute `http://` URI) and returns the response once its head has
    /// arrived; its body keeps the connection going and hands it back to the pool at its end.
    ///
    /// A request that a pooled connection could not even start sending (the upstream had
    /// closed it) is sent again on another connection. One that went out on a connection
    /// idle for [`STALE_RISK_AFTER`] and met a close before any answer is sent once more on a
    /// new connection if it is idempotent and has no body (as nginx's `proxy_next_upstream
    /// error`); any other request that may have reached the upstream is not.
    pub async fn send(
        &self,
        request: Request<ProxyBody>,
        pinned: Option<&PinnedAddrs>,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let (mut request, origin) = origin_form(request)?;
        let mut pooled_ok = true;
        loop {
            let pooled = if pooled_ok {
                self.inner.checkout(origin.as_str())
            } else {
                None
            };
            let (mut conn, idle) = match pooled {
                Some((conn, idle)) => (conn, Some(idle)),
                // Boxed: a new connection is the exception under load, and its future would
                // otherwise be part of (and moved with) every request's.
                None => (Box::pin(self.inner.connect(&origin, pinned)).await?, None),
            };
            let copy = idle
                .filter(|idle| *idle >= STALE_RISK_AFTER)
                .and_then(|_| replayable_copy(&request));
            match exchange(&mut conn, request).await {
                Ok(response) => {
                    let pool = Arc::downgrade(&self.inner);
                    return Ok(response.map(|body| {
                        PooledBody {
                            body,
                            finished: false,
                            conn: Some(conn),
                            origin,
                            pool,
                        }
                        .map_err(BoxError::from)
                        .boxed()
                    }));
                }
                Err(mut failed) => match (failed.take_message(), copy) {
                    (Some(unsent), _) if idle.is_some() => request = unsent,
                    (_, Some(copy)) if closed_before_answer(failed.error()) => {
                        tracing::debug!(
                            "the upstream closed an idle connection as the request went out; sending it on a new one"
                        );
                        request = copy;
                        pooled_ok = false;
                    }
                    _ => return Err(super::idle::exchange_error(&failed.into_error())),
                },
            }
        }
    }

    /// Idle connections held now, for tests and diagnostics.
    pub fn idle_connections(&self) -> usize {
        self.inner.lock().values().map(Vec::len).sum()
    }

    /// Origins with an entry in the idle map, for tests and diagnostics.
    pub fn idle_origins(&self) -> usize {
        self.inner.lock().len()
    }
}

impl PoolInner {
    fn lock(&self) -> MutexGuard<'_, HashMap<Box<str>, Vec<IdleConn>>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used idle connection to `origin` that is still open and fresh, and
    /// how long it was idle.
    fn checkout(&self, origin: &str) -> Option<(Conn, Duration)> {
        loop {
            let mut entry = {
                let mut idle = self.lock();
                let list = idle.get_mut(origin)?;
                let entry = list.pop();
                if list.is_empty() {
                    idle.remove(origin);
                }
                entry?
            };
            let idle = entry.since.elapsed();
            // Checked for a close only after a pause: it was checked when it came back, and a
            // close that arrived since makes hyper hand the request back unsent, which `send`
            // then sends on another connection. Under load, connections idle for microseconds
            // and the check (a poll of the connection) was a fifth of the pool's cost.
            if idle < self.idle_timeout && (idle < RECHECK_AFTER || entry.conn.reusable()) {
                return Some((entry.conn, idle));
            }
        }
    }

    fn checkin(self: &Arc<Self>, origin: &Authority, conn: Conn) {
        let mut idle = self.lock();
        let entry = IdleConn {
            conn,
            since: Instant::now(),
        };
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
        if self.sweeper_started.swap(true, Ordering::AcqRel) {
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

    /// A new connection to `origin`, or to the addresses its host was checked at.
    async fn connect(
        &self,
        origin: &Authority,
        pinned: Option<&PinnedAddrs>,
    ) -> Result<Conn, UpstreamError> {
        let host = origin.host().trim_start_matches('[').trim_end_matches(']');
        let port = origin.port_u16().unwrap_or(80);
        let connecting = async {
            match pinned {
                Some(pinned) => TcpStream::connect(&pinned.0[..]).await,
                None => TcpStream::connect((host, port)).await,
            }
        };
        let stream = match tokio::time::timeout(self.connect_timeout, connecting).await {
            Err(_) => {
                return Err(UpstreamError::Failed(format!(
                    "tcp connect error: no connection within {:?}",
                    self.connect_timeout
                )))
            }
            Ok(Err(e)) => return Err(UpstreamError::Failed(format!("tcp connect error: {e}"))),
            Ok(Ok(stream)) => stream,
        };
        let _ = stream.set_nodelay(true);
        let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
        let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
        let (sender, driver) = http1::Builder::new()
            .max_buf_size(super::budget::CONNECTION_BUFFER)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| UpstreamError::Failed(describe(&e)))?;
        Ok(Conn {
            sender,
            driver: Some(Box::pin(driver)),
        })
    }
}

async fn sweep_every(pool: Weak<PoolInner>, period: Duration) {
    loop {
        tokio::time::sleep(period).await;
        match pool.upgrade() {
            Some(pool) => pool.sweep(),
            None => return,
        }
    }
}

/// Rewrites an absolute-form request for an origin server: `Host` from the URI (without a
/// default port), origin-form request target, HTTP/1.1. Returns the origin it goes to.
fn origin_form(
    mut request: Request<ProxyBody>,
) -> Result<(Request<ProxyBody>, Authority), UpstreamError> {
    let parts = std::mem::take(request.uri_mut()).into_parts();
    let origin = parts
        .authority
        .ok_or_else(|| UpstreamError::Failed("the upstream URI names no host".into()))?;
    let host = match super::authority::host_and_port(origin.as_str()) {
        (_, Some(port)) if port != 80 => origin.as_str(),
        (host, _) => host,
    };
    let host = HeaderValue::from_str(host)
        .map_err(|_| UpstreamError::Failed("the upstream host is not a valid header".into()))?;
    request.headers_mut().insert(header::HOST, host);
    let target = parts
        .path_and_query
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    *request.uri_mut() = Uri::from(target);
    *request.version_mut() = Version::HTTP_11;
    Ok((request, origin))
}

/// A copy of `request` to send again, if that is safe: an idempotent method (RFC 9110
/// §9.2.2) and no body.
fn replayable_copy(request: &Request<ProxyBody>) -> Option<Request<ProxyBody>> {
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
    Some(copy)
}

/// Whether the connection ended before any of the response arrived: closed, or reset.
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
            );
        }
        source = e.source();
    }
    false
}

/// Sends `request` on `conn`, driving the connection until the response head is in.
async fn exchange(
    conn: &mut Conn,
    request: Request<ProxyBody>,
) -> Result<Response<Incoming>, TrySendError<Request<ProxyBody>>> {
    let mut response = pin!(conn.sender.try_send_request(request));
    poll_fn(|cx| {
        conn.drive(cx);
        response.as_mut().poll(cx)
    })
    .await
}

/// A response body from a pooled connection: reading it drives the connection, and the
/// connection returns to the pool when the body was read to the end.
struct PooledBody {
    body: Incoming,
    finished: bool,
    conn: Option<Conn>,
    origin: Authority,
    pool: Weak<PoolInner>,
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        if let Some(conn) = &mut this.conn {
            conn.drive(cx);
        }
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        if matches!(frame, Poll::Ready(None)) {
            this.finished = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.finished || self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        let Some(mut conn) = self.conn.take() else {
            return;
        };
        if !self.is_end_stream() || !conn.reusable() {
            return;
        }
        if let Some(pool) = self.pool.upgrade() {
            pool.checkin(&self.origin, conn);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use tokio::net::TcpListener;

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

    async fn get(pool: &PlainPool, addr: std::net::SocketAddr) {
        let request = Request::get(format!("http://{addr}/"))
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .unwrap();
        let response = pool.send(request, None).await.unwrap();
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
        let pool = PlainPool::new(Duration::from_secs(5), Duration::from_secs(60));
        let request = || {
            Request::get(format!("http://pinned.invalid:{}/", addr.port()))
                .body(Empty::new().map_err(|never| match never {}).boxed())
                .unwrap()
        };
        assert!(
            pool.send(request(), None).await.is_err(),
            "the name resolves to nothing"
        );
        let pinned = PinnedAddrs(vec![addr].into());
        let response = pool.send(request(), Some(&pinned)).await.unwrap();
        assert_eq!(
            response.into_body().collect().await.unwrap().to_bytes(),
            "ok"
        );
    }

    #[tokio::test]
    async fn the_idle_map_holds_only_origins_with_idle_connections_up_to_a_cap() {
        let pool = PlainPool::with_max_origins(Duration::from_secs(5), Duration::from_secs(60), 2);
        let origins = [origin().await, origin().await, origin().await];
        for addr in origins {
            get(&pool, addr).await;
        }
        assert_eq!(pool.idle_origins(), 2, "a third origin is not kept");
        assert_eq!(pool.idle_connections(), 2);

        // Taking the only idle connection of an origin removes its entry.
        let request = Request::get(format!("http://{}/", origins[0]))
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .unwrap();
        let response = pool.send(request, None).await.unwrap();
        assert_eq!(pool.idle_origins(), 1, "the emptied origin's entry is gone");
        drop(response.into_body().collect().await.unwrap());
        assert_eq!(pool.idle_origins(), 2);
    }
}
