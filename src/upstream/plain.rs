//! Plain-HTTP upstreams: connections over TCP for the shared pool (`pool.rs`), and the one
//! way every upstream connection (plain, TLS, upgrade) opens its TCP socket.

use std::time::Duration;

use http::uri::{Authority, Scheme};
use tokio::net::TcpStream;

use super::error::UpstreamError;
use super::pinned::PinnedAddrs;
use super::pool::{Connected, Pool, Transport};

/// TCP keep-alive probes on upstream connections, so that a dead peer is noticed.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// The pool of plain-HTTP upstream connections.
pub(crate) type PlainPool = Pool<Tcp>;

/// Opens plain TCP connections for HTTP/1.1.
pub(crate) struct Tcp {
    connect_timeout: Duration,
}

impl Tcp {
    /// Connections opened within `connect_timeout`.
    pub(crate) fn new(connect_timeout: Duration) -> Self {
        Self { connect_timeout }
    }
}

impl Transport for Tcp {
    type Stream = TcpStream;
    const SCHEME: Scheme = Scheme::HTTP;
    const DEFAULT_PORT: u16 = 80;
    /// Finishing abandoned exchanges: a new TCP connection is cheap: an abandoned exchange closes its connection.
    const FINISH_ABANDONED: bool = false;

    async fn connect(
        &self,
        origin: &Authority,
        pinned: Option<&PinnedAddrs>,
    ) -> Result<Connected<TcpStream>, UpstreamError> {
        let stream = open_tcp(origin, Self::DEFAULT_PORT, pinned, self.connect_timeout).await?;
        Ok(Connected::Http1(stream))
    }
}

/// A TCP connection to `origin` (`default_port` when it names none), or to the addresses its
/// host was checked at, within `timeout`; no Nagle delay, keep-alive probes on.
pub(crate) async fn open_tcp(
    origin: &Authority,
    default_port: u16,
    pinned: Option<&PinnedAddrs>,
    timeout: Duration,
) -> Result<TcpStream, UpstreamError> {
    let host = origin.host().trim_start_matches('[').trim_end_matches(']');
    let port = origin.port_u16().unwrap_or(default_port);
    let connecting = async {
        match pinned {
            Some(pinned) => TcpStream::connect(&pinned.0[..]).await,
            None => TcpStream::connect((host, port)).await,
        }
    };
    let stream = match tokio::time::timeout(timeout, connecting).await {
        Err(_) => {
            return Err(UpstreamError::Failed(format!(
                "tcp connect error: no connection within {timeout:?}"
            )))
        }
        Ok(Err(e)) => return Err(UpstreamError::Failed(format!("tcp connect error: {e}"))),
        Ok(Ok(stream)) => stream,
    };
    let _ = stream.set_nodelay(true);
    let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
    Ok(stream)
}
