//! The config file exactly as written: serde structs that reject unknown keys. Nothing here
//! is checked beyond its shape; `validate.rs` turns it into the runtime model.

use serde::Deserialize;
use std::collections::BTreeMap;

use crate::credentials;
use crate::vocab::secret_command::ArgvSummary;
use crate::vocab::values::{ByteSize, ConfigDuration};

/// The top level of `routes.yaml`. `Debug` by hand: the admin token and its command are
/// secrets.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// Address of the proxy listener.
    pub listen: Option<String>,
    /// Address of the admin listener (health, metrics); off when absent.
    pub admin: Option<String>,
    /// Bearer token that admin actions changing state (refresh, invalidate) require.
    pub admin_token: Option<String>,
    /// `admin_token` read from a file.
    pub admin_token_file: Option<String>,
    /// `admin_token` printed by a command.
    pub admin_token_command: Option<Vec<String>>,
    /// How long a secret command (`x_command`) may run (default 10s).
    pub secret_command_timeout: Option<ConfigDuration>,
    /// Client connections held open at once; derived from the file-descriptor limit when absent.
    pub max_connections: Option<usize>,
    /// What to do with requests no route matches.
    #[serde(default)]
    pub unmatched: Unmatched,
    #[serde(default)]
    pub timeouts: RawTimeouts,
    #[serde(default)]
    pub retry: RawRetry,
    #[serde(default)]
    pub tokens: RawTokens,
    #[serde(default)]
    pub connect: RawConnect,
    #[serde(default)]
    pub tls: RawTls,
    /// The local CA that signs certificates for intercepted hosts.
    pub intercept_ca: Option<RawInterceptCa>,
    #[serde(default)]
    pub credentials: BTreeMap<String, RawCredential>,
    /// `None` when the file has no `routes:` key: a reload to a file without routes and
    /// credentials is refused unless it says `routes: []` (a truncated file must not fail open).
    #[serde(default)]
    pub routes: Option<Vec<RawRoute>>,
    /// Who may use the proxy: client addresses and named users.
    #[serde(default)]
    pub clients: RawClients,
    /// Extra destination ranges (CIDR) that unmatched traffic may never reach.
    #[serde(default)]
    pub unmatched_deny: Vec<RawNet>,
    /// Inside ranges unmatched traffic may still reach when clients beyond loopback may
    /// connect.
    pub unmatched_allow: Option<Vec<RawNet>>,
    /// The only ports unmatched traffic reaches (default: every port with loopback-only
    /// clients, 80 and 443 otherwise).
    pub unmatched_ports: Option<Vec<u16>>,
    /// Host names the admin endpoint answers besides IP literals and `localhost`.
    #[serde(default)]
    pub admin_hosts: Vec<String>,
    /// Where tokens are kept: in this process only (default) or shared through Redis.
    #[serde(default)]
    pub token_cache: RawTokenCache,
}

impl std::fmt::Debug for RawConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawConfig")
            .field("listen", &self.listen)
            .field("admin", &self.admin)
            .field("admin_token", &redacted(&self.admin_token))
            .field("admin_token_file", &self.admin_token_file)
            .field("admin_token_command", &argv(&self.admin_token_command))
            .field("secret_command_timeout", &self.secret_command_timeout)
            .field("max_connections", &self.max_connections)
            .field("unmatched", &self.unmatched)
            .field("timeouts", &self.timeouts)
            .field("retry", &self.retry)
            .field("tokens", &self.tokens)
            .field("connect", &self.connect)
            .field("tls", &self.tls)
            .field("intercept_ca", &self.intercept_ca)
            .field("credentials", &self.credentials)
            .field("routes", &self.routes)
            .field("clients", &self.clients)
            .field("unmatched_deny", &self.unmatched_deny)
            .field("unmatched_allow", &self.unmatched_allow)
            .field("unmatched_ports", &self.unmatched_ports)
            .field("admin_hosts", &self.admin_hosts)
            .field("token_cache", &self.token_cache)
            .finish()
    }
}

/// An inline secret as written (or its `${VAR}`) for `Debug`: whether it is set, never what.
fn redacted(value: &Option<String>) -> Option<&'static str> {
    value.as_ref().map(|_| "***")
}

