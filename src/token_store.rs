//! The token store: one slot per credential holding its current token behind an `ArcSwap`.
//!
//! The hot path loads the current token without a lock. Everything else about a slot is a
//! small state machine kept under one short-lived lock ([`Inner`]): a slot is either idle or
//! running exactly one fetch ([`Phase`]), and remembers its last failure once ([`Failure`]).
//! Every way into a fetch (a request without a token, a token falling due, a 401 from
//! upstream, the keeper, an operator) goes through [`CredentialSlot::begin`], which either
//! answers at once, joins the fetch in flight (single flight: however many requests need a
//! token, one call reaches the token endpoint and all take its result, failures included), or
//! starts one. The fetch runs in its own task and hands its outcome to every waiter through a
//! `watch` channel, so a request that gives up never cancels it, and a drop guard returns the
//! slot to idle even if that task dies: no credential can stay stuck in `refreshing`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use http::{HeaderName, HeaderValue};
use tokio::sync::{oneshot, watch};

use crate::config::{CredentialConfig, TokenSettings};
use crate::credentials::{CredentialError, Token, TokenSource};
use crate::metrics::{CredentialGauges, Metrics};
use crate::token_cache::{CacheStatus, Obtained, RedisCache, SharedSlot, SharedToken};

/// First quiet period of a route whose refresh after a 401/403 did not help.
pub const QUIET_INITIAL: Duration = Duration::from_secs(5);
/// Longest quiet period (the period doubles per useless refresh up to this).
pub const QUIET_MAX: Duration = Duration::from_secs(300);

/// How much longer than the fetch timeout a replica's lease on a credential lasts in the
/// shared cache: a lease outlives any fetch its holder can still be making.
const LEASE_MARGIN: Duration = Duration::from_secs(5);

/// Where a slot's token came from (shown by the admin endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// This replica called the token endpoint.
    Fetched,
    /// Another replica (or an earlier run) stored it in the shared cache.
    SharedCache,
}

impl Origin {
    fn as_str(self) -> &'static str {
        match self {
            Origin::Fetched => "fetched",
            Origin::SharedCache => "redis",
        }
    }
}

/// A token ready to inject: the header value is built once per token, never per request.
pub struct IssuedToken {
    header_value: HeaderValue,
    usable_until: Option<Instant>,
    refresh_at: Option<Instant>,
    expires_at_wall: Option<SystemTime>,
    token: Token,
    origin: Origin,
    /// The record as the shared cache holds it, for compare-and-delete.
    sealed: Option<Arc<[u8]>>,
    /// Fetched by this replica because the upstream refused the token before it: only such
    /// a token, refused in turn, shows that refreshing does not help a route.
    for_refusal: bool,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken")
            .field("header_value", &"***")
            .field("expires_at", &self.expires_at_wall)
            .finish()
    }
}

/// Where a token issued at `issued_at` stands now: how long it may still be sent and how
/// long until it is due for renewal (`None`: it never expires). Every replica computes the
/// same answer for a shared token, however late it read it.
fn standing(
    expires_at: Option<SystemTime>,
    issued_at: SystemTime,
    settings: &TokenSettings,
) -> Option<(Duration, Duration)> {
    let exp = expires_at?;
    let lifetime = exp.duration_since(issued_at).unwrap_or(Duration::ZERO);
    let elapsed = SystemTime::now()
        .duration_since(issued_at)
        .unwrap_or(Duration::ZERO);
    let timing = refresh_timing(lifetime, settings);
    Some((
        timing.usable_for.saturating_sub(elapsed),
        timing.refresh_after.saturating_sub(elapsed),
    ))
}

