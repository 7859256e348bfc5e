//! Credentials: where the value of an injected header comes from. One file per token source;
//! each turns its config section into settings (`validate`) and its settings into a
//! [`TokenSource`]. Timing, caching, single flight and backoff are not here: they are shared
//! by every source in `token_store.rs`.

pub mod exchange;
pub mod jwt;
pub mod login;
pub mod oauth2;
pub mod outreach;
pub mod outseta;
pub mod static_header;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::SystemTime;

use http::HeaderName;

use crate::vocab::redact::Redactor;
use crate::vocab::secret::Secret;
use crate::vocab::validate_ctx::ValidateCtx;

/// A freshly obtained credential.
#[derive(Debug, Clone)]
pub struct Token {
    /// The complete header value, scheme included (`Bearer eyJ…`, `Outseta key:secret`).
    pub value: Secret,
    /// When the token stops being accepted; `None` for values that never expire.
    pub expires_at: Option<SystemTime>,
    /// A grant that can get the next token without the primary secret (refresh tokens).
    pub refresh: Option<RefreshGrant>,
}

impl Token {
    /// `base` plus this token's header value, the bare token after its scheme, and its
    /// refresh grant: the tokens a source holds while it fetches the next one.
    pub fn redactor(&self, base: &Redactor) -> Redactor {
        let token = self;
        let value = token.value.expose();
        let bare = value.split_once(' ').map(|(_, t)| t);
        let refresh = token.refresh.as_ref().map(|g| g.token.expose());
        base.with([Some(value), bare, refresh].into_iter().flatten())
    }
}

/// A refresh token and its own expiry.
#[derive(Debug, Clone)]
pub struct RefreshGrant {
    pub token: Secret,
    pub expires_at: Option<SystemTime>,
}

impl RefreshGrant {
    /// Whether the grant can still be used at `now`.
    pub fn usable_at(&self, now: SystemTime) -> bool {
        self.expires_at.is_none_or(|e| e > now)
    }
}

/// Why a token could not be obtained. Messages never contain a secret: transport errors are
/// stripped of their URL (a query could carry a client secret) and only vendor message fields
/// of error bodies are kept.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CredentialError {
    /// The token endpoint could not be reached or did not answer in time.
    #[error("token endpoint unreachable: {0}")]
    Unreachable(String),
    /// The token endpoint answered with an error status.
    #[error("token endpoint answered {status}{}", detail_suffix(detail))]
    Rejected { status: u16, detail: String },
    /// The token endpoint refused the configured secret or grant (RFC 6749 §5.2
    /// `invalid_client`, `invalid_grant`, `unauthorized_client`, or any 400/401): retrying
    /// will not help until the configuration changes. `vendor_error` is the vendor's `error`
    /// code when it sent a registered one.
    #[error("token endpoint refused the credential ({status}{}){}", code_suffix(vendor_error.as_deref()), detail_suffix(detail))]
    Refused {
        status: u16,
        vendor_error: Option<String>,
        detail: String,
    },
    /// The answer was not the document the vendor documents.
    #[error("token endpoint answer not understood: {0}")]
    BadResponse(String),
    /// Anything else (an unreadable key, an account that does not exist, …).
    #[error("{0}")]
    Other(String),
}

impl CredentialError {
    /// The same error with every text in it passed through [`Redactor::detail`].
    pub fn redacted(self, redactor: &Redactor) -> Self {
        match self {
            CredentialError::Unreachable(m) => CredentialError::Unreachable(redactor.detail(&m)),
            CredentialError::Rejected { status, detail } => CredentialError::Rejected {
                status,
                detail: redactor.detail(&detail),
            },
            CredentialError::Refused {
                status,
                vendor_error,
                detail,
            } => CredentialError::Refused {
                status,
                vendor_error,
                detail: redactor.detail(&detail),
            },
            CredentialError::BadResponse(m) => CredentialError::BadResponse(redactor.detail(&m)),
            CredentialError::Other(m) => CredentialError::Other(redactor.detail(&m)),
        }
    }

    /// Whether the endpoint refused the grant that was presented (a refresh token, a cached
    /// access token) rather than being in trouble: the caller should fall back to the
    /// primary secret instead of backing off. `success: false` answers come as `Rejected`
    /// with a 2xx status.
    pub fn is_refusal(&self) -> bool {
        matches!(self, CredentialError::Refused { .. })
            || matches!(self, CredentialError::Rejected { status, .. }
            if matches!(status, 400 | 401 | 403) || (200..300).contains(status))
    }

