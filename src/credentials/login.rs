//! `type: login` — a username/password login that answers a bearer token and a refresh token
//! (TeleTracker Online and look-alikes):
//! `{success, token, tokenExpiration, tokenLifetime, refreshToken, refreshTokenExpiration}`.
//!
//! The next token comes from `refresh_url` with the refresh token while that is usable; the
//! answer carries a new token and a new refresh token (the old one is single-use). When the
//! refresh is refused, or its grant has expired, the same fetch logs in again. Field names
//! can be overridden for APIs that follow the pattern under other names.

use std::sync::Arc;
use std::time::SystemTime;

use reqwest::Url;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::exchange::{self, EndpointAnswer};
use super::{CredentialError, CredentialType, Fingerprint, FetchFuture, RefreshGrant, SourceDeps, Token, TokenFormat, TokenSource};
use crate::expiry::{self, Stated};
use crate::vocab::redact::Redactor;
use crate::vocab::secret::Secret;
use crate::vocab::validate_ctx::ValidateCtx;

/// The config section as written. `Debug` hides the password.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginSpec {
    /// Where to log in (`https://api.teletracker.net/auth/login`).
    pub login_url: Option<String>,
    /// The login name.
    pub username: Option<String>,
    /// The password (usually `${VAR}`).
    pub password: Option<Secret>,
    /// The password read from this file instead.
    pub password_file: Option<String>,
    /// Which account to log in to, for users with several (sent as an integer).
    pub account_id: Option<i64>,
    /// Where to trade a refresh token for new tokens; without it every fetch logs in.
    pub refresh_url: Option<String>,
    /// How request bodies are encoded (default `json`).
    pub body: Option<BodyEncoding>,
    /// Field names for look-alike APIs.
    #[serde(default)]
    pub fields: FieldsSpec,
}

/// How the login and refresh bodies are encoded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BodyEncoding {
    /// `application/json`.
    #[default]
    Json,
    /// `application/x-www-form-urlencoded`.
    Form,
}

/// `fields:` — names used by the vendor, split by direction.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FieldsSpec {
    /// Keys of the login and refresh request bodies.
    #[serde(default)]
    pub request: RequestFieldsSpec,
    /// Where the answer's values are.
    #[serde(default)]
    pub response: ResponseFieldsSpec,
}

/// Names of the fields authrelay sends.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RequestFieldsSpec {
    /// Default `username`.
    pub username: Option<String>,
    /// Default `password`.
    pub password: Option<String>,
    /// Default `account_id`.
    pub account_id: Option<String>,
    /// Key of the refresh token in the refresh request; default `refresh_token`.
    pub refresh_token: Option<String>,
}

/// Where authrelay finds things in the answer: a top-level key, or a JSON pointer when the
/// name starts with `/` (`/data/accessToken`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResponseFieldsSpec {
    /// A boolean that is `false` on refusal; default `success`.
    pub success: Option<String>,
    /// The token; default `token`.
    pub token: Option<String>,
    /// ISO 8601 expiry of the token; default `tokenExpiration`.
    pub token_expiration: Option<String>,
    /// Lifetime of the token in seconds; default `tokenLifetime`.
    pub token_lifetime: Option<String>,
    /// The next refresh token; default `refreshToken`.
    pub refresh_token: Option<String>,
    /// ISO 8601 expiry of the refresh token; default `refreshTokenExpiration`.
    pub refresh_token_expiration: Option<String>,
}

/// Resolved request field names.
#[derive(Debug, Clone, PartialEq)]
struct RequestFields {
    username: String,
    password: String,
    account_id: String,
    refresh_token: String,
}

/// Resolved response locations, as JSON pointers.
#[derive(Debug, Clone, PartialEq)]
struct ResponseFields {
    success: String,
    token: String,
    token_expiration: String,
    token_lifetime: String,
    refresh_token: String,
    refresh_token_expiration: String,
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct LoginSettings {
    login_url: Url,
    refresh_url: Option<Url>,
    username: String,
    password: Secret,
    account_id: Option<i64>,
    encoding: BodyEncoding,
    request: RequestFields,
    response: ResponseFields,
    format: TokenFormat,
}

/// `type: login`.
pub struct Login;

impl CredentialType for Login {
    const NAME: &'static str = "login";
    type Spec = LoginSpec;
    type Settings = LoginSettings;

    fn default_scheme(_: &LoginSpec) -> Option<&'static str> {
        Some("Bearer")
    }

