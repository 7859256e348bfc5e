//! What the `check --fetch`, `token`, `authorize`, `revoke` and `health` commands do, kept in the library so that
//! `main.rs` only parses arguments and prints.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use http::HeaderName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use std::sync::Arc;

use crate::config::{Config, Unmatched};
use crate::credentials::oauth2_code::{self, OAuth2AuthorizationCode};
use crate::credentials::DurableTokens;
use crate::state::State;
use crate::vocab::secret::Secret;

/// What `check` and the startup log say about who may spend the credentials and where
/// traffic no route claims may go, one line each.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessNotes {
    /// Which unmatched-traffic regime applies.
    pub unmatched: String,
    /// Set when credentials are configured and no client has to name itself.
    pub open_credentials: Option<&'static str>,
}

/// The [`AccessNotes`] of `config`.
pub fn access_notes(config: &Config) -> AccessNotes {
    let unmatched = match config.unmatched {
        Unmatched::Deny => "unmatched traffic: refused (`unmatched: deny`)".to_string(),
        Unmatched::Pass => config.unmatched_reach.summary(),
    };
    AccessNotes {
        unmatched,
        open_credentials: config
            .clients
            .open_to_local_processes(!config.credentials.is_empty()),
    }
}

/// The result of obtaining one credential's token once.
#[derive(Debug)]
pub struct FetchReport {
    /// The credential's name.
    pub name: String,
    /// When the token expires (`None` inside `Ok` for values that never expire), or why no
    /// token could be obtained (never contains a secret).
    pub outcome: Result<Option<SystemTime>, String>,
    /// Where the token came from: `fetched` or `redis` (the shared cache held it).
    pub origin: Option<&'static str>,
}

impl std::fmt::Display for FetchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.outcome {
            Ok(Some(exp)) => write!(
                f,
                "{}: ok, expires {}",
                self.name,
                humantime::format_rfc3339_seconds(*exp)
            )?,
            Ok(None) => write!(f, "{}: ok, does not expire", self.name)?,
            Err(e) => return write!(f, "{}: FAILED: {e}", self.name),
        }
        match self.origin {
            Some("redis") => write!(f, " (read from the shared token cache)"),
            _ => Ok(()),
        }
    }
}

/// Obtains every credential's token once, through the credential slots (so with the same
/// timeout and validation as the proxy), in name order.
pub async fn fetch_all(state: &State) -> Vec<FetchReport> {
    let snapshot = state.snapshot();
    let mut names: Vec<&String> = snapshot.slots.keys().collect();
    names.sort();
    let mut reports = Vec::with_capacity(names.len());
    for name in names {
        let Some(slot) = snapshot.slots.get(name) else {
            continue;
        };
        let outcome = match slot.get().await {
            Ok(token) => Ok(token.expires_at()),
            Err(e) => Err(e.source.to_string()),
        };
        reports.push(FetchReport {
            name: name.clone(),
            outcome,
            origin: slot.status().origin,
        });
    }
    reports
}

/// For `check --fetch` with `token_cache: type: redis`: whether Redis answers and this
/// replica's `encryption_key` opens what the others sealed. `None` for the memory cache.
pub async fn check_token_cache(state: &State) -> Option<Result<String, String>> {
    let cache = state.snapshot().token_cache.clone()?;
    let url = cache.status().url.unwrap_or_default();
    Some(match cache.verify().await {
        Ok(()) => Ok(format!(
            "token_cache: ok, {url} answers and the encryption key matches"
        )),
        Err(e) => Err(format!("token_cache: FAILED ({url}): {e}")),
    })
}

/// Why `token NAME` printed no value.
#[derive(Debug, thiserror::Error)]
pub enum TokenCommandError {
    /// The config has no credential of that name.
    #[error("no credential named `{0}` in the config (known: {1})")]
    Unknown(String, String),
    /// The token could not be obtained.
    #[error("{0}")]
    Unavailable(String),
}

/// Obtains credential `name`'s token and returns the header it sets and its value.
pub async fn fetch_header(
    state: &State,
    name: &str,
) -> Result<(HeaderName, Secret), TokenCommandError> {
    let snapshot = state.snapshot();
    let Some(slot) = snapshot.slots.get(name) else {
        let mut known: Vec<&str> = snapshot.slots.keys().map(String::as_str).collect();
        known.sort_unstable();
        return Err(TokenCommandError::Unknown(
            name.to_string(),
            known.join(", "),
        ));
    };
    let token = slot
        .get()
        .await
        .map_err(|e| TokenCommandError::Unavailable(e.to_string()))?;
    let value = String::from_utf8_lossy(token.header_value().as_bytes()).into_owned();
    Ok((slot.header().clone(), Secret::new(value)))
}

/// What `authorize` has to tell the person, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum AuthorizeEvent {
    /// Open this URL in a browser and consent.
    Open(String),
    /// The tokens are stored: the credential named here works from now on.
    Authorized(String),
}

