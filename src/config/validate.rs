//! Turns the raw file into the runtime model, collecting every problem so that a user fixes
//! the file in one pass. Nothing is checked later, under traffic.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use http::Method;

use super::raw::{
    RawClientCert, RawClients, RawConfig, RawCredential, RawNet, RawPerClient, RawRoute,
    RawRouteCredential, RawTokenCache, TokenCacheType,
};
use super::{
    Config, ConnectSettings, CredentialChoice, CredentialConfig, EncryptionKey, FileCacheSettings,
    InterceptCaSettings, RedisCacheSettings, RefreshOn, RetrySettings, RouteConfig, Timeouts,
    TlsSettings, TokenCacheSettings, TokenSettings,
};
use crate::access::{ClientPolicy, UnmatchedReach, User, CLOSED_INSIDE_PORTS};
use crate::vocab::client_cert::{ClientCert, ClientCertFile};
use crate::vocab::hosts::{HostPattern, UpstreamTarget};
use crate::vocab::secret_command;
use crate::vocab::validate_ctx::ValidateCtx;
use crate::vocab::values::Environment;

/// Default proxy listener.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:3128";

/// The metric series name of traffic no route matches; no route may share it.
pub const RESERVED_ROUTE_NAME: &str = "unmatched";

/// Whether token timing schedules refreshes past usability. A token stops being sent in the
/// last tenth of its life (at most 5 s, see `token_store::refresh_timing`); the refresh must
/// start before that for every lifetime, which holds when the fraction leaves more than a
/// tenth or `refresh_before` exceeds 5 s.
fn contradictory_timing(tokens: &TokenSettings) -> bool {
    tokens.refresh_at_fraction >= 0.9 && tokens.refresh_before <= Duration::from_secs(5)
}

fn validate_credential(
    name: &str,
    raw: RawCredential,
    ctx: &mut ValidateCtx<'_>,
) -> Option<CredentialConfig> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    {
        ctx.problem(
            "",
            "credential names may use letters, digits, `_`, `-` and `.` only",
        );
    }
    ctx.take_secret_parts();
    let v = raw.0.validate(ctx)?;
    Some(CredentialConfig {
        name: name.to_string(),
        header: v.header,
        query_param: v.query_param,
        prefetch: v.prefetch,
        kind: v.kind,
        secret_parts: ctx.take_secret_parts(),
    })
}

