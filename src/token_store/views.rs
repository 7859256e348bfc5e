//! What the admin endpoint (`/credentials`) and the Prometheus gauges show of a slot:
//! read-only views taken under the slot's lock, holding no token.

use std::time::{Instant, SystemTime};

use super::flight::Phase;
use super::CredentialSlot;
use crate::metrics::CredentialGauges;
use crate::token_cache::{CacheStatus, SharedSlot};

/// What the admin endpoint shows of a credential. Holds no token.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SlotStatus {
    pub name: String,
    #[serde(rename = "type")]
    pub type_name: &'static str,
    /// `valid`, `refreshing`, `failing`, `rejected` (the token endpoint refused the
    /// configured secret), `needs_consent` (a person must run `authrelay authorize`) or
    /// `empty` (no usable token and no failure).
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

impl CredentialSlot {
    /// The admin view of this credential.
    pub fn status(&self) -> SlotStatus {
        let inner = self.lock();
        let current = self.current.load_full();
        let usable = current
            .as_ref()
            .is_some_and(|t| t.usable_at(Instant::now()));
        let state = match (&inner.phase, &inner.failure) {
            (Phase::Fetching(_), _) => "refreshing",
            (Phase::Idle, Some(f)) if f.error.needs_consent() => "needs_consent",
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
            .filter(|(_, r)| r.quiet_at(now))
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
    pub(crate) fn gauges(&self) -> CredentialGauges {
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
            refused: inner
                .failure
                .as_ref()
                .is_some_and(|f| f.error.is_final() && !f.error.needs_consent()),
            needs_consent: inner
                .failure
                .as_ref()
                .is_some_and(|f| f.error.needs_consent()),
        }
    }
}
