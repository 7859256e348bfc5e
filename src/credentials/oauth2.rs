//! `type: oauth2_client_credentials` — RFC 6749 §4.4: the client authenticates with its id
//! and secret (in the form body, or HTTP Basic per §2.3.1) and gets an access token. With
//! `jwt_exchange:` (ItsYou.online) the access token is then exchanged for a JWT, which is
//! what gets injected; the access token (ItsYou's live 24 h) travels with the JWT as its
//! refresh grant, so the next JWT is had with one call and without sending the client secret.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use serde::Deserialize;

use super::exchange::{self, EndpointAnswer};
use super::{CredentialError, CredentialType, Fingerprint, FetchFuture, RefreshGrant, SourceDeps, Token, TokenFormat, TokenSource};
use crate::expiry::{self, Stated};
use crate::vocab::redact::{form_urlencode, Redactor};
use crate::vocab::secret::Secret;
use crate::vocab::validate_ctx::ValidateCtx;
use crate::vocab::values::ConfigDuration;

/// An access token kept for the next JWT exchange must stay valid at least this much longer,
/// so that it does not expire between being chosen and reaching the JWT endpoint.
const ACCESS_TOKEN_MARGIN: Duration = Duration::from_secs(30);

/// How the client authenticates at the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// `client_id` and `client_secret` in the form body (`client_secret_post`).
    #[default]
    Post,
    /// HTTP Basic with the form-urlencoded id and secret (`client_secret_basic`).
    Basic,
}

/// The config section as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Spec {
    /// The token endpoint.
    pub token_url: Option<String>,
    /// The client id.
    pub client_id: Option<String>,
    /// The client secret, inline with `${VAR}`.
    pub client_secret: Option<Secret>,
    /// The client secret read from a file instead.
    pub client_secret_file: Option<String>,
    /// Space-separated scopes to ask for.
    pub scope: Option<String>,
    /// `post` (default) or `basic`.
    #[serde(default)]
    pub auth: ClientAuth,
    /// Exchange the access token for a JWT (ItsYou.online).
    pub jwt_exchange: Option<JwtExchangeSpec>,
}

/// The `jwt_exchange:` block as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtExchangeSpec {
    /// The JWT endpoint (`https://itsyou.online/v1/oauth/jwt`).
    pub url: Option<String>,
    /// Comma-separated scopes for the JWT.
    pub scope: Option<String>,
    /// Comma-separated audiences for the JWT.
    pub aud: Option<String>,
    /// Requested JWT lifetime, sent as `validity` in seconds.
    pub validity: Option<ConfigDuration>,
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct OAuth2Settings {
    token_url: reqwest::Url,
    client_id: String,
    client_secret: Secret,
    scope: Option<String>,
    auth: ClientAuth,
    jwt_exchange: Option<JwtExchange>,
    format: TokenFormat,
}

/// Validated `jwt_exchange:` settings.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtExchange {
    url: reqwest::Url,
    scope: Option<String>,
    aud: Option<String>,
    validity: Option<Duration>,
}

/// `type: oauth2_client_credentials`.
pub struct OAuth2ClientCredentials;

impl CredentialType for OAuth2ClientCredentials {
    const NAME: &'static str = "oauth2_client_credentials";
    type Spec = OAuth2Spec;
    type Settings = OAuth2Settings;

