//! `type: outseta` — an Outseta access token (a JWT) from `POST {base_url}/api/v1/tokens`,
//! obtained either as a person (`username` + `password`) or server-side with the API key
//! pair (`Authorization: Outseta key:secret`, the person's `username`, empty password).
//!
//! People with several accounts pick one: `subscription_uid` goes straight to
//! `?subscriptionUid=…`; `account_uid` first gets a token, lists
//! `/api/v1/billing/subscriptions` with it, and asks for the token of that account's
//! subscription; later refreshes ask for that subscription's token directly. Expiry comes
//! from the JWT's `exp` (or `expires_in`).

use std::sync::Arc;
use std::sync::{Mutex, MutexGuard, PoisonError};

use http::HeaderValue;
use reqwest::Url;
use serde::Deserialize;
use serde_json::{json, Value};

use super::exchange::{self, EndpointAnswer};
use super::{CredentialError, CredentialType, Fingerprint, FetchFuture, SourceDeps, Token, TokenFormat, TokenSource};
use crate::expiry::{self, Stated};
use crate::vocab::redact::Redactor;
use crate::vocab::secret::Secret;
use crate::vocab::validate_ctx::ValidateCtx;

/// Page size asked of the subscriptions list (the server may answer with fewer).
const SUBSCRIPTIONS_PAGE: usize = 100;
/// A bound on pages read, so a server that never ends its list cannot hold a fetch forever.
const MAX_SUBSCRIPTION_PAGES: usize = 50;

/// The config section as written. `Debug` hides every secret field.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutsetaSpec {
    /// `https://<subdomain>.outseta.com`.
    pub base_url: Option<String>,
    /// The person whose token is wanted (email), for both forms.
    pub username: Option<String>,
    /// The person's password (person login).
    pub password: Option<Secret>,
    /// `password` read from this file instead.
    pub password_file: Option<String>,
    /// The API key (server-side form).
    pub api_key: Option<Secret>,
    /// `api_key` read from this file instead.
    pub api_key_file: Option<String>,
    /// The API secret (server-side form).
    pub api_secret: Option<Secret>,
    /// `api_secret` read from this file instead.
    pub api_secret_file: Option<String>,
    /// Ask directly for the token of this subscription.
    pub subscription_uid: Option<String>,
    /// Find the subscription of this account, then ask for its token.
    pub account_uid: Option<String>,
}

/// How authrelay proves who it is to the token endpoint.
#[derive(Debug, Clone, PartialEq)]
enum Login {
    /// The person's own password in the body.
    Person { password: Secret },
    /// `Authorization: Outseta key:secret` (the whole header value is the secret).
    ServerSide { authorization: Secret },
}

/// Which of the person's accounts the token is for.
#[derive(Debug, Clone, PartialEq)]
enum AccountChoice {
    /// Whatever Outseta picks (the person's primary account).
    Primary,
    /// `?subscriptionUid=` with this subscription.
    Subscription(String),
    /// Look up this account's subscription first.
    Account(String),
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct OutsetaSettings {
    token_url: Url,
    subscriptions_url: Url,
    username: String,
    login: Login,
    account: AccountChoice,
    format: TokenFormat,
}

/// `type: outseta`.
pub struct Outseta;

impl CredentialType for Outseta {
    const NAME: &'static str = "outseta";
    type Spec = OutsetaSpec;
    type Settings = OutsetaSettings;

    fn default_scheme(_: &OutsetaSpec) -> Option<&'static str> {
        Some("Bearer")
    }

    fn validate(
        spec: OutsetaSpec,
        format: TokenFormat,
        ctx: &mut ValidateCtx<'_>,
    ) -> Option<OutsetaSettings> {
                let base = match spec.base_url.as_deref() {
            Some(raw) => ctx.url("base_url", raw),
            None => {
                ctx.problem(
                    "base_url",
                    "is required (like https://yourcompany.outseta.com)",
                );
                None
            }
        };
        let urls = base.and_then(|base| endpoint_urls(ctx, &base));
        let username = ctx
            .required_text("username", spec.username.as_deref())
            .filter(|u| {
                let ok = !u.trim().is_empty();
                if !ok {
                    ctx.problem("username", "must not be empty");
                }
                ok
            });
        let login = spec.login(ctx);
        let account = spec.account(ctx);
        let (token_url, subscriptions_url) = urls?;
        Some(OutsetaSettings {
                token_url,
                subscriptions_url,
                username: username?,
                login: login?,
                account: account?,
                format,
            })
    }

