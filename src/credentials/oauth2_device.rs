//! `type: oauth2_device_code` — the device authorization grant (RFC 8628), made for machines
//! without a browser: `authrelay authorize NAME` shows a person a `user_code` and where to
//! enter it, polls the token endpoint until they consent, and from then on the refresh
//! token keeps the credential alive exactly as for the code grant (`consent.rs`).

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::consent::{endpoint_spec, required_url, ConsentSource, EndpointClient, TokenEndpoint};
use super::exchange;
use super::oauth2::ClientAuth;
use super::{
    CredentialError, CredentialType, Fingerprint, SourceDeps, Token, TokenFormat, TokenSource,
};
use crate::vocab::secret::Secret;
use crate::vocab::validate_ctx::ValidateCtx;
use crate::vocab::values::ConfigDuration;

/// RFC 8628 §3.2: the polling interval when the vendor states none.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
/// RFC 8628 §3.5: what every `slow_down` adds to the interval.
const SLOW_DOWN_STEP: Duration = Duration::from_secs(5);
/// The longest a person is given when the vendor states no `expires_in`.
const DEFAULT_EXPIRES_IN: Duration = Duration::from_secs(900);
/// The most of `expires_in` and `interval` taken from a vendor's answer: a user code is
/// meant for minutes (Microsoft 15, Google 30), and an absurd value must neither overflow
/// the deadline nor keep `authorize` waiting for days.
const MAX_EXPIRES_IN: Duration = Duration::from_secs(3600);
const MAX_INTERVAL: Duration = Duration::from_secs(60);
/// The grant type of the polling requests.
const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

/// The config section as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceSpec {
    /// Where the device authorization request goes (RFC 8628 §3.1).
    pub device_authorization_url: Option<String>,
    /// The token endpoint.
    pub token_url: Option<String>,
    pub client_id: Option<String>,
    /// Absent for a public client.
    pub client_secret: Option<Secret>,
    pub client_secret_file: Option<String>,
    /// Scopes to ask for.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// RFC 8707 resource indicator.
    pub resource: Option<String>,
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
pub struct DeviceSettings {
    device_authorization_url: reqwest::Url,
    endpoint: TokenEndpoint,
}

impl DeviceSettings {
    /// The token endpoint.
    pub fn endpoint(&self) -> &TokenEndpoint {
        &self.endpoint
    }
}

/// `type: oauth2_device_code`.
pub struct OAuth2DeviceCode;

impl CredentialType for OAuth2DeviceCode {
    const NAME: &'static str = "oauth2_device_code";
    type Spec = DeviceSpec;
    type Settings = DeviceSettings;

    fn default_scheme(_: &DeviceSpec) -> Option<&'static str> {
        Some("Bearer")
    }

    fn validate(
        spec: DeviceSpec,
        format: TokenFormat,
        ctx: &mut ValidateCtx<'_>,
    ) -> Option<DeviceSettings> {
        let device_authorization_url = required_url(
            ctx,
            "device_authorization_url",
            spec.device_authorization_url.as_deref(),
        );
        let endpoint = TokenEndpoint::validate(endpoint_spec!(spec), format, ctx);
        Some(DeviceSettings {
            device_authorization_url: device_authorization_url?,
            endpoint: endpoint?,
        })
    }

    fn fingerprint(settings: &DeviceSettings, fp: &mut Fingerprint) {
        fp.text(
            "device_authorization_url",
            settings.device_authorization_url.as_str(),
        );
        settings.endpoint.fingerprint(fp);
    }

    fn source(settings: &DeviceSettings, deps: &SourceDeps) -> Arc<dyn TokenSource> {
        ConsentSource::build(Self::NAME, &settings.endpoint, deps)
    }
}

/// The vendor's answer to a device authorization request: what the person is shown, and
/// the device code only this process polls with.
pub struct DeviceAuthorization {
    /// Where the person enters the code.
    pub verification_uri: String,
    /// The code the person enters.
    pub user_code: String,
    /// The same page with the code filled in, when the vendor sends one.
    pub verification_uri_complete: Option<String>,
    device_code: Secret,
    interval: Duration,
    expires_in: Duration,
}

impl std::fmt::Debug for DeviceAuthorization {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceAuthorization")
            .field("verification_uri", &self.verification_uri)
            .field("user_code", &self.user_code)
            .finish_non_exhaustive()
    }
}

/// Talks to the vendor's endpoints for one device-grant credential.
pub struct Client {
    settings: DeviceSettings,
    endpoint: EndpointClient,
}

impl Client {
    /// The endpoints of `settings`, reached with `http`.
    pub fn new(settings: DeviceSettings, http: reqwest::Client) -> Self {
        let endpoint = EndpointClient::new(settings.endpoint.clone(), http);
        Self { settings, endpoint }
    }

    /// The token endpoint client (refresh, revoke).
    pub fn endpoint(&self) -> &EndpointClient {
        &self.endpoint
    }

