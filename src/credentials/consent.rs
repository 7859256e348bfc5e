//! What the two grants a person consents to share (`oauth2_authorization_code`,
//! `oauth2_device_code`): the token endpoint with its client authentication, the refresh
//! grant, RFC 7009 revocation, and the runtime source that keeps the rotating refresh token
//! in the durable store.
//!
//! Many vendors rotate the refresh token on every use and kill the previous one at once, so
//! the newest is written to the durable store (`token_cache: type: file`) before the access
//! token that came with it is handed out: a crash can lose consent only between the
//! vendor's answer and that write. The store is the source of truth: every fetch reads it
//! first, so tokens written by `authrelay authorize` in another process, or by an earlier
//! run, are picked up without a restart, and a refresh whose answer was lost is retried with
//! the same refresh token.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::exchange;
use super::oauth2::{basic_credentials, ClientAuth};
use super::{
    CredentialError, DurableTokens, FetchFuture, Fingerprint, RefreshGrant, SourceDeps, Token,
    TokenFormat, TokenSource,
};
use crate::expiry::{self, Stated};
use crate::vocab::redact::Redactor;
use crate::vocab::secret::Secret;
use crate::vocab::validate_ctx::ValidateCtx;
use crate::vocab::values::ConfigDuration;

/// A stored access token with less than this left is refreshed rather than sent.
const STORED_TOKEN_MARGIN: Duration = Duration::from_secs(60);
/// `keepalive_refresh` when not set: vendors expire refresh tokens left unused (Xero after
/// 60 days), so an idle credential is refreshed at least this often.
const DEFAULT_KEEPALIVE: Duration = Duration::from_secs(24 * 3600);

/// The [`EndpointSpec`] of a consent type's spec, whose shared fields are named alike (a
/// macro because serde's `flatten` cannot be combined with `deny_unknown_fields`).
macro_rules! endpoint_spec {
    ($spec:expr) => {
        $crate::credentials::consent::EndpointSpec {
            token_url: $spec.token_url.as_deref(),
            client_id: $spec.client_id.as_deref(),
            client_secret: $spec.client_secret.as_ref(),
            client_secret_file: $spec.client_secret_file.as_deref(),
            auth: $spec.auth,
            revocation_url: $spec.revocation_url.as_deref(),
            resource: $spec.resource,
            scopes: $spec.scopes,
            keepalive_refresh: $spec.keepalive_refresh,
        }
    };
}
pub(crate) use endpoint_spec;

/// The token endpoint fields both grants write the same way.
pub struct EndpointSpec<'a> {
    pub token_url: Option<&'a str>,
    pub client_id: Option<&'a str>,
    pub client_secret: Option<&'a Secret>,
    pub client_secret_file: Option<&'a str>,
    pub auth: ClientAuth,
    pub revocation_url: Option<&'a str>,
    pub resource: Option<String>,
    pub scopes: Vec<String>,
    pub keepalive_refresh: Option<ConfigDuration>,
}

/// The validated token endpoint of a consent credential.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEndpoint {
    token_url: reqwest::Url,
    pub(super) client_id: String,
    client_secret: Option<Secret>,
    auth: ClientAuth,
    revocation_url: Option<reqwest::Url>,
    /// RFC 8707 resource indicator, sent with every token request.
    resource: Option<String>,
    pub(super) scopes: Vec<String>,
    format: TokenFormat,
    /// The longest the refresh token goes unused, traffic or not.
    keepalive: Duration,
}

impl TokenEndpoint {
    /// Checks the shared fields; problems go to `ctx`.
    pub fn validate(
        spec: EndpointSpec<'_>,
        format: TokenFormat,
        ctx: &mut ValidateCtx<'_>,
    ) -> Option<Self> {
        let token_url = required_url(ctx, "token_url", spec.token_url);
        let revocation_url = match spec.revocation_url {
            Some(raw) => ctx.url("revocation_url", raw).map(Some),
            None => Some(None),
        };
        let client_id = ctx.required_text("client_id", spec.client_id).filter(|id| {
            let ok = !id.is_empty();
            if !ok {
                ctx.problem("client_id", "is empty");
            }
            ok
        });
        let client_secret = ctx.optional_secret(
            "client_secret",
            spec.client_secret.map(Secret::expose),
            spec.client_secret_file,
        );
        let public = spec.client_secret.is_none() && spec.client_secret_file.is_none();
        if public && spec.auth == ClientAuth::Basic {
            ctx.problem("auth", "`basic` needs a `client_secret`");
        }
        let keepalive = spec.keepalive_refresh.map_or(DEFAULT_KEEPALIVE, |d| d.0);
        if keepalive < Duration::from_secs(1) {
            ctx.problem("keepalive_refresh", "must be at least 1s");
        }
        Some(Self {
            token_url: token_url?,
            client_id: client_id?,
            client_secret: if public { None } else { Some(client_secret?) },
            auth: spec.auth,
            revocation_url: revocation_url?,
            resource: spec.resource,
            scopes: spec.scopes,
            format,
            keepalive,
        })
    }