    fn fingerprint(settings: &OutsetaSettings, fp: &mut Fingerprint) {
        fp.text("token_url", settings.token_url.as_str());
        fp.text("subscriptions_url", settings.subscriptions_url.as_str());
        fp.text("username", &settings.username);
        match &settings.login {
            Login::Person { password } => fp.secret("password", password),
            Login::ServerSide { authorization } => fp.secret("api_key", authorization),
        }
        match &settings.account {
            AccountChoice::Primary => fp.optional_text("account", None),
            AccountChoice::Subscription(uid) => fp.text("subscription_uid", uid),
            AccountChoice::Account(uid) => fp.text("account_uid", uid),
        }
        settings.format.fingerprint(fp);
    }

    fn source(settings: &OutsetaSettings, deps: &SourceDeps) -> Arc<dyn TokenSource> {
        Arc::new(OutsetaSource::new(settings.clone(), deps.http.clone()))
    }
}

impl OutsetaSpec {

    fn login(&self, ctx: &mut ValidateCtx<'_>) -> Option<Login> {
        let has_password = self.password.is_some() || self.password_file.is_some();
        let has_key = self.api_key.is_some() || self.api_key_file.is_some();
        let has_secret = self.api_secret.is_some() || self.api_secret_file.is_some();
        match (has_password, has_key || has_secret) {
            (true, true) => {
                ctx.problem(
                    "",
                    "set either `password` (person login) or `api_key` + `api_secret` \
                     (server-side), not both",
                );
                None
            }
            (false, false) => {
                ctx.problem(
                    "",
                    "needs `password` (person login) or `api_key` + `api_secret` (server-side)",
                );
                None
            }
            (true, false) => {
                let password = ctx.required_secret(
                    "password",
                    self.password.as_ref().map(Secret::expose),
                    self.password_file.as_deref(),
                )?;
                if password.is_empty() {
                    ctx.problem("password", "must not be empty");
                    return None;
                }
                Some(Login::Person { password })
            }
            (false, true) => {
                let key = ctx.required_secret(
                    "api_key",
                    self.api_key.as_ref().map(Secret::expose),
                    self.api_key_file.as_deref(),
                );
                let secret = ctx.required_secret(
                    "api_secret",
                    self.api_secret.as_ref().map(Secret::expose),
                    self.api_secret_file.as_deref(),
                );
                let (key, secret) = (key?, secret?);
                if key.is_empty() || secret.is_empty() {
                    ctx.problem("api_key", "`api_key` and `api_secret` must not be empty");
                    return None;
                }
                let authorization =
                    Secret::new(format!("Outseta {}:{}", key.expose(), secret.expose()));
                if HeaderValue::from_str(authorization.expose()).is_err() {
                    ctx.problem(
                        "api_key",
                        "`api_key` or `api_secret` holds characters not allowed in a header",
                    );
                    return None;
                }
                Some(Login::ServerSide { authorization })
            }
        }
    }

    fn account(&self, ctx: &mut ValidateCtx<'_>) -> Option<AccountChoice> {
        let mut uid = |field: &str, raw: &str| {
            let text = ctx.text(field, raw)?;
            if text.trim().is_empty() {
                ctx.problem(field, "must not be empty");
                return None;
            }
            Some(text.trim().to_string())
        };
        match (&self.subscription_uid, &self.account_uid) {
            (Some(_), Some(_)) => {
                ctx.problem(
                    "",
                    "set either `subscription_uid` or `account_uid`, not both",
                );
                None
            }
            (Some(s), None) => uid("subscription_uid", s).map(AccountChoice::Subscription),
            (None, Some(a)) => uid("account_uid", a).map(AccountChoice::Account),
            (None, None) => Some(AccountChoice::Primary),
        }
    }
}

/// `{base}/api/v1/tokens` and `{base}/api/v1/billing/subscriptions`, keeping any path prefix
/// of the base URL.
fn endpoint_urls(ctx: &mut ValidateCtx<'_>, base: &Url) -> Option<(Url, Url)> {
    if base.query().is_some() || base.fragment().is_some() {
        ctx.problem("base_url", "must not have a query or fragment");
        return None;
    }
    let root = base.as_str().trim_end_matches('/');
    let tokens = Url::parse(&format!("{root}/api/v1/tokens"));
    let subscriptions = Url::parse(&format!("{root}/api/v1/billing/subscriptions"));
    match (tokens, subscriptions) {
        (Ok(t), Ok(s)) => Some((t, s)),
        _ => {
            ctx.problem("base_url", "cannot be extended with /api/v1/…");
            None
        }
    }
}

