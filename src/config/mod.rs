//! Configuration: `raw.rs` is the file as written, `validate.rs` checks it once, and the types
//! here are the validated runtime model that the rest of the proxy reads.

pub mod raw;
pub mod validate;
pub mod values;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderName, Method};

pub use raw::{OnUnauthorized, Unmatched};
pub use validate::ValidateCtx;
pub use values::{Environment, ProcessEnv};

use crate::credentials::CredentialKind;
use crate::routes::{HostPattern, UpstreamTarget};

/// Why a config file was refused. Each variant's message names the file; parse errors carry
/// the line and column that serde_yaml reports.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The YAML is malformed or has an unknown or mistyped key.
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    /// The YAML is well-formed but its content is inconsistent; every problem is listed.
    #[error("{path}: invalid configuration:\n  - {}", problems.join("\n  - "))]
    Invalid {
        path: PathBuf,
        problems: Vec<String>,
    },
}

/// The validated configuration. Built once per load; immutable afterwards.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the proxy listens.
    pub listen: SocketAddr,
    /// Where the admin endpoint listens, if enabled.
    pub admin: Option<SocketAddr>,
    /// Client connections held open at once (`None`: derived from the file-descriptor limit
    /// at start, see `proxy::limits`), so that idle sockets cannot use up every descriptor.
    pub max_connections: Option<usize>,
    /// Policy for requests no route matches.
    pub unmatched: Unmatched,
    pub timeouts: Timeouts,
    pub retry: RetrySettings,
    pub tokens: TokenSettings,
    pub connect: ConnectSettings,
    pub tls: TlsSettings,
    /// The CA for intercepted CONNECT tunnels; required when a route has `intercept: true`.
    pub intercept_ca: Option<InterceptCaSettings>,
    /// Credentials by name.
    pub credentials: BTreeMap<String, CredentialConfig>,
    /// Routes in the order they are tried.
    pub routes: Vec<RouteConfig>,
}

/// Timeouts applied by the proxy.
#[derive(Debug, Clone, PartialEq)]
pub struct Timeouts {
    /// TCP (and TLS) connect to an upstream.
    pub connect: Duration,
    /// From sending the request until the upstream's response head arrives (504 after).
    pub upstream: Duration,
    /// How long an idle pooled upstream connection is kept.
    pub pool_idle: Duration,
    /// How long an idle client keep-alive connection is kept open.
    pub client_idle: Duration,
    /// On shutdown, how long requests in flight may take to finish.
    pub drain: Duration,
    /// A request body that sends nothing for this long is answered 408 and its connection
    /// closed, so that a stalled upload cannot hold memory or an upstream connection.
    pub client_body: Duration,
    /// An upstream response body that sends nothing for this long is cut (the client's
    /// connection is closed), so that a stalled upstream cannot hold a client forever.
    pub upstream_body_idle: Duration,
}

/// Replay of requests after a 401/403.
#[derive(Debug, Clone, PartialEq)]
pub struct RetrySettings {
    /// Bodies up to this size are kept so that they can be replayed.
    pub max_body_bytes: u64,
    /// Bytes all requests together may hold for replay; beyond it a request streams
    /// without replay, so that many large uploads cannot exhaust memory.
    pub max_buffered_total: u64,
}

/// Token refresh timing and failure backoff, shared by every credential.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenSettings {
    /// Refresh at least this long before expiry...
    pub refresh_before: Duration,
    /// ...and no later than this fraction of the lifetime (whichever is earlier).
    pub refresh_at_fraction: f64,
    /// A token endpoint call that takes longer fails.
    pub fetch_timeout: Duration,
    /// First wait after a failed fetch; doubles per failure.
    pub backoff_initial: Duration,
    /// Longest wait between failed fetches.
    pub backoff_max: Duration,
    /// A 401/403 on a token younger than this is passed to the client instead of causing
    /// another refresh (the upstream refuses the request itself, not the token).
    pub min_reject_age: Duration,
}

/// CONNECT tunnels.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectSettings {
    /// Ports a CONNECT may reach.
    pub allowed_ports: Vec<u16>,
    /// A tunnel with no traffic either way for this long is closed.
    pub idle_timeout: Duration,
}

/// Upstream TLS.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct TlsSettings {
    /// Extra PEM roots trusted beside the webpki roots.
    pub ca_file: Option<PathBuf>,
}

/// Where the interception CA's certificate and key are.
#[derive(Debug, Clone, PartialEq)]
pub struct InterceptCaSettings {
    /// The CA certificate (PEM).
    pub cert_file: PathBuf,
    /// The CA private key (PEM, PKCS#8).
    pub key_file: PathBuf,
}

/// One validated credential.
#[derive(Debug, Clone, PartialEq)]
pub struct CredentialConfig {
    /// Its name in the config; shown in errors, logs and metrics.
    pub name: String,
    /// The header it sets on matched requests.
    pub header: HeaderName,
    /// Obtain the token at start and keep it fresh in the background.
    pub prefetch: bool,
    /// The token source and its settings.
    pub kind: CredentialKind,
}

/// One validated route.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteConfig {
    pub name: String,
    pub host: Option<HostPattern>,
    pub path_prefix: Option<String>,
    pub methods: Option<Vec<Method>>,
    pub mount: Option<String>,
    pub upstream: Option<UpstreamTarget>,
    pub credential: Option<String>,
    pub on_unauthorized: OnUnauthorized,
    pub intercept: bool,
}

impl Config {
    /// Reads, parses and validates a config file, resolving `${VAR}` from `env`.
    pub fn load(path: &Path, env: &dyn Environment) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_yaml(&text, path, env)
    }

    /// Parses and validates YAML text; `path` names the file in errors and anchors relative
    /// paths inside it.
    pub fn from_yaml(
        text: &str,
        path: &Path,
        env: &dyn Environment,
    ) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig = serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: describe_yaml_error(&e),
        })?;
        let base_dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        validate::validate(raw, base_dir, env).map_err(|problems| ConfigError::Invalid {
            path: path.to_path_buf(),
            problems,
        })
    }
}

/// serde_yaml puts the location at the end of its message; make sure it is always there and
/// reads as "line L column C".
fn describe_yaml_error(e: &serde_yaml::Error) -> String {
    let message = e.to_string();
    match e.location() {
        Some(loc) if !message.contains("line ") => {
            format!("{message} at line {} column {}", loc.line(), loc.column())
        }
        _ => message,
    }
}