fn validate_route(
    raw: RawRoute,
    declared_credentials: &BTreeSet<String>,
    declared_users: &BTreeSet<String>,
    ctx: &mut ValidateCtx<'_>,
) -> Option<RouteConfig> {
    let mut ok = true;
    let host = match raw.host.as_deref() {
        Some(h) => match HostPattern::parse(h) {
            Ok(p) => Some(p),
            Err(e) => {
                ctx.problem("host", e);
                ok = false;
                None
            }
        },
        None => None,
    };
    let path_prefix = match raw.path_prefix {
        Some(p) if !p.starts_with('/') => {
            ctx.problem("path_prefix", format!("`{p}` must start with `/`"));
            ok = false;
            None
        }
        other => other,
    };
    let methods = match raw.methods {
        Some(list) if list.is_empty() => {
            ctx.problem(
                "methods",
                "must not be empty (leave it out to allow every method)",
            );
            ok = false;
            None
        }
        Some(list) => {
            let mut parsed = Vec::new();
            for m in list {
                match Method::from_bytes(m.to_ascii_uppercase().as_bytes()) {
                    Ok(method) => parsed.push(method),
                    Err(_) => {
                        ctx.problem("methods", format!("`{m}` is not an HTTP method"));
                        ok = false;
                    }
                }
            }
            Some(parsed)
        }
        None => None,
    };
    let mount = match raw.mount {
        Some(m) if !m.starts_with('/') || m.len() < 2 => {
            ctx.problem(
                "mount",
                format!("`{m}` must start with `/` and name a path, like `/outseta`"),
            );
            ok = false;
            None
        }
        Some(m) => Some(m.trim_end_matches('/').to_string()),
        None => None,
    };
    let upstream = match raw.upstream.as_deref() {
        Some(u) => match ctx.text("upstream", u).map(|t| UpstreamTarget::parse(&t)) {
            Some(Ok(t)) => Some(t),
            Some(Err(e)) => {
                ctx.problem("upstream", e);
                ok = false;
                None
            }
            None => {
                ok = false;
                None
            }
        },
        None => None,
    };
    if host.is_none() && mount.is_none() && ok {
        ctx.problem(
            "",
            "a route needs `host` (forward proxy) or `mount` (reverse proxy), or both",
        );
        ok = false;
    }
    if mount.is_some() && upstream.is_none() {
        match &host {
            Some(h) if h.is_exact() => {}
            _ => {
                ctx.problem(
                    "upstream",
                    "a `mount` route needs `upstream` (or an exact `host`, reached over https)",
                );
                ok = false;
            }
        }
    }
    if raw.intercept && host.is_none() {
        ctx.problem(
            "intercept",
            "needs `host`: interception applies to CONNECT requests for that host",
        );
        ok = false;
    }
    let credential = raw.credential.map(|c| match c {
        RawRouteCredential::Shared(name) => CredentialChoice::Shared(name),
        RawRouteCredential::PerClient(RawPerClient { by_client, default }) => {
            CredentialChoice::PerClient {
                by_client: by_client
                    .into_iter()
                    .map(|(user, name)| (user.0, name))
                    .collect(),
                default,
            }
        }
    });
    if let Some(choice) = &credential {
        ok &= check_credential_choice(choice, declared_credentials, ctx);
    }
    let refresh_on = match raw.refresh_on.as_deref() {
        None => RefreshOn::default(),
        Some(statuses)
            if statuses.contains(&401) && statuses.iter().all(|s| matches!(s, 401 | 403)) =>
        {
            RefreshOn {
                forbidden: statuses.contains(&403),
            }
        }
        Some(_) => {
            ctx.problem(
                "refresh_on",
                "must be [401] or [401, 403] (to never refresh, set `on_unauthorized: pass`)",
            );
            ok = false;
            RefreshOn::default()
        }
    };
    if let Some(list) = &raw.clients {
        if list.is_empty() {
            ctx.problem(
                "clients",
                "must not be empty (leave it out to allow every client)",
            );
            ok = false;
        }
        for c in list.iter().filter(|c| !declared_users.contains(*c)) {
            ctx.problem(
                "clients",
                format!("`{c}` is not defined under `clients.users`"),
            );
            ok = false;
        }
    }
    if let Some(up) = upstream.as_ref().filter(|_| credential.is_some()) {
        if up.scheme == http::uri::Scheme::HTTP
            && !raw.allow_cleartext
            && !crate::vocab::hosts::is_loopback_host(up.authority.host())
        {
            ctx.problem(
                "upstream",
                format!(
                    "`http://{}` would send the credential in clear; use https:// or set `allow_cleartext: true`",
                    up.authority
                ),
            );
            ok = false;
        }
    }
    let tls_client_cert = raw
        .tls_client_cert
        .as_ref()
        .and_then(|files| client_cert(ctx, files));
    if raw.tls_client_cert.is_some() {
        ok &= tls_client_cert.is_some();
        if let Some(up) = upstream
            .as_ref()
            .filter(|up| up.scheme == http::uri::Scheme::HTTP)
        {
            ctx.problem(
                "tls_client_cert",
                format!(
                    "a client certificate is presented in a TLS handshake, and `http://{}` has \
                     none; use https://",
                    up.authority
                ),
            );
            ok = false;
        }
    }
    ok.then(|| RouteConfig {
        name: raw.name,
        host,
        path_prefix,
        methods,
        mount,
        upstream,
        credential,
        on_unauthorized: raw.on_unauthorized,
        refresh_on,
        intercept: raw.intercept,
        rewrite_location: raw.rewrite_location.unwrap_or(true),
        clients: raw.clients,
        allow_cleartext: raw.allow_cleartext,
        tls_client_cert,
    })
}

/// A route's `tls_client_cert`: both files read and checked now, each problem named by its
/// field (`tls_client_cert.cert_file` or `.key_file`).
fn client_cert(ctx: &mut ValidateCtx<'_>, raw: &RawClientCert) -> Option<Arc<ClientCert>> {
    let cert = ctx.existing_file("tls_client_cert.cert_file", &raw.cert_file);
    let key = ctx.existing_file("tls_client_cert.key_file", &raw.key_file);
    let (cert, key) = (cert?, key?);
    match ClientCert::load(&cert, &key) {
        Ok(loaded) => Some(Arc::new(loaded)),
        Err(e) => {
            let field = match e.file() {
                ClientCertFile::Cert => "tls_client_cert.cert_file",
                ClientCertFile::Key => "tls_client_cert.key_file",
            };
            ctx.problem(field, e);
            None
        }
    }
}

