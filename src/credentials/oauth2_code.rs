//! `type: oauth2_authorization_code` — RFC 6749 §4.1 with PKCE (RFC 7636, always S256): a
//! person consents once (`authrelay authorize NAME`), and the refresh token keeps the
//! credential alive from then on. Many vendors rotate the refresh token on every use and
//! kill the previous one at once, so the newest is written to the durable store
//! (`token_cache: type: file`) before the access token that came with it is handed out:
//! a crash can lose consent only between the vendor's answer and that write.
//!
//! The store is the source of truth: every fetch reads it first, so tokens written by
//! `authrelay authorize` in another process, or by an earlier run, are picked up without a
//! restart, and a refresh whose answer was lost is retried with the same refresh token.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;

use super::exchange;
use super::oauth2::{basic_credentials, ClientAuth};
use super::{
    CredentialError, CredentialType, DurableTokens, FetchFuture, Fingerprint, RefreshGrant, SourceDeps, Token,
    TokenFormat, TokenSource,
};
use crate::expiry::{self, Stated};
use crate::vocab::redact::Redactor;
use crate::vocab::secret::Secret;
use crate::vocab::validate_ctx::ValidateCtx;

/// A stored access token with less than this left is refreshed rather than sent.
const STORED_TOKEN_MARGIN: Duration = Duration::from_secs(60);

/// The config section as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodeSpec {
    /// Where the person's browser is sent to consent.
    pub authorize_url: Option<String>,
    /// The token endpoint.
    pub token_url: Option<String>,
    pub client_id: Option<String>,
    /// Absent for a public client (PKCE alone proves the caller).
    pub client_secret: Option<Secret>,
    pub client_secret_file: Option<String>,
    /// Scopes to ask for.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// The loopback address `authrelay authorize` listens on for the browser's return.
    pub redirect_uri: Option<String>,
    /// `audience` (Auth0 and others).
    pub audience: Option<String>,
    /// RFC 8707 resource indicator.
    pub resource: Option<String>,
    /// Extra parameters of the authorization request (`access_type: offline`, `prompt`).
    #[serde(default)]
    pub authorize_params: BTreeMap<String, String>,
    /// `post` (default) or `basic`, as for client credentials.
    #[serde(default)]
    pub auth: ClientAuth,
    /// RFC 7009 revocation endpoint, used by `authrelay revoke`.
    pub revocation_url: Option<String>,
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct CodeSettings {
    authorize_url: reqwest::Url,
    token_url: reqwest::Url,
    client_id: String,
    client_secret: Option<Secret>,
    scopes: Vec<String>,
    redirect_uri: reqwest::Url,
    audience: Option<String>,
    resource: Option<String>,
    authorize_params: BTreeMap<String, String>,
    auth: ClientAuth,
    revocation_url: Option<reqwest::Url>,
    format: TokenFormat,
}

/// `type: oauth2_authorization_code`.
pub struct OAuth2AuthorizationCode;

impl CredentialType for OAuth2AuthorizationCode {
    const NAME: &'static str = "oauth2_authorization_code";
    type Spec = CodeSpec;
    type Settings = CodeSettings;

