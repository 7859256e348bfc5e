//! The slot's state machine: a slot is idle or running exactly one fetch ([`Phase`]), and
//! remembers its last failure once ([`Failure`]). Every way into a fetch (a request without
//! a token, a token falling due, a 401 from upstream, the keeper, an operator) goes through
//! [`CredentialSlot::begin`], which answers at once, joins the fetch in flight (single
//! flight: however many requests need a token, one call reaches the token endpoint and all
//! take its result, failures included), or starts one.
//!
//! A fetch runs in one spawned task of its own. It hands its outcome to every waiter through
//! a `watch` channel, so a request that gives up never cancels it; a panic anywhere in it (a
//! token source's bug, a vendor value no check foresaw) is caught and recorded as an
//! ordinary failure with backoff; and a drop guard returns the slot to idle even if the task
//! is dropped unfinished (the runtime shutting down): no credential can stay stuck in
//! `refreshing`.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt;
use tokio::sync::watch;

use super::issued::standing;
use super::timing::backoff_delay;
use super::{CredentialSlot, Inner, IssuedToken, Origin, Unavailable};
use crate::config::TokenSettings;
use crate::credentials::{CredentialError, Token, TokenSource};
use crate::token_cache::{Obtained, SharedToken};

/// Why a fetch is asked for; decides whether the cached token is good enough.
#[derive(Debug, Clone)]
pub(super) enum Trigger {
    /// A request needs a token and has none usable.
    Missing,
    /// The token is due for renewal (background and keeper): nothing to do if not due.
    Due,
    /// Upstream refused this token: replace exactly it, never a newer one.
    Rejected(Arc<IssuedToken>),
    /// An operator asked for a fetch now: ignores both the cached token and the backoff.
    Operator,
    /// The keeper of a source whose grant must not go unused longer than this: nothing to
    /// do while a fetch succeeded more recently (and, with `prefetch`, the token is not due).
    Keepalive(Duration),
}

impl Trigger {
    /// Whether a token found in the shared cache answers this trigger, so that no vendor
    /// call is needed: it must be usable, not the one just refused or dropped, and for a
    /// renewal not due itself. An operator's fetch never takes a stored token.
    pub(super) fn accepts(
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
            Trigger::Due | Trigger::Keepalive(_) => usable && !due,
            Trigger::Rejected(rejected) => usable && !is(rejected),
            Trigger::Operator => false,
        }
    }
}

/// The outcome of one fetch, shared by everyone who waited for it.
pub(super) type Outcome = Result<Arc<IssuedToken>, Unavailable>;
/// Where waiters read the outcome of the fetch in flight (`None` until it ends).
pub(super) type Flight = watch::Receiver<Option<Outcome>>;

/// What a slot is doing. At most one fetch per slot runs at any time.
pub(super) enum Phase {
    Idle,
    Fetching(Flight),
}

/// The last failed fetch, recorded once: the admin view, the 502 and the backoff all read it.
pub(super) struct Failure {
    pub(super) error: CredentialError,
    pub(super) consecutive: u32,
    /// No new fetch (except an operator's) before this.
    pub(super) retry_at: Instant,
}

/// What [`CredentialSlot::begin`] decided.
pub(super) enum Begin {
    /// The cached token serves.
    Ready(Arc<IssuedToken>),
    /// A fetch is in flight (perhaps just started): wait for its outcome.
    Wait(Flight),
    /// Backing off after a failure: no fetch now.
    BackingOff(Unavailable),
}

/// Ends a fetch however its task ends: if the task is dropped before publishing an outcome
/// (the runtime shutting down; a panic is caught before it gets here), the slot goes back to
/// idle with a recorded failure, and the waiters get that failure instead of waiting forever.
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
            let outcome = self.slot.settle(Err(abnormal_end()), false, Duration::ZERO);
            tx.send_replace(Some(outcome));
        }
    }
}

/// Why waiters got no outcome: the fetch's task was dropped unfinished.
fn abnormal_end() -> CredentialError {
    CredentialError::Other("the token fetch ended abnormally".into())
}

