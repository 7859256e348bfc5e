//! `CONNECT host:port`: a byte tunnel to hosts no route intercepts (closed after an idle
//! period), a decrypted tunnel (`intercepted.rs`) to hosts one does; only to allowed ports.

use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::intercepted;
use super::replay;
use super::respond::ProxyError;
use crate::config::Unmatched;
use crate::state::State;
use crate::upstream::ProxyBody;

/// Answers a CONNECT request: 200 and a tunnel (decrypted when a route intercepts the host),
/// or an error.
pub async fn handle(state: Arc<State>, request: Request<Incoming>) -> Response<ProxyBody> {
    let opened = open(&state, &request).and_then(|authority| {
        let tls = interception(&state, &authority)?;
        Ok((authority, tls))
    });
    let (authority, tls) = match opened {
        Ok(o) => o,
        Err(e) => {
            tracing::info!(error = %e, "CONNECT refused");
            return e.into_response(None);
        }
    };
    tokio::spawn(tunnel(state, request, authority, tls));
    let mut response = Response::new(replay::empty());
    *response.status_mut() = StatusCode::OK;
    response
}

/// The TLS server config to decrypt the tunnel with, when a route intercepts its host.
fn interception(
    state: &State,
    authority: &Authority,
) -> Result<Option<Arc<rustls::ServerConfig>>, ProxyError> {
    let port = authority.port_u16().unwrap_or(443);
    if state
        .snapshot()
        .routes
        .intercepts(authority.host(), port)
        .is_none()
    {
        return Ok(None);
    }
    let ca = state.intercept_ca().ok_or_else(|| {
        ProxyError::Interception(
            "no intercept_ca is loaded (see the error logged when it was read)".into(),
        )
    })?;
    ca.server_config(authority.host())
        .map(Some)
        .map_err(|e| ProxyError::Interception(e.to_string()))
}

/// Runs one tunnel after the 200: decrypted and proxied request by request, or spliced.
async fn tunnel(
    state: Arc<State>,
    mut request: Request<Incoming>,
    authority: Authority,
    tls: Option<Arc<rustls::ServerConfig>>,
) {
    let shutdown = request.extensions_mut().remove::<super::ShutdownSignal>();
    let upgraded = match hyper::upgrade::on(request).await {
        Ok(u) => TokioIo::new(u),
        Err(e) => {
            tracing::debug!(error = %e, "CONNECT upgrade failed");
            return;
        }
    };
    let tunnels = state.metrics.tunnels.clone();
    tunnels.inc();
    match tls {
        Some(tls) => intercepted::serve(state, upgraded, authority, tls, shutdown).await,
        None => {
            let idle = state.snapshot().config.connect.idle_timeout;
            plain(upgraded, &authority, idle).await;
        }
    }
    tunnels.dec();
}

/// A byte tunnel to `authority`: nothing is read or changed.
async fn plain(client: TokioIo<hyper::upgrade::Upgraded>, authority: &Authority, idle: Duration) {
    let upstream = match TcpStream::connect(authority.as_str()).await {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(error = %e, host = %authority.host(), "tunnel upstream unreachable");
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    if let Err(e) = splice(client, upstream, idle).await {
        tracing::debug!(error = %e, host = %authority.host(), "tunnel closed");
    }
}

fn open(state: &State, request: &Request<Incoming>) -> Result<Authority, ProxyError> {
    let authority = request
        .uri()
        .authority()
        .cloned()
        .ok_or_else(|| ProxyError::BadRequest("CONNECT needs host:port".into()))?;
    let port = authority
        .port_u16()
        .ok_or_else(|| ProxyError::BadRequest("CONNECT needs host:port".into()))?;
    let snapshot = state.snapshot();
    if !snapshot.config.connect.allowed_ports.contains(&port) {
        return Err(ProxyError::PortNotAllowed(port));
    }
    if snapshot.config.unmatched == Unmatched::Deny
        && !snapshot.routes.names_host(authority.host(), port)
    {
        return Err(ProxyError::Denied(authority.host().to_string()));
    }
    Ok(authority)
}

/// Copies bytes both ways until either side closes or nothing moves for `idle`.
pub async fn splice<A, B>(a: A, b: B, idle: Duration) -> std::io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let mut buf_a = vec![0u8; 16 * 1024];
    let mut buf_b = vec![0u8; 16 * 1024];
    let (mut a_open, mut b_open) = (true, true);
    while a_open || b_open {
        let step = tokio::time::timeout(idle, async {
            tokio::select! {
                n = ar.read(&mut buf_a), if a_open => {
                    let n = n?;
                    if n == 0 { a_open = false; bw.shutdown().await?; } else { bw.write_all(&buf_a[..n]).await?; }
                    Ok::<_, std::io::Error>(())
                }
                n = br.read(&mut buf_b), if b_open => {
                    let n = n?;
                    if n == 0 { b_open = false; aw.shutdown().await?; } else { aw.write_all(&buf_b[..n]).await?; }
                    Ok(())
                }
            }
        })
        .await;
        match step {
            Ok(result) => result?,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "tunnel idle",
                ))
            }
        }
    }
    Ok(())
}