    fn default_scheme(_: &CodeSpec) -> Option<&'static str> {
        Some("Bearer")
    }

    fn validate(
        spec: CodeSpec,
        format: TokenFormat,
        ctx: &mut ValidateCtx<'_>,
    ) -> Option<CodeSettings> {
        let url = |ctx: &mut ValidateCtx<'_>, field: &str, raw: Option<&str>| match raw {
            Some(raw) => ctx.url(field, raw),
            None => {
                ctx.problem(field, "is required");
                None
            }
        };
        let authorize_url = url(ctx, "authorize_url", spec.authorize_url.as_deref());
        let token_url = url(ctx, "token_url", spec.token_url.as_deref());
        let redirect_uri = url(ctx, "redirect_uri", spec.redirect_uri.as_deref())
            .filter(|u| loopback_redirect(ctx, u));
        let revocation_url = match spec.revocation_url.as_deref() {
            Some(raw) => ctx.url("revocation_url", raw).map(Some),
            None => Some(None),
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
        let client_secret = ctx.optional_secret(
            "client_secret",
            spec.client_secret.as_ref().map(Secret::expose),
            spec.client_secret_file.as_deref(),
        );
        let public = spec.client_secret.is_none() && spec.client_secret_file.is_none();
        if public && spec.auth == ClientAuth::Basic {
            ctx.problem("auth", "`basic` needs a `client_secret`");
        }
        Some(CodeSettings {
            authorize_url: authorize_url?,
            token_url: token_url?,
            client_id: client_id?,
            client_secret: if public { None } else { Some(client_secret?) },
            scopes: spec.scopes,
            redirect_uri: redirect_uri?,
            audience: spec.audience,
            resource: spec.resource,
            authorize_params: spec.authorize_params,
            auth: spec.auth,
            revocation_url: revocation_url?,
            format,
        })
    }

    fn fingerprint(settings: &CodeSettings, fp: &mut Fingerprint) {
        fp.text("authorize_url", settings.authorize_url.as_str());
        fp.text("token_url", settings.token_url.as_str());
        fp.text("client_id", &settings.client_id);
        match &settings.client_secret {
            Some(secret) => fp.secret("client_secret", secret),
            None => fp.optional_text("client_secret", None),
        }
        fp.text("scopes", &settings.scopes.join(" "));
        fp.text("redirect_uri", settings.redirect_uri.as_str());
        fp.optional_text("audience", settings.audience.as_deref());
        fp.optional_text("resource", settings.resource.as_deref());
        for (k, v) in &settings.authorize_params {
            fp.text(&format!("authorize_params.{k}"), v);
        }
        fp.text(
            "auth",
            match settings.auth {
                ClientAuth::Post => "post",
                ClientAuth::Basic => "basic",
            },
        );
        fp.optional_text("revocation_url", settings.revocation_url.as_ref().map(reqwest::Url::as_str));
        settings.format.fingerprint(fp);
    }

    fn source(settings: &CodeSettings, deps: &SourceDeps) -> Arc<dyn TokenSource> {
        Arc::new(CodeSource {
            client: Client::new(settings.clone(), deps.http.clone()),
            store: deps.durable.clone(),
            name: Arc::clone(&deps.credential),
        })
    }
}

/// The browser comes back to `authrelay authorize` on this machine: anything else would
/// hand the authorization code to another host.
fn loopback_redirect(ctx: &mut ValidateCtx<'_>, url: &reqwest::Url) -> bool {
    let host = url.host_str().unwrap_or_default();
    let loopback = host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !loopback || url.scheme() != "http" || url.port().is_none() {
        ctx.problem(
            "redirect_uri",
            "must be http:// on a loopback address with a port, like http://127.0.0.1:8765/callback",
        );
        return false;
    }
    true
}

impl CodeSettings {
    /// The address `authrelay authorize` listens on for the browser's return.
    pub fn redirect_addr(&self) -> Option<SocketAddr> {
        self.redirect_uri
            .socket_addrs(|| None)
            .ok()
            .and_then(|addrs| addrs.into_iter().find(|a| a.ip().is_loopback()))
    }

    /// The path the browser returns to.
    pub fn redirect_path(&self) -> &str {
        self.redirect_uri.path()
    }

    /// What binds a stored record to this definition: tokens issued to another client or
    /// by another token endpoint are never sent.
    pub fn identity(&self) -> String {
        format!(
            "{}\n{}\n{}\n{}",
            Self::kind(),
            self.token_url,
            self.client_id,
            self.scopes.join(" ")
        )
    }

    fn kind() -> &'static str {
        OAuth2AuthorizationCode::NAME
    }
}

/// One authorization request in progress: the URL to open, and the state and PKCE verifier
/// that only this process knows.
pub struct Consent {
    /// The URL the person opens.
    pub url: reqwest::Url,
    state: Secret,
    verifier: Secret,
}

