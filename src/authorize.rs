//! Consent, once: what `authrelay authorize NAME`, `authrelay revoke NAME` and the admin
//! listener's `POST /credentials/NAME/authorize` do for the credential types a person
//! consents to. [`start`] asks the vendor (code grant: the authorization URL, with a
//! listener on the loopback `redirect_uri`; device grant: a user code) and returns what the
//! person is told; [`Pending::finish`] waits for their consent and writes the tokens to the
//! durable store, where the running proxy's next fetch finds them.

use std::sync::Arc;

use crate::credentials::consent::{blocking_store, EndpointClient};
use crate::credentials::oauth2_code::{self, Consent, OAuth2AuthorizationCode};
use crate::credentials::oauth2_device::{self, DeviceAuthorization, OAuth2DeviceCode};
use crate::credentials::{CredentialError, CredentialType, DurableTokens, Token};
use crate::state::State;

/// What the person is told, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum AuthorizeEvent {
    /// Code grant: open this URL in a browser and consent.
    Open(String),
    /// Device grant: enter `user_code` at `verification_uri` (or open
    /// `verification_uri_complete`, which carries the code).
    EnterCode {
        verification_uri: String,
        user_code: String,
        verification_uri_complete: Option<String>,
    },
    /// The tokens are stored: the credential named here works from now on.
    Authorized(String),
}

impl AuthorizeEvent {
    /// The event as the one JSON object `--json` prints and the admin endpoint answers.
    pub fn to_json(&self) -> serde_json::Value {
        match self {
            AuthorizeEvent::Open(url) => serde_json::json!({ "open": url }),
            AuthorizeEvent::EnterCode {
                verification_uri,
                user_code,
                verification_uri_complete,
            } => {
                let mut doc = serde_json::json!({
                    "verification_uri": verification_uri,
                    "user_code": user_code,
                });
                if let Some(complete) = verification_uri_complete {
                    doc["verification_uri_complete"] = complete.as_str().into();
                }
                doc
            }
            AuthorizeEvent::Authorized(name) => serde_json::json!({ "authorized": name }),
        }
    }
}

/// Why `authorize` or `revoke` did not complete.
#[derive(Debug, thiserror::Error)]
pub enum ConsentCommandError {
    /// The config has no credential of that name.
    #[error("no credential named `{0}` in the config (known: {1})")]
    Unknown(String, String),
    /// The credential is not one a person consents to.
    #[error("credential `{0}` is of type `{1}`; only `oauth2_authorization_code` and `oauth2_device_code` credentials are authorized by a person")]
    NotConsent(String, &'static str),
    /// Anything that stopped the flow (never contains a secret).
    #[error("{0}")]
    Failed(String),
}

impl From<CredentialError> for ConsentCommandError {
    fn from(e: CredentialError) -> Self {
        ConsentCommandError::Failed(e.to_string())
    }
}

/// The grant of a consent credential, with its vendor client.
enum Grant {
    Code(oauth2_code::Client),
    Device(oauth2_device::Client),
}

impl Grant {
    fn endpoint(&self) -> &EndpointClient {
        match self {
            Grant::Code(c) => c.endpoint(),
            Grant::Device(c) => c.endpoint(),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Grant::Code(_) => OAuth2AuthorizationCode::NAME,
            Grant::Device(_) => OAuth2DeviceCode::NAME,
        }
    }
}

/// One consent credential of the running config: its grant and its token store.
pub struct ConsentCredential {
    name: String,
    grant: Grant,
    store: Arc<dyn DurableTokens>,
}

/// Consent credential `name` of `state`'s config.
pub fn consent_credential(
    state: &State,
    name: &str,
) -> Result<ConsentCredential, ConsentCommandError> {
    let snapshot = state.snapshot();
    let Some(credential) = snapshot.config.credentials.get(name) else {
        let known: Vec<&str> = snapshot
            .config
            .credentials
            .keys()
            .map(String::as_str)
            .collect();
        return Err(ConsentCommandError::Unknown(
            name.to_string(),
            known.join(", "),
        ));
    };
    let deps = state.source_deps();
    let http = deps.http.clone();
    let grant = if let Some(s) = credential.kind.settings::<OAuth2AuthorizationCode>() {
        Grant::Code(oauth2_code::Client::new(s.clone(), http))
    } else if let Some(s) = credential.kind.settings::<OAuth2DeviceCode>() {
        Grant::Device(oauth2_device::Client::new(s.clone(), http))
    } else {
        return Err(ConsentCommandError::NotConsent(
            name.to_string(),
            credential.kind.type_name(),
        ));
    };
    let store = deps.durable.clone().ok_or_else(|| {
        ConsentCommandError::Failed(
            "the config has no `token_cache` of `type: file` or `type: redis`".into(),
        )
    })?;
    Ok(ConsentCredential {
        name: name.to_string(),
        grant,
        store,
    })
}

/// A consent in progress: what is left to wait for once the person has been told.
pub struct Pending {
    name: String,
    store: Arc<dyn DurableTokens>,
    identity: String,
    wait: Waiting,
}

enum Waiting {
    Code {
        client: oauth2_code::Client,
        consent: Consent,
        listener: tokio::net::TcpListener,
    },
    Device {
        client: oauth2_device::Client,
        authorization: DeviceAuthorization,
    },
}

/// Starts the consent of `credential`: what to tell the person, and what to wait for.
/// Code grant: listens on the loopback `redirect_uri` (so that nothing else can take the
/// code) before the URL is shown. Device grant: asks the vendor for a user code.
pub async fn start(
    credential: ConsentCredential,
) -> Result<(AuthorizeEvent, Pending), ConsentCommandError> {
    let identity = credential
        .grant
        .endpoint()
        .endpoint()
        .identity(credential.grant.kind());
    let (event, wait) = match credential.grant {
        Grant::Code(client) => {
            let addr = client.settings().redirect_addr().ok_or_else(|| {
                ConsentCommandError::Failed("the redirect_uri names no loopback address".into())
            })?;
            let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                ConsentCommandError::Failed(format!(
                    "cannot listen on {addr} (the redirect_uri): {e}"
                ))
            })?;
            let consent = client.begin()?;
            (
                AuthorizeEvent::Open(consent.url.to_string()),
                Waiting::Code {
                    client,
                    consent,
                    listener,
                },
            )
        }
        Grant::Device(client) => {
            let authorization = client.begin().await?;
            (
                AuthorizeEvent::EnterCode {
                    verification_uri: authorization.verification_uri.clone(),
                    user_code: authorization.user_code.clone(),
                    verification_uri_complete: authorization.verification_uri_complete.clone(),
                },
                Waiting::Device {
                    client,
                    authorization,
                },
            )
        }
    };
    let pending = Pending {
        name: credential.name,
        store: credential.store,
        identity,
        wait,
    };
    Ok((event, pending))
}

