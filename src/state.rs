//! The proxy's hot state: one immutable snapshot (config, routes, credential slots) behind a
//! single `ArcSwap`, so a request sees one consistent version from start to end and never
//! takes a lock. A reload builds a whole new snapshot and swaps it in one step.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};

use crate::config::{Config, ConfigError, Environment, RouteConfig, TokenCacheSettings};
use crate::credentials::{build_credential_source, is_consent_type, DurableTokens, SourceDeps};
use crate::intercept::CertAuthority;
use crate::metrics::{Metrics, RouteMetrics};
use crate::routes::RouteTable;
use crate::token_cache::file_store::FileStore;
use crate::token_cache::RedisCache;
use crate::token_store::CredentialSlot;
use crate::upstream::{tls_config, UpstreamClient};

/// One consistent version of everything a request needs.
pub struct Snapshot {
    /// The validated config this snapshot was built from.
    pub config: Arc<Config>,
    /// The route table.
    pub routes: RouteTable,
    /// Credential slots by name.
    pub slots: HashMap<String, Arc<CredentialSlot>>,
    /// Metric handles for traffic no route matches.
    pub unmatched_metrics: RouteMetrics,
    /// The shared token cache (`token_cache: type: redis`), if configured.
    pub token_cache: Option<Arc<RedisCache>>,
    /// Where consent credentials keep their grant (`token_cache: type: file`, or the Redis
    /// cache's consent records); it follows `token_cache` across reloads.
    pub durable: Option<Arc<dyn DurableTokens>>,
}

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The config file was refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// TLS trust roots could not be loaded.
    #[error("{0}")]
    Tls(String),
    /// The shared token cache could not be set up.
    #[error("{0}")]
    TokenCache(String),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// State shared by the proxy, the admin endpoint and the reloader.
pub struct State {
    snapshot: ArcSwap<Snapshot>,
    /// The pooled upstream client.
    pub upstream: UpstreamClient,
    /// Metrics registry and handles.
    pub metrics: Arc<Metrics>,
    /// The CA that signs leaf certificates for intercepted tunnels (`intercept_ca`).
    intercept_ca: ArcSwapOption<CertAuthority>,
    deps: SourceDeps,
    /// The config file, for reloads (`None` when started from an in-memory config).
    pub config_path: Option<PathBuf>,
    env: Arc<dyn Environment>,
    reload_lock: std::sync::Mutex<()>,
    /// The proxy's bound listen and admin addresses (set once they are bound), which
    /// unmatched traffic may never reach.
    pub own_addresses: std::sync::OnceLock<Vec<std::net::SocketAddr>>,
    /// Failed proxy logins per client address; kept across reloads, so that a reload does
    /// not forgive a guessing client.
    pub auth_throttle: crate::access::AuthThrottle,
}

impl State {
    /// Builds the state for `config`. Must run inside a tokio runtime (prefetching
    /// credentials spawns tasks).
    pub fn new(
        config: Config,
        config_path: Option<PathBuf>,
        env: Arc<dyn Environment>,
    ) -> Result<Arc<Self>, StartError> {
        let tls = tls_config(&config.tls).map_err(StartError::Tls)?;
        let upstream = UpstreamClient::new(Arc::clone(&tls), &config.timeouts);
        let http = reqwest::Client::builder()
            .use_preconfigured_tls((*tls).clone())
            .connect_timeout(config.timeouts.connect)
            .timeout(config.tokens.fetch_timeout)
            .no_proxy()
            // A redirect would re-send a form body (a client secret, a password) to a host the
            // config does not name; a token endpoint that redirects is reported instead.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| StartError::Tls(format!("cannot build the token endpoint client: {e}")))?;
        let intercept_ca = match &config.intercept_ca {
            Some(settings) => Some(Arc::new(
                CertAuthority::load(settings).map_err(|e| StartError::Tls(e.to_string()))?,
            )),
            None => None,
        };
        let metrics = Arc::new(Metrics::new());
        let deps = SourceDeps::new(http);
        let token_cache = match &config.token_cache {
            TokenCacheSettings::Memory | TokenCacheSettings::File(_) => None,
            TokenCacheSettings::Redis(settings) => Some(
                RedisCache::new(settings, Arc::clone(&metrics)).map_err(StartError::TokenCache)?,
            ),
        };
        let durable = new_durable(&config, token_cache.as_ref());
        let shared = Shared {
            token_cache,
            durable,
        };
        let snapshot = build_snapshot(config, None, shared, &deps, &metrics, false);
        let auth_throttle = crate::access::AuthThrottle::new(metrics.proxy_auth_failures.clone());
        let secret_refused = Arc::clone(&deps.secret_refused);
        let state = Arc::new(Self {
            snapshot: ArcSwap::from_pointee(snapshot),
            upstream,
            metrics,
            intercept_ca: ArcSwapOption::new(intercept_ca),
            deps,
            config_path,
            env,
            reload_lock: std::sync::Mutex::new(()),
            own_addresses: std::sync::OnceLock::new(),
            auth_throttle,
        });
        rerun_secret_commands(Arc::downgrade(&state), secret_refused);
        Ok(state)
    }