    /// RFC 8628 §3.1–3.2: asks for a device code and the user code to show.
    pub async fn begin(&self) -> Result<DeviceAuthorization, CredentialError> {
        let scope = self.settings.endpoint.scopes.join(" ");
        let mut form = Vec::new();
        if !scope.is_empty() {
            form.push(("scope", scope.as_str()));
        }
        if let Some(r) = self.settings.endpoint.resource() {
            form.push(("resource", r));
        }
        let url = self.settings.device_authorization_url.clone();
        let request = self.endpoint.authenticated(url, &mut form);
        let redactor = self.endpoint.redactor([]);
        let answer = exchange::send(request.form(&form), &redactor).await?;
        let doc = answer.json()?;
        let text = |pointer: &str| exchange::string_at(&doc, pointer).map(str::to_string);
        let seconds = |pointer: &str| {
            doc.pointer(pointer)
                .and_then(serde_json::Value::as_u64)
                .filter(|s| *s > 0)
                .map(Duration::from_secs)
        };
        Ok(DeviceAuthorization {
            device_code: Secret::new(text("/device_code")?),
            user_code: text("/user_code")?,
            // Google names it `verification_url`.
            verification_uri: text("/verification_uri").or_else(|_| text("/verification_url"))?,
            verification_uri_complete: text("/verification_uri_complete").ok(),
            interval: seconds("/interval")
                .unwrap_or(DEFAULT_INTERVAL)
                .min(MAX_INTERVAL),
            expires_in: seconds("/expires_in")
                .unwrap_or(DEFAULT_EXPIRES_IN)
                .min(MAX_EXPIRES_IN),
        })
    }

    /// RFC 8628 §3.4–3.5: polls the token endpoint until the person consents, declines or
    /// the code expires. Waits `interval` between polls, five seconds more after every
    /// `slow_down` (and after an unreachable endpoint, as §3.5 asks).
    pub async fn wait_for_consent(
        &self,
        authorization: &DeviceAuthorization,
    ) -> Result<Token, CredentialError> {
        let deadline = tokio::time::Instant::now() + authorization.expires_in;
        let mut interval = authorization.interval;
        let device_code = authorization.device_code.expose();
        let redactor = self.endpoint.redactor([device_code]);
        loop {
            tokio::time::sleep(interval).await;
            if tokio::time::Instant::now() >= deadline {
                return Err(expired());
            }
            let form = vec![("grant_type", DEVICE_GRANT), ("device_code", device_code)];
            let error = match self.endpoint.token_request(form, None, &redactor).await {
                Ok(token) => return Ok(token),
                Err(error) => error,
            };
            match error.vendor_error() {
                Some("authorization_pending") => {}
                Some("slow_down") => interval += SLOW_DOWN_STEP,
                Some("access_denied") => {
                    return Err(CredentialError::Other(
                        "the person declined (access_denied)".into(),
                    ))
                }
                Some("expired_token") => return Err(expired()),
                _ if matches!(error, CredentialError::Unreachable(_)) => {
                    interval += SLOW_DOWN_STEP
                }
                _ => return Err(error),
            }
        }
    }
}

fn expired() -> CredentialError {
    CredentialError::Other(
        "the user code expired before the person consented (expired_token); run authorize again"
            .into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::validate_for_test;

    #[test]
    fn a_device_credential_needs_both_endpoints_and_a_client_id() {
        let e = validate_for_test::<OAuth2DeviceCode>("scopes: [a]\n", &[]).unwrap_err();
        for field in ["device_authorization_url", "token_url", "client_id"] {
            assert!(e.iter().any(|p| p.contains(field)), "{field}: {e:?}");
        }
        let s = validate_for_test::<OAuth2DeviceCode>(
            "device_authorization_url: https://idp.test/device\ntoken_url: https://idp.test/token\n\
             client_id: tv\n",
            &[],
        )
        .unwrap();
        assert!(s.endpoint.public());
    }

    /// A vendor's absurd `expires_in` and `interval` are capped: no overflowing deadline (a
    /// panic), no wait of days.
    #[tokio::test]
    async fn absurd_lifetimes_in_a_device_answer_are_capped() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = vec![0u8; 4096];
            let _ = s.read(&mut buf).await.unwrap();
            let body = format!(
                "{{\"device_code\":\"dc\",\"user_code\":\"UC\",\"verification_uri\":\"https://idp.test/d\",\"expires_in\":{},\"interval\":{}}}",
                u64::MAX,
                u64::MAX
            );
            let answer = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            s.write_all(answer.as_bytes()).await.unwrap();
        });
        let settings = validate_for_test::<OAuth2DeviceCode>(
            &format!(
                "device_authorization_url: http://{addr}/device\ntoken_url: http://{addr}/token\nclient_id: tv\n"
            ),
            &[],
        )
        .unwrap();
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::new(settings, reqwest::Client::new());
        let authorization = client.begin().await.unwrap();
        assert_eq!(authorization.expires_in, MAX_EXPIRES_IN);
        assert_eq!(authorization.interval, MAX_INTERVAL);
        assert_eq!(authorization.user_code, "UC");
    }
}