    /// Writes every field that decides which tokens this endpoint gives.
    pub fn fingerprint(&self, fp: &mut Fingerprint) {
        fp.text("token_url", self.token_url.as_str());
        fp.text("client_id", &self.client_id);
        match &self.client_secret {
            Some(secret) => fp.secret("client_secret", secret),
            None => fp.optional_text("client_secret", None),
        }
        fp.text("scopes", &self.scopes.join(" "));
        fp.optional_text("resource", self.resource.as_deref());
        fp.text(
            "auth",
            match self.auth {
                ClientAuth::Post => "post",
                ClientAuth::Basic => "basic",
            },
        );
        fp.optional_text(
            "revocation_url",
            self.revocation_url.as_ref().map(reqwest::Url::as_str),
        );
        self.format.fingerprint(fp);
    }

    /// What binds a stored record to a definition of type `kind`: tokens issued to another
    /// client or by another token endpoint are never sent.
    pub fn identity(&self, kind: &str) -> String {
        format!(
            "{kind}\n{}\n{}\n{}",
            self.token_url,
            self.client_id,
            self.scopes.join(" ")
        )
    }

    /// Whether the client has no secret (a public client: PKCE or the device code alone
    /// proves the caller).
    pub fn public(&self) -> bool {
        self.client_secret.is_none()
    }

    /// The RFC 8707 resource indicator, if any.
    pub fn resource(&self) -> Option<&str> {
        self.resource.as_deref()
    }
}

/// A URL field that must be present.
pub fn required_url(
    ctx: &mut ValidateCtx<'_>,
    field: &str,
    raw: Option<&str>,
) -> Option<reqwest::Url> {
    match raw {
        Some(raw) => ctx.url(field, raw),
        None => {
            ctx.problem(field, "is required");
            None
        }
    }
}

/// Talks to one consent credential's token and revocation endpoints.
pub struct EndpointClient {
    endpoint: TokenEndpoint,
    http: reqwest::Client,
    redactor: Redactor,
}

impl EndpointClient {
    /// The endpoints of `endpoint`, reached with `http`.
    pub fn new(endpoint: TokenEndpoint, http: reqwest::Client) -> Self {
        let mut hidden: Vec<String> = Vec::new();
        if let Some(secret) = &endpoint.client_secret {
            let basic = basic_credentials(&endpoint.client_id, secret);
            hidden.push(secret.expose().to_string());
            hidden.push(basic.expose().trim_start_matches("Basic ").to_string());
        }
        let redactor = Redactor::new(hidden.iter().map(String::as_str));
        Self {
            endpoint,
            http,
            redactor,
        }
    }

    /// The endpoint this client calls.
    pub fn endpoint(&self) -> &TokenEndpoint {
        &self.endpoint
    }