    /// Whether this is the running proxy's state (its listeners are bound), not a command's.
    fn serving(&self) -> bool {
        self.own_addresses.get().is_some()
    }

    /// Marks the state as the running proxy's, its listeners bound at `own`, and starts the
    /// keepers of credentials whose grant must not go unused (`keepalive_refresh`).
    pub fn serve(&self, own: Vec<std::net::SocketAddr>) {
        let _ = self.own_addresses.set(own);
        for slot in self.snapshot().slots.values() {
            if slot.keeps_alive() {
                slot.start_keeper();
            }
        }
    }

    /// The current snapshot. Hold the `Arc` for the whole request.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.load_full()
    }

    /// The token cache for a reloaded `config`: the running one while its settings are
    /// unchanged (slots keep their tokens), a new one when they changed. A cache that cannot
    /// be built leaves the running one in force.
    fn reload_token_cache(&self, previous: &Snapshot, config: &Config) -> Option<Arc<RedisCache>> {
        let running = previous.token_cache.clone();
        match &config.token_cache {
            // The file store is opened at start (`State::new`); a reload does not move it.
            TokenCacheSettings::Memory | TokenCacheSettings::File(_) => {
                if running.is_some() {
                    tracing::info!("token_cache: now memory only; tokens are no longer shared");
                    self.metrics.token_cache_up.set(1);
                }
                None
            }
            TokenCacheSettings::Redis(settings) => match running {
                Some(cache) if cache.same_settings(settings) => Some(cache),
                _ => match RedisCache::new(settings, Arc::clone(&self.metrics)) {
                    Ok(cache) => {
                        tracing::info!(cache = %settings.display_url, "token_cache: now shared through redis");
                        Some(cache)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "token_cache not changed");
                        running
                    }
                },
            },
        }
    }

    /// The consent store for a reloaded `config` whose token cache is `token_cache`: the
    /// running one while it stays where it is (the same file and key, or the same Redis
    /// cache), a new one when it moved. A Redis cache that could not be built leaves the
    /// running store in force, as it leaves the running cache.
    fn reload_durable(
        previous: &Snapshot,
        config: &Config,
        token_cache: Option<&Arc<RedisCache>>,
    ) -> Option<Arc<dyn DurableTokens>> {
        let unmoved = match (&config.token_cache, token_cache) {
            (TokenCacheSettings::Redis(_), Some(cache)) => previous
                .token_cache
                .as_ref()
                .is_some_and(|running| Arc::ptr_eq(running, cache)),
            (TokenCacheSettings::Redis(_), None) => true,
            (settings, _) => *settings == previous.config.token_cache,
        };
        if unmoved {
            previous.durable.clone()
        } else {
            new_durable(config, token_cache)
        }
    }

    /// The interception CA, if one is configured.
    pub fn intercept_ca(&self) -> Option<Arc<CertAuthority>> {
        self.intercept_ca.load_full()
    }

    /// The source dependencies (token endpoint client, the running consent store), for
    /// commands that fetch tokens.
    pub fn source_deps(&self) -> SourceDeps {
        SourceDeps {
            durable: self.snapshot().durable.clone(),
            ..self.deps.clone()
        }
    }

    /// Replaces the running config. Credentials whose definition did not change keep their
    /// slot and so their cached token.
    pub fn install(&self, config: Config) {
        let _serialized = self.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let previous = self.snapshot.load_full();
        warn_about_restart_only_changes(&previous.config, &config);
        let listening = self
            .own_addresses
            .get()
            .and_then(|own| own.first().copied())
            .unwrap_or(previous.config.listen);
        if let Some(risk) = config.clients.open_relay_risk(listening) {
            tracing::warn!("OPEN PROXY: {risk}");
        }
        if previous.config.intercept_ca != config.intercept_ca {
            self.reload_intercept_ca(&config);
        }
        let token_cache = self.reload_token_cache(&previous, &config);
        let durable = Self::reload_durable(&previous, &config, token_cache.as_ref());
        let shared = Shared {
            token_cache,
            durable,
        };
        let next = build_snapshot(
            config,
            Some(&previous),
            shared,
            &self.deps,
            &self.metrics,
            self.serving(),
        );
        drop_removed_series(&previous.config, &next.config, &self.metrics);
        self.snapshot.store(Arc::new(next));
    }

    /// Replaces the token source of credential `name` with `source` (fresh slot, no cached
    /// token) and re-points the routes at it. For embedders whose token source is not a
    /// config type (the built-in demo, tests); a reload that changes the credential's
    /// definition builds a regular slot again. Returns false when there is no such credential.
    pub fn use_source(&self, name: &str, source: Arc<dyn crate::credentials::TokenSource>) -> bool {
        let _serialized = self.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.snapshot.load_full();
        let Some(cred) = current.config.credentials.get(name) else {
            return false;
        };
        let slot = CredentialSlot::with_cache(
            cred.clone(),
            current.config.tokens.clone(),
            source,
            Arc::clone(&self.metrics),
            current.token_cache.as_ref().map(|c| c.slot(cred)),
        );
        if cred.prefetch || (slot.keeps_alive() && self.serving()) {
            slot.start_keeper();
        }
        let mut slots = current.slots.clone();
        slots.insert(name.to_string(), slot);
        let routes = RouteTable::build(&current.config.routes, &slots, &self.metrics);
        self.snapshot.store(Arc::new(Snapshot {
            config: Arc::clone(&current.config),
            routes,
            slots,
            unmatched_metrics: current.unmatched_metrics.clone(),
            token_cache: current.token_cache.clone(),
            durable: current.durable.clone(),
        }));
        true
    }

    /// Re-reads the config file and installs it; on error the running config stays.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let Some(path) = &self.config_path else {
            return Ok(());
        };
        match Config::read(path) {
            Ok(text) => self.reload_text(&text),
            Err(e) => Err(self.refused(e)),
        }
    }

    /// Installs `text` as the config file's new content (the watcher passes text it has seen
    /// stable). Refused, with the running config staying in force, when the text is invalid
    /// or would fail open: no routes and no credentials while the running config has some,
    /// unless the file says `routes: []` explicitly.
    pub fn reload_text(&self, text: &str) -> Result<(), ConfigError> {
        let Some(path) = &self.config_path else {
            return Ok(());
        };
        let loaded = Config::from_yaml(text, path, self.env.as_ref())
            .and_then(|config| refuse_fail_open(&self.snapshot().config, config, path));
        match loaded {
            Ok(config) => {
                let routes = config.routes.len();
                let credentials = config.credentials.len();
                self.install(config);
                self.metrics.reload(true);
                tracing::info!(path = %path.display(), routes, credentials, "config reloaded");
                Ok(())
            }
            Err(e) => Err(self.refused(e)),
        }
    }

    fn refused(&self, e: ConfigError) -> ConfigError {
        self.metrics.reload(false);
        tracing::error!(error = %e, "config reload refused; the running config stays in force");
        e
    }
}

