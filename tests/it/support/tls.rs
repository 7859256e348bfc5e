//! TLS test servers on 127.0.0.1: a private CA made with rcgen, leaf certificates for chosen
//! names, and an HTTPS origin (HTTP/1.1 and/or HTTP/2 by ALPN) that records the requests and
//! the HTTP version it saw.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{HeaderMap, Request, Response, Version};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;

/// A private CA for test upstreams.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub pem: String,
}

impl TestCa {
    /// A new CA.
    pub fn new() -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, "test upstream CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Self {
            issuer: Issuer::new(params, key),
            pem: cert.pem(),
        }
    }

    /// Writes the CA certificate to `dir/name` and returns the path.
    pub fn write(&self, dir: &Path, name: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, &self.pem).unwrap();
        path
    }

    /// A client certificate with subject `CN=<common_name>` (extended key usage clientAuth),
    /// written as `dir/<file>.pem` and `dir/<file>.key` (mode 600); returns both paths.
    pub fn client_files(&self, dir: &Path, file: &str, common_name: &str) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (cert_path, key_path) = (
            dir.join(format!("{file}.pem")),
            dir.join(format!("{file}.key")),
        );
        write_private(&cert_path, &cert.pem());
        write_private(&key_path, &key.serialize_pem());
        (cert_path, key_path)
    }

    /// A leaf (chain + key) for `names` (DNS names or IP addresses).
    pub fn leaf(&self, names: &[&str]) -> (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>) {
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
    }
}

/// Writes `text` to `path`, readable by its owner only (replacing the file in one rename,
/// as a secret rotation tool would).
pub fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    let staged = path.with_extension("staged");
    std::fs::write(&staged, text).unwrap();
    std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::rename(&staged, path).unwrap();
}

/// One request as an HTTPS origin saw it.
#[derive(Debug, Clone)]
pub struct TlsSeen {
    pub version: Version,
    pub target: String,
    pub headers: HeaderMap,
    /// The subject of the client certificate the connection was made with (`CN=...`).
    pub client_subject: Option<String>,
    /// Which accepted connection (1, 2, ...) the request came on.
    pub connection: usize,
}

/// A running HTTPS origin.
pub struct TlsOrigin {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<TlsSeen>>>,
    /// Why each refused handshake failed, as the server saw it.
    pub failed_handshakes: Arc<Mutex<Vec<String>>>,
}

impl TlsOrigin {
    /// `https://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The last request received.
    pub fn last(&self) -> TlsSeen {
        self.seen
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("a request")
    }

    /// Number of requests received.
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<TlsSeen> {
        self.seen.lock().unwrap().clone()
    }
}

/// Serves 200 `secure ok` over TLS with the leaf for `names`, offering `alpn` (e.g. `["h2",
/// "http/1.1"]` or `["http/1.1"]`); a path `/slow/<ms>` answers after that many milliseconds.
pub async fn https_origin(ca: &TestCa, names: &[&str], alpn: &[&str]) -> TlsOrigin {
    let (chain, key) = ca.leaf(names);
    let config = server_config_builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    serve(config, alpn).await
}

/// Like [`https_origin`], but the handshake fails unless the client presents a certificate
/// that `client_ca` signed (as banks' and Open Banking APIs do); each request records the
/// certificate's subject, and the answer echoes it: `client <subject>`.
pub async fn mtls_origin(
    ca: &TestCa,
    client_ca: &TestCa,
    names: &[&str],
    alpn: &[&str],
) -> TlsOrigin {
    serve(mtls_server_config(ca, client_ca, names), alpn).await
}

/// A server config with the leaf for `names` that requires a client certificate signed by
/// `client_ca`.
pub fn mtls_server_config(ca: &TestCa, client_ca: &TestCa, names: &[&str]) -> rustls::ServerConfig {
    let (chain, key) = ca.leaf(names);
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut client_ca.pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
            .build()
            .unwrap();
    server_config_builder()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap()
}

fn server_config_builder() -> rustls::ConfigBuilder<rustls::ServerConfig, rustls::WantsVerifier> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
}

/// The subject of a DER certificate, as `CN=...`.
pub fn subject(der: &CertificateDer<'_>) -> String {
    let (_, cert) = x509_parser::parse_x509_certificate(der).unwrap();
    cert.subject().to_string()
}

async fn serve(mut config: rustls::ServerConfig, alpn: &[&str]) -> TlsOrigin {
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Arc<Mutex<Vec<TlsSeen>>> = Arc::default();
    let handshakes: Arc<Mutex<Vec<String>>> = Arc::default();
    let record = Arc::clone(&seen);
    let refused = Arc::clone(&handshakes);
    tokio::spawn(async move {
        let mut connections = 0;
        while let Ok((tcp, _)) = listener.accept().await {
            connections += 1;
            let connection = connections;
            let acceptor = acceptor.clone();
            let record = Arc::clone(&record);
            let refused = Arc::clone(&refused);
            tokio::spawn(async move {
                let tls = match acceptor.accept(tcp).await {
                    Ok(tls) => tls,
                    Err(e) => {
                        refused.lock().unwrap().push(e.to_string());
                        return;
                    }
                };
                let client_subject = tls
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .map(subject);
                let service = service_fn(move |req: Request<Incoming>| {
                    let record = Arc::clone(&record);
                    let client_subject = client_subject.clone();
                    async move {
                        let (parts, body) = req.into_parts();
                        let _ = body.collect().await;
                        if let Some(ms) = parts.uri.path().strip_prefix("/slow/") {
                            let ms = ms.parse().unwrap_or(0);
                            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                        }
                        let answer = match &client_subject {
                            Some(s) => format!("client {s}"),
                            None => "secure ok".to_string(),
                        };
                        // A body that sends its first bytes and then nothing, never ending.
                        let body = if parts.uri.path() == "/stall-body" {
                            let first = futures_util::stream::iter([Ok::<_, Infallible>(
                                hyper::body::Frame::data(Bytes::from("partial ")),
                            )]);
                            let stalled = futures_util::StreamExt::chain(
                                first,
                                futures_util::stream::pending(),
                            );
                            http_body_util::StreamBody::new(stalled).boxed()
                        } else {
                            Full::new(Bytes::from(answer)).boxed()
                        };
                        record.lock().unwrap().push(TlsSeen {
                            version: parts.version,
                            target: parts
                                .uri
                                .path_and_query()
                                .map(|p| p.to_string())
                                .unwrap_or_default(),
                            headers: parts.headers,
                            client_subject,
                            connection,
                        });
                        Ok::<_, Infallible>(Response::new(body))
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    TlsOrigin {
        addr,
        seen,
        failed_handshakes: handshakes,
    }
}