impl IssuedToken {
    /// Checked arithmetic only: a vendor's absurd expiry (year 9999) must not panic here. A
    /// deadline beyond what `Instant` can hold is treated as "never".
    fn new(
        token: Token,
        issued_at: SystemTime,
        origin: Origin,
        sealed: Option<Vec<u8>>,
        settings: &TokenSettings,
    ) -> Result<Self, CredentialError> {
        let mut header_value = HeaderValue::from_str(token.value.expose()).map_err(|_| {
            CredentialError::BadResponse("token is not a valid header value".into())
        })?;
        header_value.set_sensitive(true);
        if token.expires_at.is_some_and(|exp| exp <= SystemTime::now()) {
            return Err(CredentialError::BadResponse(
                "token endpoint issued an already expired token".into(),
            ));
        }
        let now = Instant::now();
        let (usable_until, refresh_at) = match standing(token.expires_at, issued_at, settings) {
            None => (None, None),
            Some((usable_left, refresh_in)) => {
                (now.checked_add(usable_left), now.checked_add(refresh_in))
            }
        };
        Ok(Self {
            header_value,
            usable_until,
            refresh_at,
            expires_at_wall: token.expires_at,
            token,
            origin,
            sealed: sealed.map(Arc::from),
            for_refusal: false,
        })
    }

    /// The header value to inject (marked sensitive).
    pub fn header_value(&self) -> &HeaderValue {
        &self.header_value
    }

    /// Whether this token was fetched in answer to the upstream refusing the one before it.
    /// A refused replay with a token that was not (one fetched early, by an operator, or by
    /// another replica) earns one more refresh: it proves nothing about the route.
    pub fn answers_a_refusal(&self) -> bool {
        self.for_refusal
    }

    /// When the token expires (wall clock), if it does.
    pub fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at_wall
    }

    fn usable_at(&self, now: Instant) -> bool {
        self.usable_until.is_none_or(|u| now < u)
    }

    fn due_at(&self, now: Instant) -> bool {
        self.refresh_at.is_some_and(|r| now >= r)
    }
}

/// When to refresh a token of a given lifetime, and until when it may be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshTiming {
    /// Refresh once this much of the lifetime has passed.
    pub refresh_after: Duration,
    /// Stop sending the token after this (a small margin before expiry for clock skew and
    /// time in flight).
    pub usable_for: Duration,
}

/// Refresh at `refresh_at_fraction` of the lifetime or `refresh_before` expiry, whichever is
/// earlier — but never in the first half of the lifetime, so that short-lived tokens are not
/// refreshed continuously.
pub fn refresh_timing(lifetime: Duration, settings: &TokenSettings) -> RefreshTiming {
    let by_fraction = lifetime.mul_f64(1.0 - settings.refresh_at_fraction);
    let by_margin = settings.refresh_before.min(lifetime / 2);
    let margin = by_fraction.max(by_margin);
    let grace = (lifetime / 10).min(Duration::from_secs(5));
    RefreshTiming {
        refresh_after: lifetime - margin,
        usable_for: lifetime - grace,
    }
}

/// The wait after `failures` consecutive failed fetches: doubling from `backoff_initial`,
/// capped at `backoff_max`, plus up to 25% jitter (so gaps always grow until the cap).
pub fn backoff_delay(failures: u32, settings: &TokenSettings) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let base = settings
        .backoff_initial
        .saturating_mul(1u32 << exp)
        .min(settings.backoff_max);
    base.mul_f64(1.0 + rand::random::<f64>() * 0.25)
}

/// The quiet period after `strikes` useless refreshes in a row: [`QUIET_INITIAL`] doubling
/// up to [`QUIET_MAX`].
pub fn quiet_period(strikes: u32) -> Duration {
    let exp = strikes.saturating_sub(1).min(16);
    QUIET_INITIAL.saturating_mul(1u32 << exp).min(QUIET_MAX)
}

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