/// Every credential a route's `credential` names must be defined. (That every `by_client`
/// key is a user of `clients.users` is checked while the file is parsed, to report its line
/// and column: `raw::ClientName`.)
fn check_credential_choice(
    choice: &CredentialChoice,
    declared_credentials: &BTreeSet<String>,
    ctx: &mut ValidateCtx<'_>,
) -> bool {
    let mut ok = true;
    for name in choice.names() {
        if !declared_credentials.contains(name) {
            let known: Vec<&str> = declared_credentials.iter().map(String::as_str).collect();
            ctx.problem(
                "credential",
                format!(
                    "`{name}` is not defined under `credentials` (defined: {})",
                    known.join(", ")
                ),
            );
            ok = false;
        }
    }
    if let CredentialChoice::PerClient { by_client, default } = choice {
        if by_client.is_empty() && default.is_none() {
            ctx.problem(
                "credential.by_client",
                "must name at least one client (or give a `default`)",
            );
            ok = false;
        }
    }
    ok
}

/// A list of CIDR ranges with `${VAR}` resolved; each bad one is a problem.
fn nets(ctx: &mut ValidateCtx<'_>, field: &str, raw: &[RawNet]) -> Vec<ipnet::IpNet> {
    let mut out = Vec::new();
    for RawNet(text) in raw {
        if let Some(t) = ctx.text(field, text) {
            match crate::access::parse_net(&t) {
                Ok(n) => out.push(n),
                Err(e) => ctx.problem(field, format!("`{t}` {e}")),
            }
        }
    }
    out
}

/// `unmatched_deny`, `unmatched_allow` and `unmatched_ports`. Whether the inside ranges are
/// closed follows from `clients.allow_from`, so the two cannot disagree.
fn validate_unmatched_reach(
    deny: &[RawNet],
    allow: Option<&[RawNet]>,
    ports: Option<&[u16]>,
    clients: &ClientPolicy,
    ctx: &mut ValidateCtx<'_>,
) -> UnmatchedReach {
    let inside_closed = clients.admits_beyond_loopback();
    let allow = match allow {
        Some(_) if !inside_closed => {
            ctx.problem(
                "unmatched_allow",
                "applies only when `clients.allow_from` admits addresses beyond loopback \
                 (with loopback-only clients no inside range is closed)",
            );
            Vec::new()
        }
        Some(list) => nets(ctx, "unmatched_allow", list),
        None => Vec::new(),
    };
    let ports = match ports {
        Some(list) if list.is_empty() || list.contains(&0) => {
            ctx.problem(
                "unmatched_ports",
                "must list ports from 1 to 65535 (to refuse every unmatched request, set \
                 `unmatched: deny`)",
            );
            None
        }
        Some(list) => Some(list.to_vec()),
        None => inside_closed.then(|| CLOSED_INSIDE_PORTS.to_vec()),
    };
    UnmatchedReach {
        deny: nets(ctx, "unmatched_deny", deny),
        inside_closed,
        allow,
        ports,
    }
}

/// The `clients:` section: allowed address ranges (loopback when absent) and users.
fn validate_clients(raw: &RawClients, ctx: &mut ValidateCtx<'_>) -> ClientPolicy {
    let allow_from = match &raw.allow_from {
        Some(list) if list.is_empty() => {
            ctx.problem(
                "clients.allow_from",
                "must not be empty (leave it out for loopback only)",
            );
            Vec::new()
        }
        Some(list) => nets(ctx, "clients.allow_from", list),
        None => crate::access::loopback_nets(),
    };
    let mut users = BTreeMap::new();
    for (name, user) in &raw.users {
        if name.is_empty() || name.contains(':') {
            ctx.problem(
                "clients.users",
                format!("`{name}`: a user name must be non-empty and without `:`"),
            );
            continue;
        }
        let field = format!("clients.users.{name}.password");
        offer(ctx, &field, &user.password_command);
        if let Some(password) = ctx.required_secret(
            &field,
            user.password.as_deref(),
            user.password_file.as_deref(),
        ) {
            if password.is_empty() {
                ctx.problem(&field, "must not be empty");
            } else {
                users.insert(name.clone(), User::new(name, &password));
            }
        }
    }
    ClientPolicy { allow_from, users }
}