/// The runtime source.
pub struct OutsetaSource {
    settings: OutsetaSettings,
    http: reqwest::Client,
    /// The subscription found for `account_uid` at the last lookup: later refreshes ask for
    /// its token directly, one call instead of three or more (person token, subscription
    /// pages, the account's token). Forgotten when Outseta refuses it.
    found_subscription: Mutex<Option<String>>,
    /// Hides the password or the API key pair in everything the vendor answers.
    redactor: Redactor,
}

impl OutsetaSource {
    /// Wraps validated settings and the token-endpoint client.
    pub fn new(settings: OutsetaSettings, http: reqwest::Client) -> Self {
        let redactor = match &settings.login {
            Login::Person { password } => Redactor::new([password.expose()]),
            Login::ServerSide { authorization } => {
                let pair = authorization.expose().trim_start_matches("Outseta ");
                let (key, secret) = pair.split_once(':').unwrap_or((pair, pair));
                Redactor::new([authorization.expose(), pair, key, secret])
            }
        };
        Self {
            settings,
            http,
            found_subscription: Mutex::new(None),
            redactor,
        }
    }

    async fn obtain(&self) -> Result<Token, CredentialError> {
        let answer = match &self.settings.account {
            AccountChoice::Primary => self.request_token(None).await?,
            AccountChoice::Subscription(uid) => self.request_token(Some(uid)).await?,
            AccountChoice::Account(account_uid) => self.account_token(account_uid).await?,
        };
        Ok(Token {
            value: self.settings.format.header_value(answer.jwt.expose()),
            expires_at: answer.expires_at,
            refresh: None,
        })
    }

    /// The token of `account_uid`'s subscription: straight from the subscription found
    /// before, else (or when Outseta refuses that one) by looking the subscription up.
    async fn account_token(&self, account_uid: &str) -> Result<IssuedJwt, CredentialError> {
        let found = self.found_subscription().clone();
        if let Some(subscription) = found {
            match self.request_token(Some(&subscription)).await {
                Ok(jwt) => return Ok(jwt),
                Err(e)
                    if e.is_refusal()
                        || matches!(e, CredentialError::Rejected { status: 404, .. }) =>
                {
                    tracing::info!(error = %e, "the subscription found for the account was refused; looking it up again");
                    *self.found_subscription() = None;
                }
                Err(e) => return Err(e),
            }
        }
        let person = self.request_token(None).await?;
        let subscription = self.subscription_of(&person.jwt, account_uid).await?;
        let jwt = self.request_token(Some(&subscription)).await?;
        *self.found_subscription() = Some(subscription);
        Ok(jwt)
    }

    fn found_subscription(&self) -> MutexGuard<'_, Option<String>> {
        self.found_subscription
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// `POST /api/v1/tokens[?subscriptionUid=…]`.
    async fn request_token(
        &self,
        subscription_uid: Option<&str>,
    ) -> Result<IssuedJwt, CredentialError> {
        let mut url = self.settings.token_url.clone();
        if let Some(uid) = subscription_uid {
            url.query_pairs_mut().append_pair("subscriptionUid", uid);
        }
        let mut request = self.http.post(url);
        let body = match &self.settings.login {
            Login::Person { password } => {
                json!({ "username": self.settings.username, "password": password.expose() })
            }
            Login::ServerSide { authorization } => {
                let mut value = HeaderValue::from_str(authorization.expose()).map_err(|_| {
                    CredentialError::Other("the API key pair is not a valid header value".into())
                })?;
                value.set_sensitive(true);
                request = request.header(http::header::AUTHORIZATION, value);
                json!({ "username": self.settings.username, "password": "" })
            }
        };
        let answer = exchange::send(request.json(&body), &self.redactor).await?;
        IssuedJwt::from_answer(&answer)
    }

