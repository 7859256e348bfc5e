//! `type: static` — a fixed header value, such as `Outseta <apiKey>:<apiSecret>` or an API
//! key. Never expires and cannot be refreshed.

use serde::Deserialize;

use std::sync::Arc;

use super::{CredentialType, FetchFuture, Fingerprint, SourceDeps, Token, TokenFormat, TokenSource};
use crate::vocab::secret::Secret;
use crate::vocab::validate_ctx::ValidateCtx;

/// The config section as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StaticSpec {
    /// The full header value, usually built from `${VAR}` references.
    pub value: Option<Secret>,
    /// The value read from a file instead.
    pub value_file: Option<String>,
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct StaticSettings {
    value: Secret,
}

/// `type: static`.
pub struct StaticHeader;

impl CredentialType for StaticHeader {
    const NAME: &'static str = "static";
    const PREFETCH: bool = false;
    type Spec = StaticSpec;
    type Settings = StaticSettings;

    fn default_scheme(_: &StaticSpec) -> Option<&'static str> {
        None
    }

    fn validate(
        spec: StaticSpec,
        _format: TokenFormat,
        ctx: &mut ValidateCtx<'_>,
    ) -> Option<StaticSettings> {
        let value = ctx.required_secret(
            "value",
            spec.value.as_ref().map(Secret::expose),
            spec.value_file.as_deref(),
        );
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
        Some(StaticSettings { value })
    }

    fn fingerprint(settings: &StaticSettings, fp: &mut Fingerprint) {
        fp.secret("value", &settings.value);
    }

    fn source(settings: &StaticSettings, _deps: &SourceDeps) -> Arc<dyn TokenSource> {
        Arc::new(StaticSource::new(settings.clone()))
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
