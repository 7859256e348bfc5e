//! A token ready to inject: its header value built once, and where it stands in time
//! (usable, due for renewal), computed the same way on every replica for a shared token.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use http::HeaderValue;

use super::timing::refresh_timing;
use crate::config::TokenSettings;
use crate::credentials::{CredentialError, Token};
use crate::vocab::redact::{form_urlencode, Redactor};

/// Where a slot's token came from (shown by the admin endpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// This replica called the token endpoint.
    Fetched,
    /// Another replica (or an earlier run) stored it in the shared cache.
    SharedCache,
}

impl Origin {
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Origin::Fetched => "fetched",
            Origin::SharedCache => "redis",
        }
    }
}

/// A token ready to inject: the header value is built once per token, never per request.
pub struct IssuedToken {
    pub(super) header_value: HeaderValue,
    pub(super) usable_until: Option<Instant>,
    pub(super) refresh_at: Option<Instant>,
    pub(super) expires_at_wall: Option<SystemTime>,
    pub(super) token: Token,
    pub(super) origin: Origin,
    /// The record as the shared cache holds it, for compare-and-delete.
    pub(super) sealed: Option<Arc<[u8]>>,
    /// Fetched by this replica because the upstream refused the token before it: only such
    /// a token, refused in turn, shows that refreshing does not help a route.
    pub(super) for_refusal: bool,
    /// The token as a `query_param` value, made by the first request that sends it so.
    query_form: OnceLock<QueryForm>,
}

/// A token as a query credential (`query_param`): made once per token, never per request.
pub struct QueryForm {
    /// The value percent-encoded for a query string (a space as `%20`).
    pub encoded: String,
    /// Masks the value wherever an upstream echoes it in a response header (`None`: the
    /// value is not visible ASCII, so no text header can show it).
    pub redactor: Option<Redactor>,
}

impl QueryForm {
    fn of(value: &HeaderValue) -> Self {
        Self {
            encoded: form_urlencode(&String::from_utf8_lossy(value.as_bytes())).replace('+', "%20"),
            redactor: value.to_str().ok().map(|text| Redactor::new([text])),
        }
    }
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
pub(super) fn standing(
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
    pub(super) fn new(
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
            query_form: OnceLock::new(),
        })
    }

    /// The token as a query credential, made on first use and kept with the token.
    pub fn query_form(&self) -> &QueryForm {
        self.query_form
            .get_or_init(|| QueryForm::of(&self.header_value))
    }

    /// The header value to inject (marked sensitive).
    pub fn header_value(&self) -> &HeaderValue {
        &self.header_value
    }

    /// Whether this token was fetched in answer to the upstream refusing the one before it.
    /// A refused replay with a token that was not (one fetched early, by an operator, or by
    /// another replica) earns one more refresh: it proves nothing about the route.
    pub(crate) fn answers_a_refusal(&self) -> bool {
        self.for_refusal
    }

    /// When the token expires (wall clock), if it does.
    pub(crate) fn expires_at(&self) -> Option<SystemTime> {
        self.expires_at_wall
    }

    /// Whether the token is good for as long as it is held: no expiry, nothing to refresh
    /// (static values, vendors that state no lifetime). Requests then read no clock for it.
    pub(super) fn timeless(&self) -> bool {
        self.usable_until.is_none() && self.refresh_at.is_none()
    }

    pub(super) fn usable_at(&self, now: Instant) -> bool {
        self.usable_until.is_none_or(|u| now < u)
    }

    pub(super) fn due_at(&self, now: Instant) -> bool {
        self.refresh_at.is_some_and(|r| now >= r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token_store::timing::tests::settings;

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

    /// Only a token with neither an expiry nor a refresh time skips the clock on the hot
    /// path; one that expires in an hour is judged against the clock as before.
    #[test]
    fn only_a_token_without_lifetime_is_timeless() {
        let issue = |expires_at| {
            let token = Token {
                value: crate::vocab::secret::Secret::new("Bearer x"),
                expires_at,
                refresh: None,
            };
            IssuedToken::new(token, SystemTime::now(), Origin::Fetched, None, &settings()).unwrap()
        };
        assert!(issue(None).timeless());
        let hourly = issue(Some(SystemTime::now() + Duration::from_secs(3600)));
        assert!(!hourly.timeless());
        assert!(hourly.usable_at(Instant::now()));
        assert!(!hourly.usable_at(Instant::now() + Duration::from_secs(3600)));
    }

    /// The query form is made once per token: every request gets the same one.
    #[test]
    fn the_query_form_is_made_once_per_token() {
        let token = Token {
            value: crate::vocab::secret::Secret::new("k y&=+/%"),
            expires_at: None,
            refresh: None,
        };
        let issued =
            IssuedToken::new(token, SystemTime::now(), Origin::Fetched, None, &settings()).unwrap();
        let first = issued.query_form();
        assert_eq!(first.encoded, "k%20y%26%3D%2B%2F%25");
        assert!(std::ptr::eq(first, issued.query_form()));
        let redactor = first.redactor.as_ref().unwrap();
        assert_eq!(
            redactor.redact("next?key=k%20y%26%3D%2B%2F%25"),
            "next?key=***"
        );
    }
}