impl std::fmt::Debug for Consent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Consent(***)")
    }
}

impl Consent {
    /// Whether `state` is the one this request sent (compared in constant time).
    pub fn state_matches(&self, state: &str) -> bool {
        let expected = self.state.expose().as_bytes();
        state.len() == expected.len()
            && state
                .bytes()
                .zip(expected)
                .fold(0u8, |differ, (a, b)| differ | (a ^ b))
                == 0
    }
}

fn random_text() -> Result<String, CredentialError> {
    let mut bytes = [0u8; 32];
    SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CredentialError::Other("no randomness for PKCE".into()))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// Talks to the vendor's endpoints for one credential.
pub struct Client {
    settings: CodeSettings,
    http: reqwest::Client,
    redactor: Redactor,
}

impl Client {
    /// The endpoints of `settings`, reached with `http`.
    pub fn new(settings: CodeSettings, http: reqwest::Client) -> Self {
        let mut hidden: Vec<String> = Vec::new();
        if let Some(secret) = &settings.client_secret {
            let basic = basic_credentials(&settings.client_id, secret);
            hidden.push(secret.expose().to_string());
            hidden.push(basic.expose().trim_start_matches("Basic ").to_string());
        }
        let redactor = Redactor::new(hidden.iter().map(String::as_str));
        Self {
            settings,
            http,
            redactor,
        }
    }

    /// The settings this client uses.
    pub fn settings(&self) -> &CodeSettings {
        &self.settings
    }

    /// Starts an authorization request: a fresh state and PKCE verifier, and the URL.
    pub fn begin(&self) -> Result<Consent, CredentialError> {
        let s = &self.settings;
        let state = random_text()?;
        let verifier = random_text()?;
        let challenge = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes()));
        let mut url = s.authorize_url.clone();
        {
            let mut query = url.query_pairs_mut();
            query
                .append_pair("response_type", "code")
                .append_pair("client_id", &s.client_id)
                .append_pair("redirect_uri", s.redirect_uri.as_str())
                .append_pair("state", &state)
                .append_pair("code_challenge", &challenge)
                .append_pair("code_challenge_method", "S256");
            if !s.scopes.is_empty() {
                query.append_pair("scope", &s.scopes.join(" "));
            }
            if let Some(a) = &s.audience {
                query.append_pair("audience", a);
            }
            if let Some(r) = &s.resource {
                query.append_pair("resource", r);
            }
            for (k, v) in &s.authorize_params {
                query.append_pair(k, v);
            }
        }
        Ok(Consent {
            url,
            state: Secret::new(state),
            verifier: Secret::new(verifier),
        })
    }

    /// RFC 6749 §4.1.3: trades the authorization code for the first tokens.
    pub async fn exchange_code(
        &self,
        consent: &Consent,
        code: &str,
    ) -> Result<Token, CredentialError> {
        let s = &self.settings;
        let form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", s.redirect_uri.as_str()),
            ("code_verifier", consent.verifier.expose()),
        ];
        let redactor = self.redactor.with([code, consent.verifier.expose()]);
        self.token_request(form, None, &redactor).await
    }

    /// RFC 6749 §6: the next tokens for `grant`. A vendor that sends no new refresh token
    /// leaves the old one in force.
    pub async fn refresh(&self, grant: &RefreshGrant) -> Result<Token, CredentialError> {
        let form = vec![
            ("grant_type", "refresh_token"),
            ("refresh_token", grant.token.expose()),
        ];
        let redactor = self.redactor.with([grant.token.expose()]);
        self.token_request(form, Some(grant), &redactor).await
    }

    async fn token_request(
        &self,
        mut form: Vec<(&str, &str)>,
        kept: Option<&RefreshGrant>,
        redactor: &Redactor,
    ) -> Result<Token, CredentialError> {
        let s = &self.settings;
        if let Some(r) = &s.resource {
            form.push(("resource", r));
        }
        let request = self.authenticated(s.token_url.clone(), &mut form);
        let answer = exchange::send(request.form(&form), redactor).await?;
        let doc = answer.json()?;
        let redactor = redactor.with_answer_secrets(&doc);
        let access_token = exchange::string_at(&doc, "/access_token").map_err(|e| {
            match exchange::vendor_detail(&answer.body, &redactor) {
                m if m.is_empty() => e,
                m => CredentialError::BadResponse(format!("no access_token: {m}")),
            }
        })?;
        let expires_at = expiry::expires_at(
            access_token,
            [
                Stated::jwt_exp(access_token),
                Stated::seconds_at(&doc, "/expires_in"),
            ],
        );
        let refresh = match exchange::string_at(&doc, "/refresh_token") {
            Ok(rotated) => Some(RefreshGrant {
                token: Secret::new(rotated),
                expires_at: Stated::seconds_at(&doc, "/refresh_token_expires_in")
                    .map(|stated| expiry::expires_at(rotated, [Some(stated)])),
            }),
            Err(_) => kept.cloned(),
        };
        Ok(Token {
            value: s.format.header_value(access_token),
            expires_at: Some(expires_at),
            refresh,
        })
    }

    /// RFC 7009: asks the vendor to revoke `grant`. `Ok(false)` when no `revocation_url` is
    /// configured.
    pub async fn revoke(&self, grant: &RefreshGrant) -> Result<bool, CredentialError> {
        let Some(url) = self.settings.revocation_url.clone() else {
            return Ok(false);
        };
        let mut form = vec![
            ("token", grant.token.expose()),
            ("token_type_hint", "refresh_token"),
        ];
        let request = self.authenticated(url, &mut form);
        let redactor = self.redactor.with([grant.token.expose()]);
        exchange::send(request.form(&form), &redactor).await?;
        Ok(true)
    }

    /// A POST to `url` with the client's authentication (form fields or HTTP Basic).
    fn authenticated<'a>(
        &'a self,
        url: reqwest::Url,
        form: &mut Vec<(&'a str, &'a str)>,
    ) -> reqwest::RequestBuilder {
        let s = &self.settings;
        let mut request = self
            .http
            .post(url)
            .header(http::header::ACCEPT, "application/json");
        match (&s.client_secret, s.auth) {
            (Some(secret), ClientAuth::Basic) => {
                request = request.header(
                    http::header::AUTHORIZATION,
                    basic_credentials(&s.client_id, secret).expose(),
                );
            }
            (secret, _) => {
                form.push(("client_id", &s.client_id));
                if let Some(secret) = secret {
                    form.push(("client_secret", secret.expose()));
                }
            }
        }
        request
    }
}

