//! An in-process Outseta: `POST /api/v1/tokens` (person login or `Outseta key:secret`, with
//! optional `?subscriptionUid=`) issuing RS256 JWTs with a short `exp`, and
//! `GET /api/v1/billing/subscriptions` (Bearer, signature verified, paginated). Tokens are
//! registered in a [`TokenBook`] so that `vendor::protected_api` accepts exactly them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde_json::{json, Value};

use crate::support::server::{self, Origin, Seen};
use crate::support::vendor::TokenBook;

/// A test-only RSA key pair (generated with openssl for these tests; it signs nothing else).
const PRIVATE_KEY: &str = include_str!("outseta_test_key.pem");
const PUBLIC_KEY: &str = include_str!("outseta_test_key.pub.pem");

/// A person and the accounts (account uid, subscription uid) they belong to; the first is
/// their primary account.
#[derive(Clone)]
pub struct Person {
    pub uid: String,
    pub username: String,
    pub password: String,
    pub accounts: Vec<(String, String)>,
}

/// How the server behaves.
#[derive(Clone)]
pub struct OutsetaOptions {
    /// Roughly how long tokens live (the `exp` claim is whole seconds, so 1–2 s for 2 s).
    pub lifetime: Duration,
    pub api_key: String,
    pub api_secret: String,
    pub people: Vec<Person>,
    /// Largest page the subscriptions list answers, whatever `limit` asks.
    pub page_size: usize,
}

impl Default for OutsetaOptions {
    fn default() -> Self {
        Self {
            lifetime: Duration::from_secs(2),
            api_key: "key-abc".into(),
            api_secret: "secret-xyz".into(),
            people: vec![Person {
                uid: "person-1".into(),
                username: "ann@example.com".into(),
                password: "pw-ann-123".into(),
                accounts: vec![("acc-primary".into(), "sub-primary".into())],
            }],
            page_size: 100,
        }
    }
}

/// A running Outseta stand-in.
pub struct Outseta {
    pub origin: Origin,
    /// Issued JWTs; `token_call` counts every `POST /api/v1/tokens`.
    pub book: Arc<TokenBook>,
    /// `GET /api/v1/billing/subscriptions` calls (not token calls).
    pub subscription_calls: Arc<AtomicUsize>,
    options: Arc<Mutex<OutsetaOptions>>,
}

impl Outseta {
    /// `http://127.0.0.1:PORT` (the `base_url`).
    pub fn url(&self) -> String {
        self.origin.url()
    }

    /// The token requests received.
    pub fn token_requests(&self) -> Vec<Seen> {
        self.origin
            .requests()
            .into_iter()
            .filter(|s| s.target.starts_with("/api/v1/tokens"))
            .collect()
    }

    /// The subscription list requests received.
    pub fn subscription_requests(&self) -> Vec<Seen> {
        self.origin
            .requests()
            .into_iter()
            .filter(|s| s.target.starts_with("/api/v1/billing/subscriptions"))
            .collect()
    }

    /// Number of subscription list calls.
    pub fn subscription_count(&self) -> usize {
        self.subscription_calls.load(Ordering::SeqCst)
    }

    /// Gives `account_uid` a new subscription uid (the old one is then "not found").
    pub fn resubscribe(&self, account_uid: &str, subscription_uid: &str) {
        let mut options = self.options.lock().unwrap();
        for person in &mut options.people {
            for (account, subscription) in &mut person.accounts {
                if account == account_uid {
                    *subscription = subscription_uid.to_string();
                }
            }
        }
    }
}

/// The claims of a JWT this server issued, after verifying its signature (not its expiry).
pub fn verified_claims(jwt: &str) -> Option<Value> {
    let key = DecodingKey::from_rsa_pem(PUBLIC_KEY.as_bytes()).expect("public key");
    let mut validation = Validation::new(Algorithm::RS256);
    validation.validate_exp = false;
    validation.required_spec_claims.clear();
    jsonwebtoken::decode::<Value>(jwt, &key, &validation)
        .ok()
        .map(|d| d.claims)
}