    fn validate(
        spec: LoginSpec,
        format: TokenFormat,
        ctx: &mut ValidateCtx<'_>,
    ) -> Option<LoginSettings> {
                let login_url = match spec.login_url.as_deref() {
            Some(raw) => ctx.url("login_url", raw),
            None => {
                ctx.problem("login_url", "is required");
                None
            }
        };
        let refresh_url = match spec.refresh_url.as_deref() {
            Some(raw) => ctx.url("refresh_url", raw).map(Some),
            None => Some(None),
        };
        let username = ctx.required_text("username", spec.username.as_deref());
        let password = ctx
            .required_secret(
                "password",
                spec.password.as_ref().map(Secret::expose),
                spec.password_file.as_deref(),
            )
            .filter(|p| {
                if p.is_empty() {
                    ctx.problem("password", "must not be empty");
                }
                !p.is_empty()
            });
        let request = request_fields(ctx, &spec.fields.request);
        let response = response_fields(ctx, &spec.fields.response);
        Some(LoginSettings {
                login_url: login_url?,
                refresh_url: refresh_url?,
                username: username?,
                password: password?,
                account_id: spec.account_id,
                encoding: spec.body.unwrap_or_default(),
                request: request?,
                response: response?,
                format,
            })
    }

    fn fingerprint(settings: &LoginSettings, fp: &mut Fingerprint) {
        fp.text("login_url", settings.login_url.as_str());
        fp.optional_text("refresh_url", settings.refresh_url.as_ref().map(Url::as_str));
        fp.text("username", &settings.username);
        fp.secret("password", &settings.password);
        match settings.account_id {
            None => fp.optional_text("account_id", None),
            Some(id) => fp.number("account_id", id),
        }
        fp.text(
            "body",
            match settings.encoding {
                BodyEncoding::Json => "json",
                BodyEncoding::Form => "form",
            },
        );
        let r = &settings.request;
        fp.text("fields.request.username", &r.username);
        fp.text("fields.request.password", &r.password);
        fp.text("fields.request.account_id", &r.account_id);
        fp.text("fields.request.refresh_token", &r.refresh_token);
        let a = &settings.response;
        fp.text("fields.response.success", &a.success);
        fp.text("fields.response.token", &a.token);
        fp.text("fields.response.token_expiration", &a.token_expiration);
        fp.text("fields.response.token_lifetime", &a.token_lifetime);
        fp.text("fields.response.refresh_token", &a.refresh_token);
        fp.text("fields.response.refresh_token_expiration", &a.refresh_token_expiration);
        settings.format.fingerprint(fp);
    }

    fn source(settings: &LoginSettings, deps: &SourceDeps) -> Arc<dyn TokenSource> {
        Arc::new(LoginSource::new(settings.clone(), deps.http.clone()))
    }
}

fn field_name(
    ctx: &mut ValidateCtx<'_>,
    field: &str,
    given: Option<&String>,
    default: &str,
) -> Option<String> {
    match given {
        None => Some(default.to_string()),
        Some(name) if name.trim().is_empty() => {
            ctx.problem(&format!("fields.{field}"), "must not be empty");
            None
        }
        Some(name) => Some(name.clone()),
    }
}

fn request_fields(ctx: &mut ValidateCtx<'_>, spec: &RequestFieldsSpec) -> Option<RequestFields> {
    let username = field_name(ctx, "request.username", spec.username.as_ref(), "username");
    let password = field_name(ctx, "request.password", spec.password.as_ref(), "password");
    let account_id = field_name(
        ctx,
        "request.account_id",
        spec.account_id.as_ref(),
        "account_id",
    );
    let refresh_token = field_name(
        ctx,
        "request.refresh_token",
        spec.refresh_token.as_ref(),
        "refresh_token",
    );
    Some(RequestFields {
        username: username?,
        password: password?,
        account_id: account_id?,
        refresh_token: refresh_token?,
    })
}

fn response_fields(ctx: &mut ValidateCtx<'_>, spec: &ResponseFieldsSpec) -> Option<ResponseFields> {
    let mut pointer = |field: &str, given: Option<&String>, default: &str| {
        field_name(ctx, &format!("response.{field}"), given, default).map(|n| as_pointer(&n))
    };
    let success = pointer("success", spec.success.as_ref(), "success");
    let token = pointer("token", spec.token.as_ref(), "token");
    let token_expiration = pointer(
        "token_expiration",
        spec.token_expiration.as_ref(),
        "tokenExpiration",
    );
    let token_lifetime = pointer(
        "token_lifetime",
        spec.token_lifetime.as_ref(),
        "tokenLifetime",
    );
    let refresh_token = pointer("refresh_token", spec.refresh_token.as_ref(), "refreshToken");
    let refresh_token_expiration = pointer(
        "refresh_token_expiration",
        spec.refresh_token_expiration.as_ref(),
        "refreshTokenExpiration",
    );
    Some(ResponseFields {
        success: success?,
        token: token?,
        token_expiration: token_expiration?,
        token_lifetime: token_lifetime?,
        refresh_token: refresh_token?,
        refresh_token_expiration: refresh_token_expiration?,
    })
}

