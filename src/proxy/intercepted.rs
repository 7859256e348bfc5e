//! Requests inside a CONNECT tunnel to a routed host. An intercepted tunnel first has the
//! client's TLS terminated with a leaf for the tunnel's host (ALPN h2 or http/1.1); a tunnel
//! that carries plain HTTP (undici sends `CONNECT host:80` even for `http://` URLs) is read as
//! is. Either way each request goes through the pipeline (`dispatch.rs`) like a forward-proxy
//! request for `scheme://host:port` — admission, injection, refresh-and-replay. A tunnel with
//! no request in flight for `timeouts.client_idle` is closed (HTTP/2: GOAWAY), as the listener
//! closes idle keep-alive connections; on shutdown its requests in flight finish first.

use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::context::{Connection, Handler};

/// Decrypts the tunnel and serves its requests until the client closes it, it is idle too
/// long, it is evicted, or shutdown (then after its requests in flight).
pub(crate) async fn serve<T>(
    conn: Arc<Connection>,
    client: T,
    tls: Arc<rustls::ServerConfig>,
    pipeline: Handler,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let stream = match tokio_rustls::TlsAcceptor::from(tls).accept(client).await {
        Ok(s) => s,
        Err(e) => {
            let host = conn.tunnel.as_ref().map(|t| t.authority.host());
            tracing::info!(error = %e, host, "client refused the interception certificate or TLS failed");
            return;
        }
    };
    serve_requests(conn, stream, pipeline).await;
}

/// Serves the requests that arrive on `stream` (HTTP/1.1 or HTTP/2) through the pipeline,
/// each as a request for the tunnel's origin, until the client closes it, it is idle too
/// long, it is evicted, or shutdown.
pub(crate) async fn serve_requests<S>(conn: Arc<Connection>, stream: S, pipeline: Handler)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let client_idle = conn.state.snapshot().config.timeouts.client_idle;
    let mut shutdown = conn.shutdown.clone();
    let activity = Arc::clone(&conn.activity);
    let service_conn = Arc::clone(&conn);
    let service = service_fn(move |request: Request<Incoming>| {
        super::context::serve_counted(&service_conn, request, pipeline)
    });
    let server = super::limits::tunnel_server();
    let connection = server.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let mut check = tokio::time::interval((client_idle / 4).max(Duration::from_millis(10)));
    let host = conn.tunnel.as_ref().map(|t| t.authority.host().to_string());
    let ended = loop {
        tokio::select! {
            ended = connection.as_mut() => break ended,
            () = crate::vocab::shutdown::shutdown_requested(&mut shutdown) => {
                tracing::debug!(host, "shutdown: closing a tunnel's connection once its requests are done");
                connection.as_mut().graceful_shutdown();
                break connection.as_mut().await;
            },
            () = activity.evicted() => {
                tracing::debug!(host, "closing a tunnel to make room under max_connections");
                connection.as_mut().graceful_shutdown();
                break connection.as_mut().await;
            },
            _ = check.tick() => if activity.idle_for() >= client_idle {
                tracing::debug!(host, "closing an idle tunnel connection");
                connection.as_mut().graceful_shutdown();
                break connection.as_mut().await;
            },
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "tunnel connection ended with an error");
    }
}
