//! The token store: one slot per credential holding its current token behind an `ArcSwap`.
//!
//! The hot path loads the current token without a lock ([`CredentialSlot::get`]). The rest
//! lives in files of its own:
//! - `flight.rs`: the slot's state machine — idle or running exactly one fetch, in one
//!   spawned task that survives the request that started it and turns a panic into an
//!   ordinary failure; every way into a fetch goes through it (single flight);
//! - `issued.rs`: a token ready to inject and where it stands (usable, due);
//! - `timing.rs`: when to refresh, how long to back off, how long a route stays quiet;
//! - `rejections.rs`: what a 401/403 on a route does (refresh once, then quiet periods);
//! - `views.rs`: what the admin endpoint and the gauges show of a slot.

mod flight;
mod issued;
mod rejections;
mod timing;
mod views;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use http::HeaderName;
use tokio::sync::oneshot;

use crate::config::{CredentialConfig, TokenSettings};
use crate::credentials::{CredentialError, RequestSigner, TokenSource};
use crate::metrics::Metrics;
use crate::token_cache::{RedisCache, SharedSlot};
use flight::{Failure, Phase, Trigger};
use rejections::RouteRejections;

pub(crate) use issued::Origin;
pub use issued::{IssuedToken, QueryForm};
pub use views::SlotStatus;

/// A credential could not supply a token; answered as 502 naming the credential.
#[derive(Debug, Clone, thiserror::Error)]
#[error("credential `{credential}` unavailable: {source}")]
pub struct Unavailable {
    /// The credential's name.
    pub credential: Arc<str>,
    /// The last failure.
    pub source: CredentialError,
    /// When the next attempt will be made, if backing off.
    pub retry_in: Option<Duration>,
}

/// The slot's mutable state. The lock is held for a few field updates only, never across an
/// `.await`.
struct Inner {
    settings: TokenSettings,
    phase: Phase,
    /// The last token issued, kept for its refresh grant even after it stops being sent.
    last_issued: Option<Arc<IssuedToken>>,
    last_success: Option<(SystemTime, Instant)>,
    failure: Option<Failure>,
    fetches: u64,
    rejections: HashMap<Arc<str>, RouteRejections>,
    /// The token an operator dropped: never taken back from the shared cache.
    dropped: Option<Arc<IssuedToken>>,
}

/// One credential's token and everything needed to renew it.
pub struct CredentialSlot {
    name: Arc<str>,
    config: CredentialConfig,
    source: Arc<dyn TokenSource>,
    refreshable: bool,
    /// The longest the keeper lets the slot go without a successful fetch (see
    /// [`TokenSource::keepalive`]).
    keepalive: Option<Duration>,
    metrics: Arc<Metrics>,
    /// This credential's place in the shared token cache (`token_cache: type: redis`).
    shared: Option<SharedSlot>,
    /// The token requests inject, read without a lock.
    current: ArcSwapOption<IssuedToken>,
    inner: Mutex<Inner>,
    /// How many routes have a rejection record, so that the success path skips the lock in
    /// the usual case (no route has one).
    routes_with_rejections: AtomicUsize,
    /// A lock-free copy of "a fetch is running", so that requests using a token that is due
    /// do not take the lock while its refresh runs. Set with the phase; cleared by `settle`,
    /// which the fetch's drop guard always reaches.
    fetch_running: AtomicBool,
    keeper_stop: Mutex<Option<oneshot::Sender<()>>>,
}

impl std::fmt::Debug for CredentialSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CredentialSlot")
            .field("name", &self.name)
            .finish()
    }
}

impl CredentialSlot {
    /// A slot with no token yet, kept in this process only.
    pub fn new(
        config: CredentialConfig,
        settings: TokenSettings,
        source: Arc<dyn TokenSource>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Self::with_cache(config, settings, source, metrics, None)
    }

    /// A slot with no token yet whose fetches go through the shared cache, when `shared` is
    /// given and the credential is refreshable (a fixed value has nothing to share).
    pub(crate) fn with_cache(
        config: CredentialConfig,
        settings: TokenSettings,
        source: Arc<dyn TokenSource>,
        metrics: Arc<Metrics>,
        shared: Option<SharedSlot>,
    ) -> Arc<Self> {
        let shared = shared.filter(|_| source.refreshable());
        Arc::new(Self {
            shared,
            name: Arc::from(config.name.as_str()),
            refreshable: source.refreshable(),
            keepalive: source.keepalive(),
            config,
            source,
            metrics,
            current: ArcSwapOption::empty(),
            inner: Mutex::new(Inner {
                settings,
                phase: Phase::Idle,
                last_issued: None,
                last_success: None,
                failure: None,
                fetches: 0,
                rejections: HashMap::new(),
                dropped: None,
            }),
            routes_with_rejections: AtomicUsize::new(0),
            fetch_running: AtomicBool::new(false),
            keeper_stop: Mutex::new(None),
        })
    }

    /// A poisoned lock only means a panic elsewhere; the fields stay consistent (each update
    /// is a few assignments), so carry on.
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The credential's name.
    pub(crate) fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The header this credential sets.
    pub fn header(&self) -> &HeaderName {
        &self.config.header
    }

    /// The query parameter this credential's value goes in instead of its header.
    pub(crate) fn query_param(&self) -> Option<&str> {
        self.config.query_param.as_deref()
    }

    /// The signer of a credential that signs each request (`hmac`, `aws_sigv4`), read from
    /// the slot's own definition: no lookup by name on the request path.
    pub(crate) fn signer(&self) -> Option<&dyn RequestSigner> {
        self.config.kind.signer()
    }

