//! An OAuth2 client-credentials server that behaves like ItsYou.online (and any RFC 6749
//! §4.4 server): `POST /v1/oauth/access_token` checks the client (form body or HTTP Basic),
//! answers plain-text 400 to a bad client, and issues opaque access tokens;
//! `GET|POST /v1/oauth/jwt` requires `Authorization: token <valid access token>` (plain-text
//! 401 otherwise) and answers a raw ES384 JWT with `exp`, `iss: itsyouonline`, `scope`, `azp`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use super::fixture_bytes;
use crate::support::server::{self, Origin, Seen};
use crate::support::vendor::TokenBook;

/// How the test vendor behaves.
#[derive(Clone)]
pub struct OAuth2Vendor {
    pub client_id: String,
    pub client_secret: String,
    /// Lifetime of access tokens (whole seconds are sent as `expires_in`).
    pub access_lifetime: Duration,
    /// Send `expires_in` as a string (`"2"`), as some servers do.
    pub expires_in_as_string: bool,
    /// JWT lifetime when the client does not ask for a `validity`.
    pub jwt_lifetime: Duration,
}

impl OAuth2Vendor {
    /// A vendor with the given client and 2-second tokens.
    pub fn new(client_id: &str, client_secret: &str) -> Self {
        Self {
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            access_lifetime: Duration::from_secs(2),
            expires_in_as_string: false,
            jwt_lifetime: Duration::from_secs(2),
        }
    }
}

/// Query and form parameters of a request, form winning.
fn params(seen: &Seen) -> HashMap<String, String> {
    let query = seen.target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let mut all: HashMap<String, String> = serde_urlencoded::from_str(query).unwrap_or_default();
    if seen
        .header("content-type")
        .starts_with("application/x-www-form-urlencoded")
    {
        let form: HashMap<String, String> =
            serde_urlencoded::from_bytes(&seen.body).unwrap_or_default();
        all.extend(form);
    }
    all
}

/// The client id and secret from HTTP Basic (RFC 6749 §2.3.1: each form-urlencoded).
fn basic_client(seen: &Seen) -> Option<(String, String)> {
    let value = seen.header("authorization");
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let pair = String::from_utf8(decoded).ok()?;
    let (id, secret) = pair.split_once(':')?;
    let un = |s: &str| -> Option<String> {
        let v: Vec<(String, String)> = serde_urlencoded::from_str(&format!("v={s}")).ok()?;
        v.into_iter().next().map(|(_, v)| v)
    };
    Some((un(id)?, un(secret)?))
}

fn plain(status: u16, text: &str) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let mut r = server::respond(status, format!("{text}\n"));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Starts the vendor. Both endpoints count as token calls in `book` (so a JWT costs two).
pub async fn start(book: Arc<TokenBook>, vendor: OAuth2Vendor) -> Origin {
    let key = Arc::new(EncodingKey::from_ec_pem(&fixture_bytes("itsyou_es384_key.pem")).unwrap());
    let clients_of: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    server::serve(move |seen: Seen| {
        let book = Arc::clone(&book);
        let vendor = vendor.clone();
        let key = Arc::clone(&key);
        let clients_of = Arc::clone(&clients_of);
        async move {
            let path = seen.target.split('?').next().unwrap_or("").to_string();
            match path.as_str() {
                "/v1/oauth/access_token" => access_token(&seen, &book, &vendor, &clients_of),
                "/v1/oauth/jwt" => jwt(&seen, &book, &vendor, &key, &clients_of),
                _ => plain(404, "not found"),
            }
        }
    })
    .await
}

fn access_token(
    seen: &Seen,
    book: &TokenBook,
    vendor: &OAuth2Vendor,
    clients_of: &Mutex<HashMap<String, String>>,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    if seen.method != http::Method::POST {
        return plain(405, "method not allowed");
    }
    if !book.token_call() {
        return plain(500, "internal server error");
    }
    let p = params(seen);
    if p.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return plain(400, "unsupported grant_type");
    }
    let from_body = p
        .get("client_id")
        .zip(p.get("client_secret"))
        .map(|(i, s)| (i.clone(), s.clone()));
    let (id, secret) = match (basic_client(seen), from_body) {
        (Some(b), None) | (None, Some(b)) => b,
        _ => return plain(400, "invalid client credentials"),
    };
    if id != vendor.client_id || secret != vendor.client_secret {
        return plain(400, "invalid client credentials");
    }
    let token = book.issue("itsyou-access", vendor.access_lifetime);
    clients_of.lock().unwrap().insert(token.clone(), id);
    let secs = vendor.access_lifetime.as_secs();
    let expires_in = if vendor.expires_in_as_string {
        serde_json::json!(secs.to_string())
    } else {
        serde_json::json!(secs)
    };
    server::json(
        200,
        serde_json::json!({
            "access_token": token,
            "token_type": "bearer",
            "scope": p.get("scope").cloned().unwrap_or_default(),
            "expires_in": expires_in,
            "info": {"username": "svc"},
        }),
    )
}

fn jwt(
    seen: &Seen,
    book: &TokenBook,
    vendor: &OAuth2Vendor,
    key: &EncodingKey,
    clients_of: &Mutex<HashMap<String, String>>,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    if !book.token_call() {
        return plain(500, "internal server error");
    }
    let presented = seen.header("authorization");
    let access = presented
        .split_once(' ')
        .filter(|(scheme, _)| *scheme == "token")
        .map(|(_, t)| t.to_string());
    let Some(access) = access.filter(|t| book.is_valid(t)) else {
        return plain(401, "unauthorized");
    };
    let azp = clients_of
        .lock()
        .unwrap()
        .get(&access)
        .cloned()
        .unwrap_or_default();
    let p = params(seen);
    let lifetime = p
        .get("validity")
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(vendor.jwt_lifetime);
    let exp = now_secs() + lifetime.as_secs();
    let scope: Vec<&str> = p
        .get("scope")
        .map(|s| s.split(',').filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();
    let mut claims = serde_json::json!({
        "exp": exp,
        "iss": "itsyouonline",
        "scope": scope,
        "azp": azp,
        "jti": rand::random::<u64>().to_string(),
    });
    if let Some(aud) = p.get("aud") {
        claims["aud"] = serde_json::json!(aud.split(',').collect::<Vec<_>>());
    }
    let token = jsonwebtoken::encode(&Header::new(Algorithm::ES384), &claims, key).unwrap();
    let valid_for = (UNIX_EPOCH + Duration::from_secs(exp))
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    book.register(&token, valid_for);
    let mut r = server::respond(200, token);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/jwt"),
    );
    r
}
