//! Upstream TLS by client certificate (mutual TLS). Each certificate gets clients of its own —
//! the HTTP/1.1 pool, the HTTP/2 client and an upgrade connector — built from the shared trust settings, so a connection
//! made with one certificate (or with none) is never taken out of the pool for a request that
//! must present another. Each also gets its own TLS session store: a resumed session carries
//! the client authentication of the handshake it came from (rustls already refuses to resume
//! across certificate resolvers; a store of its own also keeps one certificate's sessions
//! from pushing out another's).

use std::collections::HashMap;
use std::future::{ready, Future};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use futures_util::future::Either;
use futures_util::FutureExt;
use http::{Request, Response};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::body::ProxyBody;
use super::deadline::Deadline;
use super::error::UpstreamError;
use super::pool::{Outcome, Pool};
use super::tls::{send_on_new_http2, Tls};
use super::upgrade::UpgradeConnector;
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
        type Http2Leg<'a> =
            Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, UpstreamError>> + Send + 'a>>;
        self.http1
            .send(request, None, deadline)
            .then(move |sent| match sent {
                Ok(Outcome::Answered(response)) => Either::Left(ready(Ok(response))),
                Err(e) => Either::Left(ready(Err(e))),
                // Boxed, whole: the HTTP/2 leg's future (its deadline's timer, the request it
                // hands over) would otherwise be part of, and moved with, every HTTP/1.1
                // request's (~170 bytes at every level above).
                Ok(Outcome::SpeaksHttp2(request, new)) => {
                    let leg: Http2Leg<'_> = Box::pin(async move {
                        let response = deadline.bound(self.send_http2(request, new)).await?;
                        Ok(response.map(|body| super::idle::upstream_body(body, deadline)))
                    });
                    Either::Right(leg)
                }
            })
    }

    /// Sends `request` to an origin that chose HTTP/2: on `new`, the connection that told so,
    /// or else through the multiplexing client.
    async fn send_http2(
        &self,
        request: Request<ProxyBody>,
        new: Option<Box<TlsStream<TcpStream>>>,
    ) -> Result<Response<hyper::body::Incoming>, UpstreamError> {
        Ok(match new {
            Some(new) => send_on_new_http2(new, request)
                .await
                .map_err(|e| super::idle::exchange_error(&e))?,
            None => self
                .http2
                .request(request)
                .await
                .map_err(|e| super::idle::exchange_error(&e))?,
        })
    }
}

/// The legs of every client certificate in use, by certificate. An entry lives while a
/// config names its certificate (a reload that keeps the files keeps the pool); entries of
/// certificates no config holds any more are dropped when another one is added. Requests
/// read the map without a lock; adding a certificate (or re-holding one a reload read
/// again) replaces the map whole, one adder at a time.
pub(crate) struct IdentityLegs {
    base: Arc<rustls::ClientConfig>,
    timeouts: Timeouts,
    legs: ArcSwap<HashMap<[u8; 32], HeldLegs>>,
    adding: Mutex<()>,
}

/// One certificate's legs, and the certificate as a config holds it (while any does).
#[derive(Clone)]
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
            legs: ArcSwap::default(),
            adding: Mutex::default(),
        }
    }

    /// The legs that present `cert`: found without a lock while a config holds the
    /// certificate, else added.
    pub(crate) fn for_cert(&self, cert: &Arc<ClientCert>) -> Arc<TlsLegs> {
        match self.held(cert) {
            Some(legs) => legs,
            None => self.add(cert),
        }
    }

    /// The legs of `cert` while the config that made them still holds it.
    fn held(&self, cert: &ClientCert) -> Option<Arc<TlsLegs>> {
        self.legs
            .load()
            .get(&cert.id())
            .filter(|h| h.cert.strong_count() > 0)
            .map(|h| Arc::clone(&h.legs))
    }

    /// Adds legs for `cert`, or points the existing ones at it (the config that made them is
    /// gone, a new one read the same certificate).
    fn add(&self, cert: &Arc<ClientCert>) -> Arc<TlsLegs> {
        let _adding = self.adding.lock().unwrap_or_else(PoisonError::into_inner);
        let mut held = HashMap::clone(&self.legs.load());
        let legs = match held.get(&cert.id()) {
            Some(found) => Arc::clone(&found.legs),
            None => {
                held.retain(|_, h| h.cert.strong_count() > 0);
                tracing::debug!(cert = %cert.short_id(), "upstream clients for a client certificate");
                Arc::new(TlsLegs::new(&presenting(&self.base, cert), &self.timeouts))
            }
        };
        held.insert(
            cert.id(),
            HeldLegs {
                cert: Arc::downgrade(cert),
                legs: Arc::clone(&legs),
            },
        );
        self.legs.store(Arc::new(held));
        legs
    }

    /// Certificates with legs now, for tests and diagnostics.
    pub(crate) fn len(&self) -> usize {
        self.legs.load().len()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn timeouts() -> Timeouts {
        let s = Duration::from_secs(5);
        Timeouts {
            connect: s,
            upstream: s,
            pool_idle: s,
            client_idle: s,
            drain: s,
            client_body: s,
            upstream_body_idle: s,
        }
    }

    /// A self-signed certificate `name` and its key, written to `dir`.
    fn write_cert(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![format!("{name}.test")])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let files = (
            dir.join(format!("{name}.pem")),
            dir.join(format!("{name}.key")),
        );
        std::fs::write(&files.0, cert.pem()).unwrap();
        std::fs::write(&files.1, key.serialize_pem()).unwrap();
        files
    }

    fn load((cert, key): &(std::path::PathBuf, std::path::PathBuf)) -> Arc<ClientCert> {
        Arc::new(ClientCert::load(cert, key).unwrap())
    }

    /// One set of legs per certificate, found again without the adding lock (held here by
    /// the test) while a config holds the certificate; the same legs for the certificate
    /// read again by a new config once the old one is gone; dropped once no config holds
    /// it and another certificate is added.
    #[tokio::test]
    async fn legs_follow_the_certificates_configs_hold() {
        crate::upstream::install_crypto_provider();
        let base = rustls::ClientConfig::builder()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let identities = IdentityLegs::new(Arc::new(base), &timeouts());
        let dir = tempfile::tempdir().unwrap();
        let (a_files, b_files) = (write_cert(dir.path(), "a"), write_cert(dir.path(), "b"));

        let a = load(&a_files);
        let legs = identities.for_cert(&a);
        {
            let _adding = identities.adding.lock().unwrap();
            let found = identities.held(&a).unwrap();
            assert!(Arc::ptr_eq(&legs, &found), "read without the lock");
        }
        assert!(Arc::ptr_eq(&legs, &identities.for_cert(&a)));

        drop(a);
        let reread = load(&a_files);
        assert!(identities.held(&reread).is_none(), "its config is gone");
        assert!(
            Arc::ptr_eq(&legs, &identities.for_cert(&reread)),
            "the same certificate keeps its pool"
        );
        assert!(identities.held(&reread).is_some(), "held again");

        drop(reread);
        let b = load(&b_files);
        let b_legs = identities.for_cert(&b);
        assert!(!Arc::ptr_eq(&legs, &b_legs));
        assert_eq!(
            identities.len(),
            1,
            "the certificate no config holds is gone"
        );
    }
}
