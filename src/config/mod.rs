//! Configuration: `raw.rs` is the file as written, `validate.rs` checks it once, and the types
//! here are the validated runtime model that the rest of the proxy reads.

pub mod raw;
pub mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, Method};

pub use crate::vocab::validate_ctx::ValidateCtx;
pub use crate::vocab::values::{self as values, Environment, ProcessEnv};
pub use raw::{OnUnauthorized, Unmatched};

use crate::access::{ClientPolicy, UnmatchedReach};
use crate::credentials::CredentialKind;
use crate::vocab::client_cert::ClientCert;
use crate::vocab::hosts::{HostPattern, UpstreamTarget};
use crate::vocab::secret::Secret;

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
    /// The bearer token admin actions that change state require (needed for them when the
    /// admin listener is not on loopback).
    pub admin_token: Option<Secret>,
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
    /// Whether the file has a `routes:` key (even `routes: []`). A reload that would leave
    /// no routes and no credentials is refused unless the file says so explicitly.
    pub declares_routes: bool,
    /// The files besides this one that the config was built from (`*_file` secrets, keys,
    /// CAs): the reloader watches them, so a rotated secret reloads its credential.
    pub files: Vec<PathBuf>,
    /// Which client addresses may connect and which users may authenticate.
    pub clients: ClientPolicy,
    /// Where unmatched traffic may go: `unmatched_deny`, `unmatched_allow`, `unmatched_ports`
    /// and whether the inside ranges are closed (clients beyond loopback).
    pub unmatched_reach: UnmatchedReach,
    /// Host names (lower-case) the admin endpoint answers besides IP literals and `localhost`.
    pub admin_hosts: Vec<String>,
    /// Where tokens are kept: this process only, or shared with other replicas via Redis.
    pub token_cache: TokenCacheSettings,
    /// Whether some secret came from a command (`x_command`): a secret the vendor refuses
    /// then re-runs the commands (a reload), so that a rotated secret is picked up.
    pub secret_commands: bool,
}

/// Where tokens are kept.
#[derive(Debug, Clone, PartialEq, Default)]
pub enum TokenCacheSettings {
    /// In this process only: every replica fetches its own tokens.
    #[default]
    Memory,
    /// Shared through Redis by every replica with the same settings.
    Redis(RedisCacheSettings),
    /// Kept in one sealed file (`token_cache: type: file`), for tokens a person consented to.
    File(FileCacheSettings),
}

/// A validated `token_cache: type: file`. `Debug` shows no key.
#[derive(Debug, Clone, PartialEq)]
pub struct FileCacheSettings {
    /// The store file (absolute, or relative to the config file's folder).
    pub path: PathBuf,
    /// 32 bytes that seal stored tokens.
    pub encryption_key: EncryptionKey,
}

/// A validated `token_cache: type: redis`. `Debug` shows no password and no key.
#[derive(Debug, Clone, PartialEq)]
pub struct RedisCacheSettings {
    /// The full URL (it may carry a password, hence a secret).
    pub url: Secret,
    /// The URL without user information, for logs and the admin endpoint.
    pub display_url: String,
    /// The password when given apart from the URL.
    pub password: Option<Secret>,
    /// Prefix of every key written.
    pub key_prefix: String,
    /// 32 bytes that seal stored tokens.
    pub encryption_key: EncryptionKey,
    /// Longest wait for one Redis command before the replica falls back to memory.
    pub timeout: Duration,
    /// Extra PEM root for `rediss://`.
    pub ca_file: Option<PathBuf>,
}

/// The token cache's 32-byte key. `Debug` prints `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct EncryptionKey(pub [u8; 32]);