/// A config that has lost every route and credential the running one has is a truncated or
/// emptied file until it says otherwise (`routes: []`).
fn refuse_fail_open(
    running: &Config,
    next: Config,
    path: &std::path::Path,
) -> Result<Config, ConfigError> {
    let had = !running.routes.is_empty() || !running.credentials.is_empty();
    let has = !next.routes.is_empty() || !next.credentials.is_empty();
    if had && !has && !next.declares_routes {
        return Err(ConfigError::Invalid {
            path: path.to_path_buf(),
            problems: vec![format!(
                "the file has no routes and no credentials while the running config has {} \
                 routes and {} credentials; refused as a possibly truncated file (write \
                 `routes: []` to remove them all)",
                running.routes.len(),
                running.credentials.len()
            )],
        });
    }
    Ok(next)
}

impl State {
    /// Loads a changed `intercept_ca`; a CA that cannot be loaded leaves the old one in use.
    fn reload_intercept_ca(&self, config: &Config) {
        match &config.intercept_ca {
            None => self.intercept_ca.store(None),
            Some(settings) => match CertAuthority::load(settings) {
                Ok(ca) => self.intercept_ca.store(Some(Arc::new(ca))),
                Err(e) => {
                    tracing::error!(error = %e, "intercept_ca not reloaded; the previous CA stays in use")
                }
            },
        }
    }
}