/// The runtime source: stored tokens first, then the stored refresh token.
struct CodeSource {
    client: Client,
    store: Option<Arc<dyn DurableTokens>>,
    name: Arc<str>,
}

impl CodeSource {
    fn consent_required(&self, why: &str) -> CredentialError {
        CredentialError::ConsentRequired(format!(
            "{why}; run `authrelay authorize {}` once",
            self.name
        ))
    }

    async fn fetch_token(&self, previous: Option<&Token>) -> Result<Token, CredentialError> {
        let store = self.store.clone().ok_or_else(|| {
            CredentialError::Other(
                "no token store is open (`token_cache: type: file` takes effect at start)".into(),
            )
        })?;
        let identity = self.client.settings().identity();
        let stored = blocking_store(&store, {
            let (name, identity) = (Arc::clone(&self.name), identity.clone());
            move |s| s.load(&name, &identity)
        })
        .await?;
        let Some(stored) = stored else {
            return Err(self.consent_required("no tokens are stored for this credential"));
        };
        // A stored access token this process has not sent yet (an earlier run's, or one
        // `authorize` just wrote) is used as is while it lasts.
        let unsent = previous.is_none_or(|p| p.value != stored.value);
        let lasting = stored
            .expires_at
            .is_some_and(|e| e > SystemTime::now() + STORED_TOKEN_MARGIN);
        if unsent && lasting {
            return Ok(stored);
        }
        let Some(grant) = stored.refresh.as_ref().filter(|g| g.usable_at(SystemTime::now()))
        else {
            return Err(self.consent_required("the stored refresh token has expired"));
        };
        let token = match self.client.refresh(grant).await {
            Ok(token) => token,
            Err(e) if e.vendor_error() == Some("invalid_grant") => {
                return Err(self.consent_required(
                    "the vendor refused the stored refresh token (invalid_grant: revoked or expired)",
                ));
            }
            Err(e) => return Err(e),
        };
        // Written before anyone sends the new access token: with a rotating vendor the old
        // refresh token is already dead, and this write is all that keeps consent.
        blocking_store(&store, {
            let (name, token) = (Arc::clone(&self.name), token.clone());
            move |s| s.save(&name, &identity, &token)
        })
        .await?;
        Ok(token)
    }
}

