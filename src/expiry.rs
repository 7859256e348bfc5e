//! The one expiry policy every token source uses. Vendors state lifetimes in many ways
//! (`expires_in`, a JWT `exp`, `tokenLifetime`, `tokenExpiration`, `expiresAt`) and some state
//! absurd ones (`1e20`, negative, `NaN`); turning any of them into a `SystemTime` here, with
//! checked arithmetic and clamping, means no vendor number can panic a refresh or schedule one
//! past the end of time.
//!
//! The rule: the first expiry the vendor states (in each source's documented order) wins,
//! clamped to between [`MIN_LIFETIME`] and [`MAX_LIFETIME`] from now; when the vendor states
//! none, the token's own JWT `exp` (if it is a JWT), else [`DEFAULT_LIFETIME`].

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde_json::Value;

/// The longest lifetime a token is believed to have. Longer (or infinite) claims are cut to
/// this, so such a token is still refreshed now and then (at 80% of it by default).
pub const MAX_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);

/// The shortest lifetime a relative claim (`expires_in`, `tokenLifetime`) is given. Zero,
/// negative and `NaN` lifetimes become this: the token is used briefly and renewed soon,
/// rather than refused outright.
pub const MIN_LIFETIME: Duration = Duration::from_secs(1);

/// The lifetime assumed when the vendor states none and the token is not a JWT with `exp`
/// (RFC 6749 makes `expires_in` optional). An hour keeps a longer-lived token from being
/// fetched too often; a 401 before then is cured by refresh-and-retry.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);

/// One way a vendor states when a token expires.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stated {
    /// A number of seconds from now (`expires_in`), as sent: may be absurd.
    Seconds(f64),
    /// A moment (`tokenExpiration`, `expiresAt`, a JWT `exp`).
    At(SystemTime),
}

impl Stated {
    /// The seconds at a JSON pointer: a number, or a numeric string (`"3600"`).
    pub fn seconds_at(doc: &Value, pointer: &str) -> Option<Self> {
        let v = doc.pointer(pointer)?;
        v.as_f64()
            .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))
            .map(Self::Seconds)
    }

    /// A Unix time in seconds (a JWT `exp`); `None` for non-finite or non-positive values.
    pub fn unix_seconds(secs: f64) -> Option<Self> {
        if !secs.is_finite() || secs <= 0.0 {
            return None;
        }
        // Beyond u64 seconds (or SystemTime's range) is "far future": clamped later anyway.
        let far = SystemTime::now() + MAX_LIFETIME + MAX_LIFETIME;
        let at = Duration::try_from_secs_f64(secs)
            .ok()
            .and_then(|d| UNIX_EPOCH.checked_add(d))
            .unwrap_or(far);
        Some(Self::At(at))
    }

    /// The `exp` claim of a JWT, read without verifying the signature (we are the bearer, not
    /// the audience: the vendor verifies it). `None` when the token is not a JWT or has no
    /// usable `exp`.
    pub fn jwt_exp(token: &str) -> Option<Self> {
        let payload = token.split('.').nth(1)?;
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload.trim_end_matches('='))
            .ok()?;
        let claims: Value = serde_json::from_slice(&bytes).ok()?;
        Self::unix_seconds(claims.get("exp")?.as_f64()?)
    }

    /// The moment this statement means, clamped by the policy. A moment already past stays
    /// past (the token store reports such a token as already expired).
    fn resolve(self, now: SystemTime) -> SystemTime {
        let latest = now + MAX_LIFETIME;
        match self {
            Self::At(at) => at.min(latest),
            Self::Seconds(secs) => {
                let lifetime = if secs.is_nan() {
                    MIN_LIFETIME
                } else {
                    Duration::try_from_secs_f64(secs.max(0.0))
                        .unwrap_or(MAX_LIFETIME)
                        .clamp(MIN_LIFETIME, MAX_LIFETIME)
                };
                now + lifetime
            }
        }
    }
}

/// When a token expires: the first of `stated` that is present, clamped; else the token's JWT
/// `exp`; else [`DEFAULT_LIFETIME`] from now.
pub fn expires_at(token: &str, stated: impl IntoIterator<Item = Option<Stated>>) -> SystemTime {
    let now = SystemTime::now();
    stated
        .into_iter()
        .flatten()
        .next()
        .or_else(|| Stated::jwt_exp(token))
        .map_or(now + DEFAULT_LIFETIME, |s| s.resolve(now))
}

/// A configured lifetime (a self-signed token's `lifetime`), cut to [`MAX_LIFETIME`].
pub fn clamp_configured(lifetime: Duration) -> Duration {
    lifetime.clamp(MIN_LIFETIME, MAX_LIFETIME)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within(at: SystemTime, lifetime: Duration) -> bool {
        let now = SystemTime::now();
        at <= now + lifetime && at + Duration::from_secs(5) >= now + lifetime
    }

    #[test]
    fn absurd_numbers_are_clamped_not_panicking() {
        for secs in [1e20, 1e300, f64::INFINITY, 1.8e19, u64::MAX as f64] {
            let at = expires_at("opaque", [Some(Stated::Seconds(secs))]);
            assert!(within(at, MAX_LIFETIME), "{secs}");
        }
        for secs in [-5.0, 0.0, f64::NEG_INFINITY, f64::NAN, 1e-9] {
            let at = expires_at("opaque", [Some(Stated::Seconds(secs))]);
            assert!(within(at, MIN_LIFETIME), "{secs}");
        }
        let at = expires_at("opaque", [Stated::unix_seconds(1e20)]);
        assert!(within(at, MAX_LIFETIME));
    }

    #[test]
    fn first_statement_wins_then_jwt_then_default() {
        let payload =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"exp":2000000000}"#);
        let jwt = format!("eyJhbGciOiJSUzI1NiJ9.{payload}.sig");
        let at = expires_at(&jwt, [None, Some(Stated::Seconds(60.0))]);
        assert!(within(at, Duration::from_secs(60)));
        assert!(
            within(expires_at(&jwt, [None]), MAX_LIFETIME),
            "2033 is cut to the maximum"
        );
        let soon = UNIX_EPOCH + Duration::from_secs(4_000_000_000);
        assert_eq!(
            expires_at("opaque", [Some(Stated::At(UNIX_EPOCH))]),
            UNIX_EPOCH
        );
        assert!(expires_at("opaque", [Some(Stated::At(soon))]) < soon);
        assert!(within(expires_at("opaque", [None]), DEFAULT_LIFETIME));
        let huge = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"exp":1e20}"#);
        assert!(within(expires_at(&format!("h.{huge}.s"), []), MAX_LIFETIME));
        assert_eq!(Stated::jwt_exp("opaque-token"), None);
    }
}