/// Drops the metric series of routes and credentials that the new config no longer has.
fn drop_removed_series(old: &Config, new: &Config, metrics: &Metrics) {
    for route in &old.routes {
        let kept = new.routes.iter().find(|r| r.name == route.name);
        if kept.is_none() {
            metrics.drop_route(&route.name);
        }
        let still = kept.map(RouteConfig::credential_names).unwrap_or_default();
        for credential in route
            .credential_names()
            .into_iter()
            .filter(|c| !still.contains(c))
        {
            metrics.drop_replays(&route.name, credential);
        }
    }
    for name in old.credentials.keys() {
        if !new.credentials.contains_key(name) {
            metrics.drop_credential(name);
        }
    }
}

fn warn_about_restart_only_changes(old: &Config, new: &Config) {
    for line in restart_only_changes(old, new) {
        tracing::warn!("{line}");
    }
}

/// What of a reload from `old` to `new` waits for the next restart, one line per setting.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut lines = Vec::new();
    if old.listen != new.listen || old.admin != new.admin {
        lines.push("`listen` and `admin` changes take effect at the next restart");
    }
    if old.max_connections != new.max_connections {
        lines.push("`max_connections` changes take effect at the next restart");
    }
    if old.tls != new.tls
        || old.timeouts.connect != new.timeouts.connect
        || old.timeouts.pool_idle != new.timeouts.pool_idle
    {
        lines.push("`tls`, `timeouts.connect` and `timeouts.pool_idle` changes take effect at the next restart");
    }
    if old.tokens.fetch_timeout < new.tokens.fetch_timeout {
        lines.push(
            "a longer `tokens.fetch_timeout` reaches token endpoint calls (their HTTP client \
             stops at the old one) at the next restart",
        );
    }
    if matches!(new.token_cache, TokenCacheSettings::Redis(_))
        && old.token_cache == new.token_cache
        && old.tokens.fetch_timeout != new.tokens.fetch_timeout
    {
        lines.push(
            "`tokens.fetch_timeout` changes reach the consent credentials' refresh lease on \
             Redis at the next restart (or when `token_cache` changes)",
        );
    }
    lines
}

/// When the vendor refuses a configured secret (a token endpoint for good, or the upstream a
/// fixed value or a signature) and some secret comes from a command, reloads the config,
/// which runs the commands again: a changed secret makes a new slot that the next request
/// uses; an unchanged one keeps the refused slot (and its backoff). Refusals that arrive
/// meanwhile are folded into one, and after each run the next waits `tokens.backoff_max`, so
/// that a vendor refusing every request does not keep the commands running.
fn rerun_secret_commands(state: std::sync::Weak<State>, refused: Arc<tokio::sync::Notify>) {
    tokio::spawn(async move {
        loop {
            refused.notified().await;
            let Some(state) = state.upgrade() else {
                return;
            };
            // Read and let go of: the snapshot must not outlive the reload and the pause.
            let (commands, pause) = {
                let snapshot = state.snapshot();
                (
                    snapshot.config.secret_commands,
                    snapshot.config.tokens.backoff_max,
                )
            };
            if !commands {
                continue;
            }
            tracing::info!("the vendor refused a secret; running the secret commands again");
            // Commands block (up to `secret_command_timeout` each).
            let _ = tokio::task::spawn_blocking(move || state.reload()).await;
            tokio::time::sleep(pause).await;
        }
    });
}

/// The consent store of `config`, on `token_cache` when that is Redis.
fn new_durable(
    config: &Config,
    token_cache: Option<&Arc<RedisCache>>,
) -> Option<Arc<dyn DurableTokens>> {
    match (&config.token_cache, token_cache) {
        (_, Some(cache)) => Some(Arc::new(cache.durable(config.tokens.fetch_timeout))),
        (TokenCacheSettings::File(settings), None) => Some(Arc::new(FileStore::new(settings))),
        _ => None,
    }
}

/// Where a snapshot's slots keep what outlives one fetch: shared tokens and consent grants.
struct Shared {
    token_cache: Option<Arc<RedisCache>>,
    durable: Option<Arc<dyn DurableTokens>>,
}