fn socket_addr(ctx: &mut ValidateCtx<'_>, field: &str, raw: &str) -> Option<SocketAddr> {
    let text = ctx.text(field, raw)?;
    match text.parse() {
        Ok(a) => Some(a),
        Err(_) => {
            ctx.problem(
                field,
                format!("`{text}` is not an address like 127.0.0.1:3128"),
            );
            None
        }
    }
}

/// `token_cache:`. Nothing here ever prints a URL's password or the key.
fn validate_token_cache(
    raw: &RawTokenCache,
    ctx: &mut ValidateCtx<'_>,
) -> Option<TokenCacheSettings> {
    if raw.kind == TokenCacheType::Memory {
        let set = [
            ("url", raw.url.is_some()),
            (
                "password",
                raw.password.is_some()
                    || raw.password_file.is_some()
                    || raw.password_command.is_some(),
            ),
            ("key_prefix", raw.key_prefix.is_some()),
            (
                "encryption_key",
                raw.encryption_key.is_some()
                    || raw.encryption_key_file.is_some()
                    || raw.encryption_key_command.is_some(),
            ),
            ("timeout", raw.timeout.is_some()),
            ("ca_file", raw.ca_file.is_some()),
            ("path", raw.path.is_some()),
        ];
        for (field, _) in set.iter().filter(|(_, present)| *present) {
            ctx.problem(
                &format!("token_cache.{field}"),
                "applies only to `type: redis` or `type: file` (the memory cache has no settings)",
            );
        }
        return Some(TokenCacheSettings::Memory);
    }
    if raw.kind == TokenCacheType::File {
        return validate_file_cache(raw, ctx);
    }
    if raw.path.is_some() {
        ctx.problem("token_cache.path", "applies only to `type: file`");
    }
    let url_text = match raw.url.as_deref() {
        Some(u) => interpolated_secret(ctx, "token_cache.url", u),
        None => {
            ctx.problem("token_cache.url", "is required for `type: redis`");
            None
        }
    };
    let url = url_text.and_then(|text| match reqwest::Url::parse(text.expose()) {
        Ok(u) if matches!(u.scheme(), "redis" | "rediss") && u.host().is_some() => Some((text, u)),
        Ok(u) => {
            ctx.problem(
                "token_cache.url",
                format!(
                    "must be a redis:// or rediss:// URL with a host (scheme `{}`)",
                    u.scheme()
                ),
            );
            None
        }
        Err(e) => {
            ctx.problem("token_cache.url", format!("is not a valid URL: {e}"));
            None
        }
    });
    offer(ctx, "token_cache.password", &raw.password_command);
    let password = ctx.optional_secret(
        "token_cache.password",
        raw.password.as_deref(),
        raw.password_file.as_deref(),
    );
    if let (Some((_, u)), Some(_)) = (&url, &password) {
        if u.password().is_some() {
            ctx.problem(
                "token_cache.password",
                "the url already carries a password; give it in one place only",
            );
        }
    }
    let key = encryption_key(raw, "redis", ctx);
    let key_prefix = raw
        .key_prefix
        .clone()
        .unwrap_or_else(|| "authrelay:".into());
    if key_prefix.is_empty()
        || key_prefix
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
    {
        ctx.problem(
            "token_cache.key_prefix",
            "must be non-empty, without spaces or control characters",
        );
    }
    let timeout = dur(raw.timeout, Duration::from_millis(500));
    if !(Duration::from_millis(10)..=Duration::from_secs(10)).contains(&timeout) {
        ctx.problem("token_cache.timeout", "must be between 10ms and 10s");
    }
    let ca_file = raw
        .ca_file
        .as_deref()
        .and_then(|f| ctx.existing_file("token_cache.ca_file", f));
    let (url, parsed) = url?;
    let display_url = format!(
        "{}://{}:{}{}",
        parsed.scheme(),
        parsed.host_str().unwrap_or_default(),
        parsed.port().unwrap_or(6379),
        parsed.path()
    );
    Some(TokenCacheSettings::Redis(RedisCacheSettings {
        url,
        display_url,
        password,
        key_prefix,
        encryption_key: key?,
        timeout,
        ca_file,
    }))
}

