//! The client every proxied request goes out through: keep-alive per origin; plain HTTP on
//! connections driven by the request itself (`plain`), https by rustls with webpki roots plus
//! an optional private CA, and HTTP/2 when an https upstream offers it.

pub mod budget;
pub mod idle;
pub mod plain;
pub mod upgrade;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::Scheme;
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use http_body_util::BodyExt;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use self::budget::ReplayBudget;
use self::plain::PlainPool;
use self::upgrade::UpgradeConnector;
use crate::config::{Timeouts, TlsSettings};

/// Most bytes hyper buffers per connection, client or upstream (and so the longest request head: 431
/// beyond it). hyper's default, about 400 KiB, would let every streaming upload hold that
/// much; nginx allows 32 KiB of headers by default.
pub const CONNECTION_BUFFER: usize = 64 * 1024;

/// Errors boxed for bodies that mix sources.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every request sent upstream and every response sent to a client.
pub type ProxyBody = BoxBody<Bytes, BoxError>;

/// Why an upstream exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No response head within the configured time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connect, TLS or protocol failure; the text is safe to show (no URL query).
    #[error("{0}")]
    Failed(String),
    /// The client's request body, streamed upstream, sent nothing for this long.
    #[error("the request body sent nothing for {0:?}")]
    ClientBodyStalled(Duration),
    /// The client's request body, streamed upstream, could not be read (bad chunk framing,
    /// the client went away).
    #[error("{0}")]
    ClientBody(String),
}

/// A client's request body could not be read while it was being sent: the client's fault,
/// not the upstream's.
#[derive(Debug, thiserror::Error)]
#[error("request body could not be read: {0}")]
pub struct ClientBodyError(#[source] pub hyper::Error);

impl UpstreamError {
    /// The error for a failed exchange: a stalled client body is the client's fault (408),
    /// anything else the upstream's.
    fn from_exchange(e: &(dyn std::error::Error + 'static)) -> Self {
        match idle::Stalled::find(e) {
            Some(stalled) if stalled.side == idle::Side::Client => {
                UpstreamError::ClientBodyStalled(stalled.idle)
            }
            _ => match find::<ClientBodyError>(e) {
                Some(client) => UpstreamError::ClientBody(client.to_string()),
                None => UpstreamError::Failed(describe(e)),
            },
        }
    }
}

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
        timeout: Duration,
    ) -> Result<Response<hyper::body::Incoming>, UpstreamError> {
        self.upgrades.send(request, timeout).await
    }

    /// The bytes held for replay by all requests together (`retry.max_buffered_total`). It
    /// lives here because this client is the one object every forwarded request shares.
    pub fn replay_budget(&self) -> &Arc<ReplayBudget> {
        &self.replay_budget
    }

    /// Sends `request` (absolute URI) and waits for the response head at most `timeout`.
    pub async fn send(
        &self,
        request: Request<ProxyBody>,
        timeout: Duration,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let exchange = async {
            if request.uri().scheme() == Some(&Scheme::HTTP) {
                return self.plain.send(request).await;
            }
            match self.tls.request(request).await {
                Ok(response) => Ok(response.map(|body| body.map_err(BoxError::from).boxed())),
                Err(e) => Err(UpstreamError::from_exchange(&e)),
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

/// The error of type `T` among `e` and its causes.
fn find<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut current = Some(e);
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<T>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

/// The error and its causes on one line; certificate problems read as such.
fn describe(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = Vec::new();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.contains(&text) {
            parts.push(text);
        }
        source = s.source();
    }
    if parts.is_empty() {
        parts.push(e.to_string());
    }
    parts.join(": ")
}