    fn default_scheme(spec: &OAuth2Spec) -> Option<&'static str> {
        // ItsYou.online documents API calls with a lower-case `bearer`.
        Some(if spec.jwt_exchange.is_some() {
            "bearer"
        } else {
            "Bearer"
        })
    }

    fn validate(
        spec: OAuth2Spec,
        format: TokenFormat,
        ctx: &mut ValidateCtx<'_>,
    ) -> Option<OAuth2Settings> {
                let token_url = match spec.token_url.as_deref() {
            Some(raw) => ctx.url("token_url", raw),
            None => {
                ctx.problem("token_url", "is required");
                None
            }
        };
        let client_id = ctx
            .required_text("client_id", spec.client_id.as_deref())
            .filter(|id| {
                let ok = !id.is_empty();
                if !ok {
                    ctx.problem("client_id", "is empty");
                }
                ok
            });
        let client_secret = ctx.required_secret(
            "client_secret",
            spec.client_secret.as_ref().map(Secret::expose),
            spec.client_secret_file.as_deref(),
        );
        // Outer `None`: a problem was recorded; keep going to collect the others.
        let scope = optional_text(ctx, "scope", spec.scope.as_deref());
        let jwt_exchange = match spec.jwt_exchange {
            Some(x) => x.validate(ctx).map(Some),
            None => Some(None),
        };
        Some(OAuth2Settings {
                token_url: token_url?,
                client_id: client_id?,
                client_secret: client_secret?,
                scope: scope?,
                auth: spec.auth,
                jwt_exchange: jwt_exchange?,
                format,
            })
    }

    fn fingerprint(settings: &OAuth2Settings, fp: &mut Fingerprint) {
        fp.text("token_url", settings.token_url.as_str());
        fp.text("client_id", &settings.client_id);
        fp.secret("client_secret", &settings.client_secret);
        fp.optional_text("scope", settings.scope.as_deref());
        fp.text(
            "auth",
            match settings.auth {
                ClientAuth::Post => "post",
                ClientAuth::Basic => "basic",
            },
        );
        match &settings.jwt_exchange {
            None => fp.optional_text("jwt_exchange", None),
            Some(x) => {
                fp.text("jwt_exchange.url", x.url.as_str());
                fp.optional_text("jwt_exchange.scope", x.scope.as_deref());
                fp.optional_text("jwt_exchange.aud", x.aud.as_deref());
                match x.validity {
                    None => fp.optional_text("jwt_exchange.validity", None),
                    Some(v) => fp.duration("jwt_exchange.validity", v),
                }
            }
        }
        settings.format.fingerprint(fp);
    }

    fn source(settings: &OAuth2Settings, deps: &SourceDeps) -> Arc<dyn TokenSource> {
        Arc::new(OAuth2Source::new(settings.clone(), deps.http.clone()))
    }
}

impl JwtExchangeSpec {
    fn validate(self, ctx: &mut ValidateCtx<'_>) -> Option<JwtExchange> {
        let url = match self.url.as_deref() {
            Some(raw) => ctx.url("jwt_exchange.url", raw),
            None => {
                ctx.problem("jwt_exchange.url", "is required");
                None
            }
        };
        let scope = optional_text(ctx, "jwt_exchange.scope", self.scope.as_deref());
        let aud = optional_text(ctx, "jwt_exchange.aud", self.aud.as_deref());
        let validity = self.validity.map(|v| v.0);
        if validity.is_some_and(|v| v < Duration::from_secs(1)) {
            ctx.problem("jwt_exchange.validity", "must be at least 1s");
            return None;
        }
        Some(JwtExchange {
            url: url?,
            scope: scope?,
            aud: aud?,
            validity,
        })
    }
}

/// An optional plain value with `${VAR}` resolved: `Some(None)` when absent, `None` when a
/// problem was recorded.
fn optional_text(
    ctx: &mut ValidateCtx<'_>,
    field: &str,
    raw: Option<&str>,
) -> Option<Option<String>> {
    match raw {
        Some(r) => ctx.text(field, r).map(Some),
        None => Some(None),
    }
}

/// The runtime source.
pub struct OAuth2Source {
    settings: OAuth2Settings,
    http: reqwest::Client,
    /// Hides the client secret (and its HTTP Basic form) in everything the endpoints answer.
    redactor: Redactor,
}

