//! Inside an intercepted CONNECT tunnel: terminate the client's TLS with a leaf for the
//! tunnel's host (ALPN h2 or http/1.1), then handle each request exactly like a forward-proxy
//! request for `https://host:port` — route match, injection, refresh-and-retry, TLS upstream.
//! A tunnel with no request in flight for `timeouts.client_idle` is closed (HTTP/2: GOAWAY),
//! as the plain listener closes idle keep-alive connections; on shutdown its requests in
//! flight finish first.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;

use super::{target, Activity, ShutdownSignal};
use crate::state::State;
use crate::upstream::ProxyBody;

/// Serves the decrypted tunnel until the client closes it, it is idle too long, or shutdown
/// (then after its requests in flight).
pub async fn serve(
    state: Arc<State>,
    client: TokioIo<Upgraded>,
    authority: Authority,
    tls: Arc<rustls::ServerConfig>,
    shutdown: Option<ShutdownSignal>,
) {
    let stream = match tokio_rustls::TlsAcceptor::from(tls).accept(client).await {
        Ok(s) => s,
        Err(e) => {
            tracing::info!(error = %e, host = %authority.host(), "client refused the interception certificate or TLS failed");
            return;
        }
    };
    let client_idle = state.snapshot().config.timeouts.client_idle;
    let authority = Arc::new(authority);
    let host = Arc::clone(&authority);
    let activity = Arc::new(Activity::new());
    let requests = Arc::clone(&activity);
    let service = service_fn(move |request| {
        let state = Arc::clone(&state);
        let authority = Arc::clone(&authority);
        let in_flight = requests.begin();
        async move {
            let response = handle(&state, &authority, request).await;
            Ok::<_, Infallible>(in_flight.until_sent(response))
        }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .max_buf_size(super::CONNECTION_BUFFER)
        .header_read_timeout(client_idle);
    builder.http2().timer(TokioTimer::new());
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let mut check = tokio::time::interval((client_idle / 4).max(Duration::from_millis(10)));
    let mut shutdown = shutdown.map(|s| s.0);
    let ended = loop {
        tokio::select! {
            ended = connection.as_mut() => break ended,
            _ = async { match &mut shutdown {
                Some(signal) => crate::shutdown_requested(signal).await,
                None => std::future::pending().await,
            } } => {
                tracing::debug!(host = %host.host(), "shutdown: closing an intercepted connection once its requests are done");
                connection.as_mut().graceful_shutdown();
                break connection.as_mut().await;
            },
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

async fn handle(
    state: &State,
    authority: &Authority,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let snapshot = state.snapshot();
    let target = target::tunnel_target(&snapshot, request.method(), request.uri(), authority);
    super::dispatch(state, &snapshot, target, request).await
}