/// What the admin endpoint shows of a credential. Holds no token.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotStatus {
    pub name: String,
    #[serde(rename = "type")]
    pub type_name: &'static str,
    /// `valid`, `refreshing`, `failing`, `rejected` (the token endpoint refused the
    /// configured secret) or `empty` (no usable token and no failure).
    pub state: &'static str,
    pub expires_at: Option<String>,
    pub last_refresh: Option<String>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    pub fetches: u64,
    /// Where the current token came from: `fetched` (by this replica) or `redis` (stored by
    /// another replica or an earlier run).
    pub origin: Option<&'static str>,
    /// The token cache this credential uses and its state.
    pub cache: CacheStatus,
    /// Routes that pass 401/403 through without refreshing for now, because a fresh token
    /// was refused there too (sorted).
    pub quiet_routes: Vec<String>,
}

/// Why a fetch is asked for; decides whether the cached token is good enough.
#[derive(Debug, Clone)]
enum Trigger {
    /// A request needs a token and has none usable.
    Missing,
    /// The token is due for renewal (background and keeper): nothing to do if not due.
    Due,
    /// Upstream refused this token: replace exactly it, never a newer one.
    Rejected(Arc<IssuedToken>),
    /// An operator asked for a fetch now: ignores both the cached token and the backoff.
    Operator,
}

impl Trigger {
    /// Whether a token found in the shared cache answers this trigger, so that no vendor
    /// call is needed: it must be usable, not the one just refused or dropped, and for a
    /// renewal not due itself. An operator's fetch never takes a stored token.
    fn accepts(
        &self,
        found: &SharedToken,
        dropped: Option<&IssuedToken>,
        settings: &TokenSettings,
    ) -> bool {
        let value = found.token.value.expose();
        let is = |t: &IssuedToken| t.token.value.expose() == value;
        if dropped.is_some_and(is) {
            return false;
        }
        let (usable, due) = match standing(found.token.expires_at, found.issued_at, settings) {
            None => (true, false),
            Some((usable_left, refresh_in)) => (!usable_left.is_zero(), refresh_in.is_zero()),
        };
        match self {
            Trigger::Missing => usable,
            Trigger::Due => usable && !due,
            Trigger::Rejected(rejected) => usable && !is(rejected),
            Trigger::Operator => false,
        }
    }
}

/// The outcome of one fetch, shared by everyone who waited for it.
type Outcome = Result<Arc<IssuedToken>, Unavailable>;
/// Where waiters read the outcome of the fetch in flight (`None` until it ends).
type Flight = watch::Receiver<Option<Outcome>>;

/// What a slot is doing. At most one fetch per slot runs at any time.
enum Phase {
    Idle,
    Fetching(Flight),
}

/// The last failed fetch, recorded once: the admin view, the 502 and the backoff all read it.
struct Failure {
    error: CredentialError,
    consecutive: u32,
    /// No new fetch (except an operator's) before this.
    retry_at: Instant,
}