/// A top-level key as a JSON pointer (escaping `~` and `/`); a name starting with `/` is
/// already one.
fn as_pointer(name: &str) -> String {
    if name.starts_with('/') {
        name.to_string()
    } else {
        format!("/{}", name.replace('~', "~0").replace('/', "~1"))
    }
}

/// The runtime source.
pub struct LoginSource {
    settings: LoginSettings,
    http: reqwest::Client,
    /// The last refresh token the vendor refused. The store keeps handing back the previous
    /// token until a fetch succeeds; remembering the refusal keeps a failing login from
    /// sending the dead refresh token again on every retry.
    refused: std::sync::Mutex<Option<Secret>>,
    /// Hides the password in everything the vendor answers.
    redactor: Redactor,
}

impl LoginSource {
    /// Wraps validated settings and the token-endpoint client.
    pub fn new(settings: LoginSettings, http: reqwest::Client) -> Self {
        let redactor = Redactor::new([settings.password.expose()]);
        Self {
            settings,
            http,
            refused: std::sync::Mutex::new(None),
            redactor,
        }
    }

    fn was_refused(&self, grant: &RefreshGrant) -> bool {
        let refused = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        refused.as_ref() == Some(&grant.token)
    }

    async fn obtain(&self, previous: Option<&Token>) -> Result<Token, CredentialError> {
        let redactor =
            previous.map_or_else(|| self.redactor.clone(), |t| t.redactor(&self.redactor));
        let grant = previous
            .and_then(|t| t.refresh.as_ref())
            .filter(|g| g.usable_at(SystemTime::now()) && !self.was_refused(g));
        if let (Some(url), Some(grant)) = (&self.settings.refresh_url, grant) {
            match self.refresh(url, grant, &redactor).await {
                Ok(token) => return Ok(token),
                Err(e) if e.is_refusal() => {
                    *self.refused.lock().unwrap_or_else(|p| p.into_inner()) =
                        Some(grant.token.clone());
                    tracing::info!(error = %e, "refresh token refused; logging in again");
                }
                Err(e) => return Err(e),
            }
        }
        self.login(&redactor).await
    }

    async fn login(&self, redactor: &Redactor) -> Result<Token, CredentialError> {
        let s = &self.settings;
        let mut body = Map::new();
        body.insert(s.request.username.clone(), Value::from(s.username.as_str()));
        body.insert(s.request.password.clone(), Value::from(s.password.expose()));
        if let Some(id) = s.account_id {
            body.insert(s.request.account_id.clone(), Value::from(id));
        }
        let answer = self.post(&s.login_url, body, redactor).await?;
        // `success: false` with a 2xx status on the password login is the vendor refusing the
        // configured user or password: final (state `rejected`, slow retries), as a 401 is.
        // The same answer to a refresh only refuses the grant (a login follows).
        self.token_from(&answer, redactor).map_err(|e| match e {
            CredentialError::Rejected { status, detail } if (200..300).contains(&status) => {
                CredentialError::Refused {
                    status,
                    vendor_error: None,
                    detail,
                }
            }
            other => other,
        })
    }

    async fn refresh(
        &self,
        url: &Url,
        grant: &RefreshGrant,
        redactor: &Redactor,
    ) -> Result<Token, CredentialError> {
        let mut body = Map::new();
        body.insert(
            self.settings.request.refresh_token.clone(),
            Value::from(grant.token.expose()),
        );
        let answer = self.post(url, body, redactor).await?;
        self.token_from(&answer, redactor)
    }

    async fn post(
        &self,
        url: &Url,
        body: Map<String, Value>,
        redactor: &Redactor,
    ) -> Result<EndpointAnswer, CredentialError> {
        let request = self.http.post(url.clone());
        let request = match self.settings.encoding {
            BodyEncoding::Json => request.json(&body),
            BodyEncoding::Form => {
                let pairs: Vec<(String, String)> = body
                    .into_iter()
                    .map(|(k, v)| match v {
                        Value::String(s) => (k, s),
                        other => (k, other.to_string()),
                    })
                    .collect();
                request.form(&pairs)
            }
        };
        exchange::send(request, redactor).await
    }