impl Pending {
    /// Waits for the person's consent (code grant: one code whose state matches, then the
    /// listener closes; device grant: polling as RFC 8628 asks), trades it for tokens and
    /// stores them. Returns the credential's name.
    pub async fn finish(self) -> Result<String, ConsentCommandError> {
        let token: Token = match self.wait {
            Waiting::Code {
                client,
                consent,
                listener,
            } => {
                let path = client.settings().redirect_path();
                let code = callback::wait_for_code(&listener, path, &consent, &self.name).await?;
                drop(listener);
                client.exchange_code(&consent, code.expose()).await?
            }
            Waiting::Device {
                client,
                authorization,
            } => client.wait_for_consent(&authorization).await?,
        };
        let (name, identity) = (self.name.clone(), self.identity);
        blocking_store(&self.store, move |s| s.save(&name, &identity, &token)).await?;
        Ok(self.name)
    }
}

/// `authorize NAME`: tells the person what to do, waits for their consent and stores the
/// tokens.
pub async fn authorize(
    state: &State,
    name: &str,
    mut tell: impl FnMut(AuthorizeEvent),
) -> Result<(), ConsentCommandError> {
    let (event, pending) = start(consent_credential(state, name)?).await?;
    tell(event);
    let name = pending.finish().await?;
    tell(AuthorizeEvent::Authorized(name));
    Ok(())
}

/// What `revoke NAME` did.
#[derive(Debug)]
pub struct Revoked {
    /// Whether the vendor was asked to revoke the refresh token (a `revocation_url` is set
    /// and a token was stored), and its answer.
    pub at_vendor: Option<Result<(), String>>,
    /// Whether stored tokens were deleted.
    pub deleted: bool,
}

/// `revoke NAME`: revokes the stored refresh token at the vendor (RFC 7009) when a
/// `revocation_url` is configured, and deletes the stored tokens either way.
pub async fn revoke(state: &State, name: &str) -> Result<Revoked, ConsentCommandError> {
    let credential = consent_credential(state, name)?;
    let client = credential.grant.endpoint();
    let identity = client.endpoint().identity(credential.grant.kind());
    let owned = name.to_string();
    let stored = blocking_store(&credential.store, move |s| s.load(&owned, &identity)).await?;
    let at_vendor = match stored.and_then(|t| t.refresh) {
        Some(grant) => match client.revoke(&grant).await {
            Ok(true) => Some(Ok(())),
            Ok(false) => None,
            Err(e) => Some(Err(e.to_string())),
        },
        None => None,
    };
    let owned = name.to_string();
    let deleted = blocking_store(&credential.store, move |s| s.delete(&owned)).await?;
    Ok(Revoked { at_vendor, deleted })
}

