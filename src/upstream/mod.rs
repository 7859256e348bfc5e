//! The client every proxied request goes out through: keep-alive per origin; plain HTTP on
//! connections driven by the request itself (`plain`), https by rustls with webpki roots plus
//! an optional private CA, and HTTP/2 when an https upstream offers it.

pub mod authority;
pub mod body;
pub mod budget;
pub mod error;
pub mod idle;
pub mod pinned;
pub mod plain;
pub mod upgrade;

use std::sync::Arc;
use std::time::Duration;

use http::uri::Scheme;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

pub use self::body::{BoxError, ProxyBody};
use self::budget::ReplayBudget;
pub use self::budget::CONNECTION_BUFFER;
pub use self::error::{ClientBodyError, UpstreamError};

pub use self::pinned::PinnedAddrs;
use self::plain::PlainPool;
use self::upgrade::UpgradeConnector;
use crate::config::{Timeouts, TlsSettings};

/// Builds the rustls client config shared by upstream requests and token endpoints (ALPN is
/// left to each client: hyper-rustls offers h2 and http/1.1).
pub fn tls_config(settings: &TlsSettings) -> Result<Arc<rustls::ClientConfig>, String> {
    install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &settings.ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read tls.ca_file {}: {e}", path.display()))?;
        let mut added = 0;
        for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
            let cert = cert.map_err(|e| format!("tls.ca_file {}: {e}", path.display()))?;
            roots
                .add(cert)
                .map_err(|e| format!("tls.ca_file {}: {e}", path.display()))?;
            added += 1;
        }
        if added == 0 {
            return Err(format!(
                "tls.ca_file {} holds no PEM certificate",
                path.display()
            ));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Makes ring the process-wide rustls provider (once; later calls do nothing), so that any
/// rustls user in the process, such as a reqwest client, finds one.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The pooled upstream client. Cheap to clone.
#[derive(Clone)]
pub struct UpstreamClient {
    plain: PlainPool,
    tls: Client<HttpsConnector<HttpConnector>, ProxyBody>,
    upgrades: UpgradeConnector,
    replay_budget: Arc<ReplayBudget>,
}

impl UpstreamClient {
    /// A client using `tls` for https upstreams.
    pub fn new(tls: Arc<rustls::ClientConfig>, timeouts: &Timeouts) -> Self {
        let upgrades = UpgradeConnector::new(&tls, timeouts.connect);
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeouts.connect));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config((*tls).clone())
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let tls = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(timeouts.pool_idle)
            .pool_max_idle_per_host(1024)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        Self {
            plain: PlainPool::new(timeouts.connect, timeouts.pool_idle),
            tls,
            upgrades,
            replay_budget: Arc::default(),
        }
    }

    /// Sends an upgrade handshake (WebSocket) on a connection of its own and waits for the
    /// response head at most `timeout`; see [`upgrade`].
    pub async fn send_upgrade(
        &self,
        request: Request<ProxyBody>,
        pinned: Option<&PinnedAddrs>,
        timeout: Duration,
    ) -> Result<Response<hyper::body::Incoming>, UpstreamError> {
        self.upgrades.send(request, pinned, timeout).await
    }

    /// The bytes held for replay by all requests together (`retry.max_buffered_total`). It
    /// lives here because this client is the one object every forwarded request shares.
    pub fn replay_budget(&self) -> &Arc<ReplayBudget> {
        &self.replay_budget
    }

    /// Sends `request` (absolute URI) and waits for the response head at most `timeout`.
    /// `pinned`: the addresses an unmatched destination was checked at, the only ones it may
    /// be connected to.
    pub async fn send(
        &self,
        request: Request<ProxyBody>,
        pinned: Option<&PinnedAddrs>,
        timeout: Duration,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        if request.uri().scheme() != Some(&Scheme::HTTP) && pinned.is_some() {
            // An unmatched absolute-form `https://` request: the pooled TLS client would
            // resolve the name again (a second DNS answer could point anywhere), so it goes
            // on a connection of its own to the addresses its host was checked at, with the
            // name only as TLS server name. Rare: clients send CONNECT for https URLs.
            // Boxed: as large as a TLS handshake, it would otherwise be part of (and moved
            // with) every request's future.
            let response = Box::pin(self.upgrades.send(request, pinned, timeout)).await?;
            return Ok(response.map(|body| body.map_err(BoxError::from).boxed()));
        }
        let exchange = async {
            if request.uri().scheme() == Some(&Scheme::HTTP) {
                return self.plain.send(request, pinned).await;
            }
            match self.tls.request(request).await {
                Ok(response) => Ok(response.map(|body| body.map_err(BoxError::from).boxed())),
                Err(e) => Err(idle::exchange_error(&e)),
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or(Err(UpstreamError::Timeout(timeout)))
    }

    /// Idle plain-HTTP upstream connections held now, for tests and diagnostics.
    pub fn idle_plain_connections(&self) -> usize {
        self.plain.idle_connections()
    }
}