    /// Hides the client's secrets and `also` from vendor text.
    pub fn redactor<'a>(&self, also: impl IntoIterator<Item = &'a str>) -> Redactor {
        self.redactor.with(also)
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

    /// A POST of `form` to the token endpoint, its answer read as tokens; `kept` is the
    /// refresh grant in force when the answer brings none.
    pub async fn token_request(
        &self,
        mut form: Vec<(&str, &str)>,
        kept: Option<&RefreshGrant>,
        redactor: &Redactor,
    ) -> Result<Token, CredentialError> {
        let e = &self.endpoint;
        if let Some(r) = &e.resource {
            form.push(("resource", r));
        }
        let request = self.authenticated(e.token_url.clone(), &mut form);
        let answer = exchange::send(request.form(&form), redactor).await?;
        let doc = answer.json()?;
        let redactor = redactor.with_answer_secrets(&doc);
        let access_token =
            exchange::string_at(&doc, "/access_token").map_err(
                |e| match exchange::vendor_detail(&answer.body, &redactor) {
                    m if m.is_empty() => e,
                    m => CredentialError::BadResponse(format!("no access_token: {m}")),
                },
            )?;
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
            value: e.format.header_value(access_token),
            expires_at: Some(expires_at),
            refresh,
        })
    }

    /// RFC 7009: asks the vendor to revoke `grant`. `Ok(false)` when no `revocation_url` is
    /// configured.
    pub async fn revoke(&self, grant: &RefreshGrant) -> Result<bool, CredentialError> {
        let Some(url) = self.endpoint.revocation_url.clone() else {
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
    pub fn authenticated<'a>(
        &'a self,
        url: reqwest::Url,
        form: &mut Vec<(&'a str, &'a str)>,
    ) -> reqwest::RequestBuilder {
        let e = &self.endpoint;
        let mut request = self
            .http
            .post(url)
            .header(http::header::ACCEPT, "application/json");
        match (&e.client_secret, e.auth) {
            (Some(secret), ClientAuth::Basic) => {
                request = request.header(
                    http::header::AUTHORIZATION,
                    basic_credentials(&e.client_id, secret).expose(),
                );
            }
            (secret, _) => {
                form.push(("client_id", &e.client_id));
                if let Some(secret) = secret {
                    form.push(("client_secret", secret.expose()));
                }
            }
        }
        request
    }
}

/// The runtime source of a consent credential: stored tokens first, then the stored
/// refresh token.
pub struct ConsentSource {
    client: EndpointClient,
    identity: String,
    store: Option<Arc<dyn DurableTokens>>,
    name: Arc<str>,
}

impl ConsentSource {
    /// The source of credential `name` of type `kind`, keeping its tokens in `store`.
    pub fn new(
        kind: &str,
        client: EndpointClient,
        store: Option<Arc<dyn DurableTokens>>,
        name: Arc<str>,
    ) -> Self {
        Self {
            identity: client.endpoint().identity(kind),
            client,
            store,
            name,
        }
    }

    /// The source of a credential of type `kind` with `endpoint`, as [`CredentialType::source`]
    /// makes it.
    ///
    /// [`CredentialType::source`]: super::CredentialType::source
    pub fn build(kind: &str, endpoint: &TokenEndpoint, deps: &SourceDeps) -> Arc<dyn TokenSource> {
        Arc::new(Self::new(
            kind,
            EndpointClient::new(endpoint.clone(), deps.http.clone()),
            deps.durable.clone(),
            Arc::clone(&deps.credential),
        ))
    }

    fn consent_required(&self, why: &str) -> CredentialError {
        CredentialError::ConsentRequired(format!(
            "{why}; run `authrelay authorize {}` once",
            self.name
        ))
    }

    async fn fetch_token(&self, previous: Option<&Token>) -> Result<Token, CredentialError> {
        let store = self.store.clone().ok_or_else(|| {
            CredentialError::Other(
                "no token store is configured (`token_cache: type: file` or `redis`)".into(),
            )
        })?;
        // Read, spent and replaced under the refresh lock: another process sharing the store
        // may be refreshing, and the refresh token it leaves is the one that counts.
        let (_lock, stored) = blocking_store(&store, {
            let (name, identity) = (Arc::clone(&self.name), self.identity.clone());
            move |s| {
                let lock = s.lock_refresh()?;
                Ok((lock, s.load(&name, &identity)?))
            }
        })
        .await?;
        let Some(stored) = stored else {
            return Err(self.consent_required("no tokens are stored for this credential"));
        };
        // A stored access token this process has not sent yet (an earlier run's, one
        // `authorize` or another process just wrote) is used as is while it lasts.
        let unsent = previous.is_none_or(|p| p.value != stored.value);
        let lasting = stored
            .expires_at
            .is_some_and(|e| e > SystemTime::now() + STORED_TOKEN_MARGIN);
        if unsent && lasting {
            return Ok(stored);
        }
        let Some(grant) = stored
            .refresh
            .as_ref()
            .filter(|g| g.usable_at(SystemTime::now()))
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
            let (name, identity, token) =
                (Arc::clone(&self.name), self.identity.clone(), token.clone());
            move |s| s.save(&name, &identity, &token)
        })
        .await?;
        Ok(token)
    }
}

impl TokenSource for ConsentSource {
    fn fetch<'a>(&'a self, previous: Option<&'a Token>) -> FetchFuture<'a> {
        Box::pin(self.fetch_token(previous))
    }

    fn keepalive(&self) -> Option<Duration> {
        Some(self.client.endpoint().keepalive)
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
