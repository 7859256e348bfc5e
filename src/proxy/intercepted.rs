//! Requests inside a CONNECT tunnel to a routed host. An intercepted tunnel first has the
//! client's TLS terminated with a leaf for the tunnel's host (ALPN h2 or http/1.1); a tunnel
//! that carries plain HTTP (undici sends `CONNECT host:80` even for `http://` URLs) is read as
//! is. Either way each request is handled exactly like a forward-proxy request for
//! `scheme://host:port` — route match, injection, refresh-and-retry. A tunnel with no request
//! in flight for `timeouts.client_idle` is closed (HTTP/2: GOAWAY), as the plain listener
//! closes idle keep-alive connections.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::uri::{Authority, Scheme};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};

use super::target;
use crate::access::Client;
use crate::state::State;
use crate::upstream::{BoxError, ProxyBody};

/// Decrypts the tunnel and serves its requests as `https://authority` until the client
/// closes it.
pub async fn serve<T>(
    state: Arc<State>,
    user: Client,
    client: T,
    authority: Authority,
    tls: Arc<rustls::ServerConfig>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stream = match tokio_rustls::TlsAcceptor::from(tls).accept(client).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(error = %e, host = %authority.host(), "client refused the interception certificate or TLS failed");
            return;
        }
    };
    serve_requests(state, user, stream, authority, Scheme::HTTPS).await;
}

/// Serves the requests that arrive on `stream` (HTTP/1.1 or HTTP/2) as requests for
/// `scheme://authority`, until the client closes it or it has been idle too long.
pub async fn serve_requests<S>(
    state: Arc<State>,
    user: Client,
    stream: S,
    authority: Authority,
    scheme: Scheme,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let client_idle = state.snapshot().config.timeouts.client_idle;
    let authority = Arc::new(authority);
    let host = Arc::clone(&authority);
    let activity = Arc::new(Activity::new());
    let requests = Arc::clone(&activity);
    let user = Arc::new(user);
    let service = service_fn(move |request| {
        let state = Arc::clone(&state);
        let authority = Arc::clone(&authority);
        let scheme = scheme.clone();
        let user = Arc::clone(&user);
        let in_flight = requests.begin();
        async move {
            let response = handle(&state, &user, &authority, scheme, request).await;
            Ok::<_, Infallible>(response.map(|body| {
                InFlightBody {
                    body,
                    _in_flight: in_flight,
                }
                .boxed()
            }))
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(client_idle);
    builder.http2().timer(TokioTimer::new());
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let mut check = tokio::time::interval((client_idle / 4).max(Duration::from_millis(10)));
    let ended = loop {
        tokio::select! {
            ended = connection.as_mut() => break ended,
            _ = check.tick() => if activity.idle_for() >= client_idle {
                tracing::debug!(host = %host.host(), "closing an idle intercepted connection");
                connection.as_mut().graceful_shutdown();
                break connection.as_mut().await;
            },
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "intercepted connection ended with an error");
    }
}

/// Routes one decrypted request; `user` is the client that opened the tunnel.
async fn handle(
    state: &State,
    user: &Client,
    authority: &Authority,
    scheme: Scheme,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let snapshot = state.snapshot();
    let target = target::tunnel_target(
        &snapshot,
        request.method(),
        request.uri(),
        authority,
        scheme,
    );
    super::dispatch(state, &snapshot, user, target, request).await
}

/// Requests in flight on one connection (from the request head until its response body has
/// been sent or dropped), and since when there has been none.
struct Activity {
    in_flight: AtomicUsize,
    idle_since: Mutex<Instant>,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(Instant::now()),
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(Arc::clone(self))
    }

    /// How long the connection has had no request in flight (zero while one is).
    fn idle_for(&self) -> Duration {
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        self.idle_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .elapsed()
    }
}

/// One request in flight; dropping it ends the request.
struct InFlight(Arc<Activity>);

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
