//! An in-process TeleTracker-like login API: `POST /auth/login` (username, password,
//! optional integer account id; JSON or form) and `POST /auth/refresh` (single-use refresh
//! token), both answering a new opaque token and a new refresh token. Field names are
//! parameters so that look-alike APIs can be imitated.
//!
//! Access tokens live in `book` (what `vendor::protected_api` checks and `revoke_all`
//! clears); refresh tokens live in `refresh_book`, so revoking access tokens leaves refresh
//! tokens usable, as a vendor's "log out all sessions" would not necessarily do — tests that
//! want refused refresh tokens revoke `refresh_book` too.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use serde_json::{json, Map, Value};

use crate::support::server::{self, Origin, Seen};
use crate::support::vendor::TokenBook;

/// The vendor's field names.
#[derive(Clone)]
pub struct Names {
    pub username: &'static str,
    pub password: &'static str,
    pub account_id: &'static str,
    pub refresh_request: &'static str,
    pub token: &'static str,
    pub token_expiration: &'static str,
    pub token_lifetime: &'static str,
    pub refresh_token: &'static str,
    pub refresh_token_expiration: &'static str,
}

impl Names {
    /// TeleTracker's names.
    pub fn teletracker() -> Self {
        Self {
            username: "username",
            password: "password",
            account_id: "account_id",
            refresh_request: "refresh_token",
            token: "token",
            token_expiration: "tokenExpiration",
            token_lifetime: "tokenLifetime",
            refresh_token: "refreshToken",
            refresh_token_expiration: "refreshTokenExpiration",
        }
    }
}

/// How the server behaves.
#[derive(Clone)]
pub struct LoginOptions {
    pub username: String,
    pub password: String,
    /// Accounts the user may pick; when not empty, an integer `account_id` from it is required.
    pub accounts: Vec<i64>,
    pub lifetime: Duration,
    pub refresh_lifetime: Duration,
    /// Refuse with `200 {"success": false}` instead of 401.
    pub soft_refusals: bool,
    /// Send `tokenExpiration` (else only `tokenLifetime`).
    pub send_expiration: bool,
    pub names: Names,
}

impl Default for LoginOptions {
    fn default() -> Self {
        Self {
            username: "dispatch".into(),
            password: "pw-dispatch-123".into(),
            accounts: Vec::new(),
            lifetime: Duration::from_millis(1500),
            refresh_lifetime: Duration::from_secs(60),
            soft_refusals: false,
            send_expiration: true,
            names: Names::teletracker(),
        }
    }
}

/// Call counters.
#[derive(Default)]
pub struct Counts {
    pub logins: AtomicUsize,
    pub refreshes: AtomicUsize,
    pub refused_refreshes: AtomicUsize,
    pub refused_logins: AtomicUsize,
    /// Logins still to be answered with 503 (an outage of the login endpoint only).
    pub failing_logins: AtomicUsize,
    /// Refresh tokens presented again after they were used once.
    pub reused_refreshes: AtomicUsize,
    /// Refresh tokens used so far.
    pub used_refresh_tokens: Mutex<std::collections::HashSet<String>>,
}

/// A running login API.
pub struct LoginServer {
    pub origin: Origin,
    /// Access tokens; `token_call` counts logins and refreshes alike.
    pub book: Arc<TokenBook>,
    /// Refresh tokens (single-use: consumed when presented).
    pub refresh_book: Arc<TokenBook>,
    pub counts: Arc<Counts>,
    /// The `account_id` value of each login body, as sent (JSON number or form text).
    pub account_ids: Arc<Mutex<Vec<Value>>>,
}

impl LoginServer {
    /// `http://127.0.0.1:PORT/auth/login`
    pub fn login_url(&self) -> String {
        format!("{}/auth/login", self.origin.url())
    }

    /// `http://127.0.0.1:PORT/auth/refresh`
    pub fn refresh_url(&self) -> String {
        format!("{}/auth/refresh", self.origin.url())
    }

    /// Successful logins so far.
    pub fn logins(&self) -> usize {
        self.counts.logins.load(Ordering::SeqCst)
    }

    /// Successful refreshes so far.
    pub fn refreshes(&self) -> usize {
        self.counts.refreshes.load(Ordering::SeqCst)
    }

    /// Refresh tokens presented a second time (a single-use token used twice).
    pub fn reused_refreshes(&self) -> usize {
        self.counts.reused_refreshes.load(Ordering::SeqCst)
    }

    /// Refresh attempts refused so far.
    pub fn refused_refreshes(&self) -> usize {
        self.counts.refused_refreshes.load(Ordering::SeqCst)
    }
}