/// Per route: what refreshing after a 401/403 achieved there.
#[derive(Default)]
struct RouteRejections {
    /// The token fetched after this route's last rejection; a 401/403 on it too means
    /// refreshing does not help this route.
    probe: Option<Weak<IssuedToken>>,
    /// Useless refreshes in a row (reset by the route's next success).
    strikes: u32,
    /// No refresh on rejection for this route before this.
    quiet_until: Option<Instant>,
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

/// What [`CredentialSlot::begin`] decided.
enum Begin {
    /// The cached token serves.
    Ready(Arc<IssuedToken>),
    /// A fetch is in flight (perhaps just started): wait for its outcome.
    Wait(Flight),
    /// Backing off after a failure: no fetch now.
    BackingOff(Unavailable),
}

/// One credential's token and everything needed to renew it.
pub struct CredentialSlot {
    name: Arc<str>,
    config: CredentialConfig,
    source: Arc<dyn TokenSource>,
    refreshable: bool,
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

/// Ends a fetch however its task ends: if the task stops before publishing an outcome (a
/// panic in our own code, the runtime shutting down), the slot goes back to idle with a
/// recorded failure, and the waiters get that failure instead of waiting forever.
struct FlightGuard {
    slot: Arc<CredentialSlot>,
    publish: Option<watch::Sender<Option<Outcome>>>,
}

impl FlightGuard {
    fn finish(mut self, outcome: Outcome) {
        if let Some(tx) = self.publish.take() {
            tx.send_replace(Some(outcome));
        }
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        if let Some(tx) = self.publish.take() {
            let error = CredentialError::Other("the token fetch ended abnormally".into());
            let outcome = self.slot.settle(Err(error), false, Duration::ZERO);
            tx.send_replace(Some(outcome));
        }
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
    pub fn with_cache(
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
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The header this credential sets.
    pub fn header(&self) -> &HeaderName {
        &self.config.header
    }

    /// Whether this slot can be kept across a reload to `config`: the token source is the
    /// same, so its cached token is still good. Timing settings do not matter (see
    /// [`Self::use_settings`]).
    pub fn same_definition(&self, config: &CredentialConfig) -> bool {
        &self.config == config
    }

    /// Whether this slot uses the shared cache `cache` (`None`: memory only); a reload that
    /// changes `token_cache` builds new slots.
    pub fn uses_cache(&self, cache: Option<&Arc<RedisCache>>) -> bool {
        match (&self.shared, cache) {
            (None, None) => true,
            (Some(s), Some(c)) => s.is_in(c),
            (None, Some(_)) => !self.refreshable,
            (Some(_), None) => false,
        }
    }

    /// Applies reloaded `tokens:` settings without dropping the cached token: the next fetch
    /// and backoff use them.
    pub fn use_settings(&self, settings: &TokenSettings) {
        self.lock().settings = settings.clone();
    }

    /// Whether fetching again can cure a 401/403.
    pub fn refreshable(&self) -> bool {
        self.refreshable
    }

    /// Whether the slot holds a token that may be sent now (for readiness).
    pub fn has_usable_token(&self) -> bool {
        self.current
            .load()
            .as_ref()
            .is_some_and(|t| t.usable_at(Instant::now()))
    }

    /// The token to inject now. Lock-free when a usable token is cached; starts a background
    /// refresh when the token is due; waits (single flight) only when there is no usable token.
    pub async fn get(self: &Arc<Self>) -> Result<Arc<IssuedToken>, Unavailable> {
        let now = Instant::now();
        if let Some(token) = self.current.load_full() {
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

    /// Called when `route`'s upstream refused `rejected` (401, or 403 where the route says so).
    /// Returns a fresh token to replay with, or `Ok(None)` when refreshing would not help:
    /// the credential is not refreshable, the route is in a quiet period, or `rejected` is
    /// the very token fetched after this route's previous rejection (then the quiet period
    /// starts). Drops `rejected` only if it is still the cached token, never a newer one.
    pub async fn refresh_after_rejection(
        self: &Arc<Self>,
        route: &Arc<str>,
        rejected: &Arc<IssuedToken>,
    ) -> Result<Option<Arc<IssuedToken>>, Unavailable> {
        if !self.refreshable {
            return Ok(None);
        }
        {
            let mut inner = self.lock();
            let now = Instant::now();
            if let Some(record) = inner.rejections.get_mut(route) {
                if record.quiet_until.is_some_and(|until| now < until) {
                    return Ok(None);
                }
                let is_probe = record
                    .probe
                    .as_ref()
                    .is_some_and(|p| std::ptr::eq(p.as_ptr(), Arc::as_ptr(rejected)));
                if is_probe {
                    self.start_quiet(record, route, now);
                    return Ok(None);
                }
            }
        }
        let fresh = self
            .refresh(Trigger::Rejected(Arc::clone(rejected)))
            .await?;
        let mut inner = self.lock();
        if fresh.for_refusal {
            let record = self.rejection_record(&mut inner, route);
            record.probe = Some(Arc::downgrade(&fresh));
        }
        Ok(Some(fresh))
    }

    /// Called when the replay with a fresh token was refused as well: refreshing does not
    /// help `route`, so it stops refreshing on rejection for a growing quiet period.
    pub fn replay_refused(&self, route: &Arc<str>) {
        let mut inner = self.lock();
        let now = Instant::now();
        let record = self.rejection_record(&mut inner, route);
        if record.quiet_until.is_none_or(|until| until <= now) {
            self.start_quiet(record, route, now);
        }
    }

    /// Called when `route`'s upstream accepted a request (any answer but 401/403): ends its
    /// quiet period and forgets its useless refreshes. Lock-free unless a route has a record.
    pub fn upstream_accepted(&self, route: &str) {
        if self.routes_with_rejections.load(Ordering::Acquire) == 0 {
            return;
        }
        let mut inner = self.lock();
        if inner.rejections.remove(route).is_some() {
            self.routes_with_rejections
                .store(inner.rejections.len(), Ordering::Release);
        }
    }

    fn rejection_record<'a>(
        &self,
        inner: &'a mut Inner,
        route: &Arc<str>,
    ) -> &'a mut RouteRejections {
        if !inner.rejections.contains_key(route) {
            inner
                .rejections
                .insert(Arc::clone(route), RouteRejections::default());
            self.routes_with_rejections
                .store(inner.rejections.len(), Ordering::Release);
        }
        inner.rejections.entry(Arc::clone(route)).or_default()
    }

    fn start_quiet(&self, record: &mut RouteRejections, route: &str, now: Instant) {
        record.strikes = record.strikes.saturating_add(1);
        let quiet = quiet_period(record.strikes);
        record.quiet_until = now.checked_add(quiet);
        record.probe = None;
        tracing::warn!(
            credential = %self.name,
            route,
            quiet_for = %humantime::format_duration(quiet),
            "a fresh token was refused too; passing 401/403 through without refreshing for a while"
        );
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

    /// Begins (or joins) a fetch for `trigger` and waits for its outcome.
    async fn refresh(self: &Arc<Self>, trigger: Trigger) -> Result<Arc<IssuedToken>, Unavailable> {
        match self.begin(trigger) {
            Begin::Ready(token) => Ok(token),
            Begin::BackingOff(unavailable) => Err(unavailable),
            Begin::Wait(mut flight) => match flight.wait_for(Option::is_some).await {
                Ok(outcome) => match &*outcome {
                    Some(result) => result.clone(),
                    None => Err(self.ended_abnormally()),
                },
                Err(_) => Err(self.ended_abnormally()),
            },
        }
    }

    fn ended_abnormally(&self) -> Unavailable {
        Unavailable {
            credential: Arc::clone(&self.name),
            source: CredentialError::Other("the token fetch ended abnormally".into()),
            retry_in: None,
        }
    }

    /// The one way into a fetch. Decides under the lock, so that two callers can never both
    /// start one.
    fn begin(self: &Arc<Self>, trigger: Trigger) -> Begin {
        let mut inner = self.lock();
        if let Phase::Fetching(flight) = &inner.phase {
            return Begin::Wait(flight.clone());
        }
        let now = Instant::now();
        let current = self.current.load_full();
        match (&trigger, current) {
            (Trigger::Operator, _) => {}
            (Trigger::Missing, Some(c)) if c.usable_at(now) => return Begin::Ready(c),
            (Trigger::Due, Some(c)) if c.usable_at(now) && !c.due_at(now) => {
                return Begin::Ready(c)
            }
            (Trigger::Rejected(r), Some(c)) if Arc::ptr_eq(r, &c) => self.current.store(None),
            (Trigger::Rejected(_), Some(c)) if c.usable_at(now) => return Begin::Ready(c),
            _ => {}
        }
        if !matches!(trigger, Trigger::Operator) {
            if let Some(f) = inner.failure.as_ref().filter(|f| now < f.retry_at) {
                return Begin::BackingOff(Unavailable {
                    credential: Arc::clone(&self.name),
                    source: f.error.clone(),
                    retry_in: Some(f.retry_at.saturating_duration_since(now)),
                });
            }
        }
        Begin::Wait(self.start_fetch(&mut inner, trigger))
    }

    /// Starts the fetch task. It owns the fetch: callers only wait for its outcome.
    fn start_fetch(self: &Arc<Self>, inner: &mut Inner, trigger: Trigger) -> Flight {
        let (publish, flight) = watch::channel(None);
        inner.phase = Phase::Fetching(flight.clone());
        self.fetch_running.store(true, Ordering::Release);
        let previous = inner.last_issued.as_ref().map(|t| t.token.clone());
        let settings = inner.settings.clone();
        let dropped = inner.dropped.clone();
        let guard = FlightGuard {
            slot: Arc::clone(self),
            publish: Some(publish),
        };
        tokio::spawn(async move {
            let started = Instant::now();
            let (issued, called_vendor) = guard
                .slot
                .obtain(trigger, previous, dropped, &settings)
                .await;
            let outcome = guard.slot.settle(issued, called_vendor, started.elapsed());
            guard.finish(outcome);
        });
        flight
    }

    /// Gets the next token: from the token endpoint, or through the shared cache when one
    /// is configured (which may hold a token another replica fetched). Says whether the
    /// token endpoint was called.
    async fn obtain(
        &self,
        trigger: Trigger,
        previous: Option<Token>,
        dropped: Option<Arc<IssuedToken>>,
        settings: &TokenSettings,
    ) -> (Result<IssuedToken, CredentialError>, bool) {
        let for_refusal = matches!(trigger, Trigger::Rejected(_));
        let mark = move |issued: Result<IssuedToken, CredentialError>, called_vendor: bool| {
            let issued = issued.map(|mut t| {
                t.for_refusal = for_refusal && t.origin == Origin::Fetched;
                t
            });
            (issued, called_vendor)
        };
        let source = Arc::clone(&self.source);
        let timeout = settings.fetch_timeout;
        let call = move |previous: Option<Token>| fetch(source, previous, timeout);
        let Some(shared) = &self.shared else {
            let issued = call(previous).await.and_then(|t| {
                IssuedToken::new(t, SystemTime::now(), Origin::Fetched, None, settings)
            });
            return mark(issued, true);
        };
        let accept_settings = settings.clone();
        let accept =
            move |found: &SharedToken| trigger.accepts(found, dropped.as_deref(), &accept_settings);
        let lease = settings.fetch_timeout.saturating_add(LEASE_MARGIN);
        match shared.obtain(&accept, previous, lease, call).await {
            Ok(Obtained::Shared { token, sealed }) => mark(
                IssuedToken::new(
                    token.token,
                    token.issued_at,
                    Origin::SharedCache,
                    Some(sealed),
                    settings,
                ),
                false,
            ),
            Ok(Obtained::Fetched { token, sealed }) => mark(
                IssuedToken::new(token, SystemTime::now(), Origin::Fetched, sealed, settings),
                true,
            ),
            Err(error) => (Err(error), true),
        }
    }

    /// Records a fetch's result: the new token, or the failure and the backoff it earns.
    /// Returns the slot to idle.
    fn settle(
        &self,
        issued: Result<IssuedToken, CredentialError>,
        called_vendor: bool,
        took: Duration,
    ) -> Outcome {
        let mut inner = self.lock();
        inner.phase = Phase::Idle;
        self.fetch_running.store(false, Ordering::Release);
        if called_vendor {
            inner.fetches += 1;
            self.metrics.token_fetch(&self.name, issued.is_ok(), took);
        }
        match issued {
            Ok(token) => {
                let token = Arc::new(token);
                self.current.store(Some(Arc::clone(&token)));
                inner.last_issued = Some(Arc::clone(&token));
                inner.last_success = Some((SystemTime::now(), Instant::now()));
                inner.failure = None;
                inner.dropped = None;
                let expires_at = token
                    .expires_at_wall
                    .map(|t| humantime::format_rfc3339_seconds(t).to_string())
                    .unwrap_or_else(|| "never".into());
                let from = token.origin.as_str();
                tracing::info!(credential = %self.name, %expires_at, from, "token obtained");
                Ok(token)
            }
            Err(error) => {
                let consecutive = inner
                    .failure
                    .as_ref()
                    .map_or(1, |f| f.consecutive.saturating_add(1));
                // A refused secret will be refused again: retrying fast only burns the
                // vendor's rate limit, so wait the longest.
                let delay = if error.is_final() {
                    backoff_delay(u32::MAX, &inner.settings)
                } else {
                    backoff_delay(consecutive, &inner.settings)
                };
                let now = Instant::now();
                tracing::warn!(credential = %self.name, %error, failures = consecutive, retry_in = ?delay, "token fetch failed");
                inner.failure = Some(Failure {
                    error: error.clone(),
                    consecutive,
                    retry_at: now.checked_add(delay).unwrap_or(now),
                });
                Err(Unavailable {
                    credential: Arc::clone(&self.name),
                    source: error,
                    retry_in: Some(delay),
                })
            }
        }
    }

    /// Starts a task that obtains the token now and keeps it fresh until the slot is
    /// dropped (for `prefetch: true`). Calling it twice has no effect.
    pub fn start_keeper(self: &Arc<Self>) {
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
                let _ = slot.refresh(Trigger::Due).await;
                let wait = slot.next_wake();
                drop(slot);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = &mut rx => break,
                }
            }
        });
    }

