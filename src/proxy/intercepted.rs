//! Requests inside a CONNECT tunnel to a routed host. An intercepted tunnel first has the
//! client's TLS terminated with a leaf for the tunnel's host (ALPN h2 or http/1.1); a tunnel
//! that carries plain HTTP (undici sends `CONNECT host:80` even for `http://` URLs) is read as
//! is. Either way each request is handled exactly like a forward-proxy request for
//! `scheme://host:port` — route match, injection, refresh-and-retry. A tunnel with no request
//! in flight for `timeouts.client_idle` is closed (HTTP/2: GOAWAY), as the plain listener
//! closes idle keep-alive connections; on shutdown its requests in flight finish first.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};

use super::activity::{Activity, ShutdownSignal};
use super::target;
use crate::access::Client;
use crate::state::State;
use crate::upstream::ProxyBody;

/// Concurrent HTTP/2 requests one tunnel may have in flight (like nginx's
/// `http2_max_concurrent_streams`, but lower: every stream can hold an upstream socket).
pub const MAX_STREAMS_PER_TUNNEL: u32 = 32;

/// Decrypts the tunnel and serves its requests as `https://authority` until the client
/// closes it, it is idle too long, or shutdown (then after its requests in flight).
pub async fn serve<T>(
    state: Arc<State>,
    user: Client,
    client: T,
    authority: Authority,
    tls: Arc<rustls::ServerConfig>,
    shutdown: Option<ShutdownSignal>,
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
    serve_requests(state, user, stream, authority, Scheme::HTTPS, shutdown).await;
}

/// Serves the requests that arrive on `stream` (HTTP/1.1 or HTTP/2) as requests for
/// `scheme://authority`, until the client closes it, it is idle too long, or shutdown.
pub async fn serve_requests<S>(
    state: Arc<State>,
    user: Client,
    stream: S,
    authority: Authority,
    scheme: Scheme,
    shutdown: Option<ShutdownSignal>,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let client_idle = state.snapshot().config.timeouts.client_idle;
    let authority = Arc::new(authority);
    let host = Arc::clone(&authority);
    let user = Arc::new(user);
    let activity = Arc::new(Activity::new());
    let requests = Arc::clone(&activity);
    let service = service_fn(move |request| {
        let state = Arc::clone(&state);
        let authority = Arc::clone(&authority);
        let scheme = scheme.clone();
        let user = Arc::clone(&user);
        let in_flight = requests.begin();
        async move {
            let response = handle(&state, &user, &authority, scheme, request).await;
            Ok::<_, Infallible>(in_flight.until_sent(response))
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // No hyper header-read timer (it arms one per request head): the `check` below closes a
    // connection with nothing in flight for `client_idle`, a partly sent head included.
    builder
        .http1()
        .max_buf_size(crate::upstream::CONNECTION_BUFFER)
        .header_read_timeout(None);
    // Each stream may open its own upstream connection: hyper's default of 200 streams per
    // tunnel would let a few tunnels use up the descriptors `max_connections` was sized for.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS_PER_TUNNEL);
    let connection = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let mut check = tokio::time::interval((client_idle / 4).max(Duration::from_millis(10)));
    let mut shutdown = shutdown.map(|s| s.0);
    let ended = loop {
        tokio::select! {
            ended = connection.as_mut() => break ended,
            _ = async { match &mut shutdown {
                Some(signal) => crate::vocab::shutdown::shutdown_requested(signal).await,
                None => std::future::pending().await,
            } } => {
                tracing::debug!(host = %host.host(), "shutdown: closing a tunnel's connection once its requests are done");
                connection.as_mut().graceful_shutdown();
                break connection.as_mut().await;
            },
            _ = check.tick() => if activity.idle_for() >= client_idle {
                tracing::debug!(host = %host.host(), "closing an idle tunnel connection");
                connection.as_mut().graceful_shutdown();
                break connection.as_mut().await;
            },
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "tunnel connection ended with an error");
    }
}

/// Routes one request from inside the tunnel; `user` is the client that opened it.
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
    super::dispatch::dispatch(state, &snapshot, user, target, request).await
}