/// `token_cache.encryption_key` (or `_file`), required for the `kind` cache.
fn encryption_key(
    raw: &RawTokenCache,
    kind: &str,
    ctx: &mut ValidateCtx<'_>,
) -> Option<EncryptionKey> {
    // The key's command is offered here, for every kind of store that needs a key.
    offer(
        ctx,
        "token_cache.encryption_key",
        &raw.encryption_key_command,
    );
    let key = ctx
        .optional_secret(
            "token_cache.encryption_key",
            raw.encryption_key.as_deref(),
            raw.encryption_key_file.as_deref(),
        )
        .and_then(|k| match decode_key(k.expose().trim()) {
            Some(bytes) => Some(EncryptionKey(bytes)),
            None => {
                ctx.problem(
                    "token_cache.encryption_key",
                    "must be 32 random bytes written as base64 (44 characters) or hex (64); \
                     create one with `openssl rand -base64 32`",
                );
                None
            }
        });
    if raw.encryption_key.is_none()
        && raw.encryption_key_file.is_none()
        && raw.encryption_key_command.is_none()
    {
        ctx.problem(
            "token_cache.encryption_key",
            format!(
                "is required for `type: {kind}` (tokens are stored sealed with it; \
                 `openssl rand -base64 32` makes one; inline with ${{VAR}} or as `encryption_key_file`)"
            ),
        );
    }
    key
}

/// `token_cache: type: file`: a path and a key; the Redis settings do not apply.
fn validate_file_cache(
    raw: &RawTokenCache,
    ctx: &mut ValidateCtx<'_>,
) -> Option<TokenCacheSettings> {
    let redis_only = [
        ("url", raw.url.is_some()),
        (
            "password",
            raw.password.is_some() || raw.password_file.is_some() || raw.password_command.is_some(),
        ),
        ("key_prefix", raw.key_prefix.is_some()),
        ("timeout", raw.timeout.is_some()),
        ("ca_file", raw.ca_file.is_some()),
    ];
    for (field, _) in redis_only.iter().filter(|(_, present)| *present) {
        ctx.problem(
            &format!("token_cache.{field}"),
            "applies only to `type: redis`",
        );
    }
    let path = match raw.path.as_deref() {
        Some(p) => ctx
            .text("token_cache.path", p)
            .map(|p| ctx.base_dir().join(p)),
        None => {
            ctx.problem("token_cache.path", "is required for `type: file`");
            None
        }
    };
    let encryption_key = encryption_key(raw, "file", ctx);
    Some(TokenCacheSettings::File(FileCacheSettings {
        path: path?,
        encryption_key: encryption_key?,
    }))
}

/// Credentials a person consents to need a store that outlives the process: without one,
/// every restart would ask the person again.
fn check_consent_store(
    credentials: &BTreeMap<String, CredentialConfig>,
    token_cache: Option<&TokenCacheSettings>,
    ctx: &mut ValidateCtx<'_>,
) {
    if matches!(
        token_cache,
        Some(TokenCacheSettings::File(_) | TokenCacheSettings::Redis(_)) | None
    ) {
        return;
    }
    for (name, c) in credentials {
        if crate::credentials::is_consent_type(c.kind.type_name()) {
            ctx.scope(format!("credentials.{name}"));
            ctx.problem(
                "type",
                format!(
                    "`{}` needs `token_cache: type: file` or `type: redis` (its refresh \
                     token must outlive the process)",
                    c.kind.type_name()
                ),
            );
        }
    }
}

/// A `${VAR}`-interpolated value that may hold a secret (a URL with a password): problems
/// name the field, never the value.
fn interpolated_secret(
    ctx: &mut ValidateCtx<'_>,
    field: &str,
    raw: &str,
) -> Option<crate::vocab::secret::Secret> {
    ctx.optional_secret(field, Some(raw), None)
}

/// 32 bytes from base64 (standard or URL-safe, padded or not) or 64 hex digits.
fn decode_key(text: &str) -> Option<[u8; 32]> {
    use base64::Engine;
    let hex = || -> Option<Vec<u8>> {
        if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        (0..32)
            .map(|i| u8::from_str_radix(&text[2 * i..2 * i + 2], 16).ok())
            .collect()
    };
    let engines = [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::STANDARD_NO_PAD,
        base64::engine::general_purpose::URL_SAFE,
        base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ];
    hex()
        .or_else(|| engines.iter().find_map(|e| e.decode(text).ok()))
        .and_then(|bytes| bytes.try_into().ok())
}

/// Offers `x_command` for the next read of secret `field` (a list checked non-empty there).
fn offer(ctx: &mut ValidateCtx<'_>, field: &str, command: &Option<Vec<String>>) {
    if let Some(argv) = command {
        ctx.offer_command(field, argv.clone());
    }
}

