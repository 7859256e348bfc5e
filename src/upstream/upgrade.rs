//! Upstream side of a protocol upgrade (WebSocket): one dedicated HTTP/1.1 connection per
//! handshake, never pooled, because after `101 Switching Protocols` it belongs to the upgraded
//! stream. `https`/`wss` upstreams get TLS with the same trust roots as every other request,
//! offering only `http/1.1` (an upgrade does not exist in HTTP/2).

use std::sync::Arc;
use std::time::Duration;

use http::uri::{Authority, Scheme};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};

use super::body::ProxyBody;
use super::deadline::Deadline;
use super::error::{describe, UpstreamError};
use super::pinned::PinnedAddrs;
use super::plain::{open_tcp, Tcp};
use super::pool::Transport;
use super::tls::{server_name, Tls};

/// Opens upgrade connections. Cheap to clone.
#[derive(Clone)]
pub struct UpgradeConnector {
    tls: Arc<rustls::ClientConfig>,
    connect_timeout: Duration,
}

impl UpgradeConnector {
    /// A connector trusting what `tls` trusts, offering HTTP/1.1 only.
    pub fn new(tls: &rustls::ClientConfig, connect_timeout: Duration) -> Self {
        let mut tls = tls.clone();
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self {
            tls: Arc::new(tls),
            connect_timeout,
        }
    }

    /// Sends the handshake `request` (absolute URI) on a new connection and returns the
    /// response head by `deadline`; after a 101, `hyper::upgrade::on(&mut response)` yields
    /// the stream.
    pub async fn send(
        &self,
        request: Request<ProxyBody>,
        pinned: Option<&PinnedAddrs>,
        deadline: Deadline,
    ) -> Result<Response<Incoming>, UpstreamError> {
        let (request, origin, scheme) = origin_form(request)?;
        let exchange = async {
            let port = default_port(&scheme);
            let stream = open_tcp(&origin, port, pinned, self.connect_timeout).await?;
            if scheme == Scheme::HTTPS {
                let tls = tokio_rustls::TlsConnector::from(Arc::clone(&self.tls))
                    .connect(server_name(&origin)?, stream)
                    .await
                    .map_err(|e| UpstreamError::Failed(describe(&e)))?;
                handshake(tls, request).await
            } else {
                handshake(stream, request).await
            }
        };
        deadline.bound(exchange).await
    }
}

async fn handshake<S>(
    stream: S,
    request: Request<ProxyBody>,
) -> Result<Response<Incoming>, UpstreamError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| UpstreamError::Failed(describe(&e)))?;
    tokio::spawn(async move {
        if let Err(e) = connection.with_upgrades().await {
            tracing::debug!(error = %e, "upgrade connection ended with an error");
        }
    });
    sender
        .send_request(request)
        .await
        .map_err(|e| UpstreamError::Failed(describe(&e)))
}

/// The request in origin form with `Host` set from its absolute URI, and where it goes.
fn origin_form(
    mut request: Request<ProxyBody>,
) -> Result<(Request<ProxyBody>, Authority, Scheme), UpstreamError> {
    let scheme = request.uri().scheme().cloned().unwrap_or(Scheme::HTTP);
    let origin = super::pool::origin_form(&mut request)?;
    let host = super::pool::host_header(&origin, default_port(&scheme))?;
    request.headers_mut().insert(http::header::HOST, host);
    Ok((request, origin, scheme))
}

fn default_port(scheme: &Scheme) -> u16 {
    if *scheme == Scheme::HTTPS {
        Tls::DEFAULT_PORT
    } else {
        Tcp::DEFAULT_PORT
    }
}
