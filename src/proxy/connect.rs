//! `CONNECT host:port`: a byte tunnel to hosts no route intercepts (closed after an idle
//! period), a decrypted tunnel (`intercepted.rs`) to hosts one does; only to allowed ports,
//! never to the proxy itself or link-local addresses, and answered 200 only once the
//! upstream connection is open.

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
use crate::access::Client;
use crate::config::Unmatched;
use crate::state::State;
use crate::upstream::ProxyBody;

/// Answers a CONNECT request: 200 once the tunnel can carry bytes — the upstream TCP
/// connection is open (within `timeouts.connect`), or a route intercepts the host — else
/// the error.
pub async fn handle(
    state: Arc<State>,
    client: Client,
    request: Request<Incoming>,
) -> Response<ProxyBody> {
    let opened = match open(&state, &request) {
        Ok(authority) => match interception(&state, &authority) {
            Ok(Some(tls)) => Ok((authority, Upstream::Intercepted(tls))),
            Ok(None) => connect_upstream(&state, &authority)
                .await
                .map(|stream| (authority, Upstream::Plain(stream))),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    let (authority, upstream) = match opened {
        Ok(o) => o,
        Err(e) => {
            tracing::info!(client = %client.addr, user = client.user.as_deref().unwrap_or("-"), error = %e, "CONNECT refused");
            return e.into_response(None);
        }
    };
    tokio::spawn(tunnel(state, client, request, authority, upstream));
    let mut response = Response::new(replay::empty());
    *response.status_mut() = StatusCode::OK;
    response
}

/// What the client's side of a tunnel is joined to.
enum Upstream {
    /// Decrypted with this server config; each request inside is routed on its own.
    Intercepted(Arc<rustls::ServerConfig>),
    /// Spliced, byte for byte, to this open connection.
    Plain(TcpStream),
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

/// Opens the TCP connection a plain tunnel will splice to, within `timeouts.connect`. The
/// host is resolved once and checked — never the proxy's own addresses or link-local ranges,
/// nor `unmatched_deny` for a host no route names — and the checked address is the one
/// connected to (a second DNS answer cannot differ). Every connect failure reads the same.
async fn connect_upstream(state: &State, authority: &Authority) -> Result<TcpStream, ProxyError> {
    let snapshot = state.snapshot();
    let timeout = snapshot.config.timeouts.connect;
    let host = authority.host();
    let port = authority.port_u16().unwrap_or(443);
    let deny: &[ipnet::IpNet] = if snapshot.routes.names_host(host, port) {
        &[]
    } else {
        &snapshot.config.unmatched_deny
    };
    let addrs = super::allowed_destination(state, host, port, deny).await?;
    let timed_out = || ProxyError::UpstreamTimeout(humantime::format_duration(timeout).to_string());
    let attempt = async {
        let mut last = None;
        for addr in &addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => return Ok(stream),
                Err(e) => last = Some(e),
            }
        }
        Err(last)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) => {
            if let Some(e) = e {
                tracing::debug!(error = %e, host, "tunnel upstream unreachable");
            }
            Err(ProxyError::Unreachable)
        }
        Err(_) => Err(timed_out()),
    }
}

/// Runs one tunnel after the 200: decrypted and proxied request by request, or spliced.
async fn tunnel(
    state: Arc<State>,
    client: Client,
    request: Request<Incoming>,
    authority: Authority,
    upstream: Upstream,
) {
    let upgraded = match hyper::upgrade::on(request).await {
        Ok(u) => TokioIo::new(u),
        Err(e) => {
            tracing::debug!(error = %e, "CONNECT upgrade failed");
            return;
        }
    };
    let tunnels = state.metrics.tunnels.clone();
    tunnels.inc();
    match upstream {
        Upstream::Intercepted(tls) => {
            intercepted::serve(state, client, upgraded, authority, tls).await
        }
        Upstream::Plain(stream) => {
            let idle = state.snapshot().config.connect.idle_timeout;
            if let Err(e) = splice(upgraded, stream, idle).await {
                tracing::debug!(error = %e, host = %authority.host(), "tunnel closed");
            }
        }
    }
    tunnels.dec();
}

/// The tunnel's `host:port`, refused when it is malformed (no port, empty host, user info)
/// or not allowed by `connect.allowed_ports` or `unmatched: deny`.
fn open(state: &State, request: &Request<Incoming>) -> Result<Authority, ProxyError> {
    let malformed = || ProxyError::BadRequest("CONNECT needs host:port".into());
    let authority = request.uri().authority().cloned().ok_or_else(malformed)?;
    if authority.as_str().contains('@') {
        return Err(ProxyError::BadRequest(
            "user info in a CONNECT target is not allowed".into(),
        ));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        return Err(malformed());
    }
    let port = authority
        .port_u16()
        .filter(|p| *p != 0)
        .ok_or_else(malformed)?;
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