/// Why `authorize` or `revoke` did not complete.
#[derive(Debug, thiserror::Error)]
pub enum ConsentCommandError {
    /// The config has no credential of that name.
    #[error("no credential named `{0}` in the config (known: {1})")]
    Unknown(String, String),
    /// The credential is not one a person consents to.
    #[error("credential `{0}` is of type `{1}`; only `oauth2_authorization_code` credentials are authorized by a person")]
    NotConsent(String, &'static str),
    /// Anything that stopped the flow (never contains a secret).
    #[error("{0}")]
    Failed(String),
}

/// The settings, endpoint client and token store of consent credential `name`.
fn consent_credential(
    state: &State,
    name: &str,
) -> Result<(oauth2_code::Client, Arc<dyn DurableTokens>), ConsentCommandError> {
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
    let Some(settings) = credential.kind.settings::<OAuth2AuthorizationCode>() else {
        return Err(ConsentCommandError::NotConsent(
            name.to_string(),
            credential.kind.type_name(),
        ));
    };
    let deps = state.source_deps();
    let store = deps.durable.clone().ok_or_else(|| {
        ConsentCommandError::Failed("the config has no `token_cache: type: file`".into())
    })?;
    Ok((
        oauth2_code::Client::new(settings.clone(), deps.http.clone()),
        store,
    ))
}

/// `authorize NAME`: listens on the credential's loopback `redirect_uri`, tells the person
/// the URL to open, takes one authorization code whose state matches (then stops
/// listening), trades it for tokens and stores them.
pub async fn authorize(
    state: &State,
    name: &str,
    mut tell: impl FnMut(AuthorizeEvent),
) -> Result<(), ConsentCommandError> {
    let (client, store) = consent_credential(state, name)?;
    let settings = client.settings();
    let addr = settings.redirect_addr().ok_or_else(|| {
        ConsentCommandError::Failed("the redirect_uri names no loopback address".into())
    })?;
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        ConsentCommandError::Failed(format!("cannot listen on {addr} (the redirect_uri): {e}"))
    })?;
    let failed =
        |e: crate::credentials::CredentialError| ConsentCommandError::Failed(e.to_string());
    let consent = client.begin().map_err(failed)?;
    tell(AuthorizeEvent::Open(consent.url.to_string()));
    let code = callback::wait_for_code(&listener, settings.redirect_path(), &consent, name).await?;
    drop(listener);
    let token = client
        .exchange_code(&consent, code.expose())
        .await
        .map_err(failed)?;
    let identity = settings.identity();
    let owned = name.to_string();
    oauth2_code::blocking_store(&store, move |s| s.save(&owned, &identity, &token))
        .await
        .map_err(failed)?;
    tell(AuthorizeEvent::Authorized(name.to_string()));
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
    let (client, store) = consent_credential(state, name)?;
    let failed =
        |e: crate::credentials::CredentialError| ConsentCommandError::Failed(e.to_string());
    let identity = client.settings().identity();
    let owned = name.to_string();
    let stored = oauth2_code::blocking_store(&store, move |s| s.load(&owned, &identity))
        .await
        .map_err(failed)?;
    let at_vendor = match stored.and_then(|t| t.refresh) {
        Some(grant) => match client.revoke(&grant).await {
            Ok(true) => Some(Ok(())),
            Ok(false) => None,
            Err(e) => Some(Err(e.to_string())),
        },
        None => None,
    };
    let owned = name.to_string();
    let deleted = oauth2_code::blocking_store(&store, move |s| s.delete(&owned))
        .await
        .map_err(failed)?;
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

/// Authorization schemes shown by [`mask`]; any other first word may be part of a secret
/// (a static value with a space) and is hidden with the rest.
const KNOWN_SCHEMES: [&str; 10] = [
    "Bearer",
    "Basic",
    "Token",
    "Outseta",
    "Digest",
    "Negotiate",
    "ApiKey",
    "Bot",
    "JWT",
    "MAC",
];

/// A header value safe to show: the scheme word when it is a well-known one, then `***` and
/// the length of the rest — `Bearer ***(312 chars)`. No character of a secret is shown.
pub fn mask(value: &str) -> String {
    let (scheme, token) = match value.split_once(' ') {
        Some((scheme, token)) if KNOWN_SCHEMES.iter().any(|k| k.eq_ignore_ascii_case(scheme)) => {
            (Some(scheme), token)
        }
        _ => (None, value),
    };
    let length = token.chars().count();
    match scheme {
        Some(s) => format!("{s} ***({length} chars)"),
        None => format!("***({length} chars)"),
    }
}

/// Asks the admin endpoint at `admin` for `/healthz`; `Ok` when it answers 200. Used as a
/// container health check where no curl or wget is installed.
pub async fn health(admin: SocketAddr) -> Result<(), String> {
    let check = async {
        let mut stream = tokio::net::TcpStream::connect(admin)
            .await
            .map_err(|e| format!("cannot connect to {admin}: {e}"))?;
        let request =
            format!("GET /healthz HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("cannot send to {admin}: {e}"))?;
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .await
            .map_err(|e| format!("no answer from {admin}: {e}"))?;
        let answer = String::from_utf8_lossy(&answer);
        let status_line = answer.lines().next().unwrap_or_default();
        if status_line.split(' ').nth(1) == Some("200") {
            Ok(())
        } else {
            Err(format!("{admin} answered `{status_line}`"))
        }
    };
    tokio::time::timeout(Duration::from_secs(5), check)
        .await
        .unwrap_or_else(|_| Err(format!("no answer from {admin} within 5s")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_keep_a_known_scheme_and_the_length_only() {
        let jwt = format!("eyJh{}", "x".repeat(308));
        assert_eq!(mask(&format!("Bearer {jwt}")), "Bearer ***(312 chars)");
        assert_eq!(mask("Outseta k1:s1"), "Outseta ***(5 chars)");
        assert_eq!(mask("abcdefghijklmnopqrst"), "***(20 chars)");
        assert_eq!(mask("hunter2 is my password"), "***(22 chars)");
    }
}