impl OAuth2Source {
    /// Wraps validated settings and the token endpoint client.
    pub fn new(settings: OAuth2Settings, http: reqwest::Client) -> Self {
        let basic = basic_credentials(&settings.client_id, &settings.client_secret);
        let redactor = Redactor::new([
            settings.client_secret.expose(),
            basic.expose(),
            basic.expose().trim_start_matches("Basic "),
        ]);
        Self {
            settings,
            http,
            redactor,
        }
    }

    /// RFC 6749 §4.4: the access token and its expiry.
    async fn client_credentials(
        &self,
        redactor: &Redactor,
    ) -> Result<(String, SystemTime), CredentialError> {
        let s = &self.settings;
        let mut form = vec![("grant_type", "client_credentials")];
        if let Some(scope) = &s.scope {
            form.push(("scope", scope));
        }
        let mut request = self
            .http
            .post(s.token_url.clone())
            .header(http::header::ACCEPT, "application/json");
        match s.auth {
            ClientAuth::Post => {
                form.push(("client_id", &s.client_id));
                form.push(("client_secret", s.client_secret.expose()));
            }
            ClientAuth::Basic => {
                request = request.header(
                    http::header::AUTHORIZATION,
                    basic_credentials(&s.client_id, &s.client_secret).expose(),
                );
            }
        }
        let answer = exchange::send(request.form(&form), redactor).await?;
        let doc = answer.json()?;
        let access_token = exchange::string_at(&doc, "/access_token").map_err(|e| {
            // Some servers answer 200 with an OAuth error document.
            match exchange::vendor_detail(&answer.body, redactor) {
                m if m.is_empty() => e,
                m => CredentialError::BadResponse(format!("no access_token: {m}")),
            }
        })?;
        // RFC 6749: `expires_in`; else the token's JWT `exp`; else the default hour.
        let expires_at = expiry::expires_at(
            access_token,
            [
                Stated::jwt_exp(access_token),
                Stated::seconds_at(&doc, "/expires_in"),
            ],
        );
        Ok((access_token.to_string(), expires_at))
    }

    /// ItsYou.online: trades the access token for a JWT.
    async fn exchange_for_jwt(
        &self,
        x: &JwtExchange,
        access_token: &str,
        redactor: &Redactor,
    ) -> Result<String, CredentialError> {
        let mut query: Vec<(&str, String)> = Vec::new();
        if let Some(scope) = &x.scope {
            query.push(("scope", scope.clone()));
        }
        if let Some(aud) = &x.aud {
            query.push(("aud", aud.clone()));
        }
        if let Some(validity) = x.validity {
            query.push(("validity", validity.as_secs().to_string()));
        }
        let request = self
            .http
            .get(x.url.clone())
            .query(&query)
            .header(http::header::ACCEPT, "application/jwt")
            .header(http::header::AUTHORIZATION, format!("token {access_token}"));
        let answer = exchange::send(request, redactor).await?;
        jwt_from_answer(&answer)
    }

    async fn fetch_token(&self, previous: Option<&Token>) -> Result<Token, CredentialError> {
        let s = &self.settings;
        let redactor =
            previous.map_or_else(|| self.redactor.clone(), |t| t.redactor(&self.redactor));
        let Some(x) = &s.jwt_exchange else {
            let (access_token, expires_at) = self.client_credentials(&redactor).await?;
            return Ok(Token {
                value: s.format.header_value(&access_token),
                expires_at: Some(expires_at),
                refresh: None,
            });
        };
        let kept = previous
            .and_then(|t| t.refresh.as_ref())
            .filter(|g| g.usable_at(SystemTime::now() + ACCESS_TOKEN_MARGIN));
        if let Some(grant) = kept {
            match self.jwt_token(x, grant.clone(), &redactor).await {
                Ok(token) => return Ok(token),
                Err(e) if e.is_refusal() => {
                    tracing::info!(error = %e, "the kept access token was refused; obtaining a new one");
                }
                Err(e) => return Err(e),
            }
        }
        let (access_token, expires_at) = self.client_credentials(&redactor).await?;
        let grant = RefreshGrant {
            token: Secret::new(access_token),
            expires_at: Some(expires_at),
        };
        self.jwt_token(x, grant, &redactor).await
    }