/// The loopback end of the authorization code grant: the one HTTP request the browser
/// makes when the vendor sends it back.
mod callback {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::ConsentCommandError;
    use crate::credentials::oauth2_code::Consent;
    use crate::vocab::secret::Secret;

    /// Longest request head read from the browser.
    const MAX_HEAD: usize = 16 * 1024;

    /// What one request to the listener was.
    enum Visit {
        /// The vendor's answer with a code and the right state.
        Code(Secret),
        /// The vendor's answer with an error (the person declined, or the request was bad).
        Refused(String),
        /// Anything else: another path, a wrong state, bytes that are not HTTP.
        Stray,
    }

    /// Serves requests on `listener` until one brings a code with `consent`'s state, or the
    /// vendor's refusal.
    pub(super) async fn wait_for_code(
        listener: &TcpListener,
        path: &str,
        consent: &Consent,
        name: &str,
    ) -> Result<Secret, ConsentCommandError> {
        loop {
            let (mut stream, _) = listener.accept().await.map_err(|e| {
                ConsentCommandError::Failed(format!("the redirect_uri listener failed: {e}"))
            })?;
            match visit(&mut stream, path, consent, name).await {
                Visit::Code(code) => return Ok(code),
                Visit::Refused(why) => {
                    return Err(ConsentCommandError::Failed(format!(
                        "the authorization was refused: {why}"
                    )))
                }
                Visit::Stray => {}
            }
        }
    }

    async fn visit(stream: &mut TcpStream, path: &str, consent: &Consent, name: &str) -> Visit {
        let Some(target) = read_target(stream).await else {
            return Visit::Stray;
        };
        let Ok(url) = reqwest::Url::parse(&format!("http://callback{target}")) else {
            answer(stream, "400 Bad Request", "not an HTTP request").await;
            return Visit::Stray;
        };
        if url.path() != path {
            answer(stream, "404 Not Found", "not found").await;
            return Visit::Stray;
        }
        let query: std::collections::HashMap<String, String> =
            url.query_pairs().into_owned().collect();
        if !query.get("state").is_some_and(|s| consent.state_matches(s)) {
            answer(
                stream,
                "400 Bad Request",
                "this answer does not belong to the authorization authrelay started",
            )
            .await;
            return Visit::Stray;
        }
        if let Some(error) = query.get("error") {
            answer(
                stream,
                "400 Bad Request",
                "authorization refused; see the terminal",
            )
            .await;
            // The vendor's code and description are plain words (RFC 6749 §4.1.2.1), but
            // are cut short: they are shown, not trusted.
            let description = query.get("error_description").map_or("", String::as_str);
            let why = format!("{error} {description}");
            return Visit::Refused(why.trim().chars().take(200).collect());
        }
        match query.get("code") {
            Some(code) => {
                answer(
                    stream,
                    "200 OK",
                    &format!("authrelay: `{name}` is authorized; you may close this window"),
                )
                .await;
                Visit::Code(Secret::new(code.clone()))
            }
            None => {
                answer(stream, "400 Bad Request", "no code in the answer").await;
                Visit::Stray
            }
        }
    }

    /// The request target of a `GET` request head, or `None`.
    async fn read_target(stream: &mut TcpStream) -> Option<String> {
        let mut head = Vec::new();
        let mut buf = [0u8; 2048];
        let read = async {
            while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_HEAD {
                let n = stream.read(&mut buf).await.ok()?;
                if n == 0 {
                    return None;
                }
                head.extend_from_slice(&buf[..n]);
            }
            Some(())
        };
        tokio::time::timeout(std::time::Duration::from_secs(10), read)
            .await
            .ok()??;
        let text = String::from_utf8_lossy(&head);
        let mut words = text.lines().next()?.split(' ');
        match (words.next(), words.next()) {
            (Some("GET"), Some(target)) if target.starts_with('/') => Some(target.to_string()),
            _ => None,
        }
    }

    async fn answer(stream: &mut TcpStream, status: &str, text: &str) {
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n\
             Content-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n{text}",
            text.len()
        );
        // The browser may be gone; the outcome stands either way.
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    }
}
