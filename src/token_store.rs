//! The token store: one slot per credential holding its current token behind an `ArcSwap`.
//!
//! The hot path loads the current token without a lock. Refreshes go through a per-slot async
//! mutex so that however many requests need a token at once, one call reaches the token
//! endpoint and the rest take its result (single flight) — including its failure, which then
//! holds off further attempts with exponential backoff and jitter.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwapOption;
use http::{HeaderName, HeaderValue};
use tokio::sync::oneshot;

use crate::config::{CredentialConfig, TokenSettings};
use crate::credentials::{CredentialError, Token, TokenSource};
use crate::metrics::Metrics;

/// A token ready to inject: the header value is built once per token, never per request.
pub struct IssuedToken {
    header_value: HeaderValue,
    issued_at: Instant,
    usable_until: Option<Instant>,
    refresh_at: Option<Instant>,
    expires_at_wall: Option<SystemTime>,
    token: Token,
}

impl std::fmt::Debug for IssuedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedToken")
            .field("header_value", &"***")
            .field("expires_at", &self.expires_at_wall)
            .finish()
    }
}

impl IssuedToken {
    fn new(token: Token, settings: &TokenSettings) -> Result<Self, CredentialError> {
        let mut header_value = HeaderValue::from_str(token.value.expose()).map_err(|_| {
            CredentialError::BadResponse("token is not a valid header value".into())
        })?;
        header_value.set_sensitive(true);
        let now = Instant::now();
        let wall_now = SystemTime::now();
        let (usable_until, refresh_at) = match token.expires_at {
            None => (None, None),
            Some(exp) => {
                let lifetime = exp.duration_since(wall_now).map_err(|_| {
                    CredentialError::BadResponse(
                        "token endpoint issued an already expired token".into(),
                    )
                })?;
                let timing = refresh_timing(lifetime, settings);
                (
                    Some(now + timing.usable_for),
                    Some(now + timing.refresh_after),
                )
            }
        };
        Ok(Self {
            header_value,
            issued_at: now,
            usable_until,
            refresh_at,
            expires_at_wall: token.expires_at,
            token,
        })
    }

