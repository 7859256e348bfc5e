//! Inside an intercepted CONNECT tunnel: terminate the client's TLS with a leaf for the
//! tunnel's host (ALPN h2 or http/1.1), then handle each request exactly like a forward-proxy
//! request for `https://host:port` — route match, injection, refresh-and-retry, TLS upstream.

use std::convert::Infallible;
use std::sync::Arc;

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;

use super::target;
use crate::state::State;
use crate::upstream::ProxyBody;

/// Serves the decrypted tunnel until the client closes it.
pub async fn serve(
    state: Arc<State>,
    client: TokioIo<Upgraded>,
    authority: Authority,
    tls: Arc<rustls::ServerConfig>,
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
    let service = service_fn(move |request| {
        let state = Arc::clone(&state);
        let authority = Arc::clone(&authority);
        async move { Ok::<_, Infallible>(handle(&state, &authority, request).await) }
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(client_idle);
    builder.http2().timer(TokioTimer::new());
    if let Err(e) = builder
        .serve_connection(TokioIo::new(stream), service)
        .await
    {
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
