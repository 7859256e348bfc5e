//! What every in-process vendor server shares: a book of issued tokens (with expiry,
//! revocation, call counts and injected failures) and a protected API that accepts only
//! tokens the book says are valid — as the real vendors' APIs do.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::server::{self, Origin, Seen};

/// The tokens a vendor has issued and what it has been asked.
#[derive(Default)]
pub struct TokenBook {
    inner: Mutex<BookState>,
}

#[derive(Default)]
struct BookState {
    tokens: HashMap<String, Instant>,
    /// Every token ever issued or registered, for scans that must find none of them.
    issued: Vec<String>,
    next_id: u64,
    token_calls: Vec<Instant>,
    fail_next: usize,
    api_calls: usize,
    api_rejections: usize,
}

impl TokenBook {
    /// A new, shared book.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Records a call to a token-issuing endpoint. Returns `false` when an injected failure
    /// should be answered instead (the call still counts).
    pub fn token_call(&self) -> bool {
        let mut s = self.inner.lock().unwrap();
        s.token_calls.push(Instant::now());
        if s.fail_next > 0 {
            s.fail_next -= 1;
            return false;
        }
        true
    }

    /// Issues a new opaque token valid for `lifetime`, with `prefix` to tell kinds apart.
    pub fn issue(&self, prefix: &str, lifetime: Duration) -> String {
        let mut s = self.inner.lock().unwrap();
        s.next_id += 1;
        let token = format!("{prefix}-{}-{}", s.next_id, rand::random::<u32>());
        s.tokens.insert(token.clone(), Instant::now() + lifetime);
        s.issued.push(token.clone());
        token
    }

    /// Registers a token minted elsewhere (a JWT) as valid for `lifetime`.
    pub fn register(&self, token: &str, lifetime: Duration) {
        let mut s = self.inner.lock().unwrap();
        s.tokens
            .insert(token.to_string(), Instant::now() + lifetime);
        s.issued.push(token.to_string());
    }

    /// Every token issued so far, revoked and expired ones included.
    pub fn issued(&self) -> Vec<String> {
        self.inner.lock().unwrap().issued.clone()
    }

    /// Whether `token` was issued, is not revoked and has not expired.
    pub fn is_valid(&self, token: &str) -> bool {
        self.inner
            .lock()
            .unwrap()
            .tokens
            .get(token)
            .is_some_and(|exp| Instant::now() < *exp)
    }

    /// Forgets a single token (a single-use refresh token, once used).
    pub fn consume(&self, token: &str) -> bool {
        let mut s = self.inner.lock().unwrap();
        match s.tokens.remove(token) {
            Some(exp) => Instant::now() < exp,
            None => false,
        }
    }

    /// Revokes every token issued so far.
    pub fn revoke_all(&self) {
        self.inner.lock().unwrap().tokens.clear();
    }

    /// Makes the next `n` token calls fail.
    pub fn fail_next(&self, n: usize) {
        self.inner.lock().unwrap().fail_next = n;
    }

    /// Number of token-issuing calls so far.
    pub fn token_calls(&self) -> usize {
        self.inner.lock().unwrap().token_calls.len()
    }

    /// When each token-issuing call arrived.
    pub fn token_call_times(&self) -> Vec<Instant> {
        self.inner.lock().unwrap().token_calls.clone()
    }

    /// API calls seen and how many were refused with 401.
    pub fn api_stats(&self) -> (usize, usize) {
        let s = self.inner.lock().unwrap();
        (s.api_calls, s.api_rejections)
    }

    /// Records an API call and whether it was accepted (for APIs that check tokens themselves).
    pub fn api_call(&self, accepted: bool) {
        let mut s = self.inner.lock().unwrap();
        s.api_calls += 1;
        if !accepted {
            s.api_rejections += 1;
        }
    }
}

/// A protected API: answers 200 with `{"ok":true,"method":…,"body":…}` when the request's
/// `header` equals `scheme token` (case-insensitive scheme) for a valid token, else 401 (or
/// `reject_status`). The body is echoed so tests can check replays byte for byte.
pub async fn protected_api(
    book: Arc<TokenBook>,
    header: &'static str,
    scheme: &'static str,
    reject_status: u16,
) -> Origin {
    server::serve(move |seen: Seen| {
        let book = Arc::clone(&book);
        async move {
            let presented = seen.header(header);
            let token = match scheme {
                "" => Some(presented.as_str()),
                s => presented
                    .split_once(' ')
                    .filter(|(given, _)| given.eq_ignore_ascii_case(s))
                    .map(|(_, t)| t),
            };
            let ok = token.is_some_and(|t| book.is_valid(t));
            book.api_call(ok);
            if ok {
                accepted(&seen)
            } else {
                server::json(
                    reject_status,
                    serde_json::json!({"Message": "Unauthorized"}),
                )
            }
        }
    })
    .await
}

/// The protected APIs' answer to an accepted request: what arrived, so that tests can check
/// replays byte for byte.
pub fn accepted(seen: &Seen) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    server::json(
        200,
        serde_json::json!({
            "ok": true,
            "method": seen.method.as_str(),
            "target": seen.target,
            "body": String::from_utf8_lossy(&seen.body),
        }),
    )
}
