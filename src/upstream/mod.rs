//! The client every proxied request goes out through: keep-alive per origin on HTTP/1.1
//! connections driven by the request itself (`pool`), over TCP (`plain`) or TLS (`tls`:
//! rustls with webpki roots plus an optional private CA), and hyper-util's pooled client for
//! https upstreams that choose HTTP/2.

pub mod authority;
pub mod body;
pub mod budget;
mod conn_waker;
mod deadline;
pub mod error;
mod identity;
pub mod idle;
pub mod pinned;
mod plain;
mod pool;
mod tls;
pub mod upgrade;

use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use futures_util::future::Either;
use futures_util::FutureExt;
use http::uri::Scheme;
use http::{Request, Response};

pub use self::body::{BoxError, ProxyBody};
use self::budget::ReplayBudget;
pub use self::budget::CONNECTION_BUFFER;
pub use self::deadline::Deadline;
pub use self::error::{ClientBodyError, UpstreamError};

use self::identity::{IdentityLegs, TlsLegs};
use self::idle::upstream_body;
pub use self::pinned::PinnedAddrs;
use self::plain::{PlainPool, Tcp};
use self::pool::Outcome;
use crate::config::{Timeouts, TlsSettings};
use crate::vocab::client_cert::{pem_certificates, ClientCert};

/// Builds the rustls client config shared by upstream requests and token endpoints (ALPN is
/// left to each client: the pool's TLS transport offers h2 and http/1.1, upgrades http/1.1).
pub fn tls_config(settings: &TlsSettings) -> Result<Arc<rustls::ClientConfig>, String> {
    install_crypto_provider();
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &settings.ca_file {
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read tls.ca_file {}: {e}", path.display()))?;
        let certs =
            pem_certificates(&pem).map_err(|e| format!("tls.ca_file {}: {e}", path.display()))?;
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| format!("tls.ca_file {}: {e}", path.display()))?;
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
    /// https without a client certificate.
    tls: Arc<TlsLegs>,
    /// https presenting a route's client certificate: clients of their own per certificate.
    identities: Arc<IdentityLegs>,
    replay_budget: Arc<ReplayBudget>,
}

impl UpstreamClient {
    /// A client using `tls` for https upstreams.
    pub fn new(tls: Arc<rustls::ClientConfig>, timeouts: &Timeouts) -> Self {
        Self {
            plain: PlainPool::new(Tcp::new(timeouts.connect), timeouts.pool_idle),
            tls: Arc::new(TlsLegs::new(&tls, timeouts)),
            identities: Arc::new(IdentityLegs::new(tls, timeouts)),
            replay_budget: Arc::default(),
        }
    }