    fn token_from(
        &self,
        answer: &EndpointAnswer,
        redactor: &Redactor,
    ) -> Result<Token, CredentialError> {
        let fields = &self.settings.response;
        let doc = answer.json()?;
        if doc.pointer(&fields.success).and_then(Value::as_bool) == Some(false) {
            let message = exchange::vendor_detail(&answer.body, redactor);
            return Err(CredentialError::Rejected {
                status: answer.status,
                detail: if message.is_empty() {
                    "refused (success: false)".into()
                } else {
                    format!("refused (success: false): {message}")
                },
            });
        }
        let token = exchange::string_at(&doc, &fields.token)?;
        // `tokenExpiration`; else `tokenLifetime`; else the JWT's `exp`; else the default hour.
        let expires_at = expiry::expires_at(
            token,
            [
                doc.pointer(&fields.token_expiration)
                    .and_then(Value::as_str)
                    .and_then(exchange::parse_timestamp)
                    .map(Stated::At),
                Stated::seconds_at(&doc, &fields.token_lifetime),
            ],
        );
        let refresh = doc
            .pointer(&fields.refresh_token)
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .map(|t| RefreshGrant {
                token: Secret::new(t),
                expires_at: doc
                    .pointer(&fields.refresh_token_expiration)
                    .and_then(Value::as_str)
                    .and_then(exchange::parse_timestamp),
            });
        Ok(Token {
            value: self.settings.format.header_value(token),
            expires_at: Some(expires_at),
            refresh,
        })
    }
}

impl TokenSource for LoginSource {
    fn fetch<'a>(&'a self, previous: Option<&'a Token>) -> FetchFuture<'a> {
        Box::pin(self.obtain(previous))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(yaml: &str, env: &[(&str, &str)]) -> Result<LoginSettings, Vec<String>> {
        crate::credentials::validate_for_test::<Login>(yaml, env)
    }

    #[test]
    fn defaults_and_debug_hide_the_password() {
        let s = validate(
            "login_url: https://api.example.com/auth/login\nusername: u\npassword: ${PW}\naccount_id: 7\n",
            &[("PW", "pw-hunter2")],
        )
        .unwrap();
        assert_eq!(s.encoding, BodyEncoding::Json);
        assert_eq!(s.response.token, "/token");
        assert_eq!(s.response.refresh_token, "/refreshToken");
        assert_eq!(s.request.refresh_token, "refresh_token");
        assert_eq!(s.account_id, Some(7));
        assert!(!format!("{s:?}").contains("pw-hunter2"));
        let spec: LoginSpec = serde_yaml::from_str("password: literal-pw\n").unwrap();
        assert!(!format!("{spec:?}").contains("literal-pw"));
    }

    #[test]
    fn fields_can_be_renamed_or_pointed_at() {
        let s = validate(
            "login_url: https://x.test/login\nusername: u\npassword: p\nbody: form\nfields:\n  request: {username: user}\n  response: {token: /data/access, refresh_token: a/b}\n",
            &[],
        )
        .unwrap();
        assert_eq!(s.encoding, BodyEncoding::Form);
        assert_eq!(s.request.username, "user");
        assert_eq!(s.response.token, "/data/access");
        assert_eq!(s.response.refresh_token, "/a~1b");
    }

    #[test]
    fn missing_and_bad_fields_are_refused() {
        let p = validate("username: u\n", &[]).unwrap_err();
        assert!(p.iter().any(|m| m.contains("login_url")), "{p:?}");
        assert!(p.iter().any(|m| m.contains("password")), "{p:?}");
        let p = validate(
            "login_url: ftp://x.test/\nusername: u\npassword: p\nfields: {response: {token: ''}}\n",
            &[],
        )
        .unwrap_err();
        assert!(p.iter().any(|m| m.contains("login_url")), "{p:?}");
        assert!(
            p.iter().any(|m| m.contains("fields.response.token")),
            "{p:?}"
        );
        assert!(serde_yaml::from_str::<LoginSpec>("account_id: seven\n").is_err());
        assert!(serde_yaml::from_str::<LoginSpec>("body: xml\n").is_err());
    }

    #[test]
    fn refusals_fall_back_but_outages_do_not() {
        let rejected = |status| CredentialError::Rejected {
            status,
            detail: String::new(),
        };
        assert!(rejected(401).is_refusal());
        assert!(rejected(400).is_refusal());
        assert!(rejected(200).is_refusal());
        assert!(!rejected(500).is_refusal());
        assert!(!rejected(429).is_refusal());
        assert!(!CredentialError::Unreachable("x".into()).is_refusal());
    }
}
