//! `CONNECT host:port`. To a host no route names: a byte tunnel (closed after an idle period),
//! only to `connect.allowed_ports`, never to the proxy itself or link-local addresses, and
//! answered 200 only once the upstream connection is open. To a host a route names, on any
//! port the route matches: the client's first bytes decide — a TLS ClientHello is decrypted
//! (`intercepted.rs`) when the route says `intercept: true`, plain HTTP (undici tunnels
//! `http://` URLs too) is served request by request like forward-proxy traffic, and anything
//! else is only tunnelled to a port in `allowed_ports`.

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
use super::splice::splice;
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
        Ok((authority, routed, port_allowed)) => match interception(&state, &authority) {
            Ok(Some(tls)) => Ok((authority, Upstream::Intercepted(tls))),
            Ok(None) if routed && !port_allowed => Ok((authority, Upstream::HttpOnly)),
            Ok(None) => connect_upstream(&state, &authority)
                .await
                .map(|stream| (authority, Upstream::Plain { stream, routed })),
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
    /// A routed host that a route intercepts: TLS is decrypted with this server config, plain
    /// HTTP is read as is; each request inside is routed on its own.
    Intercepted(Arc<rustls::ServerConfig>),
    /// Spliced, byte for byte, to this open connection — unless the host is routed and the
    /// client speaks plain HTTP, which is then served like forward-proxy traffic.
    Plain { stream: TcpStream, routed: bool },
    /// A routed host on a port only its route opens: plain HTTP is served, nothing else.
    HttpOnly,
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
/// nor what the `unmatched_*` rules refuse for a host no route names — and the checked
/// address is the one connected to (a second DNS answer cannot differ). Every connect failure reads the same.
async fn connect_upstream(state: &State, authority: &Authority) -> Result<TcpStream, ProxyError> {
    let snapshot = state.snapshot();
    let timeout = snapshot.config.timeouts.connect;
    let host = authority.host();
    let port = authority.port_u16().unwrap_or(443);
    // Both port rules hold for an unrouted tunnel: `open` checked `connect.allowed_ports`,
    // `unmatched_ports` is checked here.
    let unmatched =
        (!snapshot.routes.names_host(host, port)).then_some(&snapshot.config.unmatched_reach);
    let addrs = super::dispatch::allowed_destination(state, host, port, unmatched).await?;
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
    mut request: Request<Incoming>,
    authority: Authority,
    upstream: Upstream,
) {
    let shutdown = request
        .extensions_mut()
        .remove::<super::activity::ShutdownSignal>();
    let upgraded = match hyper::upgrade::on(request).await {
        Ok(u) => TokioIo::new(u),
        Err(e) => {
            tracing::debug!(error = %e, "CONNECT upgrade failed");
            return;
        }
    };
    let tunnels = state.metrics.tunnels.clone();
    tunnels.inc();
    let snapshot = state.snapshot();
    let idle = snapshot.config.connect.idle_timeout;
    let client_idle = snapshot.config.timeouts.client_idle;
    drop(snapshot);
    match upstream {
        Upstream::Plain {
            stream,
            routed: false,
        } => {
            if let Err(e) = splice(upgraded, stream, idle).await {
                tracing::debug!(error = %e, host = %authority.host(), "tunnel closed");
            }
        }
        other => match (sniff(upgraded, client_idle).await, other) {
            (None, _) => {}
            (Some((FirstBytes::Http, io)), _) => {
                intercepted::serve_requests(state, client, io, authority, Scheme::HTTP, shutdown)
                    .await
            }
            (Some((FirstBytes::Tls, io)), Upstream::Intercepted(tls)) => {
                intercepted::serve(state, client, io, authority, tls, shutdown).await
            }
            (Some((_, io)), Upstream::Plain { stream, .. }) => {
                if let Err(e) = splice(io, stream, idle).await {
                    tracing::debug!(error = %e, host = %authority.host(), "tunnel closed");
                }
            }
            (Some(_), _) => {
                tracing::info!(host = %authority.host(), "a tunnel to a routed host carried neither HTTP nor TLS it could decrypt; closed")
            }
        },
    }
    tunnels.dec();
}

/// The tunnel's `host:port`, refused when it is malformed (no port, empty host, user info)
/// or not allowed. A host some route names (a *routed* host) may be reached on the port its
/// route matches without listing it in `connect.allowed_ports`; other hosts need an allowed
/// port and `unmatched: pass`. Returns the authority, whether it is routed, and whether its
/// port is in `allowed_ports`.
fn open(state: &State, request: &Request<Incoming>) -> Result<(Authority, bool, bool), ProxyError> {
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
