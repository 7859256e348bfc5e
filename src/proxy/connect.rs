//! `CONNECT host:port`: a byte tunnel to hosts no route intercepts, limited to the allowed
//! ports, closed after an idle period.

use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::replay;
use super::respond::ProxyError;
use crate::config::Unmatched;
use crate::state::State;
use crate::upstream::ProxyBody;

/// Answers a CONNECT request: 200 and a tunnel, or an error.
pub async fn handle(state: Arc<State>, request: Request<Incoming>) -> Response<ProxyBody> {
    match open(&state, &request) {
        Ok(authority) => {
            let idle = state.snapshot().config.connect.idle_timeout;
            let tunnels = state.metrics.tunnels.clone();
            tokio::spawn(async move {
                let upgraded = match hyper::upgrade::on(request).await {
                    Ok(u) => u,
                    Err(e) => {
                        tracing::debug!(error = %e, "CONNECT upgrade failed");
                        return;
                    }
                };
                tunnels.inc();
                match TcpStream::connect(authority.as_str()).await {
                    Ok(upstream) => {
                        let _ = upstream.set_nodelay(true);
                        if let Err(e) = splice(TokioIo::new(upgraded), upstream, idle).await {
                            tracing::debug!(error = %e, host = %authority.host(), "tunnel closed");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, host = %authority.host(), "tunnel upstream unreachable")
                    }
                }
                tunnels.dec();
            });
            let mut response = Response::new(replay::empty());
            *response.status_mut() = StatusCode::OK;
            response
        }
        Err(e) => {
            tracing::info!(error = %e, "CONNECT refused");
            e.into_response(None)
        }
    }
}

fn open(state: &State, request: &Request<Incoming>) -> Result<http::uri::Authority, ProxyError> {
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
