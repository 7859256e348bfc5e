//! `type: oauth2_authorization_code` — RFC 6749 §4.1 with PKCE (RFC 7636, always S256): a
//! person consents once (`authrelay authorize NAME`), and the refresh token keeps the
//! credential alive from then on (`consent.rs`: the token endpoint, the refresh and the
//! durable store, shared with the device grant).


use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use base64::Engine;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;

use super::consent::{endpoint_spec, required_url, ConsentSource, EndpointClient, TokenEndpoint};
use super::oauth2::ClientAuth;
use super::{
    CredentialError, CredentialType, Fingerprint, SourceDeps, Token, TokenFormat, TokenSource,
};
use crate::vocab::secret::Secret;
use crate::vocab::validate_ctx::ValidateCtx;
use crate::vocab::values::ConfigDuration;

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
    /// The longest the refresh token goes unused (default `24h`): an idle credential is
    /// refreshed anyway, since vendors expire unused refresh tokens.
    pub keepalive_refresh: Option<ConfigDuration>,
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct CodeSettings {
    authorize_url: reqwest::Url,
    redirect_uri: reqwest::Url,
    audience: Option<String>,
    authorize_params: BTreeMap<String, String>,
    endpoint: TokenEndpoint,
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
        let authorize_url = required_url(ctx, "authorize_url", spec.authorize_url.as_deref());
        let redirect_uri = required_url(ctx, "redirect_uri", spec.redirect_uri.as_deref())
            .filter(|u| loopback_redirect(ctx, u));
        let endpoint = TokenEndpoint::validate(endpoint_spec!(spec), format, ctx);
        Some(CodeSettings {
            authorize_url: authorize_url?,
            redirect_uri: redirect_uri?,
            audience: spec.audience,
            authorize_params: spec.authorize_params,
            endpoint: endpoint?,
        })
    }

    fn fingerprint(settings: &CodeSettings, fp: &mut Fingerprint) {
        fp.text("authorize_url", settings.authorize_url.as_str());
        fp.text("redirect_uri", settings.redirect_uri.as_str());
        fp.optional_text("audience", settings.audience.as_deref());
        for (k, v) in &settings.authorize_params {
            fp.text(&format!("authorize_params.{k}"), v);
        }
        settings.endpoint.fingerprint(fp);
    }

    fn source(settings: &CodeSettings, deps: &SourceDeps) -> Arc<dyn TokenSource> {
        ConsentSource::build(Self::NAME, &settings.endpoint, deps)
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

    /// The token endpoint.
    pub fn endpoint(&self) -> &TokenEndpoint {
        &self.endpoint
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
    endpoint: EndpointClient,
}

impl Client {
    /// The endpoints of `settings`, reached with `http`.
    pub fn new(settings: CodeSettings, http: reqwest::Client) -> Self {
        let endpoint = EndpointClient::new(settings.endpoint.clone(), http);
        Self { settings, endpoint }
    }

    /// The settings this client uses.
    pub fn settings(&self) -> &CodeSettings {
        &self.settings
    }

    /// The token endpoint client (refresh, revoke).
    pub fn endpoint(&self) -> &EndpointClient {
        &self.endpoint
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
                .append_pair("client_id", &s.endpoint.client_id)
                .append_pair("redirect_uri", s.redirect_uri.as_str())
                .append_pair("state", &state)
                .append_pair("code_challenge", &challenge)
                .append_pair("code_challenge_method", "S256");
            if !s.endpoint.scopes.is_empty() {
                query.append_pair("scope", &s.endpoint.scopes.join(" "));
            }
            if let Some(a) = &s.audience {
                query.append_pair("audience", a);
            }
            if let Some(r) = s.endpoint.resource() {
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
        let form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", self.settings.redirect_uri.as_str()),
            ("code_verifier", consent.verifier.expose()),
        ];
        let redactor = self.endpoint.redactor([code, consent.verifier.expose()]);
        self.endpoint.token_request(form, None, &redactor).await
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
        assert!(s.endpoint.public());
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
