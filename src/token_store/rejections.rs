//! What a 401/403 on a route does to the slot: one refresh, and when the fresh token is
//! refused too, a quiet period for that route (growing with each useless refresh) in which
//! its 401/403 pass through without touching the vendor. Kept per route, because one route
//! refusing a good token says nothing about the others.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Instant;

use super::flight::Trigger;
use super::timing::quiet_period;
use super::{CredentialSlot, Inner, IssuedToken, Unavailable};

/// Per route: what refreshing after a 401/403 achieved there.
#[derive(Default)]
pub(super) struct RouteRejections {
    /// The token fetched after this route's last rejection; a 401/403 on it too means
    /// refreshing does not help this route.
    probe: Option<Weak<IssuedToken>>,
    /// Useless refreshes in a row (reset by the route's next success).
    strikes: u32,
    /// No refresh on rejection for this route before this.
    quiet_until: Option<Instant>,
}

impl RouteRejections {
    /// Whether the route passes 401/403 through without refreshing at `now`.
    pub(super) fn quiet_at(&self, now: Instant) -> bool {
        self.quiet_until.is_some_and(|until| now < until)
    }
}

impl CredentialSlot {
    /// Called when `route`'s upstream refused `rejected` (401, or 403 where the route says so).
    /// Returns a fresh token to replay with, or `Ok(None)` when refreshing would not help:
    /// the credential is not refreshable, the route is in a quiet period, or `rejected` is
    /// the very token fetched after this route's previous rejection (then the quiet period
    /// starts). Drops `rejected` only if it is still the cached token, never a newer one.
    pub(crate) async fn refresh_after_rejection(
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
                if record.quiet_at(now) {
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
    pub(crate) fn replay_refused(&self, route: &Arc<str>) {
        let mut inner = self.lock();
        let now = Instant::now();
        let record = self.rejection_record(&mut inner, route);
        if record.quiet_until.is_none_or(|until| until <= now) {
            self.start_quiet(record, route, now);
        }
    }

    /// Called when `route`'s upstream accepted a request (any answer but 401/403): ends its
    /// quiet period and forgets its useless refreshes. Lock-free unless a route has a record.
    pub(crate) fn upstream_accepted(&self, route: &str) {
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
}