    /// The https legs for a request presenting `identity` (or none). Behind an `Arc`: the
    /// legs are large, and a request's future holds what this returns.
    fn tls_legs(&self, identity: Option<&Arc<ClientCert>>) -> Cow<'_, Arc<TlsLegs>> {
        match identity {
            Some(cert) => Cow::Owned(self.identities.for_cert(cert)),
            None => Cow::Borrowed(&self.tls),
        }
    }

    /// Sends an upgrade handshake (WebSocket) on a connection of its own and waits for the
    /// response head until `deadline`; see [`upgrade`]. `identity`: the client certificate
    /// an https upstream is shown. The answer keeps hyper's upgrade handle in its extensions;
    /// its body (an upstream that refused the switch may send one) keeps the idle limit.
    pub async fn send_upgrade(
        &self,
        request: Request<ProxyBody>,
        pinned: Option<&PinnedAddrs>,
        identity: Option<&Arc<ClientCert>>,
        deadline: Deadline,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        refuse_cleartext_identity(&request, identity)?;
        self.send_on_own_connection(request, pinned, identity, deadline)
            .await
    }

    /// Sends `request` on a connection of its own (an upgrade, or an https request pinned to
    /// its checked addresses) and waits for the response head until `deadline`; its body
    /// keeps the idle limit.
    async fn send_on_own_connection(
        &self,
        request: Request<ProxyBody>,
        pinned: Option<&PinnedAddrs>,
        identity: Option<&Arc<ClientCert>>,
        deadline: Deadline,
    ) -> Result<Response<ProxyBody>, UpstreamError> {
        let legs = self.tls_legs(identity);
        let response = legs.upgrades.send(request, pinned, deadline).await?;
        Ok(response.map(|body| upstream_body(body, deadline)))
    }

    /// The bytes held for replay by all requests together (`retry.max_buffered_total`). It
    /// lives here because this client is the one object every forwarded request shares.
    pub fn replay_budget(&self) -> &Arc<ReplayBudget> {
        &self.replay_budget
    }

    /// Sends `request` (absolute URI) and waits for the response head until `deadline`.
    /// `pinned`: the addresses an unmatched destination was checked at, the only ones it may
    /// be connected to. `identity`: the client certificate an https upstream is shown; the
    /// connection it goes on was made with that certificate (or, for `None`, with none).
    ///
    /// The leg is chosen here and its future returned as it is (combinators, no `async`
    /// block): a block would keep the request as an argument beside the leg's future that
    /// holds it too, and every level above moves this future.
    pub fn send<'a>(
        &'a self,
        request: Request<ProxyBody>,
        pinned: Option<&'a PinnedAddrs>,
        identity: Option<&'a Arc<ClientCert>>,
        deadline: Deadline,
    ) -> impl Future<Output = Result<Response<ProxyBody>, UpstreamError>> + Send + 'a {
        type Boxed<'a> =
            Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, UpstreamError>> + Send + 'a>>;
        if let Err(e) = refuse_cleartext_identity(&request, identity) {
            let refused: Boxed<'a> = Box::pin(std::future::ready(Err(e)));
            return Either::Right(Either::Right(refused));
        }
        if request.uri().scheme() == Some(&Scheme::HTTP) {
            return Either::Left(self.plain.send(request, pinned, deadline).map(|sent| {
                match sent? {
                    Outcome::Answered(response) => Ok(response),
                    // A TCP transport has no ALPN: it never reports HTTP/2.
                    Outcome::SpeaksHttp2(..) => Err(UpstreamError::Failed(
                        "plain HTTP cannot switch to HTTP/2".into(),
                    )),
                }
            }));
        }
        if pinned.is_some() {
            // An unmatched absolute-form `https://` request: the pooled TLS client would
            // resolve the name again (a second DNS answer could point anywhere), so it goes
            // on a connection of its own to the addresses its host was checked at, with the
            // name only as TLS server name. Rare: clients send CONNECT for https URLs.
            // Boxed: as large as a TLS handshake.
            let own: Boxed<'a> =
                Box::pin(self.send_on_own_connection(request, pinned, identity, deadline));
            return Either::Right(Either::Right(own));
        }
        if identity.is_none() {
            // The common https leg, unboxed: the legs without a certificate are the client's
            // own (what `tls_legs` returns for `None`).
            return Either::Right(Either::Left(self.tls.send(request, deadline)));
        }
        // A client certificate's legs are held by this request while it runs.
        let with_cert: Boxed<'a> = Box::pin(async move {
            let legs = self.tls_legs(identity);
            legs.send(request, deadline).await
        });
        Either::Right(Either::Right(with_cert))
    }

    /// Client certificates with clients of their own now, for tests and diagnostics.
    pub fn client_certificates_in_use(&self) -> usize {
        self.identities.len()
    }

    /// Idle plain-HTTP upstream connections held now, for tests and diagnostics.
    pub fn idle_plain_connections(&self) -> usize {
        self.plain.idle_connections()
    }

    /// Idle HTTP/1.1 https connections made without a client certificate, held now, for
    /// tests and diagnostics.
    pub fn idle_https_connections(&self) -> usize {
        self.tls.http1.idle_connections()
    }
}

/// A client certificate can only be presented in a TLS handshake: a request that should
/// carry one never goes out over plain HTTP without it (admission and the config check
/// already refuse such routes; this keeps the rule where the connection is made).
fn refuse_cleartext_identity(
    request: &Request<ProxyBody>,
    identity: Option<&Arc<ClientCert>>,
) -> Result<(), UpstreamError> {
    if identity.is_some() && request.uri().scheme() == Some(&Scheme::HTTP) {
        return Err(UpstreamError::Failed(
            "a client certificate needs an https:// upstream".into(),
        ));
    }
    Ok(())
}