/// Starts the server.
pub async fn start(options: LoginOptions) -> LoginServer {
    let book = TokenBook::new();
    let refresh_book = TokenBook::new();
    let counts = Arc::new(Counts::default());
    let account_ids: Arc<Mutex<Vec<Value>>> = Arc::default();
    let options = Arc::new(options);
    let origin = {
        let (book, refresh_book, counts, account_ids) = (
            Arc::clone(&book),
            Arc::clone(&refresh_book),
            Arc::clone(&counts),
            Arc::clone(&account_ids),
        );
        server::serve(move |seen: Seen| {
            let (book, refresh_book, counts, account_ids, options) = (
                Arc::clone(&book),
                Arc::clone(&refresh_book),
                Arc::clone(&counts),
                Arc::clone(&account_ids),
                Arc::clone(&options),
            );
            async move {
                if seen.method != http::Method::POST {
                    return server::json(405, json!({"success": false}));
                }
                if !book.token_call() {
                    return server::json(
                        500,
                        json!({"success": false, "message": "internal error"}),
                    );
                }
                let body = body_fields(&seen);
                let n = &options.names;
                match seen.target.as_str() {
                    "/auth/login" => {
                        let failing = counts.failing_logins.load(Ordering::SeqCst);
                        if failing > 0 {
                            counts.failing_logins.store(failing - 1, Ordering::SeqCst);
                            return server::json(
                                503,
                                json!({"success": false, "message": "maintenance"}),
                            );
                        }
                        let id = body.get(n.account_id).cloned();
                        account_ids
                            .lock()
                            .unwrap()
                            .push(id.clone().unwrap_or(Value::Null));
                        let ok = body.get(n.username).and_then(Value::as_str)
                            == Some(options.username.as_str())
                            && body.get(n.password).and_then(Value::as_str)
                                == Some(options.password.as_str());
                        if !ok {
                            counts.refused_logins.fetch_add(1, Ordering::SeqCst);
                            return refuse(&options, 401, "Invalid username or password");
                        }
                        let account_ok = options.accounts.is_empty()
                            || id
                                .as_ref()
                                .and_then(|v| {
                                    v.as_i64()
                                        .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
                                })
                                .is_some_and(|i| options.accounts.contains(&i));
                        if !account_ok {
                            counts.refused_logins.fetch_add(1, Ordering::SeqCst);
                            return refuse(&options, 400, "Unknown account");
                        }
                        counts.logins.fetch_add(1, Ordering::SeqCst);
                        issue(&options, &book, &refresh_book)
                    }
                    "/auth/refresh" => {
                        let presented = body
                            .get(n.refresh_request)
                            .and_then(Value::as_str)
                            .unwrap_or("");
                        if !counts
                            .used_refresh_tokens
                            .lock()
                            .unwrap()
                            .insert(presented.to_string())
                        {
                            counts.reused_refreshes.fetch_add(1, Ordering::SeqCst);
                        }
                        if !refresh_book.consume(presented) {
                            counts.refused_refreshes.fetch_add(1, Ordering::SeqCst);
                            return refuse(&options, 401, "Invalid or expired refresh token");
                        }
                        counts.refreshes.fetch_add(1, Ordering::SeqCst);
                        issue(&options, &book, &refresh_book)
                    }
                    _ => server::json(404, json!({"success": false})),
                }
            }
        })
        .await
    };
    LoginServer {
        origin,
        book,
        refresh_book,
        counts,
        account_ids,
    }
}

fn body_fields(seen: &Seen) -> HashMap<String, Value> {
    if seen.header("content-type").starts_with("application/json") {
        return match serde_json::from_slice::<Value>(&seen.body) {
            Ok(Value::Object(map)) => map.into_iter().collect(),
            _ => HashMap::new(),
        };
    }
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(&seen.body)
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect()
}

fn refuse(
    options: &LoginOptions,
    status: u16,
    message: &str,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let status = if options.soft_refusals { 200 } else { status };
    server::json(status, json!({"success": false, "message": message}))
}

fn issue(
    options: &LoginOptions,
    book: &TokenBook,
    refresh_book: &TokenBook,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let n = &options.names;
    let token = book.issue("tt", options.lifetime);
    let refresh = refresh_book.issue("rt", options.refresh_lifetime);
    let now = SystemTime::now();
    let stamp = |d: Duration| humantime::format_rfc3339_millis(now + d).to_string();
    let mut doc = Map::new();
    doc.insert("success".into(), json!(true));
    doc.insert("guid".into(), json!("5f0c-user-guid"));
    doc.insert(n.token.into(), json!(token));
    if options.send_expiration {
        doc.insert(n.token_expiration.into(), json!(stamp(options.lifetime)));
    }
    doc.insert(
        n.token_lifetime.into(),
        json!(options.lifetime.as_secs_f64()),
    );
    doc.insert(n.refresh_token.into(), json!(refresh));
    doc.insert(
        n.refresh_token_expiration.into(),
        json!(stamp(options.refresh_lifetime)),
    );
    server::json(200, Value::Object(doc))
}
