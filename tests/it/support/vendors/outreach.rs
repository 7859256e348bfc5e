//! An Outreach look-alike: `POST /api/app/installs/{id}/actions/accessToken` verifies the
//! app token (RS256 signature with the app's public key, `iss` = the S2S GUID, `exp` not past,
//! at most an hour long) and answers a JSON:API document with `data.meta.accessToken`; JSON:API
//! `errors[]` with 401/404 otherwise. Also an API that verifies self-signed app tokens itself
//! (as `.../actions/setupToken` does), for `type: jwt`.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, Validation};

use super::fixture_bytes;
use crate::support::server::{self, Origin, Seen};
use crate::support::vendor::TokenBook;

/// The S2S GUID the test app is registered with.
pub const S2S_GUID: &str = "3c8c6f2e-test-app-guid";
/// The installation the test app has.
pub const INSTALL_ID: &str = "install-42";
/// The app's private key (PKCS#8) and its public half.
pub const APP_KEY: &str = "outreach_app_key.pem";
const APP_PUBLIC_KEY: &str = "outreach_app_key.pub.pem";
/// An RSA key (PKCS#1) the vendor does not know.
pub const OTHER_KEY: &str = "other_rsa_key.pem";

/// The claims an app token must have.
#[derive(Debug, serde::Deserialize)]
pub struct AppClaims {
    pub iat: u64,
    pub exp: u64,
    pub iss: String,
}

fn api_error(
    status: u16,
    title: &str,
    detail: &str,
) -> http::Response<http_body_util::Full<bytes::Bytes>> {
    let mut r = server::respond(
        status,
        serde_json::json!({"errors": [{"id": title.to_lowercase(), "title": title, "detail": detail}]})
            .to_string(),
    );
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/vnd.api+json"),
    );
    r
}

/// Verifies `Authorization: Bearer <app token>`: RS256 with the app's public key, issuer
/// `issuer`, `exp` not past (no leeway), `exp - iat` at most an hour.
pub fn verify_app_token(seen: &Seen, issuer: &str) -> Result<(String, AppClaims), String> {
    let presented = seen.header("authorization");
    let token = presented
        .strip_prefix("Bearer ")
        .ok_or_else(|| "expected `Authorization: Bearer <app token>`".to_string())?;
    let key = DecodingKey::from_rsa_pem(&fixture_bytes(APP_PUBLIC_KEY)).unwrap();
    let mut validation = Validation::new(Algorithm::RS256);
    validation.leeway = 0;
    validation.set_issuer(&[issuer]);
    validation.set_required_spec_claims(&["exp", "iat", "iss"]);
    let data = jsonwebtoken::decode::<AppClaims>(token, &key, &validation)
        .map_err(|e| format!("invalid app token: {e}"))?;
    if data.claims.exp.saturating_sub(data.claims.iat) > 3600 {
        return Err("app token lives longer than an hour".into());
    }
    Ok((token.to_string(), data.claims))
}

/// Starts the token endpoint. Access tokens live `lifetime` and are sent with `expiresIn`.
pub async fn start(book: Arc<TokenBook>, lifetime: Duration) -> Origin {
    server::serve(move |seen: Seen| {
        let book = Arc::clone(&book);
        async move {
            let path = seen.target.split('?').next().unwrap_or("").to_string();
            let Some(install) = path
                .strip_prefix("/api/app/installs/")
                .and_then(|p| p.strip_suffix("/actions/accessToken"))
            else {
                return api_error(404, "Not Found", "no such route");
            };
            if seen.method != http::Method::POST {
                return api_error(405, "Method Not Allowed", "use POST");
            }
            if !book.token_call() {
                return api_error(500, "Internal Server Error", "try again later");
            }
            if let Err(e) = verify_app_token(&seen, S2S_GUID) {
                return api_error(401, "Unauthorized", &e);
            }
            if install != INSTALL_ID {
                return api_error(404, "Not Found", "install not found");
            }
            let token = book.issue("outreach-s2s", lifetime);
            let mut r = server::respond(
                200,
                serde_json::json!({
                    "data": {
                        "type": "install",
                        "id": INSTALL_ID,
                        "meta": {"accessToken": token, "expiresIn": lifetime.as_secs()},
                    }
                })
                .to_string(),
            );
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/vnd.api+json"),
            );
            r
        }
    })
    .await
}

/// An API that accepts self-signed app tokens: it verifies each with the public key itself.
/// Each token it sees for the first time counts as a "token call" in `book` and is registered
/// there until its `exp`, so that `book.revoke_all()` revokes tokens seen so far and the
/// lifecycle scenarios can count distinct tokens.
pub async fn app_token_api(book: Arc<TokenBook>) -> Origin {
    let seen_tokens: Arc<Mutex<HashSet<String>>> = Arc::default();
    server::serve(move |seen: Seen| {
        let book = Arc::clone(&book);
        let seen_tokens = Arc::clone(&seen_tokens);
        async move {
            let ok = match verify_app_token(&seen, S2S_GUID) {
                Ok((token, claims)) => {
                    if seen_tokens.lock().unwrap().insert(token.clone()) {
                        book.token_call();
                        let valid_for = (UNIX_EPOCH + Duration::from_secs(claims.exp))
                            .duration_since(SystemTime::now())
                            .unwrap_or_default();
                        book.register(&token, valid_for);
                    }
                    book.is_valid(&token)
                }
                Err(_) => false,
            };
            book.api_call(ok);
            if ok {
                crate::support::vendor::accepted(&seen)
            } else {
                api_error(401, "Unauthorized", "invalid or expired app token")
            }
        }
    })
    .await
}
