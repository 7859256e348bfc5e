//! TLS interception for CONNECT tunnels to hosts a route names with `intercept: true`: the
//! local CA (`intercept_ca`), leaf certificates made per host and cached (and made again
//! before they expire), the TLS server config offered to the client, and `ca init`, which
//! creates the CA.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::config::InterceptCaSettings;

/// Leaf certificates are kept at most for this many hosts; the cache is cleared beyond it
/// (hosts come from route rules, so only wildcard routes can make it grow).
const MAX_CACHED_HOSTS: usize = 1024;
/// How long a leaf certificate is valid (from a day back, for clocks that lag).
const LEAF_LIFETIME: time::Duration = time::Duration::days(90);
/// A cached leaf is replaced once it has less than this left, so that a proxy running for
/// months never presents an expired certificate.
const LEAF_RENEW_BEFORE: time::Duration = time::Duration::days(30);

/// Why the CA could not be loaded or a certificate made.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A CA file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The CA certificate or key is not usable.
    #[error("{0}")]
    Invalid(String),
    /// `ca init` found files it must not overwrite.
    #[error("{0} exists; pass --force to overwrite it")]
    Exists(PathBuf),
}

/// The local CA that signs leaf certificates for intercepted hosts. One per process, shared
/// by every tunnel; leaf server configs are made once per host, off the hot path.
pub struct CertAuthority {
    issuer: Issuer<'static, KeyPair>,
    ca_der: CertificateDer<'static>,
    leaves: Mutex<HashMap<String, Leaf>>,
}

/// A cached leaf's server config and when to make a new one.
struct Leaf {
    config: Arc<rustls::ServerConfig>,
    renew_at: time::OffsetDateTime,
}

impl std::fmt::Debug for CertAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CertAuthority { key: *** }")
    }
}

impl CertAuthority {
    /// Loads the CA certificate and key named in `intercept_ca`.
    pub fn load(settings: &InterceptCaSettings) -> Result<Self, CaError> {
        let cert_pem = read(&settings.cert_file)?;
        let key_pem = read(&settings.key_file)?;
        Self::from_pem(&cert_pem, &key_pem).map_err(|e| {
            CaError::Invalid(format!(
                "intercept_ca ({}, {}): {e}",
                settings.cert_file.display(),
                settings.key_file.display()
            ))
        })
    }