impl std::fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
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
    /// Longest wait between failed fetches (and the wait after a refused secret).
    pub backoff_max: Duration,
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
    /// The header it sets on matched requests (unless `query_param` is set).
    pub header: HeaderName,
    /// The query parameter its value is sent in instead of a header.
    pub query_param: Option<String>,
    /// Obtain the token at start and keep it fresh in the background.
    pub prefetch: bool,
    /// The token source and its settings.
    pub kind: CredentialKind,
    /// The `${VAR}` values used in its secret fields, each hidden on its own in vendor answers
    /// (the whole resolved secrets are hidden by the source itself).
    pub secret_parts: Vec<crate::vocab::secret::Secret>,
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
    pub credential: Option<CredentialChoice>,
    pub on_unauthorized: OnUnauthorized,
    /// Which upstream statuses mean the token was refused.
    pub refresh_on: RefreshOn,
    pub intercept: bool,
    /// Whether `Location`-style headers naming the upstream are mapped back (see
    /// `proxy/location.rs`).
    pub rewrite_location: bool,
    /// Users allowed to use the route (and so its credential); `None` means every client.
    pub clients: Option<Vec<String>>,
    /// Whether the credential may travel over plain HTTP to a non-loopback host.
    pub allow_cleartext: bool,
    /// The client certificate presented to the upstream in the TLS handshake (mutual TLS);
    /// read and checked at load, so a reload is what picks up rotated files.
    pub tls_client_cert: Option<Arc<ClientCert>>,
}

impl RouteConfig {
    /// Every credential this route may inject (none without `credential`).
    pub fn credential_names(&self) -> Vec<&str> {
        self.credential
            .as_ref()
            .map(CredentialChoice::names)
            .unwrap_or_default()
    }
}

/// Which credential a route injects: one for every client, or one per authenticated user.
#[derive(Debug, Clone, PartialEq)]
pub enum CredentialChoice {
    /// Every client's requests carry this credential.
    Shared(String),
    /// Each user listed carries its own credential; others carry `default`, or are refused
    /// when there is none.
    PerClient {
        by_client: BTreeMap<String, String>,
        default: Option<String>,
    },
}

impl CredentialChoice {
    /// Every credential name the choice may pick.
    pub fn names(&self) -> Vec<&str> {
        match self {
            CredentialChoice::Shared(name) => vec![name],
            CredentialChoice::PerClient { by_client, default } => by_client
                .values()
                .chain(default)
                .map(String::as_str)
                .collect(),
        }
    }
}

/// Which upstream answers mean "the token was refused" on a route (when the upstream sends
/// no RFC 6750 `error`). A 401 always does; a 403 only where the vendor uses it for expired
/// tokens (TeleTracker), since a 403 usually means a missing permission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RefreshOn {
    /// Whether a 403 counts as a refused token too.
    pub forbidden: bool,
}

impl RefreshOn {
    /// Whether `status` means the token was refused.
    pub fn includes(self, status: http::StatusCode) -> bool {
        status == http::StatusCode::UNAUTHORIZED
            || (self.forbidden && status == http::StatusCode::FORBIDDEN)
    }
}

impl Config {
    /// One warning per client-certificate key file that group or others may read, naming
    /// the route and the file (never its content).
    pub fn exposed_key_files(&self) -> Vec<String> {
        self.routes
            .iter()
            .filter_map(|r| {
                let cert = r.tls_client_cert.as_ref()?;
                let mode = cert.key_exposed_mode()?;
                Some(format!(
                    "route `{}`: tls_client_cert.key_file {} is readable by group or others \
                     (mode {mode:o}); `chmod 600` it",
                    r.name,
                    cert.key_file.display()
                ))
            })
            .collect()
    }

    /// Reads, parses and validates a config file, resolving `${VAR}` from `env`.
    pub fn load(path: &Path, env: &dyn Environment) -> Result<Config, ConfigError> {
        Self::from_yaml(&Self::read(path)?, path, env)
    }