    /// A JWT for `access`, carrying `access` along for the next exchange.
    async fn jwt_token(
        &self,
        x: &JwtExchange,
        access: RefreshGrant,
        redactor: &Redactor,
    ) -> Result<Token, CredentialError> {
        let redactor = redactor.with([access.token.expose()]);
        let jwt = self
            .exchange_for_jwt(x, access.token.expose(), &redactor)
            .await?;
        // The JWT's `exp`; else the validity asked for; else the access token's expiry.
        let expires_at = expiry::expires_at(
            &jwt,
            [
                Stated::jwt_exp(&jwt),
                x.validity.map(|v| Stated::Seconds(v.as_secs_f64())),
                access.expires_at.map(Stated::At),
            ],
        );
        Ok(Token {
            value: self.settings.format.header_value(&jwt),
            expires_at: Some(expires_at),
            refresh: Some(access),
        })
    }
}

impl TokenSource for OAuth2Source {
    fn fetch<'a>(&'a self, previous: Option<&'a Token>) -> FetchFuture<'a> {
        Box::pin(self.fetch_token(previous))
    }
}

/// The JWT from a JWT endpoint's answer: the raw token (`application/jwt`), tolerating a
/// JSON string or a JSON object with a `jwt`/`token`/`access_token` field.
fn jwt_from_answer(answer: &EndpointAnswer) -> Result<String, CredentialError> {
    let text = answer.text()?;
    let token = if text.starts_with(['"', '{']) {
        let doc = answer.json()?;
        doc.as_str()
            .or_else(|| {
                ["/jwt", "/token", "/access_token"]
                    .iter()
                    .find_map(|p| exchange::string_at(&doc, p).ok())
            })
            .map(str::to_string)
            .ok_or_else(|| CredentialError::BadResponse("no JWT in the answer".into()))?
    } else {
        text
    };
    if token.split('.').count() != 3 || token.contains(char::is_whitespace) {
        return Err(CredentialError::BadResponse(
            "the JWT endpoint did not answer a JWT".into(),
        ));
    }
    Ok(token)
}

/// `Basic base64(urlencode(id):urlencode(secret))` as RFC 6749 §2.3.1 requires.
pub(super) fn basic_credentials(client_id: &str, client_secret: &Secret) -> Secret {
    let pair = format!(
        "{}:{}",
        form_urlencode(client_id),
        form_urlencode(client_secret.expose())
    );
    Secret::new(format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(pair)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_form_encoded_first() {
        let value = basic_credentials("my client:1", &Secret::new("s3cr%t+/"));
        let encoded = value.expose().strip_prefix("Basic ").unwrap();
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .unwrap();
        assert_eq!(
            String::from_utf8(decoded).unwrap(),
            "my+client%3A1:s3cr%25t%2B%2F"
        );
    }

    fn answer(content_type: &str, body: &str) -> EndpointAnswer {
        EndpointAnswer {
            status: 200,
            content_type: content_type.into(),
            body: bytes::Bytes::from(body.to_string()),
        }
    }

    #[test]
    fn jwt_answers_are_read_raw_or_wrapped() {
        assert_eq!(
            jwt_from_answer(&answer("application/jwt", "a.b.c\n")).unwrap(),
            "a.b.c"
        );
        assert_eq!(
            jwt_from_answer(&answer("application/json", r#""a.b.c""#)).unwrap(),
            "a.b.c"
        );
        assert_eq!(
            jwt_from_answer(&answer("application/json", r#"{"jwt":"a.b.c"}"#)).unwrap(),
            "a.b.c"
        );
        assert!(jwt_from_answer(&answer("text/html", "<html>")).is_err());
        assert!(jwt_from_answer(&answer("text/plain", "")).is_err());
    }
}
