//! What the `check --fetch`, `token` and `health` commands do, kept in the library so that
//! `main.rs` only parses arguments and prints.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime};

use http::HeaderName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::config::{Config, Unmatched};
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
