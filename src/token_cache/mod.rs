//! The shared token cache (`token_cache: type: redis`): how replicas share one token per
//! credential, with one vendor call per token across all of them.
//!
//! Each replica still keeps its own slot and its own lock-free copy of the token (the token
//! store); this module only changes what a slot's fetch does. A fetch first reads Redis; a
//! token there that the slot can use is taken as is. Otherwise the replica takes the
//! credential's lease (`SET NX PX`) and is the only one to call the vendor — using the refresh
//! grant stored in Redis, so a single-use refresh token is used exactly once — and writes the
//! result with a compare-and-swap fenced by the lease; the others wait for it (pub/sub, with
//! polling as a fallback), but never longer than `tokens.fetch_timeout`: then each fetches by
//! itself, as during an outage. A lease holder that dies releases by expiry.
//!
//! Redis is not trusted to hand back what was written. Each record carries a generation
//! (sealed with it) one above any the writer has seen, and a replica never takes a record
//! older than one it has seen or than the token it holds, so a record put back cannot roll a
//! replica back. A value that is no record of ours (another type, beyond the read cap, not
//! opening) is only described, never obeyed, and the lease holder replaces it.
//!
//! Redis is never a single point of failure: any error or slow answer marks the cache down,
//! the replica fetches by itself as without Redis (logged once, `authrelay_token_cache_up 0`,
//! a fallback counted), and a probe brings it back.
//!
//! Records are sealed (`seal.rs`), keyed by the credential's fingerprint
//! ([`crate::credentials::Fingerprint`]), and carry no secret in clear.

pub mod file_store;
pub(crate) mod redis_durable;
pub(crate) mod redis_store;
pub(crate) mod seal;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ring::rand::{SecureRandom, SystemRandom};

use crate::config::{CredentialConfig, RedisCacheSettings};
use crate::credentials::{CredentialError, Token};
use crate::metrics::Metrics;
use redis_store::{RedisStore, StoreError, Stored};
pub(crate) use seal::{Sealer, SharedToken};

/// How much longer than the fetch timeout a replica's lease on a credential lasts: a lease
/// outlives any fetch its holder can still be making.
const LEASE_MARGIN: Duration = Duration::from_secs(5);
/// Longest a record is kept (a token or refresh grant that never expires is still dropped
/// after this, and re-fetched).
const MAX_RECORD_TTL: Duration = Duration::from_secs(30 * 24 * 3600);
/// How often a waiter looks at Redis when no wake-up arrives.
const POLL: Duration = Duration::from_millis(50);
/// How often a healthy cache is checked (so the gauge tells the truth between fetches)...
const CHECK_EVERY: Duration = Duration::from_secs(2);
/// ...and how often an unreachable one is probed.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// A known plaintext sealed under `{prefix}keycheck`: the first replica writes it, every
/// other replica checks it opens, so two replicas with different keys are noticed.
const KEYCHECK: &str = "authrelay token-cache keycheck";
/// The key check lives this long unless a replica that can open it renews it, so after a
/// key rotation the old one is gone within this time.
const KEYCHECK_TTL: Duration = Duration::from_secs(600);
/// Health checks between two key checks (about 30 s).
const KEYCHECK_EVERY: u32 = 15;

/// The Redis token cache shared by every slot of one replica.
pub struct RedisCache {
    store: Arc<RedisStore>,
    sealer: Sealer,
    settings: RedisCacheSettings,
    metrics: Arc<Metrics>,
    /// False while Redis is known to be unreachable: fetches skip it.
    up: AtomicBool,
    started: AtomicBool,
    /// Whether the last key check found another replica's key (logged on change only).
    foreign_key: AtomicBool,
    /// Dropped with the cache: stops its background tasks.
    stop: tokio::sync::watch::Sender<bool>,
}

impl std::fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCache")
            .field("url", &self.settings.display_url)
            .finish_non_exhaustive()
    }
}

/// What the admin endpoint shows of the cache.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CacheStatus {
    /// `memory` or `redis`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// The Redis URL without user information.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `up` or `down` (Redis unreachable: each replica uses its own tokens).
    pub state: &'static str,
}

impl CacheStatus {
    /// The in-process cache, always up.
    pub(crate) fn memory() -> Self {
        Self {
            kind: "memory",
            url: None,
            state: "up",
        }
    }
}

