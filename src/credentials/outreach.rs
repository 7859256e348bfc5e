//! `type: outreach_s2s` — Outreach server-to-server: sign an RS256 app token with the app's
//! private key, trade it at `POST /api/app/installs/{install_id}/actions/accessToken` for an
//! access token (a JSON:API document, token at `data.meta.accessToken`), inject that.

use std::sync::Arc;
use std::time::SystemTime;

use serde::Deserialize;
use serde_json::Value;

use super::exchange;
use super::jwt::{sign_app_token, RsaSigningKey, DEFAULT_APP_TOKEN_LIFETIME};
use super::{CredentialError, CredentialType, Fingerprint, FetchFuture, SourceDeps, Token, TokenFormat, TokenSource};
use crate::expiry::{self, Stated};
use crate::vocab::redact::Redactor;
use crate::vocab::validate_ctx::ValidateCtx;

/// The vendor's API.
pub const DEFAULT_BASE_URL: &str = "https://api.outreach.io";

/// The config section as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutreachSpec {
    /// The app's S2S GUID (the app token's `iss`).
    pub s2s_guid: Option<String>,
    /// The app's PEM RSA private key.
    pub private_key_file: Option<String>,
    /// The installation to get a token for.
    pub install_id: Option<String>,
    /// The API base (default `https://api.outreach.io`).
    pub base_url: Option<String>,
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct OutreachSettings {
    s2s_guid: String,
    key: RsaSigningKey,
    access_token_url: reqwest::Url,
    format: TokenFormat,
}

/// `type: outreach_s2s`.
pub struct OutreachS2s;

impl CredentialType for OutreachS2s {
    const NAME: &'static str = "outreach_s2s";
    type Spec = OutreachSpec;
    type Settings = OutreachSettings;

    fn default_scheme(_: &OutreachSpec) -> Option<&'static str> {
        Some("Bearer")
    }

    fn validate(
        spec: OutreachSpec,
        format: TokenFormat,
        ctx: &mut ValidateCtx<'_>,
    ) -> Option<OutreachSettings> {
                let s2s_guid = ctx.required_text("s2s_guid", spec.s2s_guid.as_deref());
        let key = match spec.private_key_file.as_deref() {
            Some(raw) => RsaSigningKey::load(ctx, "private_key_file", raw),
            None => {
                ctx.problem("private_key_file", "is required");
                None
            }
        };
        let install_id = ctx
            .required_text("install_id", spec.install_id.as_deref())
            .filter(|id| {
                let ok = !id.is_empty() && !id.contains(['/', '?', '#']);
                if !ok {
                    ctx.problem("install_id", "must be a non-empty id without `/`, `?`, `#`");
                }
                ok
            });
        let base_url = ctx.url(
            "base_url",
            spec.base_url.as_deref().unwrap_or(DEFAULT_BASE_URL),
        );
        let access_token_url = match (base_url, install_id) {
            (Some(base), Some(id)) => access_token_url(ctx, base, &id),
            _ => None,
        };
        Some(OutreachSettings {
                s2s_guid: s2s_guid?,
                key: key?,
                access_token_url: access_token_url?,
                format,
            })
    }

    fn fingerprint(settings: &OutreachSettings, fp: &mut Fingerprint) {
        fp.text("s2s_guid", &settings.s2s_guid);
        settings.key.fingerprint(fp);
        fp.text("access_token_url", settings.access_token_url.as_str());
        settings.format.fingerprint(fp);
    }

    fn source(settings: &OutreachSettings, deps: &SourceDeps) -> Arc<dyn TokenSource> {
        Arc::new(OutreachSource::new(settings.clone(), deps.http.clone()))
    }
}

/// `{base_url}/api/app/installs/{install_id}/actions/accessToken`, the id percent-encoded.
fn access_token_url(
    ctx: &mut ValidateCtx<'_>,
    mut base: reqwest::Url,
    install_id: &str,
) -> Option<reqwest::Url> {
    base.set_query(None);
    base.set_fragment(None);
    match base.path_segments_mut() {
        Ok(mut segments) => {
            segments.pop_if_empty().extend([
                "api",
                "app",
                "installs",
                install_id,
                "actions",
                "accessToken",
            ]);
        }
        Err(()) => {
            ctx.problem("base_url", "cannot hold a path");
            return None;
        }
    }
    Some(base)
}

/// The runtime source.
pub struct OutreachSource {
    settings: OutreachSettings,
    http: reqwest::Client,
}

impl OutreachSource {
    /// Wraps validated settings and the token endpoint client.
    pub fn new(settings: OutreachSettings, http: reqwest::Client) -> Self {
        Self { settings, http }
    }

    async fn fetch_token(&self) -> Result<Token, CredentialError> {
        let s = &self.settings;
        let app_token = sign_app_token(&s.key, &s.s2s_guid, DEFAULT_APP_TOKEN_LIFETIME, None)?;
        let request = self
            .http
            .post(s.access_token_url.clone())
            .header(http::header::ACCEPT, "application/vnd.api+json")
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", app_token.token),
            );
        // Non-2xx JSON:API `errors[]` become `Rejected` with the first error's detail/title.
        // The app token is a bearer secret too: an echo of it is hidden.
        let redactor = Redactor::new([app_token.token.as_str()]);
        let answer = exchange::send(request, &redactor).await?;
        let doc = answer.json()?;
        let access_token = exchange::string_at(&doc, "/data/meta/accessToken")?;
        Ok(Token {
            value: s.format.header_value(access_token),
            expires_at: Some(access_token_expiry(&doc, access_token)),
            refresh: None,
        })
    }
}

/// The access token's expiry: its JWT `exp`, else `data.meta.expiresAt` (ISO 8601), else
/// `data.meta.expiresIn` (seconds), else the default hour (Outreach documents one hour).
fn access_token_expiry(doc: &Value, access_token: &str) -> SystemTime {
    expiry::expires_at(
        access_token,
        [
            Stated::jwt_exp(access_token),
            doc.pointer("/data/meta/expiresAt")
                .and_then(Value::as_str)
                .and_then(exchange::parse_timestamp)
                .map(Stated::At),
            Stated::seconds_at(doc, "/data/meta/expiresIn"),
        ],
    )
}

impl TokenSource for OutreachSource {
    fn fetch<'a>(&'a self, _previous: Option<&'a Token>) -> FetchFuture<'a> {
        Box::pin(self.fetch_token())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn expiry_prefers_jwt_then_expires_at_then_expires_in() {
        use base64::Engine;
        let in_a_day = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 86_400;
        let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!(r#"{{"exp":{in_a_day}}}"#));
        let jwt = format!("eyJhbGciOiJSUzI1NiJ9.{payload}.sig");
        let doc = serde_json::json!({"data":{"meta":{
            "accessToken": jwt, "expiresAt": "2020-01-01T00:00:00Z", "expiresIn": 5}}});
        assert_eq!(
            access_token_expiry(&doc, &jwt),
            UNIX_EPOCH + Duration::from_secs(in_a_day)
        );
        assert_eq!(
            access_token_expiry(&doc, "opaque"),
            UNIX_EPOCH + Duration::from_secs(1_577_836_800)
        );
        let doc = serde_json::json!({"data":{"meta":{"expiresIn": "5"}}});
        let exp = access_token_expiry(&doc, "opaque");
        assert!(exp <= SystemTime::now() + Duration::from_secs(5));
        let doc = serde_json::json!({"data":{"meta":{}}});
        let exp = access_token_expiry(&doc, "opaque");
        assert!(exp > SystemTime::now() + Duration::from_secs(3500));
    }
}