fn dur(v: Option<crate::vocab::values::ConfigDuration>, default: Duration) -> Duration {
    v.map(|d| d.0).unwrap_or(default)
}

/// Validates a parsed file; `Err` lists every problem found.
pub fn validate(
    raw: RawConfig,
    base_dir: PathBuf,
    env: &dyn Environment,
) -> Result<Config, Vec<String>> {
    let mut ctx = ValidateCtx::new(env, base_dir);
    let command_timeout = dur(raw.secret_command_timeout, secret_command::DEFAULT_TIMEOUT);
    if command_timeout.is_zero() || command_timeout > secret_command::MAX_TIMEOUT {
        ctx.problem("secret_command_timeout", "must be between 1ms and 10m");
    }
    ctx.set_command_timeout(command_timeout.min(secret_command::MAX_TIMEOUT));
    let listen = socket_addr(
        &mut ctx,
        "listen",
        raw.listen.as_deref().unwrap_or(DEFAULT_LISTEN),
    );
    let admin = match raw.admin.as_deref() {
        Some(a) => {
            let addr = socket_addr(&mut ctx, "admin", a);
            if addr.is_none() {
                return Err(ctx.into_problems());
            }
            addr
        }
        None => None,
    };

    let timeouts = Timeouts {
        connect: dur(raw.timeouts.connect, Duration::from_secs(5)),
        upstream: dur(raw.timeouts.upstream, Duration::from_secs(60)),
        pool_idle: dur(raw.timeouts.pool_idle, Duration::from_secs(90)),
        client_idle: dur(raw.timeouts.client_idle, Duration::from_secs(120)),
        drain: dur(raw.timeouts.drain, Duration::from_secs(30)),
        client_body: dur(raw.timeouts.client_body, Duration::from_secs(30)),
        upstream_body_idle: dur(raw.timeouts.upstream_body_idle, Duration::from_secs(60)),
    };
    for (field, value) in [
        ("timeouts.client_body", timeouts.client_body),
        ("timeouts.upstream_body_idle", timeouts.upstream_body_idle),
    ] {
        if value.is_zero() {
            ctx.problem(field, "must be greater than 0");
        }
    }
    let retry = RetrySettings {
        max_body_bytes: raw.retry.max_body_bytes.map(|b| b.0).unwrap_or(1 << 20),
        max_buffered_total: raw
            .retry
            .max_buffered_total
            .map(|b| b.0)
            .unwrap_or(64 << 20),
    };
    if raw.max_connections == Some(0) {
        ctx.problem("max_connections", "must be at least 1");
    }
    let tokens = TokenSettings {
        refresh_before: dur(raw.tokens.refresh_before, Duration::from_secs(60)),
        refresh_at_fraction: raw.tokens.refresh_at_fraction.unwrap_or(0.8),
        fetch_timeout: dur(raw.tokens.fetch_timeout, Duration::from_secs(15)),
        backoff_initial: dur(raw.tokens.backoff_initial, Duration::from_millis(250)),
        backoff_max: dur(raw.tokens.backoff_max, Duration::from_secs(60)),
    };
    if raw.tokens.min_reject_age.is_some() {
        ctx.problem(
            "tokens.min_reject_age",
            "was removed: remove this line. A 401 (or a 403 listed in a route's `refresh_on`) now \
             always leads to one refresh and replay, whatever the token's age; a route where a \
             fresh token is refused too passes 401/403 through for a growing quiet period \
             (README: token lifecycle)",
        );
    }
    offer(&mut ctx, "admin_token", &raw.admin_token_command);
    let admin_token = ctx.optional_secret(
        "admin_token",
        raw.admin_token.as_deref(),
        raw.admin_token_file.as_deref(),
    );
    if admin_token.as_ref().is_some_and(|t| t.is_empty()) {
        ctx.problem("admin_token", "must not be empty");
    }
    if !(0.1..=1.0).contains(&tokens.refresh_at_fraction) {
        ctx.problem("tokens.refresh_at_fraction", "must be between 0.1 and 1.0");
    }
    if contradictory_timing(&tokens) {
        ctx.problem(
            "tokens.refresh_before",
            format!(
                "with `refresh_at_fraction` {} a refresh would start only after a token is no \
                 longer sent (its last 10%, at most 5s): lower `refresh_at_fraction` below 0.9 \
                 or set `refresh_before` above 5s",
                tokens.refresh_at_fraction
            ),
        );
    }
    if tokens.backoff_initial.is_zero() || tokens.backoff_max < tokens.backoff_initial {
        ctx.problem(
            "tokens.backoff_max",
            "backoff_initial must be > 0 and ≤ backoff_max",
        );
    }
    let connect = ConnectSettings {
        allowed_ports: raw.connect.allowed_ports.unwrap_or_else(|| vec![443]),
        idle_timeout: dur(raw.connect.idle_timeout, Duration::from_secs(300)),
    };
    let tls = TlsSettings {
        ca_file: raw
            .tls
            .ca_file
            .as_deref()
            .and_then(|f| ctx.existing_file("tls.ca_file", f)),
    };
    let intercept_ca = raw.intercept_ca.as_ref().and_then(|ca| {
        let cert = ctx.required_text("intercept_ca.cert_file", ca.cert_file.as_deref());
        let key = ctx.required_text("intercept_ca.key_file", ca.key_file.as_deref());
        let cert_file = ctx.existing_file("intercept_ca.cert_file", &cert?);
        let key_file = ctx.existing_file("intercept_ca.key_file", &key?);
        Some(InterceptCaSettings {
            cert_file: cert_file?,
            key_file: key_file?,
        })
    });
    let declares_routes = raw.routes.is_some();
    let raw_routes = raw.routes.unwrap_or_default();
    if raw.intercept_ca.is_none() && raw_routes.iter().any(|r| r.intercept) {
        ctx.problem(
            "intercept_ca",
            "is required when a route has `intercept: true` (create one with `authrelay ca init --out DIR`)",
        );
    }

    let token_cache = validate_token_cache(&raw.token_cache, &mut ctx);
    let clients = validate_clients(&raw.clients, &mut ctx);
    let unmatched_reach = validate_unmatched_reach(
        &raw.unmatched_deny,
        raw.unmatched_allow.as_deref(),
        raw.unmatched_ports.as_deref(),
        &clients,
        &mut ctx,
    );
    let admin_hosts = raw
        .admin_hosts
        .iter()
        .map(|h| h.trim().trim_end_matches('.').to_ascii_lowercase())
        .collect();
    let declared_users: BTreeSet<String> = clients.users.keys().cloned().collect();
    let declared: BTreeSet<String> = raw.credentials.keys().cloned().collect();
    let mut credentials = BTreeMap::new();
    for (name, spec) in raw.credentials {
        ctx.scope(format!("credentials.{name}"));
        if let Some(c) = validate_credential(&name, spec, &mut ctx) {
            credentials.insert(name, c);
        }
    }
    check_consent_store(&credentials, token_cache.as_ref(), &mut ctx);
    let mut routes = Vec::new();
    let mut names = HashSet::new();
    let mut mounts = HashSet::new();
    for (i, r) in raw_routes.into_iter().enumerate() {
        ctx.scope(format!("routes[{i}] ({})", r.name));
        if r.name == RESERVED_ROUTE_NAME {
            ctx.problem(
                "name",
                "`unmatched` is reserved (metrics count traffic no route matches under it)",
            );
        }
        if !names.insert(r.name.clone()) {
            ctx.problem(
                "name",
                "is used by an earlier route; route names must be unique",
            );
        }
        if let Some(m) = &r.mount {
            if !mounts.insert(m.trim_end_matches('/').to_string()) {
                ctx.problem("mount", format!("`{m}` is used by an earlier route"));
            }
        }
        if let Some(route) = validate_route(r, &declared, &declared_users, &mut ctx) {
            routes.push(route);
        }
    }
    ctx.scope("");
    let secret_commands = ctx.ran_commands();
    let mut files = ctx.take_files();
    files.sort();
    files.dedup();
    let problems = ctx.into_problems();
    match (listen, problems.is_empty()) {
        (Some(listen), true) => Ok(Config {
            listen,
            admin,
            admin_token,
            max_connections: raw.max_connections,
            unmatched: raw.unmatched,
            timeouts,
            retry,
            tokens,
            connect,
            tls,
            intercept_ca,
            credentials,
            routes,
            declares_routes,
            files,
            clients,
            unmatched_reach,
            admin_hosts,
            token_cache: token_cache.unwrap_or_default(),
            secret_commands,
        }),
        _ => Err(problems),
    }
}
