//! A route's client certificate for mutual TLS (`tls_client_cert: {cert_file, key_file}`):
//! read and checked when the config is loaded — PEM that parses, a private key that belongs
//! to the certificate — so that a bad pair is a config error, never a failed handshake under
//! traffic. Nothing here can print the private key: `Debug` names the files and the
//! certificate's identity only, and no error quotes a file's content.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::CertificateDer;
use rustls::sign::CertifiedKey;

/// Why a client certificate or its key could not be used. Each message names the file; none
/// quotes its content.
#[derive(Debug, thiserror::Error)]
pub enum ClientCertError {
    /// A file could not be read (missing, unreadable).
    #[error("cannot read {}: {source}", path.display())]
    Read {
        which: ClientCertFile,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The certificate file holds no usable PEM certificate.
    #[error("{}: {detail}", path.display())]
    Certificate { path: PathBuf, detail: String },
    /// The key file holds no usable private key.
    #[error("{}: {detail}", path.display())]
    Key { path: PathBuf, detail: String },
    /// The key is not the certificate's.
    #[error("the private key in {} does not belong to the certificate in {}", key.display(), cert.display())]
    Mismatch { cert: PathBuf, key: PathBuf },
}

/// Which of the two files an error is about, for naming the config field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientCertFile {
    /// `cert_file`.
    Cert,
    /// `key_file`.
    Key,
}

impl ClientCertError {
    /// The file (field) the error is about; a mismatch is reported on the key.
    pub fn file(&self) -> ClientCertFile {
        match self {
            ClientCertError::Read { which, .. } => *which,
            ClientCertError::Certificate { .. } => ClientCertFile::Cert,
            ClientCertError::Key { .. } | ClientCertError::Mismatch { .. } => ClientCertFile::Key,
        }
    }
}

/// A certificate chain and the private key it certifies, ready to present in a TLS handshake.
pub struct ClientCert {
    /// Where the chain was read from (PEM, leaf first).
    pub cert_file: PathBuf,
    /// Where the key was read from (PEM: PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    certified: Arc<CertifiedKey>,
    /// SHA-256 of the chain: what tells two certificates apart (the key follows from it, as
    /// it must match the leaf).
    id: [u8; 32],
    /// Unix permission bits of the key file when group or others may read it.
    exposed_mode: Option<u32>,
}

impl ClientCert {
    /// Reads and checks `cert_file` and `key_file`.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<Self, ClientCertError> {
        let read = |which, path: &Path| {
            std::fs::read(path).map_err(|source| ClientCertError::Read {
                which,
                path: path.to_path_buf(),
                source,
            })
        };
        let cert_pem = read(ClientCertFile::Cert, cert_file)?;
        let chain = pem_certificates(&cert_pem).map_err(|detail| ClientCertError::Certificate {
            path: cert_file.to_path_buf(),
            detail,
        })?;
        let key_pem = read(ClientCertFile::Key, key_file)?;
        let key_error = |detail: String| ClientCertError::Key {
            path: key_file.to_path_buf(),
            detail,
        };
        let key = match rustls_pemfile::private_key(&mut key_pem.as_slice()) {
            Ok(Some(key)) => key,
            Ok(None) => {
                return Err(key_error(
                    "holds no PEM private key (PKCS#8, PKCS#1 or SEC1)".into(),
                ))
            }
            Err(_) => return Err(key_error("the private key's PEM is malformed".into())),
        };
        let provider = rustls::crypto::ring::default_provider();
        let signing_key = provider
            .key_provider
            .load_private_key(key)
            .map_err(|_| key_error("the private key is of a kind TLS cannot use".into()))?;
        let certified = CertifiedKey::new(chain, signing_key);
        match certified.keys_match() {
            Ok(()) => {}
            Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
                return Err(ClientCertError::Mismatch {
                    cert: cert_file.to_path_buf(),
                    key: key_file.to_path_buf(),
                })
            }
            Err(e) => {
                return Err(ClientCertError::Certificate {
                    path: cert_file.to_path_buf(),
                    detail: format!("the certificate cannot be used: {e}"),
                })
            }
        }
        let mut chain_bytes = Vec::new();
        for cert in &certified.cert {
            chain_bytes.extend_from_slice(&(cert.len() as u64).to_be_bytes());
            chain_bytes.extend_from_slice(cert);
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, &chain_bytes);
        let mut id = [0u8; 32];
        id.copy_from_slice(digest.as_ref());
        Ok(Self {
            cert_file: cert_file.to_path_buf(),
            key_file: key_file.to_path_buf(),
            certified: Arc::new(certified),
            id,
            exposed_mode: exposed_mode(key_file),
        })
    }

    /// The chain and key, for a TLS client config.
    pub fn certified_key(&self) -> Arc<CertifiedKey> {
        Arc::clone(&self.certified)
    }

    /// SHA-256 of the certificate chain: equal for the same certificate, whatever files it
    /// was read from. Connections are pooled per identity.
    pub fn id(&self) -> [u8; 32] {
        self.id
    }

    /// The first bytes of [`Self::id`] in hex, to tell certificates apart in logs.
    pub fn short_id(&self) -> String {
        self.id[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The key file's permission bits when group or others may read it (a private key
    /// should be readable by its owner only).
    pub fn key_exposed_mode(&self) -> Option<u32> {
        self.exposed_mode
    }
}

impl fmt::Debug for ClientCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCert")
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("id", &self.short_id())
            .finish_non_exhaustive()
    }
}

/// Two loads of the same files with the same certificate are the same: a reload that did
/// not touch them changes nothing.
impl PartialEq for ClientCert {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id && self.cert_file == other.cert_file && self.key_file == other.key_file
    }
}

/// Every PEM certificate in `pem`, in order; an error when there is none or one is malformed.
pub fn pem_certificates(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("malformed PEM certificate: {e}"))?;
    if certs.is_empty() {
        return Err("holds no PEM certificate".into());
    }
    Ok(certs)
}

#[cfg(unix)]
fn exposed_mode(path: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).ok()?.permissions().mode() & 0o777;
    (mode & 0o077 != 0).then_some(mode)
}

#[cfg(not(unix))]
fn exposed_mode(_path: &Path) -> Option<u32> {
    None
}
