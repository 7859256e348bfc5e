//! `CONNECT host:port`. To a host no route names: a byte tunnel (closed after an idle period),
//! only to `connect.allowed_ports`. To a host a route names, on any port the route matches:
//! the first bytes decide — a TLS ClientHello is decrypted (`intercepted.rs`) when the route
//! says `intercept: true`, plain HTTP (undici tunnels `http://` URLs too) is served request by
//! request like forward-proxy traffic, and anything else is only tunnelled to an allowed port.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::intercepted;
use super::replay;
use super::respond::ProxyError;
use crate::config::Unmatched;
use crate::state::State;
use crate::upstream::ProxyBody;

/// What the proxy does with the bytes of one tunnel.
enum Mode {
    /// A host no route names: bytes are copied unread.
    Splice,
    /// A host a route names: served by what the client sends first.
    Routed {
        /// The certificate config when a route intercepts the host.
        tls: Option<Arc<rustls::ServerConfig>>,
        /// Whether the port is in `connect.allowed_ports` (else only HTTP is served).
        port_allowed: bool,
    },
}

/// Answers a CONNECT request: 200 and a tunnel, or an error.
pub async fn handle(state: Arc<State>, request: Request<Incoming>) -> Response<ProxyBody> {
    let opened = open(&state, &request).and_then(|(authority, routed, port_allowed)| {
        let mode = if routed {
            Mode::Routed {
                tls: interception(&state, &authority)?,
                port_allowed,
            }
        } else {
            Mode::Splice
        };
        Ok((authority, mode))
    });
    let (authority, mode) = match opened {
        Ok(o) => o,
        Err(e) => {
            tracing::info!(error = %e, "CONNECT refused");
            return e.into_response(None);
        }
    };
    tokio::spawn(tunnel(state, request, authority, mode));
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

/// Runs one tunnel after the 200: proxied request by request (decrypted or plain HTTP), or
/// spliced.
async fn tunnel(state: Arc<State>, request: Request<Incoming>, authority: Authority, mode: Mode) {
    let upgraded = match hyper::upgrade::on(request).await {
        Ok(u) => TokioIo::new(u),
        Err(e) => {
            tracing::debug!(error = %e, "CONNECT upgrade failed");
            return;
        }
    };
    let tunnels = state.metrics.tunnels.clone();
    tunnels.inc();
    let idle = state.snapshot().config.connect.idle_timeout;
    match mode {
        Mode::Splice => plain(upgraded, &authority, idle).await,
        Mode::Routed { tls, port_allowed } => {
            let client_idle = state.snapshot().config.timeouts.client_idle;
            match sniff(upgraded, client_idle).await {
                Some((FirstBytes::Tls, client)) => match tls {
                    Some(tls) => intercepted::serve(state, client, authority, tls).await,
                    None if port_allowed => plain(client, &authority, idle).await,
                    None => {
                        tracing::info!(host = %authority.host(), "TLS through a tunnel to a port only routes open, and no route intercepts it; closed")
                    }
                },
                Some((FirstBytes::Http, client)) => {
                    intercepted::serve_requests(state, client, authority, Scheme::HTTP).await
                }
                Some((FirstBytes::Other, client)) if port_allowed => {
                    plain(client, &authority, idle).await
                }
                Some((FirstBytes::Other, _)) => {
                    tracing::info!(host = %authority.host(), "neither HTTP nor TLS through a tunnel to a port only routes open; closed")
                }
                None => {}
            }
        }
    }
    tunnels.dec();
}

/// What a client sent first through a tunnel to a routed host.
enum FirstBytes {
    /// A TLS record (handshake content type 22).
    Tls,
    /// An HTTP/1 request line (a method is upper-case letters) or the HTTP/2 preface.
    Http,
    Other,
}

/// Reads the client's first bytes (waiting at most `wait`) and returns what they are with a
/// stream that yields them again. `None` when the client sent nothing or closed.
async fn sniff<T>(mut client: T, wait: Duration) -> Option<(FirstBytes, Prefixed<T>)>
where
    T: AsyncRead + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut first = vec![0u8; 1024];
    let n = match tokio::time::timeout(wait, client.read(&mut first)).await {
        Ok(Ok(n)) if n > 0 => n,
        _ => return None,
    };
    first.truncate(n);
    let kind = match first[0] {
        0x16 => FirstBytes::Tls,
        b'A'..=b'Z' => FirstBytes::Http,
        _ => FirstBytes::Other,
    };
    Some((
        kind,
        Prefixed {
            prefix: first,
            read: 0,
            inner: client,
        },
    ))
}

/// A stream that yields `prefix` before reading from `inner`: the bytes [`sniff`] looked at.
pub struct Prefixed<T> {
    prefix: Vec<u8>,
    read: usize,
    inner: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.read < this.prefix.len() {
            let rest = &this.prefix[this.read..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.read += n;
            if this.read == this.prefix.len() {
                this.prefix = Vec::new();
                this.read = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Prefixed<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A byte tunnel to `authority`: nothing is read or changed.
async fn plain<T>(client: T, authority: &Authority, idle: Duration)
where
    T: AsyncRead + AsyncWrite + Unpin,
{
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

/// Checks a CONNECT request: its authority, whether a route names the host (a routed host may
/// be reached on the port its route matches without listing it in `allowed_ports`), and
/// `unmatched: deny`. Returns the authority, whether it is routed, and whether its port is
/// in `allowed_ports`.
fn open(state: &State, request: &Request<Incoming>) -> Result<(Authority, bool, bool), ProxyError> {
    let authority = request
        .uri()
        .authority()
        .cloned()
        .ok_or_else(|| ProxyError::BadRequest("CONNECT needs host:port".into()))?;
    let port = authority
        .port_u16()
        .ok_or_else(|| ProxyError::BadRequest("CONNECT needs host:port".into()))?;
    let snapshot = state.snapshot();
    let routed = snapshot.routes.names_host(authority.host(), port);
    let port_allowed = snapshot.config.connect.allowed_ports.contains(&port);
    if !port_allowed && !routed {
        return Err(ProxyError::PortNotAllowed(port));
    }
    if snapshot.config.unmatched == Unmatched::Deny && !routed {
        return Err(ProxyError::Denied(authority.host().to_string()));
    }
    Ok((authority, routed, port_allowed))
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