/// A secret command for `Debug`: its program and argument count (see [`ArgvSummary`]).
fn argv(value: &Option<Vec<String>>) -> Option<ArgvSummary<'_>> {
    value.as_deref().map(ArgvSummary)
}

/// Which token cache to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenCacheType {
    /// Each process keeps its own tokens (no network dependency).
    #[default]
    Memory,
    /// Replicas share tokens, leases and refresh tokens through Redis.
    Redis,
    /// One sealed file on this machine keeps the tokens a person consented to across
    /// restarts.
    File,
}

/// The `token_cache:` section. `Debug` by hand: passwords, keys and their commands are
/// secrets, and the URL may carry a password.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokenCache {
    #[serde(rename = "type", default)]
    pub kind: TokenCacheType,
    /// `redis://host:port/db` or `rediss://` (TLS).
    pub url: Option<String>,
    pub password: Option<String>,
    pub password_file: Option<String>,
    pub password_command: Option<Vec<String>>,
    /// Prefix of every key authrelay writes (default `authrelay:`).
    pub key_prefix: Option<String>,
    /// 32 random bytes, base64 or hex, that seal every stored token.
    pub encryption_key: Option<String>,
    pub encryption_key_file: Option<String>,
    pub encryption_key_command: Option<Vec<String>>,
    /// Longest wait for one Redis command before falling back to memory.
    pub timeout: Option<ConfigDuration>,
    /// Extra PEM root for a `rediss://` server with a private CA.
    pub ca_file: Option<String>,
    /// `type: file`: the file that holds the sealed tokens.
    pub path: Option<String>,
}

impl std::fmt::Debug for RawTokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawTokenCache")
            .field("kind", &self.kind)
            .field("url", &redacted(&self.url))
            .field("password", &redacted(&self.password))
            .field("password_file", &self.password_file)
            .field("password_command", &argv(&self.password_command))
            .field("key_prefix", &self.key_prefix)
            .field("encryption_key", &redacted(&self.encryption_key))
            .field("encryption_key_file", &self.encryption_key_file)
            .field(
                "encryption_key_command",
                &argv(&self.encryption_key_command),
            )
            .field("timeout", &self.timeout)
            .field("ca_file", &self.ca_file)
            .field("path", &self.path)
            .finish()
    }
}

/// An address range (CIDR) or single address as written. Checked while the file is parsed,
/// so that a bad one is reported with its line and column; one holding `${VAR}` is checked
/// once the variable is resolved (`validate.rs`), then named by its field.
#[derive(Debug, Clone)]
pub struct RawNet(pub String);

impl<'de> Deserialize<'de> for RawNet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Checked inside the visitor: serde_yaml marks an error raised there with the
        // scalar's own position, not its list's.
        struct NetVisitor;
        impl serde::de::Visitor<'_> for NetVisitor {
            type Value = RawNet;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an address range like 10.0.0.0/8 or ::1")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<RawNet, E> {
                if !text.contains("${") {
                    crate::access::parse_net(text).map_err(E::custom)?;
                }
                Ok(RawNet(text.to_string()))
            }
        }
        d.deserialize_str(NetVisitor)
    }
}

/// The `clients:` section: which addresses may connect and which users may authenticate.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClients {
    /// CIDR ranges (or single addresses) allowed to connect; default loopback only.
    pub allow_from: Option<Vec<RawNet>>,
    /// Named clients, each with a password sent as `Proxy-Authorization: Basic`.
    #[serde(default)]
    pub users: BTreeMap<String, RawUser>,
}

/// One named client's password, inline (`${VAR}`), in a file or printed by a command.
/// `Debug` by hand: the password and its command are secrets.
#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUser {
    pub password: Option<String>,
    pub password_file: Option<String>,
    pub password_command: Option<Vec<String>>,
}

impl std::fmt::Debug for RawUser {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawUser")
            .field("password", &redacted(&self.password))
            .field("password_file", &self.password_file)
            .field("password_command", &argv(&self.password_command))
            .finish()
    }
}

/// Policy for requests that match no route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unmatched {
    /// Forward without adding any credential.
    #[default]
    Pass,
    /// Answer 403 with a JSON error.
    Deny,
}