/// `serving`: the state is the running proxy's (not a command's), so credentials whose
/// grant must be kept alive get their keeper: two processes refreshing one rotating refresh
/// token would kill it.
fn build_snapshot(
    config: Config,
    previous: Option<&Snapshot>,
    shared: Shared,
    deps: &SourceDeps,
    metrics: &Arc<Metrics>,
    serving: bool,
) -> Snapshot {
    let Shared {
        token_cache,
        durable,
    } = shared;
    let store_moved = previous.is_some_and(|p| !same_store(p.durable.as_ref(), durable.as_ref()));
    let deps = SourceDeps {
        durable: durable.clone(),
        ..deps.clone()
    };
    if let Some(cache) = &token_cache {
        cache.start();
    }
    for line in config.exposed_key_files() {
        tracing::warn!("{line}");
    }
    let mut slots = HashMap::new();
    for (name, cred) in &config.credentials {
        // Only the credential's own definition decides: `tokens:` timing changes apply to
        // the kept slot's next fetch, and its cached token stays.
        let consent = is_consent_type(cred.kind.type_name());
        let previous_slot = previous.and_then(|p| p.slots.get(name));
        if consent && store_moved && previous_slot.is_some() {
            tracing::warn!(
                credential = %name,
                "token_cache changed: this credential now reads its grant from the new store; \
                 the grant in the old one is not moved (run `authrelay authorize {name}` unless \
                 the new store already holds it)"
            );
        }
        let kept = previous_slot
            .filter(|s| {
                // A consent credential never uses the shared cache (below), whatever it is,
                // but its grant lives in the consent store.
                s.same_definition(cred)
                    && if consent {
                        !store_moved
                    } else {
                        s.uses_cache(token_cache.as_ref())
                    }
            })
            .cloned();
        if let Some(slot) = &kept {
            slot.use_settings(&config.tokens);
        }
        let slot = kept.unwrap_or_else(|| {
            CredentialSlot::with_cache(
                cred.clone(),
                config.tokens.clone(),
                build_credential_source(&cred.kind, &cred.secret_parts, &deps.for_credential(name)),
                Arc::clone(metrics),
                // Consent credentials share their tokens through the durable store (on the
                // same Redis) and its refresh lease instead.
                token_cache
                    .as_ref()
                    .filter(|_| !consent)
                    .map(|c| c.slot(cred)),
            )
        });
        if cred.prefetch || (slot.keeps_alive() && serving) {
            slot.start_keeper();
        }
        slots.insert(name.clone(), slot);
    }
    let routes = RouteTable::build(&config.routes, &slots, metrics);
    Snapshot {
        config: Arc::new(config),
        routes,
        slots,
        unmatched_metrics: metrics.for_route("unmatched", &[]),
        token_cache,
        durable,
    }
}

/// Whether two consent stores are the same one (both absent included).
fn same_store(a: Option<&Arc<dyn DurableTokens>>, b: Option<&Arc<dyn DurableTokens>>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Config {
        let env = HashMap::<String, String>::new();
        Config::from_yaml(yaml, std::path::Path::new("/tmp/routes.yaml"), &env)
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// A reload names what of it waits for a restart: a longer `fetch_timeout` for the token
    /// endpoint client, and on an unchanged Redis cache the consent refresh lease.
    #[test]
    fn restart_only_changes_name_the_fetch_timeout() {
        let key = "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=";
        let redis = format!(
            "token_cache:\n  type: redis\n  url: redis://127.0.0.1:6379/0\n  encryption_key: {key}\nroutes: []\n"
        );
        let with = |timeout: &str| config(&format!("tokens:\n  fetch_timeout: {timeout}\n{redis}"));
        let lines = restart_only_changes(&with("5s"), &with("20s"));
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].contains("token endpoint calls"), "{lines:?}");
        assert!(lines[1].contains("refresh lease"), "{lines:?}");
        let lines = restart_only_changes(&with("20s"), &with("5s"));
        assert_eq!(lines.len(), 1, "a shorter one applies to calls: {lines:?}");
        assert!(restart_only_changes(&with("5s"), &with("5s")).is_empty());
        let memory = |timeout: &str| {
            config(&format!(
                "tokens:\n  fetch_timeout: {timeout}\nroutes: []\n"
            ))
        };
        assert_eq!(restart_only_changes(&memory("5s"), &memory("20s")).len(), 1);
    }
}