/// One credential's place in the cache.
#[derive(Clone)]
pub(crate) struct SharedSlot {
    cache: Arc<RedisCache>,
    key: String,
    lease_key: String,
    aad: String,
    /// The newest record this replica has taken or written, and when it last obtained a
    /// token at all: nothing older is ever taken from Redis.
    seen: Arc<Mutex<Seen>>,
}

/// How new a record must be for a replica to take it. Generations are compared first; the
/// issue time covers tokens this replica fetched alone (Redis down), which have none. (Issue
/// times come from each writer's clock: a replica whose clock is far behind only makes the
/// others fetch once more, never take an older token.)
#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    /// The highest generation taken or written.
    generation: u64,
    /// When (ms since the epoch, as records hold it) the newest token this replica obtained
    /// was issued, by whichever way it came.
    issued_ms: u64,
}

/// Where a fetch's token came from.
#[derive(Debug)]
pub(crate) enum Obtained {
    /// Another replica (or an earlier run) stored it: no vendor call.
    Shared { token: SharedToken, sealed: Vec<u8> },
    /// This replica called the vendor; `sealed` is what it stored (`None`: not stored,
    /// Redis being down or another replica's newer token standing).
    Fetched {
        token: Token,
        sealed: Option<Vec<u8>>,
    },
}