    /// The text of a config file (reloads read it once and parse what they read).
    pub fn read(path: &Path) -> Result<String, ConfigError> {
        std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })
    }

    /// Parses and validates YAML text; `path` names the file in errors and anchors relative
    /// paths inside it.
    pub fn from_yaml(
        text: &str,
        path: &Path,
        env: &dyn Environment,
    ) -> Result<Config, ConfigError> {
        if !has_content(text) {
            return Err(ConfigError::Parse {
                path: path.to_path_buf(),
                message: "the file is empty (a truncated or half-written file is refused; \
                          write `routes: []` for a config without routes)"
                    .into(),
            });
        }
        let parse_error = |e: serde_yaml::Error| ConfigError::Parse {
            path: path.to_path_buf(),
            message: describe_yaml_error(&e),
        };
        let mut raw: raw::RawConfig = serde_yaml::from_str(text).map_err(parse_error)?;
        if raw.by_client_names_unknown_users() {
            // Parsed again with the user names known, so that the error points at the
            // unknown name's line and column (see `raw::ClientName`).
            raw = raw::with_known_users(raw.user_names(), || serde_yaml::from_str(text))
                .map_err(parse_error)?;
        }
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

/// Whether YAML text holds anything besides blank lines, comments and document markers.
fn has_content(text: &str) -> bool {
    text.lines().any(|line| {
        let t = line.trim();
        !(t.is_empty() || t.starts_with('#') || t == "---" || t == "...")
    })
}

/// serde_yaml puts the location at the end of its message; make sure it is always there and
/// reads as "line L column C". Values are never repeated: serde quotes the offending value
/// (a mis-indented secret would be printed), so quoted values are hidden and only
/// name-like backquoted words (keys, variants) are kept.
fn describe_yaml_error(e: &serde_yaml::Error) -> String {
    let message = hide_values(&e.to_string());
    match e.location() {
        Some(loc) if !message.contains("line ") => {
            format!("{message} at line {} column {}", loc.line(), loc.column())
        }
        _ => message,
    }
}

/// `message` with every `"quoted value"` replaced by `(value hidden)` and every backquoted
/// word that does not look like a key or variant name replaced by `` `…` ``.
fn hide_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut chars = message.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                let mut escaped = false;
                for d in chars.by_ref() {
                    match (escaped, d) {
                        (true, _) => escaped = false,
                        (false, '\\') => escaped = true,
                        (false, '"') => break,
                        _ => {}
                    }
                }
                out.push_str("(value hidden)");
            }
            '`' => {
                let word: String = chars.by_ref().take_while(|&d| d != '`').collect();
                let name_like = !word.is_empty()
                    && word.len() <= 40
                    && word
                        .chars()
                        .all(|w| w.is_ascii_alphanumeric() || "_-.[]".contains(w));
                out.push('`');
                out.push_str(if name_like { &word } else { "…" });
                out.push('`');
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_error(yaml: &str) -> String {
        let env = std::collections::HashMap::<String, String>::new();
        match Config::from_yaml(yaml, Path::new("/etc/authrelay/routes.yaml"), &env) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("accepted: {yaml}"),
        }
    }

    /// A `by_client` key that is not a user is reported once, at its line and column, with
    /// its path named once.
    #[test]
    fn an_unknown_by_client_user_is_reported_at_its_line_and_column() {
        let yaml = "clients:\n  users:\n    app: {password: pw}\ncredentials:\n  a: {type: static, value: x}\nroutes:\n  - name: r\n    host: api.example.com\n    credential:\n      by_client: {app: a, nobody: a}\n";
        let e = parse_error(yaml);
        assert!(
            e.ends_with("routes[0].credential.by_client: `nobody` is not defined under `clients.users` at line 10 column 27"),
            "{e}"
        );
    }

    /// An absurd command timeout is refused, and a command that runs during the same load
    /// (a secret of the file) cannot overflow the clock with it.
    #[test]
    fn a_secret_command_timeout_beyond_ten_minutes_is_refused() {
        let yaml = "secret_command_timeout: 300000000000y\ncredentials:\n  c:\n    type: static\n    value_command: [\"/bin/echo\", \"Bearer x\"]\n";
        let e = parse_error(yaml);
        assert!(
            e.contains("secret_command_timeout") && e.contains("between 1ms and 10m"),
            "{e}"
        );
    }

    /// A file store's key may come from a command, as a Redis store's may: it was offered
    /// only on the Redis path, and the file store quietly became a memory one.
    #[test]
    fn a_file_token_cache_takes_its_key_from_a_command() {
        let key = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";
        let yaml = format!(
            "token_cache:\n  type: file\n  path: /tmp/authrelay-tokens\n  encryption_key_command: [\"/bin/echo\", \"{key}\"]\n"
        );
        let env = std::collections::HashMap::<String, String>::new();
        let config = Config::from_yaml(&yaml, Path::new("/etc/authrelay/routes.yaml"), &env)
            .unwrap_or_else(|e| panic!("{e}"));
        match config.token_cache {
            TokenCacheSettings::File(file) => {
                assert_eq!(file.encryption_key.0, *b"01234567890123456789012345678901")
            }
            _ => panic!("not a file store"),
        }
    }

    #[test]
    fn parse_errors_never_repeat_a_value() {
        let secret = "Outseta KEY1:SECRET1";
        let cases = [
            format!("credentials:\n  c:\n    type: static\n  value: \"{secret}\"\n"),
            format!("credentials:\n  c:\n    type: static\n    value:\n      - \"{secret}\"\n"),
            format!("credentials:\n  c:\n    type: static\n    {secret}: x\n"),
            format!("timeouts:\n  connect: \"{secret}\"\n"),
            format!("listen: [\"{secret}\"]\n"),
        ];
        for yaml in cases {
            let e = parse_error(&yaml);
            assert!(!e.contains("KEY1") && !e.contains("SECRET1"), "{e}");
            assert!(e.contains("routes.yaml") && e.contains("line "), "{e}");
        }
        let e = parse_error("routes:\n  - name: a\n    upstreem: x\n");
        assert!(e.contains("`upstreem`"), "{e}");
    }

    fn load(yaml: &str, env: &[(&str, &str)]) -> Result<Config, String> {
        let env: std::collections::HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Config::from_yaml(yaml, Path::new("/etc/authrelay/routes.yaml"), &env)
            .map_err(|e| e.to_string())
    }

    const KEY_B64: &str = "q1n0yF7l3bqk2JXk1pXkq0m8mB7c2fQkA6yO0u1ZxWg=";

    #[test]
    fn token_cache_redis_is_checked_without_printing_a_secret() {
        let e = load("token_cache:\n  type: redis\nroutes: []\n", &[]).unwrap_err();
        assert!(e.contains("token_cache.url: is required"), "{e}");
        assert!(e.contains("token_cache.encryption_key: is required"), "{e}");
        let short = "c2hvcnQta2V5LW5vdC0zMi1ieXRlcw==";
        let yaml = format!(
            "token_cache:\n  type: redis\n  url: http://r:6379\n  encryption_key: {short}\n  timeout: 1ms\nroutes: []\n"
        );
        let e = load(&yaml, &[]).unwrap_err();
        assert!(e.contains("must be a redis:// or rediss:// URL"), "{e}");
        assert!(e.contains("must be 32 random bytes"), "{e}");
        assert!(e.contains("token_cache.timeout"), "{e}");
        assert!(!e.contains(short), "{e}");
        let yaml = "token_cache:\n  type: redis\n  url: redis://:pw-in-url-9@r:6379/2\n  password: ${P}\n  encryption_key: ${K}\nroutes: []\n";
        let e = load(yaml, &[("P", "pw-apart-9"), ("K", KEY_B64)]).unwrap_err();
        assert!(e.contains("already carries a password"), "{e}");
        assert!(
            !e.contains("pw-in-url-9") && !e.contains("pw-apart-9"),
            "{e}"
        );
        let e = load(
            "token_cache:\n  url: redis://r\n  timeout: 1s\nroutes: []\n",
            &[],
        )
        .unwrap_err();
        assert!(
            e.contains("token_cache.url: applies only to `type: redis`"),
            "{e}"
        );
    }

    #[test]
    fn token_cache_redis_settings_hide_password_and_key() {
        let yaml = "token_cache:\n  type: redis\n  url: rediss://:pw-in-url-9@r.internal/3\n  encryption_key: ${K}\n  key_prefix: \"relay:\"\nroutes: []\n";
        let config = load(yaml, &[("K", KEY_B64)]).unwrap();
        let TokenCacheSettings::Redis(redis) = &config.token_cache else {
            panic!("redis expected")
        };
        assert_eq!(redis.display_url, "rediss://r.internal:6379/3");
        assert_eq!(redis.key_prefix, "relay:");
        assert_eq!(redis.timeout, Duration::from_millis(500));
        let debug = format!("{config:?}");
        assert!(
            !debug.contains("pw-in-url-9") && !debug.contains(KEY_B64),
            "{debug}"
        );
        let hex = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";
        let config = load(yaml, &[("K", hex)]).unwrap();
        let TokenCacheSettings::Redis(redis) = &config.token_cache else {
            panic!("redis expected")
        };
        assert_eq!(redis.encryption_key.0[1], 0x11);
        assert_eq!(
            load("routes: []\n", &[]).unwrap().token_cache,
            TokenCacheSettings::Memory
        );
    }

    #[test]
    fn empty_files_are_refused() {
        for yaml in ["", "\n  \n", "# only a comment\n---\n"] {
            assert!(parse_error(yaml).contains("empty"), "{yaml:?}");
        }
    }
}