impl CredentialSlot {
    /// Begins (or joins) a fetch for `trigger` and waits for its outcome.
    pub(super) async fn refresh(
        self: &Arc<Self>,
        trigger: Trigger,
    ) -> Result<Arc<IssuedToken>, Unavailable> {
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
            source: abnormal_end(),
            retry_in: None,
        }
    }

    /// The one way into a fetch. Decides under the lock, so that two callers can never both
    /// start one.
    pub(super) fn begin(self: &Arc<Self>, trigger: Trigger) -> Begin {
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
            // The keeper discards what it gets: without `prefetch` an expired token waits
            // for traffic (or the end of the period).
            (Trigger::Keepalive(period), Some(c))
                if (!self.config.prefetch || (c.usable_at(now) && !c.due_at(now)))
                    && inner
                        .last_success
                        .is_some_and(|(_, at)| now.saturating_duration_since(at) < *period) =>
            {
                return Begin::Ready(c)
            }
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
            let obtained =
                AssertUnwindSafe(guard.slot.obtain(trigger, previous, dropped, &settings))
                    .catch_unwind()
                    .await;
            let (issued, called_vendor) = obtained.unwrap_or_else(|_| {
                let error =
                    CredentialError::Other("the token source failed unexpectedly (panic)".into());
                (Err(error), true)
            });
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
        match shared
            .obtain(&accept, previous, settings.fetch_timeout, call)
            .await
        {
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
                let still_needs_consent = error.needs_consent()
                    && inner
                        .failure
                        .as_ref()
                        .is_some_and(|f| f.error.needs_consent());
                if still_needs_consent {
                    // Said once (the line names the command to run); not every backoff.
                    tracing::debug!(credential = %self.name, %error, "token fetch failed");
                } else {
                    tracing::warn!(credential = %self.name, %error, failures = consecutive, retry_in = ?delay, "token fetch failed");
                }
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
}

/// Calls the token source, abandoning (dropping) the call past `timeout`. It runs inside the
/// fetch's own task, whose panic guard covers it.
async fn fetch(
    source: Arc<dyn TokenSource>,
    previous: Option<Token>,
    timeout: Duration,
) -> Result<Token, CredentialError> {
    match tokio::time::timeout(timeout, source.fetch(previous.as_ref())).await {
        Ok(result) => result,
        Err(_) => Err(CredentialError::Unreachable(format!(
            "no answer within {}",
            humantime::format_duration(timeout)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::AtomicUsize;

    use super::*;
    use crate::credentials::FetchFuture;
    use crate::metrics::Metrics;
    use crate::token_store::timing::tests::settings;
    use crate::vocab::secret::Secret;

    /// Panics on its first fetch (outside any `.await`, then inside one), then issues tokens.
    struct PanicsTwice(AtomicUsize);

    impl TokenSource for PanicsTwice {
        fn fetch<'a>(&'a self, _previous: Option<&'a Token>) -> FetchFuture<'a> {
            let call = self.0.fetch_add(1, Ordering::SeqCst);
            assert!(call != 0, "a bug before the fetch even starts");
            Box::pin(async move {
                tokio::task::yield_now().await;
                assert!(call != 1, "a vendor number no check foresaw");
                Ok(Token {
                    value: Secret::new("Bearer fine"),
                    expires_at: Some(SystemTime::now() + Duration::from_secs(60)),
                    refresh: None,
                })
            })
        }
    }

    fn slot(source: Arc<dyn TokenSource>) -> Arc<CredentialSlot> {
        let yaml = "credentials:\n  flaky:\n    type: static\n    value: x\nroutes: []\n";
        let config = crate::config::Config::from_yaml(
            yaml,
            std::path::Path::new("/etc/authrelay/routes.yaml"),
            &HashMap::new(),
        )
        .unwrap();
        let credential = config.credentials["flaky"].clone();
        CredentialSlot::new(credential, settings(), source, Arc::new(Metrics::new()))
    }

    #[tokio::test]
    async fn a_panic_in_a_fetch_is_an_ordinary_failure_and_the_slot_fetches_again() {
        let source = Arc::new(PanicsTwice(AtomicUsize::new(0)));
        let slot = slot(source.clone());
        for attempt in 1..=2 {
            let waiters = [slot.refresh_now(), slot.refresh_now()];
            for outcome in futures_util::future::join_all(waiters).await {
                let error = outcome.unwrap_err();
                assert!(error.to_string().contains("panic"), "{error}");
            }
            let status = slot.status();
            assert_eq!(status.state, "failing", "not stuck in refreshing");
            assert_eq!(status.consecutive_failures, attempt);
        }
        let token = slot.refresh_now().await.unwrap();
        assert_eq!(token.header_value(), "Bearer fine");
        assert_eq!(source.0.load(Ordering::SeqCst), 3, "one fetch per attempt");
    }
}