impl RedisCache {
    /// A cache for `settings`. Nothing connects until [`Self::start`].
    pub(crate) fn new(
        settings: &RedisCacheSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<Self>, String> {
        let store = RedisStore::new(settings)?;
        metrics.token_cache_up.set(0);
        Ok(Arc::new(Self {
            store: Arc::new(store),
            sealer: Sealer::new(&settings.encryption_key),
            settings: settings.clone(),
            metrics,
            up: AtomicBool::new(true),
            started: AtomicBool::new(false),
            foreign_key: AtomicBool::new(false),
            stop: tokio::sync::watch::channel(false).0,
        }))
    }

    /// The store of consent credentials' tokens on this cache's Redis; refresh leases last
    /// `fetch_timeout` plus a margin. Must be called inside a tokio runtime.
    pub(crate) fn durable(&self, fetch_timeout: Duration) -> redis_durable::RedisDurable {
        redis_durable::RedisDurable::new(
            Arc::clone(&self.store),
            Sealer::new(&self.settings.encryption_key),
            &self.settings.key_prefix,
            fetch_timeout.saturating_add(LEASE_MARGIN),
        )
    }

    /// Whether this cache was built from `settings` (a reload keeps it then).
    pub(crate) fn same_settings(&self, settings: &RedisCacheSettings) -> bool {
        &self.settings == settings
    }

    /// Connects, subscribes and keeps checking health in the background (once; must run
    /// inside a tokio runtime). The tasks end when the cache is dropped.
    pub(crate) fn start(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::AcqRel) {
            return;
        }
        tokio::spawn(Arc::clone(&self.store).listen(self.stop.subscribe()));
        let weak: Weak<Self> = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut first = true;
            let mut checks: u32 = 0;
            loop {
                let Some(cache) = weak.upgrade() else { return };
                match cache.store.ping().await {
                    Ok(()) if first || !cache.is_up() => cache.mark_up(first).await,
                    Ok(()) if checks % KEYCHECK_EVERY == 0 => cache.check_key().await,
                    Ok(()) => {}
                    Err(e) => cache.mark_down(&e),
                }
                first = false;
                checks = checks.wrapping_add(1);
                let wait = if cache.is_up() {
                    CHECK_EVERY
                } else {
                    PROBE_EVERY
                };
                drop(cache);
                tokio::time::sleep(wait).await;
            }
        });
    }

    async fn mark_up(&self, first: bool) {
        self.up.store(true, Ordering::Release);
        self.metrics.token_cache_up.set(1);
        if first {
            tracing::info!(cache = %self.settings.display_url, "token cache connected");
        } else {
            tracing::info!(cache = %self.settings.display_url, "token cache reachable again; tokens are shared again");
        }
        self.check_key().await;
    }

    /// Says (once per change) when the key check sealed by another replica does not open
    /// with this key, and renews it when it does.
    async fn check_key(&self) {
        match self.verify_key().await {
            Ok(()) => {
                if self.foreign_key.swap(false, Ordering::AcqRel) {
                    tracing::info!(cache = %self.settings.display_url, "token_cache.encryption_key now matches the other replicas'");
                }
            }
            Err(KeyCheck::Foreign(message)) => {
                if !self.foreign_key.swap(true, Ordering::AcqRel) {
                    tracing::error!(cache = %self.settings.display_url, "{message}");
                }
            }
            Err(KeyCheck::Unreachable(_)) => {}
        }
    }

    async fn verify_key(&self) -> Result<(), KeyCheck> {
        let key = format!("{}keycheck", self.settings.key_prefix);
        let probe = SharedToken {
            token: Token {
                value: crate::vocab::secret::Secret::new(KEYCHECK),
                expires_at: None,
                refresh: None,
            },
            issued_at: SystemTime::UNIX_EPOCH,
            generation: 0,
        };
        let unreachable = |e: StoreError| KeyCheck::Unreachable(e.to_string());
        let sealed = self
            .sealer
            .seal(KEYCHECK, &probe)
            .ok_or_else(|| KeyCheck::Unreachable("cannot seal the key check".into()))?;
        let stored = self
            .store
            .set_once(&key, &sealed, KEYCHECK_TTL)
            .await
            .map_err(unreachable)?
            .ok_or_else(|| {
                KeyCheck::Unreachable("the key check vanished right after it was written".into())
            })?;
        match self.sealer.open(KEYCHECK, &stored) {
            Some(t) if t.token.value.expose() == KEYCHECK => self
                .store
                .expire(&key, KEYCHECK_TTL)
                .await
                .map_err(unreachable),
            _ => Err(KeyCheck::Foreign(format!(
                "token_cache.encryption_key differs from the one that wrote `{key}` (another \
                 replica or an earlier run): replicas with different keys do not share tokens. \
                 Give every replica the same key; after rotating the key everywhere, the \
                 old check expires within {} minutes (or delete `{key}`)",
                KEYCHECK_TTL.as_secs() / 60
            ))),
        }
    }

    /// For `check --fetch`: Redis answers, and this key opens what other replicas sealed.
    pub(crate) async fn verify(&self) -> Result<(), String> {
        self.store.ping().await.map_err(|e| e.to_string())?;
        self.verify_key().await.map_err(|e| match e {
            KeyCheck::Foreign(m) | KeyCheck::Unreachable(m) => m,
        })
    }

    /// The cache's place for one credential (its keys depend on the whole definition).
    pub(crate) fn slot(self: &Arc<Self>, config: &CredentialConfig) -> SharedSlot {
        let fingerprint = self.sealer.fingerprint(config);
        let prefix = &self.settings.key_prefix;
        SharedSlot {
            cache: Arc::clone(self),
            key: format!("{prefix}token:{}:{fingerprint}", config.name),
            lease_key: format!("{prefix}lease:{}:{fingerprint}", config.name),
            aad: format!("authrelay token v2\0{}\0{fingerprint}", config.name),
            seen: Arc::default(),
        }
    }

    /// The admin view.
    pub(crate) fn status(&self) -> CacheStatus {
        CacheStatus {
            kind: "redis",
            url: Some(self.settings.display_url.clone()),
            state: if self.up.load(Ordering::Acquire) {
                "up"
            } else {
                "down"
            },
        }
    }

    fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Redis failed: fetch without it until the health check reaches it again. Logged
    /// once per outage.
    fn mark_down(&self, error: &StoreError) {
        self.metrics.token_cache_up.set(0);
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(
                cache = %self.settings.display_url,
                %error,
                "token cache unavailable: this replica fetches its own tokens until it is back"
            );
        }
    }
}

impl Drop for RedisCache {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

impl std::fmt::Debug for SharedSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedSlot")
            .field("key", &self.key)
            .finish()
    }
}

/// Why the key check failed.
enum KeyCheck {
    /// The check was sealed with another key.
    Foreign(String),
    /// Redis did not answer (the health check reports that).
    Unreachable(String),
}

/// What one look at Redis found.
enum Step {
    Take(SharedToken, Vec<u8>),
    /// The lease is ours; the token key holds this.
    Leased(Read),
    Wait,
}

/// A token key as read: what it means to this replica, and what it holds (the expectation
/// of the compare-and-swap that replaces it).
struct Read {
    found: Found,
    stored: Stored,
}

/// What a token key means to this replica.
enum Found {
    Nothing,
    /// A record that opens and is not older than one this replica has seen.
    Current(SharedToken),
    /// A record that opens but is older than one this replica has seen or the token it
    /// holds: put back by someone, or written before this replica's own fetch.
    Older(SharedToken),
    /// No record of ours: what it is (for the log).
    Unreadable(String),
}

