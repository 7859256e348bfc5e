//! Upstream TLS by client certificate (mutual TLS). Each certificate gets clients of its own —
//! the HTTP/1.1 pool, the HTTP/2 client and an upgrade connector — built from the shared trust settings, so a connection
//! made with one certificate (or with none) is never taken out of the pool for a request that
//! must present another. Each also gets its own TLS session store: a resumed session carries
//! the client authentication of the handshake it came from (rustls already refuses to resume
//! across certificate resolvers; a store of its own also keeps one certificate's sessions
//! from pushing out another's).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use futures_util::FutureExt;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::body::{BoxError, ProxyBody};
use super::error::UpstreamError;
use super::pool::{Outcome, Pool};
use super::tls::{send_on_new_http2, Tls};
use super::upgrade::UpgradeConnector;
use super::Deadline;
use crate::config::Timeouts;
use crate::vocab::client_cert::ClientCert;

/// The ways to an https upstream with one TLS client configuration: HTTP/1.1 connections
/// driven by the request (`pool.rs`), hyper-util's pooled client for origins that chose
/// HTTP/2, and connections of their own for upgrades. Cheap to clone.
#[derive(Clone)]
pub(crate) struct TlsLegs {
    pub(crate) http1: Pool<Tls>,
    http2: Client<HttpsConnector<HttpConnector>, ProxyBody>,
    pub(crate) upgrades: UpgradeConnector,
}

impl TlsLegs {
    pub(crate) fn new(tls: &rustls::ClientConfig, timeouts: &Timeouts) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(timeouts.connect));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let http2 = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(timeouts.pool_idle)
            .pool_max_idle_per_host(1024)
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .build(https);
        Self {
            http1: Pool::new(Tls::new(tls, timeouts.connect), timeouts.pool_idle),
            http2,
            upgrades: UpgradeConnector::new(tls, timeouts.connect),
        }
    }

    /// Sends `request` (absolute `https://` URI) on a pooled HTTP/1.1 connection, or through
    /// the HTTP/2 client when its origin chose `h2`; see [`Pool::send`].
    ///
    /// Not an `async fn`: the request moves straight into the pool's future instead of also
    /// being kept in this one (a few hundred bytes that every await level would move).
    pub(crate) fn send(
        &self,
        request: Request<ProxyBody>,
        deadline: Deadline,
    ) -> impl Future<Output = Result<Response<ProxyBody>, UpstreamError>> + Send + '_ {
        self.http1
            .send(request, None, deadline)
            .then(move |sent| async move {
                match sent? {
                    Outcome::Answered(response) => Ok(response),
                    // Boxed: the HTTP/2 leg's future would otherwise be part of (and moved with)
                    // every HTTP/1.1 request's.
                    Outcome::SpeaksHttp2(request, new) => {
                        let http2 = Box::pin(self.send_http2(request, new));
                        tokio::time::timeout_at(deadline.at, http2)
                            .await
                            .unwrap_or_else(|_| Err(deadline.passed()))
                    }
                }
            })
    }

    /// Sends `request` to an origin that chose HTTP/2: on `new`, the connection that told so,
    /// or else through the multiplexing client.
    async fn send_http2(
        &self,
        request: Request<ProxyBody>,
        new: Option<Box<TlsStream<TcpStream>>>,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let response = match new {
            Some(new) => send_on_new_http2(new, request)
                .await
                .map_err(|e| super::idle::exchange_error(&e))?,
            None => self
                .http2
                .request(request)
                .await
                .map_err(|e| super::idle::exchange_error(&e))?,
        };
        Ok(response.map(|body| body.map_err(BoxError::from).boxed()))
    }
}

/// The legs of every client certificate in use, by certificate. An entry lives while a
/// config names its certificate (a reload that keeps the files keeps the pool); entries of
/// certificates no config holds any more are dropped when another one is added.
pub(crate) struct IdentityLegs {
    base: Arc<rustls::ClientConfig>,
    timeouts: Timeouts,
    legs: Mutex<HashMap<[u8; 32], HeldLegs>>,
}

/// One certificate's legs, and the certificate as a config holds it (while any does).
struct HeldLegs {
    cert: Weak<ClientCert>,
    legs: Arc<TlsLegs>,
}

impl IdentityLegs {
    /// Legs trusting what `base` trusts.
    pub(crate) fn new(base: Arc<rustls::ClientConfig>, timeouts: &Timeouts) -> Self {
        Self {
            base,
            timeouts: timeouts.clone(),
            legs: Mutex::default(),
        }
    }

    /// The legs that present `cert`.
    pub(crate) fn for_cert(&self, cert: &Arc<ClientCert>) -> Arc<TlsLegs> {
        let mut held = self.legs.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(found) = held.get_mut(&cert.id()) {
            if found.cert.strong_count() == 0 {
                found.cert = Arc::downgrade(cert);
            }
            return Arc::clone(&found.legs);
        }
        held.retain(|_, h| h.cert.strong_count() > 0);
        let legs = Arc::new(TlsLegs::new(&presenting(&self.base, cert), &self.timeouts));
        held.insert(
            cert.id(),
            HeldLegs {
                cert: Arc::downgrade(cert),
                legs: Arc::clone(&legs),
            },
        );
        tracing::debug!(cert = %cert.short_id(), "upstream clients for a client certificate");
        legs
    }

    /// Certificates with legs now, for tests and diagnostics.
    pub(crate) fn len(&self) -> usize {
        self.legs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

/// `base` presenting `cert` when the server asks for a client certificate, with a session
/// store of its own.
fn presenting(base: &rustls::ClientConfig, cert: &ClientCert) -> rustls::ClientConfig {
    let mut config = base.clone();
    config.client_auth_cert_resolver =
        Arc::new(rustls::sign::SingleCertAndKey::from(cert.certified_key()));
    config.resumption = rustls::client::Resumption::default();
    config
}