/// Runs a store call off the async runtime (it reads, writes and fsyncs a file).
pub async fn blocking_store<T: Send + 'static>(
    store: &Arc<dyn DurableTokens>,
    call: impl FnOnce(&dyn DurableTokens) -> Result<T, String> + Send + 'static,
) -> Result<T, CredentialError> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || call(store.as_ref()))
        .await
        .map_err(|_| CredentialError::Other("the token store call failed unexpectedly".into()))?
        .map_err(|e| CredentialError::Other(format!("token store: {e}")))
}

impl TokenSource for CodeSource {
    fn fetch<'a>(&'a self, previous: Option<&'a Token>) -> FetchFuture<'a> {
        Box::pin(self.fetch_token(previous))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::validate_for_test;

    const BASE: &str = "authorize_url: https://idp.test/authorize\ntoken_url: https://idp.test/token\n\
                        client_id: app\nredirect_uri: http://127.0.0.1:8765/callback\n";

    #[test]
    fn a_public_client_needs_no_secret_and_the_redirect_stays_on_loopback() {
        let s = validate_for_test::<OAuth2AuthorizationCode>(BASE, &[]).unwrap();
        assert!(s.client_secret.is_none());
        assert_eq!(s.redirect_addr(), Some("127.0.0.1:8765".parse().unwrap()));
        let remote = BASE.replace("127.0.0.1:8765", "example.com:8765");
        let e = validate_for_test::<OAuth2AuthorizationCode>(&remote, &[]).unwrap_err();
        assert!(e.iter().any(|p| p.contains("redirect_uri") && p.contains("loopback")), "{e:?}");
        let e = validate_for_test::<OAuth2AuthorizationCode>(&format!("{BASE}auth: basic\n"), &[])
            .unwrap_err();
        assert!(e.iter().any(|p| p.contains("auth")), "{e:?}");
    }

    #[test]
    fn the_authorization_url_carries_pkce_state_and_extras() {
        let yaml = format!(
            "{BASE}scopes: [openid, offline_access]\nresource: https://api.test/\n\
             authorize_params: {{prompt: consent}}\nclient_secret: s3cret\n"
        );
        let s = validate_for_test::<OAuth2AuthorizationCode>(&yaml, &[]).unwrap();
        crate::upstream::install_crypto_provider();
        let client = Client::new(s, reqwest::Client::new());
        let consent = client.begin().unwrap();
        let q: BTreeMap<String, String> = consent.url.query_pairs().into_owned().collect();
        assert_eq!(q["code_challenge_method"], "S256");
        let expected = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(
            ring::digest::digest(&ring::digest::SHA256, consent.verifier.expose().as_bytes()),
        );
        assert_eq!(q["code_challenge"], expected);
        assert_eq!(q["scope"], "openid offline_access");
        assert_eq!(q["prompt"], "consent");
        assert_eq!(q["resource"], "https://api.test/");
        assert!(consent.state_matches(&q["state"]));
        assert!(!consent.state_matches("forged"));
        assert!(!consent.url.as_str().contains("s3cret"));
        assert!(!format!("{consent:?}").contains(consent.verifier.expose()));
        assert_ne!(client.begin().unwrap().url, consent.url, "fresh state each time");
    }
}