fn fence() -> String {
    let mut bytes = [0u8; 16];
    let _ = SystemRandom::new().fill(&mut bytes);
    crate::credentials::fingerprint::hex(&bytes)
}

/// How long Redis keeps a record: as long as its token or its refresh grant can be used.
fn record_ttl(token: &Token, now: SystemTime) -> Duration {
    let grant_end = token.refresh.as_ref().map(|g| g.expires_at);
    let end = match (token.expires_at, grant_end) {
        (None, _) | (_, Some(None)) => None,
        (Some(exp), None) => Some(exp),
        (Some(exp), Some(Some(grant))) => Some(exp.max(grant)),
    };
    end.map(|e| e.duration_since(now).unwrap_or(Duration::ZERO))
        .unwrap_or(MAX_RECORD_TTL)
        .clamp(Duration::from_secs(1), MAX_RECORD_TTL)
}

impl SharedSlot {
    /// The state of the cache this place is in.
    pub fn status(&self) -> CacheStatus {
        self.cache.status()
    }

    /// Whether this place belongs to `cache`.
    pub fn is_in(&self, cache: &Arc<RedisCache>) -> bool {
        Arc::ptr_eq(&self.cache, cache)
    }

    /// Obtains a token through the cache: one that `accept` takes from Redis, or one this
    /// replica fetches with `fetch` under the credential's lease. `fetch` runs at most once,
    /// with the refresh grant stored in Redis (or `local_previous` when Redis has none, holds
    /// an older one, or is down) and must end within `fetch_timeout`. Another replica's lease
    /// is waited for no longer than `fetch_timeout`: a holder that never finishes costs a
    /// request that much, then this replica fetches alone (as during an outage).
    pub async fn obtain<F, Fut>(
        &self,
        accept: &(dyn Fn(&SharedToken) -> bool + Send + Sync),
        local_previous: Option<Token>,
        fetch_timeout: Duration,
        fetch: F,
    ) -> Result<Obtained, CredentialError>
    where
        F: FnOnce(Option<Token>) -> Fut,
        Fut: Future<Output = Result<Token, CredentialError>>,
    {
        let cache = &self.cache;
        if !cache.is_up() {
            return self.fetch_alone(fetch, local_previous).await;
        }
        let fence = fence();
        let lease_ttl = fetch_timeout.saturating_add(LEASE_MARGIN);
        let deadline = Instant::now().checked_add(fetch_timeout);
        let waiter = cache.store.waiter(&self.key);
        loop {
            let woken = waiter.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            match self.step(accept, &fence, lease_ttl).await {
                Err(e) => {
                    cache.mark_down(&e);
                    return self.fetch_alone(fetch, local_previous).await;
                }
                Ok(Step::Take(token, sealed)) => {
                    self.saw(&token);
                    return Ok(Obtained::Shared { token, sealed });
                }
                Ok(Step::Leased(read)) => {
                    return self
                        .fetch_under_lease(read, &fence, local_previous, fetch)
                        .await
                }
                Ok(Step::Wait) if deadline.is_some_and(|d| Instant::now() >= d) => {
                    tracing::warn!(key = %self.key, "another replica has held the token lease longer than tokens.fetch_timeout; fetching alone");
                    return self.fetch_alone(fetch, local_previous).await;
                }
                Ok(Step::Wait) => {
                    tokio::select! {
                        _ = woken => {}
                        _ = tokio::time::sleep(POLL) => {}
                    }
                }
            }
        }
    }

    /// One look at Redis: a token to take, the lease (with the record as it stands under
    /// it), or someone else's lease to wait for.
    async fn step(
        &self,
        accept: &(dyn Fn(&SharedToken) -> bool + Send + Sync),
        fence: &str,
        lease_ttl: Duration,
    ) -> Result<Step, StoreError> {
        let store = &self.cache.store;
        store.connect().await?;
        if let step @ Step::Take(..) = Self::take_or_lease(self.read().await?, accept) {
            return Ok(step);
        }
        if !store.try_lease(&self.lease_key, fence, lease_ttl).await? {
            return Ok(Step::Wait);
        }
        // Another replica may have written between the read and the lease.
        let step = Self::take_or_lease(self.read().await?, accept);
        if let Step::Take(..) = step {
            store.release(&self.key, &self.lease_key, fence).await?;
        }
        Ok(step)
    }