/// Per-route reaction to a 401/403 from upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnUnauthorized {
    /// Refresh the credential once and replay the request.
    #[default]
    Retry,
    /// Hand the 401/403 to the client as is.
    Pass,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTimeouts {
    pub connect: Option<ConfigDuration>,
    pub upstream: Option<ConfigDuration>,
    pub pool_idle: Option<ConfigDuration>,
    pub client_idle: Option<ConfigDuration>,
    pub drain: Option<ConfigDuration>,
    pub client_body: Option<ConfigDuration>,
    pub upstream_body_idle: Option<ConfigDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRetry {
    pub max_body_bytes: Option<ByteSize>,
    pub max_buffered_total: Option<ByteSize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTokens {
    pub refresh_before: Option<ConfigDuration>,
    pub refresh_at_fraction: Option<f64>,
    pub fetch_timeout: Option<ConfigDuration>,
    pub backoff_initial: Option<ConfigDuration>,
    pub backoff_max: Option<ConfigDuration>,
    /// Removed; accepted here only so that validation can say what replaced it.
    pub min_reject_age: Option<serde::de::IgnoredAny>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConnect {
    pub allowed_ports: Option<Vec<u16>>,
    pub idle_timeout: Option<ConfigDuration>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// Extra PEM roots trusted for upstream TLS, beside the webpki roots.
    pub ca_file: Option<String>,
}

/// The interception CA's files (PEM), as written by `authrelay ca init`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInterceptCa {
    pub cert_file: Option<String>,
    pub key_file: Option<String>,
}

/// One credential section. `type` selects the type in the registry (`credentials/mod.rs`),
/// which reads the shared `header`, `scheme`, `prefetch` once and the rest with the type's own
/// spec (unknown keys refused).
#[derive(Debug)]
pub struct RawCredential(pub credentials::ParsedCredential);

impl<'de> Deserialize<'de> for RawCredential {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let fields = serde_yaml::Mapping::deserialize(d)?;
        credentials::parse_credential(fields)
            .map(RawCredential)
            .map_err(serde::de::Error::custom)
    }
}

/// One route rule.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub name: String,
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    pub methods: Option<Vec<String>>,
    pub mount: Option<String>,
    pub upstream: Option<String>,
    /// One credential for every client, or one per authenticated client.
    pub credential: Option<RawRouteCredential>,
    #[serde(default)]
    pub on_unauthorized: OnUnauthorized,
    /// Upstream statuses that mean "token refused" (default `[401]`; `[401, 403]` for
    /// vendors that answer 403 to an expired token).
    pub refresh_on: Option<Vec<u16>>,
    #[serde(default)]
    pub intercept: bool,
    /// Map upstream redirects back to the client's view (default true).
    pub rewrite_location: Option<bool>,
    /// Names of the users (under `clients.users`) allowed to use this route.
    pub clients: Option<Vec<String>>,
    /// Allows sending the credential over plain HTTP to a non-loopback host.
    #[serde(default)]
    pub allow_cleartext: bool,
    /// A client certificate presented to the upstream (mutual TLS).
    pub tls_client_cert: Option<RawClientCert>,
}

/// A route's `tls_client_cert:` — PEM files, relative to the config file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClientCert {
    /// The certificate chain, leaf first.
    pub cert_file: String,
    /// The leaf's private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
}

/// A route's `credential`: a name, or `{by_client: {USER: NAME}, default: NAME}` so that each
/// calling app spends its own vendor account.
#[derive(Debug)]
pub enum RawRouteCredential {
    /// The same credential for every client.
    Shared(String),
    /// A credential per user of `clients.users`.
    PerClient(RawPerClient),
}

/// Read by hand rather than `#[serde(untagged)]`: an untagged enum replaces every error inside
/// the map (an unknown key, a user that does not exist) with "did not match any variant" and
/// loses its line and column.
impl<'de> Deserialize<'de> for RawRouteCredential {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ChoiceVisitor;
        impl<'de> serde::de::Visitor<'de> for ChoiceVisitor {
            type Value = RawRouteCredential;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a credential name, or `by_client:` with an optional `default:`")
            }
            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<Self::Value, E> {
                Ok(RawRouteCredential::Shared(name.to_string()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<Self::Value, A::Error> {
                RawPerClient::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(RawRouteCredential::PerClient)
            }
        }
        d.deserialize_any(ChoiceVisitor)
    }
}

/// The `by_client` form of a route's `credential`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPerClient {
    /// Credential name by user name.
    pub by_client: BTreeMap<ClientName, String>,
    /// The credential of users without an entry; without it they are refused.
    pub default: Option<String>,
}