    /// When the keeper should look again: at the end of a backoff, when the token falls due,
    /// or at once when there is none.
    fn next_wake(&self) -> Duration {
        let inner = self.lock();
        let now = Instant::now();
        let at = match (&inner.failure, self.current.load().as_ref()) {
            (Some(f), _) if f.retry_at > now => Some(f.retry_at),
            (_, Some(t)) => t.refresh_at,
            (_, None) => Some(now),
        };
        at.map(|a| {
            a.saturating_duration_since(now)
                .max(Duration::from_millis(10))
        })
        .unwrap_or(Duration::from_secs(3600))
    }

    /// The admin view of this credential.
    pub fn status(&self) -> SlotStatus {
        let inner = self.lock();
        let current = self.current.load_full();
        let usable = current
            .as_ref()
            .is_some_and(|t| t.usable_at(Instant::now()));
        let state = match (&inner.phase, &inner.failure) {
            (Phase::Fetching(_), _) => "refreshing",
            (Phase::Idle, Some(f)) if f.error.is_final() => "rejected",
            (Phase::Idle, Some(_)) => "failing",
            (Phase::Idle, None) if usable => "valid",
            (Phase::Idle, None) => "empty",
        };
        let fmt = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        let now = Instant::now();
        let mut quiet_routes: Vec<String> = inner
            .rejections
            .iter()
            .filter(|(_, r)| r.quiet_until.is_some_and(|until| now < until))
            .map(|(route, _)| route.to_string())
            .collect();
        quiet_routes.sort();
        SlotStatus {
            name: self.name.to_string(),
            type_name: self.config.kind.type_name(),
            state,
            expires_at: current.as_ref().and_then(|t| t.expires_at_wall).map(fmt),
            last_refresh: inner.last_success.map(|(wall, _)| fmt(wall)),
            last_error: inner.failure.as_ref().map(|f| f.error.to_string()),
            consecutive_failures: inner.failure.as_ref().map_or(0, |f| f.consecutive),
            fetches: inner.fetches,
            origin: current.as_ref().map(|t| t.origin.as_str()),
            cache: self
                .shared
                .as_ref()
                .map_or_else(CacheStatus::memory, SharedSlot::status),
            quiet_routes,
        }
    }

