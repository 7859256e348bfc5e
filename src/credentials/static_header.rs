//! `type: static` — a fixed header value, such as `Outseta <apiKey>:<apiSecret>` or an API
//! key. Never expires and cannot be refreshed.

use serde::Deserialize;

use super::{CredentialKind, FetchFuture, Token, TokenSource, ValidatedCredential};
use crate::vocab::secret::Secret;
use crate::vocab::validate_ctx::ValidateCtx;

/// The config section as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticSpec {
    /// Header to set (default `Authorization`).
    pub header: Option<String>,
    /// The full header value, usually built from `${VAR}` references.
    pub value: Option<String>,
    /// The value read from a file instead.
    pub value_file: Option<String>,
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticSettings {
    value: Secret,
}

impl StaticSpec {
    /// Checks the section; problems go to `ctx`.
    pub fn validate(self, ctx: &mut ValidateCtx<'_>) -> Option<ValidatedCredential> {
        let header = ctx.header_name("header", self.header.as_deref());
        let value = ctx.required_secret("value", self.value.as_deref(), self.value_file.as_deref());
        let value = value.filter(|v| {
            let ok = http::HeaderValue::from_str(v.expose()).is_ok() && !v.is_empty();
            if !ok {
                ctx.problem(
                    "value",
                    "is empty or not a valid header value (control characters?)",
                );
            }
            ok
        })?;
        Some(ValidatedCredential {
            header: header?,
            prefetch: false,
            kind: CredentialKind::Static(StaticSettings { value }),
        })
    }
}

/// The runtime source: hands out the configured value.
pub struct StaticSource {
    settings: StaticSettings,
}

impl StaticSource {
    /// Wraps validated settings.
    pub fn new(settings: StaticSettings) -> Self {
        Self { settings }
    }
}

impl TokenSource for StaticSource {
    fn fetch<'a>(&'a self, _previous: Option<&'a Token>) -> FetchFuture<'a> {
        let token = Token {
            value: self.settings.value.clone(),
            expires_at: None,
            refresh: None,
        };
        Box::pin(async move { Ok(token) })
    }

    fn refreshable(&self) -> bool {
        false
    }
}