/// A user name in `by_client`. The one check that it is a user of `clients.users` is made
/// while the file is parsed, so that a name that is not one is reported at its own line and
/// column: a file whose first parse finds such a name (see
/// [`RawConfig::by_client_names_unknown_users`]) is parsed again with the names known (see
/// [`with_known_users`]). A valid file is parsed once.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ClientName(pub String);

thread_local! {
    static KNOWN_USERS: std::cell::RefCell<Option<std::collections::BTreeSet<String>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `parse` with `users` as the names a `by_client` key may take (on this thread only).
pub fn with_known_users<R>(
    users: std::collections::BTreeSet<String>,
    parse: impl FnOnce() -> R,
) -> R {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            KNOWN_USERS.with(|k| k.borrow_mut().take());
        }
    }
    KNOWN_USERS.with(|k| *k.borrow_mut() = Some(users));
    let _reset = Reset;
    parse()
}

impl<'de> Deserialize<'de> for ClientName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Checked inside the visitor, as `RawNet` is: serde_yaml then marks the error with
        // the key's own position.
        struct NameVisitor;
        impl serde::de::Visitor<'_> for NameVisitor {
            type Value = ClientName;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a user name from `clients.users`")
            }
            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<ClientName, E> {
                let unknown = KNOWN_USERS.with(|k| {
                    k.borrow()
                        .as_ref()
                        .is_some_and(|users| !users.contains(name))
                });
                if unknown {
                    // serde_yaml puts the key's path (`routes[0].credential.by_client`)
                    // before the message, and its line and column after.
                    return Err(E::custom(format_args!(
                        "`{name}` is not defined under `clients.users`"
                    )));
                }
                Ok(ClientName(name.to_string()))
            }
        }
        d.deserialize_str(NameVisitor)
    }
}

impl RawConfig {
    /// Whether a route's `by_client` names a user that `clients.users` does not define.
    pub fn by_client_names_unknown_users(&self) -> bool {
        let users = &self.clients.users;
        self.routes.iter().flatten().any(|route| {
            matches!(&route.credential, Some(RawRouteCredential::PerClient(per_client))
                if per_client.by_client.keys().any(|ClientName(name)| !users.contains_key(name)))
        })
    }

    /// The names under `clients.users`.
    pub fn user_names(&self) -> std::collections::BTreeSet<String> {
        self.clients.users.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Debug` of a file whose secrets are inline and in command arguments (a vault token in
    /// `-token=…`) shows each command's program and argument count, never an argument or a
    /// secret.
    #[test]
    fn debug_hides_command_arguments_and_secrets() {
        let yaml = r#"
admin_token_command: ["vault", "read", "-token=s.admin-secret"]
clients:
  users:
    ci:
      password_command: ["vault", "-token=s.user-secret"]
    dev:
      password: inline-user-secret
token_cache:
  type: redis
  url: redis://:url-secret@127.0.0.1:6379/0
  password_command: ["pass", "show", "s.redis-secret"]
  encryption_key_command: ["vault", "read", "-token=s.key-secret"]
credentials:
  api:
    type: static
    value_command: ["vault", "read", "-token=s.cred-secret", "secret/api"]
"#;
        let raw: RawConfig = serde_yaml::from_str(yaml).unwrap();
        let debug = format!("{raw:?}");
        for secret in [
            "admin-secret",
            "user-secret",
            "inline-user-secret",
            "url-secret",
            "redis-secret",
            "key-secret",
            "cred-secret",
            "secret/api",
        ] {
            assert!(!debug.contains(secret), "{secret} in {debug}");
        }
        for shown in [
            "\"vault\" (+2 arguments)",
            "\"vault\" (+1 arguments)",
            "\"pass\" (+2 arguments)",
            "\"vault\" (+3 arguments)",
        ] {
            assert!(debug.contains(shown), "{shown} not in {debug}");
        }
    }
}
