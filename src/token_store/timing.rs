//! Refresh timing, failure backoff and quiet periods: pure functions of durations and the
//! `tokens:` settings, kept apart so that they can be read (and property-tested) alone.

use std::time::Duration;

use crate::config::TokenSettings;

/// First quiet period of a route whose refresh after a 401/403 did not help.
pub(crate) const QUIET_INITIAL: Duration = Duration::from_secs(5);
/// Longest quiet period (the period doubles per useless refresh up to this).
pub(crate) const QUIET_MAX: Duration = Duration::from_secs(300);

/// When to refresh a token of a given lifetime, and until when it may be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RefreshTiming {
    /// Refresh once this much of the lifetime has passed.
    pub(crate) refresh_after: Duration,
    /// Stop sending the token after this (a small margin before expiry for clock skew and
    /// time in flight).
    pub(crate) usable_for: Duration,
}

/// Refresh at `refresh_at_fraction` of the lifetime or `refresh_before` expiry, whichever is
/// earlier — but never in the first half of the lifetime, so that short-lived tokens are not
/// refreshed continuously.
pub(crate) fn refresh_timing(lifetime: Duration, settings: &TokenSettings) -> RefreshTiming {
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
pub(crate) fn backoff_delay(failures: u32, settings: &TokenSettings) -> Duration {
    let exp = failures.saturating_sub(1).min(30);
    let base = settings
        .backoff_initial
        .saturating_mul(1u32 << exp)
        .min(settings.backoff_max);
    base.mul_f64(1.0 + rand::random::<f64>() * 0.25)
}

/// The quiet period after `strikes` useless refreshes in a row: [`QUIET_INITIAL`] doubling
/// up to [`QUIET_MAX`].
pub(crate) fn quiet_period(strikes: u32) -> Duration {
    let exp = strikes.saturating_sub(1).min(16);
    QUIET_INITIAL.saturating_mul(1u32 << exp).min(QUIET_MAX)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn settings() -> TokenSettings {
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
}