    /// The header value to inject (marked sensitive).
    pub fn header_value(&self) -> &HeaderValue {
        &self.header_value
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
    /// `valid`, `refreshing`, `failing` or `empty` (never fetched).
    pub state: &'static str,
    pub expires_at: Option<String>,
    pub last_refresh: Option<String>,
    pub last_error: Option<String>,
    pub consecutive_failures: u32,
    pub fetches: u64,
}

#[derive(Default)]
struct RefreshState {
    last: Option<Arc<IssuedToken>>,
    failures: u32,
    retry_at: Option<Instant>,
    last_error: Option<CredentialError>,
}

#[derive(Default)]
struct StatusInfo {
    last_refresh: Option<SystemTime>,
    last_error: Option<String>,
    failures: u32,
}

/// One credential's token and everything needed to renew it.
pub struct CredentialSlot {
    name: Arc<str>,
    config: CredentialConfig,
    settings: TokenSettings,
    source: Arc<dyn TokenSource>,
    refreshable: bool,
    metrics: Arc<Metrics>,
    current: ArcSwapOption<IssuedToken>,
    attempts: AtomicU64,
    background: AtomicBool,
    refreshing: AtomicBool,
    state: tokio::sync::Mutex<RefreshState>,
    status: Mutex<StatusInfo>,
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
    /// A slot with no token yet.
    pub fn new(
        config: CredentialConfig,
        settings: TokenSettings,
        source: Arc<dyn TokenSource>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            name: Arc::from(config.name.as_str()),
            refreshable: source.refreshable(),
            config,
            settings,
            source,
            metrics,
            current: ArcSwapOption::empty(),
            attempts: AtomicU64::new(0),
            background: AtomicBool::new(false),
            refreshing: AtomicBool::new(false),
            state: tokio::sync::Mutex::new(RefreshState::default()),
            status: Mutex::new(StatusInfo::default()),
            keeper_stop: Mutex::new(None),
        })
    }

    /// The credential's name.
    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// The header this credential sets.
    pub fn header(&self) -> &HeaderName {
        &self.config.header
    }

    /// Whether this slot can be kept across a reload to `config` with `settings`.
    pub fn same_definition(&self, config: &CredentialConfig, settings: &TokenSettings) -> bool {
        &self.config == config && &self.settings == settings
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
                if token.due_at(now) {
                    self.refresh_in_background();
                }
                return Ok(token);
            }
        }
        self.refresh(None).await
    }

    /// Called when upstream answered 401/403 to a request that carried `rejected`. Drops that
    /// token (unless a concurrent refresh already replaced it) and returns a fresh one, or
    /// `Ok(None)` when refreshing would not help: the credential is not refreshable, or the
    /// rejected token was issued less than a second ago (the upstream refuses the request
    /// itself, and hammering the token endpoint would not change that).
    pub async fn refresh_after_rejection(
        self: &Arc<Self>,
        rejected: &Arc<IssuedToken>,
    ) -> Result<Option<Arc<IssuedToken>>, Unavailable> {
        if !self.refreshable {
            return Ok(None);
        }
        let current = self.current.load_full();
        let replaced = current.as_ref().is_some_and(|c| !Arc::ptr_eq(c, rejected));
        if !replaced && rejected.issued_at.elapsed() < self.settings.min_reject_age {
            return Ok(None);
        }
        let _ = self
            .current
            .compare_and_swap(&Some(Arc::clone(rejected)), None::<Arc<IssuedToken>>);
        self.refresh(Some(rejected)).await.map(Some)
    }

    async fn refresh(
        &self,
        stale: Option<&Arc<IssuedToken>>,
    ) -> Result<Arc<IssuedToken>, Unavailable> {
        let seen = self.attempts.load(Ordering::Acquire);
        let mut state = self.state.lock().await;
        let now = Instant::now();
        if let Some(current) = self.current.load_full() {
            let is_stale = stale.is_some_and(|s| Arc::ptr_eq(s, &current));
            if !is_stale && current.usable_at(now) {
                return Ok(current);
            }
        }
        if self.attempts.load(Ordering::Acquire) != seen {
            if let Some(e) = &state.last_error {
                return Err(self.unavailable(e.clone(), state.retry_at, now));
            }
        }
        if let Some(at) = state.retry_at.filter(|at| now < *at) {
            let e = state
                .last_error
                .clone()
                .unwrap_or_else(|| CredentialError::Other("backing off".into()));
            return Err(self.unavailable(e, Some(at), now));
        }
        self.attempt(&mut state).await
    }

    fn unavailable(
        &self,
        source: CredentialError,
        retry_at: Option<Instant>,
        now: Instant,
    ) -> Unavailable {
        Unavailable {
            credential: Arc::clone(&self.name),
            source,
            retry_in: retry_at.map(|at| at.saturating_duration_since(now)),
        }
    }

    fn refresh_in_background(self: &Arc<Self>) {
        if self.background.swap(true, Ordering::AcqRel) {
            return;
        }
        let slot = Arc::clone(self);
        tokio::spawn(async move {
            slot.refresh_if_due().await;
            slot.background.store(false, Ordering::Release);
        });
    }

    /// Refreshes when there is no token or it is due, unless backing off. Used by the
    /// background paths; request paths use `get`.
    async fn refresh_if_due(&self) {
        let mut state = self.state.lock().await;
        let now = Instant::now();
        if let Some(current) = self.current.load_full() {
            if current.usable_at(now) && !current.due_at(now) {
                return;
            }
        }
        if state.retry_at.is_some_and(|at| now < at) {
            return;
        }
        let _ = self.attempt(&mut state).await;
    }

    async fn attempt(&self, state: &mut RefreshState) -> Result<Arc<IssuedToken>, Unavailable> {
        self.refreshing.store(true, Ordering::Release);
        let previous = state.last.as_ref().map(|t| &t.token);
        let started = Instant::now();
        let fetched =
            match tokio::time::timeout(self.settings.fetch_timeout, self.source.fetch(previous))
                .await
            {
                Ok(result) => result,
                Err(_) => Err(CredentialError::Unreachable(format!(
                    "no answer within {}",
                    humantime::format_duration(self.settings.fetch_timeout)
                ))),
            };
        let issued = fetched.and_then(|t| IssuedToken::new(t, &self.settings));
        self.attempts.fetch_add(1, Ordering::AcqRel);
        self.refreshing.store(false, Ordering::Release);
        let now = Instant::now();
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        match issued {
            Ok(token) => {
                let token = Arc::new(token);
                self.current.store(Some(Arc::clone(&token)));
                state.last = Some(Arc::clone(&token));
                state.failures = 0;
                state.retry_at = None;
                state.last_error = None;
                status.last_refresh = Some(SystemTime::now());
                status.last_error = None;
                status.failures = 0;
                self.metrics
                    .token_fetch(&self.name, true, started.elapsed());
                let expires_at = token
                    .expires_at_wall
                    .map(|t| humantime::format_rfc3339_seconds(t).to_string())
                    .unwrap_or_else(|| "never".into());
                tracing::info!(credential = %self.name, %expires_at, "token obtained");
                Ok(token)
            }
            Err(e) => {
                state.failures = state.failures.saturating_add(1);
                let delay = backoff_delay(state.failures, &self.settings);
                state.retry_at = Some(now + delay);
                state.last_error = Some(e.clone());
                status.last_error = Some(e.to_string());
                status.failures = state.failures;
                self.metrics
                    .token_fetch(&self.name, false, started.elapsed());
                tracing::warn!(credential = %self.name, error = %e, failures = state.failures, retry_in = ?delay, "token fetch failed");
                Err(self.unavailable(e, state.retry_at, now))
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
                slot.refresh_if_due().await;
                let wait = slot.next_wake().await;
                drop(slot);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = &mut rx => break,
                }
            }
        });
    }

    async fn next_wake(&self) -> Duration {
        let state = self.state.lock().await;
        let now = Instant::now();
        let at = match (state.retry_at, self.current.load().as_ref()) {
            (Some(retry), _) if retry > now => Some(retry),
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
        let info = self.status.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.current.load_full();
        let usable = current
            .as_ref()
            .is_some_and(|t| t.usable_at(Instant::now()));
        let state = if self.refreshing.load(Ordering::Acquire) {
            "refreshing"
        } else if info.failures > 0 {
            "failing"
        } else if usable {
            "valid"
        } else {
            "empty"
        };
        let fmt = |t: SystemTime| humantime::format_rfc3339_seconds(t).to_string();
        SlotStatus {
            name: self.name.to_string(),
            type_name: self.config.kind.type_name(),
            state,
            expires_at: current.as_ref().and_then(|t| t.expires_at_wall).map(fmt),
            last_refresh: info.last_refresh.map(fmt),
            last_error: info.last_error.clone(),
            consecutive_failures: info.failures,
            fetches: self.attempts.load(Ordering::Acquire),
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
            min_reject_age: Duration::from_secs(1),
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
}
