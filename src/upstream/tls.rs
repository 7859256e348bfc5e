//! HTTPS upstreams: TLS connections for the shared pool (`pool.rs`), offering `h2` and
//! `http/1.1` by ALPN, and the TLS server name every upstream handshake uses.
//!
//! A server that chooses HTTP/1.1 (or no ALPN) gets a pooled connection driven by the request
//! itself, as plain HTTP does. One that chooses `h2` is remembered: its requests go to
//! hyper-util's pooled client, which multiplexes them on one connection (`identity.rs`,
//! `TlsLegs`). The request that found out goes on the new connection itself (HTTP/2, driven
//! by a task of its own, closed after that exchange) rather than on a second handshake: a
//! server that refuses the client certificate after the handshake (TLS 1.3) sees one refused
//! connection per request, not two.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use foldhash::fast::RandomState;
use http::uri::{Authority, Scheme};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::body::ProxyBody;
use super::error::{describe, UpstreamError};
use super::pinned::PinnedAddrs;
use super::plain::open_tcp;
use super::pool::{Connected, Transport, MAX_IDLE_ORIGINS};

/// Opens TLS connections offering HTTP/2 and HTTP/1.1, with one client configuration (its
/// trust and its client certificate, if any).
pub(crate) struct Tls {
    connector: TlsConnector,
    connect_timeout: Duration,
    /// Origins that chose `h2`, by authority (randomly seeded: clients may choose the keys).
    http2_origins: Mutex<HashSet<Box<str>, RandomState>>,
    max_http2_origins: usize,
}

impl Tls {
    /// Connections made with `tls` (ALPN replaced), their TCP part within `connect_timeout`.
    pub(crate) fn new(tls: &rustls::ClientConfig, connect_timeout: Duration) -> Self {
        Self::with_max_http2_origins(tls, connect_timeout, MAX_IDLE_ORIGINS)
    }

    fn with_max_http2_origins(
        tls: &rustls::ClientConfig,
        connect_timeout: Duration,
        max: usize,
    ) -> Self {
        let mut tls = tls.clone();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Self {
            connector: TlsConnector::from(Arc::new(tls)),
            connect_timeout,
            http2_origins: Mutex::default(),
            max_http2_origins: max,
        }
    }

    fn speaks_http2(&self, origin: &str) -> bool {
        self.lock().contains(origin)
    }

    /// Remembers that `origin` chose `h2`. The set is bounded like the pool's map (clients
    /// name origins through `unmatched: pass`): when full, one origin is forgotten, which
    /// costs it one more unused handshake.
    fn remember_http2(&self, origin: &str) {
        let mut origins = self.lock();
        if origins.len() >= self.max_http2_origins {
            let forgotten = origins.iter().next().cloned();
            if let Some(forgotten) = forgotten {
                origins.remove(&forgotten);
            }
        }
        origins.insert(origin.into());
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<Box<str>, RandomState>> {
        self.http2_origins
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Origins remembered as speaking HTTP/2, for tests.
    #[cfg(test)]
    fn http2_origins(&self) -> usize {
        self.lock().len()
    }
}

impl Transport for Tls {
    type Stream = TlsStream<TcpStream>;
    const SCHEME: Scheme = Scheme::HTTPS;
    const DEFAULT_PORT: u16 = 443;
    /// Finishing abandoned exchanges: a new connection costs a TLS handshake.
    const FINISH_ABANDONED: bool = true;

    async fn connect(
        &self,
        origin: &Authority,
        pinned: Option<&PinnedAddrs>,
    ) -> Result<Connected<Self::Stream>, UpstreamError> {
        if self.speaks_http2(origin.as_str()) {
            return Ok(Connected::Http2(None));
        }
        let name = server_name(origin)?;
        let tcp = open_tcp(origin, Self::DEFAULT_PORT, pinned, self.connect_timeout).await?;
        let stream = self
            .connector
            .connect(name, tcp)
            .await
            .map_err(|e| UpstreamError::Failed(describe(&e)))?;
        if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
            tracing::debug!(
                "the upstream chose HTTP/2; its requests go to the multiplexing client"
            );
            self.remember_http2(origin.as_str());
            return Ok(Connected::Http2(Some(Box::new(stream))));
        }
        Ok(Connected::Http1(stream))
    }
}

/// Sends `request` (absolute form) on `stream`, a new connection whose server chose HTTP/2,
/// and returns the response head. The connection runs in a task of its own and closes when
/// this exchange is over.
pub(crate) async fn send_on_new_http2(
    stream: Box<TlsStream<TcpStream>>,
    request: Request<ProxyBody>,
) -> Result<Response<Incoming>, hyper::Error> {
    let (mut sender, connection) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(stream))
        .await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "an upstream HTTP/2 connection ended with an error");
        }
    });
    sender.send_request(request).await
}

/// The name a TLS handshake with `origin` checks the certificate against: its host, a DNS
/// name or an IP address (without IPv6 brackets).
pub(crate) fn server_name(origin: &Authority) -> Result<ServerName<'static>, UpstreamError> {
    let host = origin.host().trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|_| UpstreamError::Failed("the upstream host is not a TLS name".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_http2_origins_are_bounded_and_the_newest_is_kept() {
        let config = crate::upstream::tls_config(&crate::config::TlsSettings::default());
        let tls = Tls::with_max_http2_origins(&config.unwrap(), Duration::from_secs(1), 2);
        for origin in ["a.test", "b.test", "c.test"] {
            tls.remember_http2(origin);
            assert!(tls.speaks_http2(origin), "{origin}");
        }
        assert_eq!(tls.http2_origins(), 2);
    }

    #[test]
    fn server_names_are_hosts_without_port_or_brackets() {
        for (authority, name) in [
            ("api.test:8443", "api.test"),
            ("127.0.0.1:443", "127.0.0.1"),
            ("[::1]:8443", "::1"),
        ] {
            let authority: Authority = authority.parse().unwrap();
            let found = server_name(&authority).unwrap();
            assert_eq!(found.to_str(), name);
        }
    }
}