    /// Whether this slot can be kept across a reload to `config`: the token source is the
    /// same, so its cached token is still good. Timing settings do not matter (see
    /// [`Self::use_settings`]).
    pub(crate) fn same_definition(&self, config: &CredentialConfig) -> bool {
        &self.config == config
    }

    /// Whether this slot uses the shared cache `cache` (`None`: memory only); a reload that
    /// changes `token_cache` builds new slots.
    pub(crate) fn uses_cache(&self, cache: Option<&Arc<RedisCache>>) -> bool {
        match (&self.shared, cache) {
            (None, None) => true,
            (Some(s), Some(c)) => s.is_in(c),
            (None, Some(_)) => !self.refreshable,
            (Some(_), None) => false,
        }
    }

    /// Applies reloaded `tokens:` settings without dropping the cached token: the next fetch
    /// and backoff use them.
    pub(crate) fn use_settings(&self, settings: &TokenSettings) {
        self.lock().settings = settings.clone();
    }

    /// Whether fetching again can cure a 401/403.
    pub(crate) fn refreshable(&self) -> bool {
        self.refreshable
    }

    /// The upstream refused this credential's fixed value or signature, which no fetch can
    /// cure: secrets that come from commands are read again (see `TokenSource::value_refused`).
    pub(crate) fn fixed_value_refused(&self) {
        if !self.refreshable {
            self.source.value_refused();
        }
    }

    /// Whether the slot holds a token that may be sent now (for readiness).
    pub(crate) fn has_usable_token(&self) -> bool {
        self.current
            .load()
            .as_ref()
            .is_some_and(|t| t.usable_at(Instant::now()))
    }

    /// The token to inject now. Lock-free when a usable token is cached; starts a background
    /// refresh when the token is due; waits (single flight) only when there is no usable token.
    pub async fn get(self: &Arc<Self>) -> Result<Arc<IssuedToken>, Unavailable> {
        if let Some(token) = self.current.load_full() {
            if token.timeless() {
                return Ok(token);
            }
            let now = Instant::now();
            if token.usable_at(now) {
                if token.due_at(now) && !self.fetch_running.load(Ordering::Acquire) {
                    // Starts the fetch unless one runs or the slot backs off; nobody waits.
                    let _ = self.begin(Trigger::Due);
                }
                return Ok(token);
            }
        }
        self.refresh(Trigger::Missing).await
    }

    /// Drops the cached token so that the next request fetches one now (operator action).
    /// The refresh grant of the last token is kept, and any backoff is lifted.
    pub fn invalidate(&self) {
        let mut inner = self.lock();
        let dropped = self.current.swap(None);
        if let (Some(shared), Some(sealed)) = (
            &self.shared,
            dropped.as_ref().and_then(|t| t.sealed.as_ref()),
        ) {
            shared.forget(sealed.to_vec());
        }
        inner.dropped = dropped;
        inner.failure = None;
        tracing::info!(credential = %self.name, "cached token dropped by an operator");
    }

    /// How much longer the slot backs off after the token endpoint refused the configured
    /// secret; `None` without such a refusal or once its backoff is over. Read by operator
    /// actions, which otherwise ignore the backoff: a refused secret is refused again.
    pub fn refused_for(&self) -> Option<Duration> {
        let inner = self.lock();
        let now = Instant::now();
        inner
            .failure
            .as_ref()
            .filter(|f| f.error.is_final() && now < f.retry_at)
            .map(|f| f.retry_at.saturating_duration_since(now))
    }

    /// Fetches a new token now, ignoring the cached one and any backoff (operator action).
    /// Joins a fetch already in flight.
    pub async fn refresh_now(self: &Arc<Self>) -> Result<Arc<IssuedToken>, Unavailable> {
        self.refresh(Trigger::Operator).await
    }

    /// Whether the slot needs its keeper even without `prefetch: true`: its source's grant
    /// must be used at least every so often.
    pub(crate) fn keeps_alive(&self) -> bool {
        self.keepalive.is_some()
    }

    /// Starts a task, until the slot is dropped, that obtains the token now and keeps it
    /// fresh (for `prefetch: true`), and refreshes it when no fetch succeeded for the
    /// source's keepalive period (traffic or not). Calling it twice has no effect.
    pub(crate) fn start_keeper(self: &Arc<Self>) {
        let mut stop = self.keeper_stop.lock().unwrap_or_else(|p| p.into_inner());
        if stop.is_some() {
            return;
        }
        let (tx, mut rx) = oneshot::channel::<()>();
        *stop = Some(tx);
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                let Some(slot) = weak.upgrade() else { break };
                let trigger = match slot.keepalive {
                    Some(period) => Trigger::Keepalive(period),
                    None => Trigger::Due,
                };
                let _ = slot.refresh(trigger).await;
                let wait = slot.next_wake();
                drop(slot);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = &mut rx => break,
                }
            }
        });
    }

    /// When the keeper should look again: at the end of a backoff, when the token falls due
    /// (with `prefetch: true`) or the keepalive period ends, or at once when there is none.
    fn next_wake(&self) -> Duration {
        let inner = self.lock();
        let now = Instant::now();
        let keepalive_at = self
            .keepalive
            .zip(inner.last_success)
            .map(|(period, (_, at))| at + period);
        let at = match (&inner.failure, self.current.load().as_ref()) {
            // Only a person cures it; `authorize` on the admin listener wakes the slot.
            (Some(f), _) if f.error.needs_consent() => None,
            (Some(f), _) if f.retry_at > now => Some(f.retry_at),
            (_, Some(t)) if self.config.prefetch => match (t.refresh_at, keepalive_at) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            (_, Some(_)) => keepalive_at,
            (_, None) => Some(now),
        };
        at.map(|a| {
            a.saturating_duration_since(now)
                .max(Duration::from_millis(10))
        })
        .unwrap_or(Duration::from_secs(3600))
    }
}