    /// Builds the CA from PEM text (certificate, then PKCS#8 key).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, CaError> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| CaError::Invalid(format!("unreadable CA key: {e}")))?;
        let ca_der = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .next()
            .ok_or_else(|| CaError::Invalid("no PEM certificate in the CA file".into()))?
            .map_err(|e| CaError::Invalid(format!("unreadable CA certificate: {e}")))?;
        let issuer = Issuer::from_ca_cert_der(&ca_der, key)
            .map_err(|e| CaError::Invalid(format!("unreadable CA certificate: {e}")))?;
        Ok(Self {
            issuer,
            ca_der,
            leaves: Mutex::new(HashMap::new()),
        })
    }

    /// The TLS server config presented to a client that tunnels to `host`: a leaf for that
    /// host, ALPN h2 and http/1.1. Made on first use and cached until
    /// [`LEAF_RENEW_BEFORE`] its expiry.
    pub fn server_config(&self, host: &str) -> Result<Arc<rustls::ServerConfig>, CaError> {
        self.server_config_at(host, time::OffsetDateTime::now_utc())
    }

    /// [`Self::server_config`] as of `now`.
    fn server_config_at(
        &self,
        host: &str,
        now: time::OffsetDateTime,
    ) -> Result<Arc<rustls::ServerConfig>, CaError> {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if let Some(leaf) = self.lock().get(&host).filter(|l| now < l.renew_at) {
            return Ok(Arc::clone(&leaf.config));
        }
        let config = Arc::new(self.make_server_config(&host, now)?);
        let mut leaves = self.lock();
        if leaves.len() >= MAX_CACHED_HOSTS {
            leaves.clear();
        }
        let leaf = Leaf {
            config: Arc::clone(&config),
            renew_at: now + LEAF_LIFETIME - LEAF_RENEW_BEFORE,
        };
        leaves.insert(host, leaf);
        Ok(config)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Leaf>> {
        self.leaves.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn make_server_config(
        &self,
        host: &str,
        now: time::OffsetDateTime,
    ) -> Result<rustls::ServerConfig, CaError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let mut params = CertificateParams::new(vec![bare.to_string()]).map_err(|e| {
            CaError::Invalid(format!("cannot make a certificate for `{host}`: {e}"))
        })?;
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, bare);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = now - time::Duration::days(1);
        params.not_after = now + LEAF_LIFETIME;
        let key = KeyPair::generate().map_err(|e| CaError::Invalid(e.to_string()))?;
        let leaf = params.signed_by(&key, &self.issuer).map_err(|e| {
            CaError::Invalid(format!("cannot sign a certificate for `{host}`: {e}"))
        })?;
        let chain = vec![leaf.der().clone(), self.ca_der.clone()];
        let key_der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| CaError::Invalid(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .map_err(|e| CaError::Invalid(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Ok(config)
    }
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::Io {
        path: path.to_path_buf(),
        source,
    })
}

/// The files `ca init` wrote.
#[derive(Debug)]
pub struct CaFiles {
    /// The CA certificate (PEM), to give to clients.
    pub cert: PathBuf,
    /// The CA private key (PEM, mode 0600), for `intercept_ca.key_file`.
    pub key: PathBuf,
}

/// Creates a new CA in `dir` (`ca.pem`, `ca-key.pem`); refuses to replace existing files
/// unless `force`.
pub fn init_ca(dir: &Path, force: bool) -> Result<CaFiles, CaError> {
    let files = CaFiles {
        cert: dir.join("ca.pem"),
        key: dir.join("ca-key.pem"),
    };
    if !force {
        for p in [&files.cert, &files.key] {
            if p.exists() {
                return Err(CaError::Exists(p.clone()));
            }
        }
    }
    std::fs::create_dir_all(dir).map_err(|source| CaError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let (cert_pem, key_pem) = new_ca_pem()?;
    write_file(&files.key, key_pem.as_bytes(), true)?;
    write_file(&files.cert, cert_pem.as_bytes(), false)?;
    Ok(files)
}

/// A fresh self-signed CA: (certificate PEM, PKCS#8 key PEM).
pub fn new_ca_pem() -> Result<(String, String), CaError> {
    let mut params = CertificateParams::new(Vec::<String>::new())
        .map_err(|e| CaError::Invalid(e.to_string()))?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, "authrelay interception CA");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "authrelay");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = time::OffsetDateTime::now_utc();
    params.not_before = now - time::Duration::days(1);
    params.not_after = now + time::Duration::days(3650);
    let key = KeyPair::generate().map_err(|e| CaError::Invalid(e.to_string()))?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| CaError::Invalid(e.to_string()))?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write_file(path: &Path, bytes: &[u8], private: bool) -> Result<(), CaError> {
    let io = |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).map_err(io)?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        // `mode` only applies to new files; a forced overwrite must tighten an old one too.
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io)?;
    }
    file.write_all(bytes).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaf_configs_are_cached_per_host() {
        let (cert, key) = new_ca_pem().unwrap();
        let ca = CertAuthority::from_pem(&cert, &key).unwrap();
        let a = ca.server_config("API.test").unwrap();
        let b = ca.server_config("api.test").unwrap();
        assert!(Arc::ptr_eq(&a, &b));
        assert!(!Arc::ptr_eq(&a, &ca.server_config("other.test").unwrap()));
    }

    #[test]
    fn leaves_are_made_again_before_they_expire() {
        let (cert, key) = new_ca_pem().unwrap();
        let ca = CertAuthority::from_pem(&cert, &key).unwrap();
        let start = time::OffsetDateTime::now_utc();
        let first = ca.server_config_at("api.test", start).unwrap();
        let later = start + time::Duration::days(59);
        assert!(Arc::ptr_eq(
            &first,
            &ca.server_config_at("api.test", later).unwrap()
        ));
        let near_expiry = start + LEAF_LIFETIME - LEAF_RENEW_BEFORE + time::Duration::hours(1);
        let renewed = ca.server_config_at("api.test", near_expiry).unwrap();
        assert!(
            !Arc::ptr_eq(&first, &renewed),
            "a leaf near its expiry is replaced"
        );
        assert!(Arc::ptr_eq(
            &renewed,
            &ca.server_config_at("api.test", near_expiry).unwrap()
        ));
    }

    #[test]
    fn init_refuses_to_overwrite_without_force() {
        let dir = std::env::temp_dir().join(format!("authrelay-ca-{}", rand::random::<u64>()));
        let files = init_ca(&dir, false).unwrap();
        assert!(matches!(init_ca(&dir, false), Err(CaError::Exists(_))));
        init_ca(&dir, true).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&files.key).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let _ = std::fs::remove_dir_all(dir);
    }
}