/// Starts the server.
pub async fn start(options: OutsetaOptions) -> Outseta {
    let book = TokenBook::new();
    let subscription_calls = Arc::new(AtomicUsize::new(0));
    let key = Arc::new(EncodingKey::from_rsa_pem(PRIVATE_KEY.as_bytes()).expect("private key"));
    let options = Arc::new(Mutex::new(options));
    let origin = {
        let book = Arc::clone(&book);
        let calls = Arc::clone(&subscription_calls);
        let options = Arc::clone(&options);
        server::serve(move |seen: Seen| {
            let book = Arc::clone(&book);
            let calls = Arc::clone(&calls);
            let key = Arc::clone(&key);
            let options = options.lock().unwrap().clone();
            async move {
                let (path, query) = split_target(&seen.target);
                match (seen.method.as_str(), path) {
                    ("POST", "/api/v1/tokens") => tokens(&seen, &query, &book, &key, &options),
                    ("GET", "/api/v1/billing/subscriptions") => {
                        calls.fetch_add(1, Ordering::SeqCst);
                        subscriptions(&seen, &query, &book, &options)
                    }
                    _ => server::json(404, json!({"Message": "Not found"})),
                }
            }
        })
        .await
    };
    Outseta {
        origin,
        book,
        subscription_calls,
        options,
    }
}

fn split_target(target: &str) -> (&str, HashMap<String, String>) {
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    let query = serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .unwrap_or_default()
        .into_iter()
        .collect();
    (path, query)
}

fn body_fields(seen: &Seen) -> HashMap<String, String> {
    if let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(&seen.body) {
        return map
            .into_iter()
            .map(|(k, v)| (k, v.as_str().map(str::to_string).unwrap_or_default()))
            .collect();
    }
    serde_urlencoded::from_bytes::<Vec<(String, String)>>(&seen.body)
        .unwrap_or_default()
        .into_iter()
        .collect()
}

fn tokens(
    seen: &Seen,
    query: &HashMap<String, String>,
    book: &TokenBook,
    key: &EncodingKey,
    options: &OutsetaOptions,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    if !book.token_call() {
        return server::json(500, json!({"Message": "An error has occurred."}));
    }
    let body = body_fields(seen);
    let username = body.get("username").cloned().unwrap_or_default();
    let password = body.get("password").cloned().unwrap_or_default();
    let authorization = seen.header("authorization");
    let person = options.people.iter().find(|p| p.username == username);
    let person = if authorization.starts_with("Outseta ") {
        let expected = format!("Outseta {}:{}", options.api_key, options.api_secret);
        if authorization != expected {
            return server::json(
                401,
                json!({"Message": "Authorization has been denied for this request."}),
            );
        }
        person
    } else {
        person.filter(|p| !password.is_empty() && p.password == password)
    };
    let Some(person) = person else {
        return server::json(400, json!({"Message": "Invalid username or password."}));
    };
    let account = match query.get("subscriptionUid") {
        Some(sub) => person.accounts.iter().find(|(_, s)| s == sub),
        None => person.accounts.first(),
    };
    let Some((account_uid, subscription_uid)) = account else {
        return server::json(400, json!({"Message": "Subscription not found."}));
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let exp = now + options.lifetime.as_secs().max(1);
    let claims = json!({
        "sub": person.uid,
        "email": person.username,
        "iat": now,
        "nbf": now,
        "exp": exp,
        "outseta:accountUid": account_uid,
        "outseta:subscriptionUid": subscription_uid,
        "outseta:isPrimary": "1",
    });
    let jwt = jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, key).expect("sign");
    let valid_for = (UNIX_EPOCH + Duration::from_secs(exp))
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    book.register(&jwt, valid_for);
    server::json(
        200,
        json!({"access_token": jwt, "token_type": "bearer", "expires_in": exp - now}),
    )
}

fn subscriptions(
    seen: &Seen,
    query: &HashMap<String, String>,
    book: &TokenBook,
    options: &OutsetaOptions,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let presented = seen.header("authorization");
    let claims = presented
        .strip_prefix("Bearer ")
        .filter(|jwt| book.is_valid(jwt))
        .and_then(verified_claims);
    let Some(claims) = claims else {
        return server::json(
            401,
            json!({"Message": "Authorization has been denied for this request."}),
        );
    };
    let person = options
        .people
        .iter()
        .find(|p| claims["sub"].as_str() == Some(p.uid.as_str()));
    let all: Vec<Value> = person
        .map(|p| {
            p.accounts
                .iter()
                .map(|(account, sub)| {
                    json!({
                        "Uid": sub,
                        "Plan": {"Uid": "plan-1", "Name": "Pro"},
                        "Account": {"Uid": account, "Name": format!("Account {account}")},
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    let number = |name: &str, default: usize| {
        query
            .get(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let limit = number("limit", 100).min(options.page_size);
    let offset = number("offset", 0);
    let items: Vec<Value> = all.iter().skip(offset).take(limit).cloned().collect();
    server::json(
        200,
        json!({"metadata": {"limit": limit, "offset": offset, "total": all.len()}, "items": items}),
    )
}