    /// Takes what was read when it is a current record `accept` takes; else what was read
    /// is what the lease holder replaces.
    fn take_or_lease(read: Read, accept: &(dyn Fn(&SharedToken) -> bool + Send + Sync)) -> Step {
        match read {
            Read {
                found: Found::Current(token),
                stored: Stored::Value(raw),
            } if accept(&token) => Step::Take(token, raw),
            read => Step::Leased(read),
        }
    }

    /// Fetches without the shared cache (Redis down or a lease held too long), counted.
    async fn fetch_alone<F, Fut>(
        &self,
        fetch: F,
        previous: Option<Token>,
    ) -> Result<Obtained, CredentialError>
    where
        F: FnOnce(Option<Token>) -> Fut,
        Fut: Future<Output = Result<Token, CredentialError>>,
    {
        self.cache.metrics.token_cache_fallbacks.inc();
        let token = fetch(previous).await?;
        self.saw_issue(seal::to_ms(SystemTime::now()), 0);
        Ok(Obtained::Fetched {
            token,
            sealed: None,
        })
    }

    fn seen(&self) -> Seen {
        *self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Raises the floor below which no record is taken.
    fn saw_issue(&self, issued_ms: u64, generation: u64) {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.issued_ms = seen.issued_ms.max(issued_ms);
        seen.generation = seen.generation.max(generation);
    }

    fn saw(&self, token: &SharedToken) {
        self.saw_issue(seal::to_ms(token.issued_at), token.generation);
    }

    /// The token key, and what it means here: nothing, a record to consider, an older record
    /// than this replica has seen, or something that is no record of ours.
    async fn read(&self) -> Result<Read, StoreError> {
        let stored = self.cache.store.read(&self.key).await?;
        let found = match &stored {
            Stored::Nothing => Found::Nothing,
            Stored::Value(raw) => match self.cache.sealer.open(&self.aad, raw) {
                None => Found::Unreadable(format!(
                    "a value of {} bytes that does not open as a token record (another key or \
                     format, or tampered with)",
                    raw.len()
                )),
                Some(token) => {
                    let seen = self.seen();
                    if token.generation < seen.generation
                        || seal::to_ms(token.issued_at) < seen.issued_ms
                    {
                        Found::Older(token)
                    } else {
                        Found::Current(token)
                    }
                }
            },
            Stored::TooLarge(len) => Found::Unreadable(format!(
                "a value of {len} bytes, too large to be a token record (at most {})",
                redis_store::MAX_VALUE
            )),
            Stored::OtherType(kind) => Found::Unreadable(format!(
                "a value of the wrong type ({kind}; token records are strings)"
            )),
        };
        Ok(Read { found, stored })
    }

    /// This replica holds the lease: fetches the next token with the best grant it has and
    /// writes it in place of whatever the key held, one generation above anything seen.
    async fn fetch_under_lease<F, Fut>(
        &self,
        read: Read,
        fence: &str,
        local_previous: Option<Token>,
        fetch: F,
    ) -> Result<Obtained, CredentialError>
    where
        F: FnOnce(Option<Token>) -> Fut,
        Fut: Future<Output = Result<Token, CredentialError>>,
    {
        let cache = &self.cache;
        let seen = self.seen().generation;
        let (previous, stored_generation) = match read.found {
            Found::Nothing => (local_previous, 0),
            Found::Current(shared) => (Some(shared.token), shared.generation),
            Found::Older(shared) => {
                tracing::warn!(
                    key = %self.key,
                    generation = shared.generation,
                    seen,
                    "the stored token record is older than one this replica has seen or the token it holds (put back?); not taken, replacing it"
                );
                (local_previous, shared.generation)
            }
            Found::Unreadable(what) => {
                tracing::warn!(key = %self.key, found = %what, "the token key holds no readable record; replacing it");
                (local_previous, 0)
            }
        };
        let token = match fetch(previous).await {
            Ok(token) => token,
            Err(error) => {
                let _ = cache.store.release(&self.key, &self.lease_key, fence).await;
                return Err(error);
            }
        };
        // Whole milliseconds, as the record holds it, so that reading it back finds it
        // exactly as new as the floor it sets.
        let now_ms = seal::to_ms(SystemTime::now());
        let now = UNIX_EPOCH + Duration::from_millis(now_ms);
        let shared = SharedToken {
            token,
            issued_at: now,
            generation: stored_generation.max(seen).saturating_add(1),
        };
        self.saw(&shared);
        let Some(sealed) = cache.sealer.seal(&self.aad, &shared) else {
            let _ = cache.store.release(&self.key, &self.lease_key, fence).await;
            return Ok(Obtained::Fetched {
                token: shared.token,
                sealed: None,
            });
        };
        let ttl = record_ttl(&shared.token, now);
        let written = cache
            .store
            .compare_and_write(
                &self.key,
                &self.lease_key,
                fence,
                &read.stored,
                &sealed,
                ttl,
            )
            .await;
        match written {
            Ok(true) => Ok(Obtained::Fetched {
                token: shared.token,
                sealed: Some(sealed),
            }),
            Ok(false) => {
                tracing::warn!(key = %self.key, "the token key changed during the fetch (the lease expired and another replica wrote); keeping the stored token if it is newer");
                let _ = cache.store.release(&self.key, &self.lease_key, fence).await;
                let stored = match self.read().await {
                    Ok(Read {
                        found: Found::Current(token),
                        stored: Stored::Value(sealed),
                    }) => Some((token, sealed)),
                    _ => None,
                };
                match stored {
                    Some((token, sealed)) => {
                        self.saw(&token);
                        Ok(Obtained::Shared { token, sealed })
                    }
                    None => Ok(Obtained::Fetched {
                        token: shared.token,
                        sealed: None,
                    }),
                }
            }
            Err(e) => {
                cache.mark_down(&e);
                Ok(Obtained::Fetched {
                    token: shared.token,
                    sealed: None,
                })
            }
        }
    }

    /// Deletes the stored token if it is still `sealed` (an operator dropped it).
    pub fn forget(&self, sealed: Vec<u8>) {
        let slot = self.clone();
        tokio::spawn(async move {
            if let Err(e) = slot.cache.store.forget(&slot.key, &sealed).await {
                slot.cache.mark_down(&e);
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::RefreshGrant;
    use crate::vocab::secret::Secret;

    fn token(exp: Option<u64>, grant: Option<Option<u64>>) -> Token {
        let at = |s: u64| SystemTime::UNIX_EPOCH + Duration::from_secs(s);
        Token {
            value: Secret::new("Bearer t"),
            expires_at: exp.map(at),
            refresh: grant.map(|g| RefreshGrant {
                token: Secret::new("r"),
                expires_at: g.map(at),
            }),
        }
    }

    fn credential(password: &str) -> CredentialConfig {
        let yaml = "credentials:\n  tt:\n    type: login\n    login_url: https://tt.example/auth/login\n    username: dispatch\n    password: ${PW}\nroutes: []\n";
        let env: std::collections::HashMap<String, String> =
            [("PW".to_string(), password.to_string())].into();
        let config = crate::config::Config::from_yaml(
            yaml,
            std::path::Path::new("/etc/authrelay/routes.yaml"),
            &env,
        )
        .unwrap();
        config.credentials["tt"].clone()
    }

    #[test]
    fn fingerprints_agree_across_loads_and_follow_every_secret() {
        let sealer = Sealer::new(&crate::config::EncryptionKey([3; 32]));
        let a = sealer.fingerprint(&credential("pw-one"));
        assert_eq!(a, sealer.fingerprint(&credential("pw-one")), "stable");
        assert_ne!(
            a,
            sealer.fingerprint(&credential("pw-two")),
            "password counts"
        );
        let other_key = Sealer::new(&crate::config::EncryptionKey([4; 32]));
        assert_ne!(a, other_key.fingerprint(&credential("pw-one")), "keyed");
        assert!(!a.contains("pw-one"));
        assert_eq!(a.len(), 32);
    }

    #[test]
    fn records_live_as_long_as_their_token_or_grant() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let s = Duration::from_secs;
        assert_eq!(record_ttl(&token(Some(1060), None), now), s(60));
        assert_eq!(
            record_ttl(&token(Some(1060), Some(Some(4600))), now),
            s(3600)
        );
        assert_eq!(
            record_ttl(&token(Some(1060), Some(None)), now),
            MAX_RECORD_TTL
        );
        assert_eq!(record_ttl(&token(None, None), now), MAX_RECORD_TTL);
        assert_eq!(record_ttl(&token(Some(900), None), now), s(1));
    }
}
