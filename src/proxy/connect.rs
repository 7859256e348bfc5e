//! Opening an admitted CONNECT (`admission.rs` decided where it may go and how): to a host no
//! route names, a byte tunnel (closed after an idle period), answered 200 only once the
//! upstream connection is open. To a host a route names: the client's first bytes decide — a
//! TLS ClientHello is decrypted (`intercepted.rs`) when the route says `intercept: true`,
//! plain HTTP (undici tunnels `http://` URLs too) is served request by request, and anything
//! else is only tunnelled to a port in `allowed_ports`. Requests read inside a tunnel go
//! through the same pipeline as any other, on a connection context of their own. A tunnel is
//! its client connection: counted, and closed when it is the idlest at `max_connections`.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::uri::Scheme;
use http::{Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::activity::CountedWhileAlive;
use super::admission::{TunnelKind, TunnelPlan};
use super::context::{Connection, Handler, RequestContext, Tunnel};
use super::intercepted;
use super::respond::ProxyError;
use super::splice::splice;
use crate::upstream::{body, ProxyBody};

/// Opens an admitted tunnel: 200 once it can carry bytes — the upstream TCP connection is
/// open (within `timeouts.connect`), or the proxy itself reads what the client sends — else
/// the error.
pub(crate) async fn open(
    ctx: &RequestContext,
    plan: TunnelPlan,
    request: Request<Incoming>,
    pipeline: Handler,
) -> Result<Response<ProxyBody>, ProxyError> {
    let TunnelPlan { authority, kind } = plan;
    let upstream = match kind {
        TunnelKind::Intercept(tls) => Upstream::Intercepted(tls),
        TunnelKind::HttpOnly => Upstream::HttpOnly,
        TunnelKind::Open { addrs, routed } => Upstream::Plain {
            stream: connect_upstream(ctx, &addrs, authority.host()).await?,
            routed,
        },
    };
    let inner = Connection {
        state: Arc::clone(&ctx.conn.state),
        peer: ctx.conn.peer,
        activity: Arc::clone(&ctx.conn.activity),
        shutdown: ctx.conn.shutdown.clone(),
        local_port: None,
        tunnel: Some(Tunnel {
            authority,
            scheme: Scheme::HTTP,
            client: ctx.client.clone(),
        }),
    };
    tokio::spawn(tunnel(inner, request, upstream, pipeline));
    let mut response = Response::new(body::empty());
    *response.status_mut() = StatusCode::OK;
    Ok(response)
}

/// What the client's side of a tunnel is joined to.
enum Upstream {
    /// A routed host that a route intercepts: TLS is decrypted with this server config, plain
    /// HTTP is read as is; each request inside is routed on its own.
    Intercepted(Arc<rustls::ServerConfig>),
    /// Spliced, byte for byte, to this open connection — unless the host is routed and the
    /// client speaks plain HTTP, which is then served like forward-proxy traffic.
    Plain { stream: TcpStream, routed: bool },
    /// A routed host on a port only its route opens: plain HTTP is served, nothing else.
    HttpOnly,
}

/// Opens the TCP connection a plain tunnel will splice to, within `timeouts.connect`, to the
/// addresses admission checked (a second DNS answer cannot differ). Every connect failure
/// reads the same.
async fn connect_upstream(
    ctx: &RequestContext,
    addrs: &[std::net::SocketAddr],
    host: &str,
) -> Result<TcpStream, ProxyError> {
    let timeout = ctx.snapshot.config.timeouts.connect;
    let attempt = async {
        let mut last = None;
        for addr in addrs {
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
        Err(_) => Err(ProxyError::UpstreamTimeout(
            humantime::format_duration(timeout).to_string(),
        )),
    }
}

/// Runs one tunnel after the 200: decrypted and proxied request by request, or spliced.
async fn tunnel(
    mut conn: Connection,
    request: Request<Incoming>,
    upstream: Upstream,
    pipeline: Handler,
) {
    let upgraded = match hyper::upgrade::on(request).await {
        Ok(u) => TokioIo::new(u),
        Err(e) => {
            tracing::debug!(error = %e, "CONNECT upgrade failed");
            return;
        }
    };
    let _counted = CountedWhileAlive::new(conn.state.metrics.tunnels.clone());
    let config = conn.state.snapshot().config.clone();
    let (idle, client_idle) = (config.connect.idle_timeout, config.timeouts.client_idle);
    let host = conn
        .tunnel
        .as_ref()
        .map(|t| t.authority.host().to_string())
        .unwrap_or_default();
    let activity = Arc::clone(&conn.activity);
    let closed = |e: std::io::Error| tracing::debug!(error = %e, host, "tunnel closed");
    match upstream {
        Upstream::Plain {
            stream,
            routed: false,
        } => {
            if let Err(e) = splice(upgraded, stream, idle, &activity).await {
                closed(e);
            }
        }
        other => match (sniff(upgraded, client_idle).await, other) {
            (None, _) => {}
            (Some((FirstBytes::Http, io)), _) => {
                intercepted::serve_requests(Arc::new(conn), io, pipeline).await
            }
            (Some((FirstBytes::Tls, io)), Upstream::Intercepted(tls)) => {
                if let Some(t) = &mut conn.tunnel {
                    t.scheme = Scheme::HTTPS;
                }
                intercepted::serve(Arc::new(conn), io, tls, pipeline).await
            }
            (Some((_, io)), Upstream::Plain { stream, .. }) => {
                if let Err(e) = splice(io, stream, idle, &activity).await {
                    closed(e);
                }
            }
            (Some(_), _) => {
                tracing::info!(host, "a tunnel to a routed host carried neither HTTP nor TLS it could decrypt; closed")
            }
        },
    }
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