    /// Whether the failure is final: the token endpoint refused the configured secret, so the
    /// slot backs off straight to `backoff_max` and reports the credential as `rejected`.
    /// Outages (5xx, timeouts, connection errors) are not final.
    pub fn is_final(&self) -> bool {
        matches!(self, CredentialError::Refused { .. })
    }

    /// The vendor's RFC 6749 `error` code of a refusal (`invalid_client`, …), if it sent one.
    pub fn vendor_error(&self) -> Option<&str> {
        match self {
            CredentialError::Refused { vendor_error, .. } => vendor_error.as_deref(),
            _ => None,
        }
    }
}

fn code_suffix(code: Option<&str>) -> String {
    code.map(|c| format!(" {c}")).unwrap_or_default()
}

fn detail_suffix(detail: &str) -> String {
    if detail.is_empty() {
        String::new()
    } else {
        format!(": {detail}")
    }
}

/// A boxed future returned by [`TokenSource::fetch`] (trait objects cannot use `async fn`).
pub type FetchFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Token, CredentialError>> + Send + 'a>>;

/// Something that can obtain a token. Implementations hold their settings and an HTTP client;
/// they never cache tokens — the token store decides when to call them — though one may
/// remember a lookup that does not change between tokens (the Outseta subscription of an
/// account).
pub trait TokenSource: Send + Sync + 'static {
    /// Obtains a new token. `previous` is the last token this source issued, so that a
    /// source with refresh tokens can use its grant (and fall back to a full login when the
    /// grant is refused or expired).
    fn fetch<'a>(&'a self, previous: Option<&'a Token>) -> FetchFuture<'a>;

    /// Whether fetching again can cure a 401/403 (false for values fixed in the config).
    fn refreshable(&self) -> bool {
        true
    }
}

/// The settings of one credential, by type. Compared on reload: a credential whose settings
/// are unchanged keeps its cached token.
#[derive(Debug, Clone, PartialEq)]
pub enum CredentialKind {
    Static(static_header::StaticSettings),
    OAuth2(oauth2::OAuth2Settings),
    OutreachS2s(outreach::OutreachSettings),
    Jwt(jwt::JwtSettings),
    Outseta(Box<outseta::OutsetaSettings>),
    Login(Box<login::LoginSettings>),
}

impl CredentialKind {
    /// The type name as written in the config, for logs and the admin endpoint.
    pub fn type_name(&self) -> &'static str {
        match self {
            CredentialKind::Static(_) => "static",
            CredentialKind::OAuth2(_) => "oauth2_client_credentials",
            CredentialKind::OutreachS2s(_) => "outreach_s2s",
            CredentialKind::Jwt(_) => "jwt",
            CredentialKind::Outseta(_) => "outseta",
            CredentialKind::Login(_) => "login",
        }
    }
}

/// What every source's `validate` returns.
pub struct ValidatedCredential {
    pub header: HeaderName,
    pub prefetch: bool,
    pub kind: CredentialKind,
}

/// Shared things a source needs at run time.
#[derive(Clone)]
pub struct SourceDeps {
    /// The client for token endpoints (rustls, same trust roots as upstream requests).
    pub http: reqwest::Client,
}

/// Builds the runtime source for validated settings, guarded so that a panic inside a fetch
/// becomes an ordinary failure (with backoff and a 502) instead of a stuck credential.
pub fn build_source(kind: &CredentialKind, deps: &SourceDeps) -> Arc<dyn TokenSource> {
    Arc::new(Guard {
        inner: unguarded_source(kind, deps),
        redactor: Redactor::default(),
    })
}

/// Like [`build_source`] for a whole credential: its errors also hide each `${VAR}` value used
/// in its secret fields.
pub fn build_credential_source(
    kind: &CredentialKind,
    secret_parts: &[Secret],
    deps: &SourceDeps,
) -> Arc<dyn TokenSource> {
    Arc::new(Guard {
        inner: unguarded_source(kind, deps),
        redactor: Redactor::new(secret_parts.iter().map(Secret::expose)),
    })
}

fn unguarded_source(kind: &CredentialKind, deps: &SourceDeps) -> Arc<dyn TokenSource> {
    match kind {
        CredentialKind::Static(s) => Arc::new(static_header::StaticSource::new(s.clone())),
        CredentialKind::OAuth2(s) => {
            Arc::new(oauth2::OAuth2Source::new(s.clone(), deps.http.clone()))
        }
        CredentialKind::OutreachS2s(s) => {
            Arc::new(outreach::OutreachSource::new(s.clone(), deps.http.clone()))
        }
        CredentialKind::Jwt(s) => Arc::new(jwt::JwtSource::new(s.clone())),
        CredentialKind::Outseta(s) => Arc::new(outseta::OutsetaSource::new(
            (**s).clone(),
            deps.http.clone(),
        )),
        CredentialKind::Login(s) => {
            Arc::new(login::LoginSource::new((**s).clone(), deps.http.clone()))
        }
    }
}