    /// The `Uid` of the first subscription whose `Account.Uid` is `account_uid`, reading the
    /// list page by page with the person's token.
    async fn subscription_of(
        &self,
        bearer: &Secret,
        account_uid: &str,
    ) -> Result<String, CredentialError> {
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", bearer.expose()))
            .map_err(|_| {
                CredentialError::BadResponse("token is not a valid header value".into())
            })?;
        authorization.set_sensitive(true);
        let mut offset = 0usize;
        for _ in 0..MAX_SUBSCRIPTION_PAGES {
            let mut url = self.settings.subscriptions_url.clone();
            url.query_pairs_mut()
                .append_pair("limit", &SUBSCRIPTIONS_PAGE.to_string())
                .append_pair("offset", &offset.to_string());
            let request = self
                .http
                .get(url)
                .header(http::header::AUTHORIZATION, authorization.clone());
            let redactor = self.redactor.with([bearer.expose()]);
            let page = exchange::send(request, &redactor).await?.json()?;
            let items = page.get("items").and_then(Value::as_array).ok_or_else(|| {
                CredentialError::BadResponse("subscriptions list has no `items`".into())
            })?;
            let found = items.iter().find(|item| {
                item.pointer("/Account/Uid").and_then(Value::as_str) == Some(account_uid)
            });
            if let Some(item) = found {
                return exchange::string_at(item, "/Uid").map(str::to_string);
            }
            offset += items.len();
            let total = page
                .pointer("/metadata/total")
                .and_then(Value::as_u64)
                .and_then(|t| usize::try_from(t).ok())
                .unwrap_or(0);
            if items.is_empty() || offset >= total {
                break;
            }
        }
        Err(CredentialError::Other(format!(
            "no subscription of account `{account_uid}` is visible to this login"
        )))
    }
}

/// A token endpoint's answer: the JWT and when it expires.
struct IssuedJwt {
    jwt: Secret,
    expires_at: Option<std::time::SystemTime>,
}

impl IssuedJwt {
    fn from_answer(answer: &EndpointAnswer) -> Result<Self, CredentialError> {
        let doc = answer.json()?;
        let jwt = exchange::string_at(&doc, "/access_token")?;
        // The JWT's `exp`; else `expires_in`; else the default hour.
        Ok(Self {
            expires_at: Some(expiry::expires_at(
                jwt,
                [
                    Stated::jwt_exp(jwt),
                    Stated::seconds_at(&doc, "/expires_in"),
                ],
            )),
            jwt: Secret::new(jwt),
        })
    }
}

impl TokenSource for OutsetaSource {
    fn fetch<'a>(&'a self, _previous: Option<&'a Token>) -> FetchFuture<'a> {
        Box::pin(self.obtain())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validate(yaml: &str, env: &[(&str, &str)]) -> Result<OutsetaSettings, Vec<String>> {
        crate::credentials::validate_for_test::<Outseta>(yaml, env)
    }

    #[test]
    fn person_login_is_accepted_and_debug_hides_the_password() {
        let s = validate(
            "base_url: https://acme.outseta.com/\nusername: a@b.c\npassword: ${PW}\n",
            &[("PW", "hunter2-pw")],
        )
        .unwrap();
        assert_eq!(
            s.token_url.as_str(),
            "https://acme.outseta.com/api/v1/tokens"
        );
        let debug = format!("{s:?}");
        assert!(!debug.contains("hunter2-pw"), "{debug}");
        let spec: OutsetaSpec =
            serde_yaml::from_str("password: literal-pw\napi_secret: literal-secret\n").unwrap();
        let debug = format!("{spec:?}");
        assert!(!debug.contains("literal"), "{debug}");
    }

    #[test]
    fn server_side_debug_hides_key_and_secret() {
        let s = validate(
            "base_url: https://acme.outseta.com\nusername: a@b.c\napi_key: ${K}\napi_secret: ${S}\naccount_uid: acc1\n",
            &[("K", "key-123"), ("S", "secret-456")],
        )
        .unwrap();
        let debug = format!("{s:?}");
        assert!(
            !debug.contains("key-123") && !debug.contains("secret-456"),
            "{debug}"
        );
        assert_eq!(s.account, AccountChoice::Account("acc1".into()));
    }

    #[test]
    fn conflicting_or_missing_fields_are_refused() {
        let both = validate(
            "base_url: https://a.outseta.com\nusername: u\npassword: p\napi_key: k\napi_secret: s\n",
            &[],
        )
        .unwrap_err();
        assert!(both.iter().any(|p| p.contains("not both")), "{both:?}");
        let neither = validate("base_url: https://a.outseta.com\nusername: u\n", &[]).unwrap_err();
        assert!(
            neither.iter().any(|p| p.contains("needs `password`")),
            "{neither:?}"
        );
        let half = validate(
            "base_url: https://a.outseta.com\nusername: u\napi_key: k\n",
            &[],
        )
        .unwrap_err();
        assert!(half.iter().any(|p| p.contains("api_secret")), "{half:?}");
        let two_accounts = validate(
            "base_url: https://a.outseta.com\nusername: u\npassword: p\nsubscription_uid: s\naccount_uid: a\n",
            &[],
        )
        .unwrap_err();
        assert!(two_accounts.iter().any(|p| p.contains("subscription_uid")));
        let no_base = validate("username: u\npassword: p\n", &[]).unwrap_err();
        assert!(no_base.iter().any(|p| p.contains("base_url")));
    }
}