    /// The values behind this credential's Prometheus gauges, as of now.
    pub fn gauges(&self) -> CredentialGauges {
        let inner = self.lock();
        let current = self.current.load_full();
        let now = Instant::now();
        let usable = current.as_ref().is_some_and(|t| t.usable_at(now));
        let expires_in = match current.as_ref().filter(|_| usable) {
            None => 0.0,
            Some(t) => t.usable_until.map_or(f64::INFINITY, |u| {
                u.saturating_duration_since(now).as_secs_f64()
            }),
        };
        CredentialGauges {
            usable,
            expires_in_seconds: expires_in,
            since_last_fetch_seconds: inner
                .last_success
                .map_or(f64::INFINITY, |(_, at)| at.elapsed().as_secs_f64()),
            consecutive_failures: inner.failure.as_ref().map_or(0, |f| f.consecutive),
            refused: inner.failure.as_ref().is_some_and(|f| f.error.is_final()),
        }
    }
}

/// Runs the source's fetch in a task of its own, so that a panic inside a token source
/// becomes an ordinary failure (with backoff) instead of taking the slot down, and a fetch
/// past `timeout` is abandoned.
async fn fetch(
    source: Arc<dyn TokenSource>,
    previous: Option<Token>,
    timeout: Duration,
) -> Result<Token, CredentialError> {
    let mut task = tokio::spawn(async move { source.fetch(previous.as_ref()).await });
    match tokio::time::timeout(timeout, &mut task).await {
        Ok(Ok(result)) => result,
        Ok(Err(e)) if e.is_panic() => Err(CredentialError::Other(
            "the token source failed unexpectedly (panic)".into(),
        )),
        Ok(Err(_)) => Err(CredentialError::Other(
            "the token fetch was cancelled".into(),
        )),
        Err(_) => {
            task.abort();
            Err(CredentialError::Unreachable(format!(
                "no answer within {}",
                humantime::format_duration(timeout)
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> TokenSettings {
        TokenSettings {
            refresh_before: Duration::from_secs(60),
            refresh_at_fraction: 0.8,
            fetch_timeout: Duration::from_secs(5),
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_secs(10),
        }
    }

    #[test]
    fn long_tokens_refresh_at_the_fraction() {
        let t = refresh_timing(Duration::from_secs(3600), &settings());
        assert_eq!(t.refresh_after, Duration::from_secs(2880));
        assert_eq!(t.usable_for, Duration::from_secs(3595));
    }

    #[test]
    fn medium_tokens_refresh_a_margin_before_expiry() {
        let t = refresh_timing(Duration::from_secs(120), &settings());
        assert_eq!(t.refresh_after, Duration::from_secs(60));
    }

    #[test]
    fn short_tokens_refresh_at_half_life_not_continuously() {
        let t = refresh_timing(Duration::from_secs(2), &settings());
        assert_eq!(t.refresh_after, Duration::from_secs(1));
        assert!(t.usable_for > t.refresh_after && t.usable_for < Duration::from_secs(2));
    }

    #[test]
    fn backoff_grows_then_caps() {
        let s = settings();
        let mut last = Duration::ZERO;
        for failures in 1..=7 {
            let d = backoff_delay(failures, &s);
            assert!(d > last, "{failures}: {d:?} <= {last:?}");
            last = d;
        }
        for _ in 0..50 {
            let d = backoff_delay(40, &s);
            assert!(d >= s.backoff_max && d <= s.backoff_max.mul_f64(1.25));
        }
    }

    #[test]
    fn quiet_periods_double_then_cap() {
        assert_eq!(quiet_period(1), QUIET_INITIAL);
        assert_eq!(quiet_period(2), QUIET_INITIAL * 2);
        assert_eq!(quiet_period(3), QUIET_INITIAL * 4);
        assert_eq!(quiet_period(40), QUIET_MAX);
    }

    #[test]
    fn absurd_expiries_do_not_panic() {
        let token = Token {
            value: crate::vocab::secret::Secret::new("Bearer x"),
            expires_at: SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(u64::MAX / 4)),
            refresh: None,
        };
        let issued =
            IssuedToken::new(token, SystemTime::now(), Origin::Fetched, None, &settings()).unwrap();
        assert!(issued.usable_at(Instant::now()));
    }
}