/// Runs each fetch of the wrapped source in its own task, so that a panic (a bug, or a vendor
/// value no check foresaw) is reported as [`CredentialError::Other`], and passes every error
/// through `redactor` once more. Dropping the fetch (a timeout) aborts the task.
struct Guard {
    inner: Arc<dyn TokenSource>,
    redactor: Redactor,
}

impl TokenSource for Guard {
    fn fetch<'a>(&'a self, previous: Option<&'a Token>) -> FetchFuture<'a> {
        let source = Arc::clone(&self.inner);
        let previous = previous.cloned();
        let task = AbortOnDrop(tokio::spawn(async move {
            source.fetch(previous.as_ref()).await
        }));
        Box::pin(async move {
            let mut task = task;
            match (&mut task.0).await {
                Ok(result) => result.map_err(|e| e.redacted(&self.redactor)),
                Err(_) => Err(CredentialError::Other(
                    "the token fetch failed unexpectedly (internal error)".into(),
                )),
            }
        })
    }

    fn refreshable(&self) -> bool {
        self.inner.refreshable()
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<Result<Token, CredentialError>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// How a raw token becomes a header value: `scheme` then a space then the token, or the
/// bare token when the scheme is empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenFormat {
    scheme: String,
}

impl TokenFormat {
    /// `scheme` from the config, or `default_scheme` when absent.
    pub fn new(scheme: Option<&str>, default_scheme: &str) -> Self {
        Self {
            scheme: scheme.unwrap_or(default_scheme).to_string(),
        }
    }

    /// The header value for `token`.
    pub fn header_value(&self, token: &str) -> Secret {
        if self.scheme.is_empty() {
            Secret::new(token)
        } else {
            Secret::new(format!("{} {token}", self.scheme))
        }
    }
}

/// Validates the fields every credential type shares: `header`, `scheme`, `prefetch`.
pub fn common_fields(
    ctx: &mut ValidateCtx<'_>,
    header: Option<&str>,
    scheme: Option<&str>,
    default_scheme: &str,
) -> Option<(HeaderName, TokenFormat)> {
    let header = ctx.header_name("header", header)?;
    if let Some(s) = scheme {
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            ctx.problem(
                "scheme",
                format!("`{s}` must be a single word like `Bearer`"),
            );
            return None;
        }
    }
    Some((header, TokenFormat::new(scheme, default_scheme)))
}

/// Unit-test helper shared by the credential files: validates one YAML section with the
/// given variables and returns the settings or every problem found.
#[cfg(test)]
pub(crate) fn validate_for_test<S: serde::de::DeserializeOwned>(
    yaml: &str,
    env: &[(&str, &str)],
    validate: impl FnOnce(S, &mut ValidateCtx<'_>) -> Option<ValidatedCredential>,
) -> Result<CredentialKind, Vec<String>> {
    let spec: S = serde_yaml::from_str(yaml).map_err(|e| vec![e.to_string()])?;
    let env: std::collections::HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let mut ctx = ValidateCtx::new(&env, std::env::temp_dir());
    let validated = validate(spec, &mut ctx);
    let problems = ctx.into_problems();
    match validated {
        Some(v) if problems.is_empty() => Ok(v.kind),
        _ => Err(problems),
    }
}

#[cfg(test)]
mod panic_guard_tests {
    use super::*;

    struct Panics;

    impl TokenSource for Panics {
        fn fetch<'a>(&'a self, _previous: Option<&'a Token>) -> FetchFuture<'a> {
            Box::pin(async { panic!("a vendor number no check foresaw") })
        }
    }

    #[tokio::test]
    async fn a_panicking_fetch_is_an_ordinary_failure() {
        let guarded = Guard {
            inner: Arc::new(Panics),
            redactor: Redactor::default(),
        };
        for _ in 0..2 {
            let e = guarded.fetch(None).await.unwrap_err();
            assert!(matches!(e, CredentialError::Other(_)), "{e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacted_errors_hide_tokens_from_answers() {
        let doc = serde_json::json!({"data": {"accessToken": "at-secret-1"}});
        let r = Redactor::default().with_answer_secrets(&doc);
        let e = CredentialError::Rejected {
            status: 400,
            detail: "at-secret-1".into(),
        }
        .redacted(&r);
        assert!(!e.to_string().contains("at-secret-1"), "{e}");
    }
}
