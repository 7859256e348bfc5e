//! `type: oauth2_client_credentials`, plain (client in the form body or HTTP Basic) and with
//! the ItsYou.online JWT exchange: every lifecycle scenario against an in-process vendor, the
//! exact requests the vendor sees, and no secret in errors or Debug output.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;

use crate::support::lifecycle::{self, Setup, TEST_TOKENS_YAML};
use crate::support::server::Origin;
use crate::support::vendor::{protected_api, TokenBook};
use crate::support::vendors::oauth2::{self as vendor, OAuth2Vendor};
use crate::support::{self, server};

const CLIENT_ID: &str = "client 1";
/// Characters that RFC 6749 §2.3.1 form-encoding changes, to prove Basic encodes them.
const CLIENT_SECRET: &str = "s3cr3t:+/%";
const LIFETIME: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, PartialEq)]
enum Flavor {
    Post,
    Basic,
    JwtExchange,
}

struct Vendor {
    setup: Setup,
    token_server: Origin,
}

fn config(token_server: &Origin, api: &Origin, flavor: Flavor, validity: Duration) -> String {
    let auth = if flavor == Flavor::Basic {
        "basic"
    } else {
        "post"
    };
    let exchange = if flavor == Flavor::JwtExchange {
        format!(
            "    jwt_exchange:\n      url: {}/v1/oauth/jwt\n      scope: \"user:memberof:org1,offline_access\"\n      aud: \"api-1\"\n      validity: {}s\n",
            token_server.url(),
            validity.as_secs()
        )
    } else {
        String::new()
    };
    format!(
        "{TEST_TOKENS_YAML}credentials:
  itsyou:
    type: oauth2_client_credentials
    token_url: {}/v1/oauth/access_token
    client_id: \"{CLIENT_ID}\"
    client_secret: ${{ITSYOU_SECRET}}
    scope: \"user:name\"
    auth: {auth}
{exchange}routes:
  - name: api
    host: \"{}\"
    credential: itsyou
",
        token_server.url(),
        api.addr
    )
}

async fn start(flavor: Flavor, vendor_settings: OAuth2Vendor) -> Vendor {
    let book = TokenBook::new();
    let token_server = vendor::start(Arc::clone(&book), vendor_settings.clone()).await;
    // ItsYou.online documents a lower-case `bearer` for API calls; the check is case-insensitive.
    let api = protected_api(Arc::clone(&book), "authorization", "Bearer", 401).await;
    let yaml = config(&token_server, &api, flavor, vendor_settings.jwt_lifetime);
    let proxy = support::proxy_with_env(&yaml, &[("ITSYOU_SECRET", CLIENT_SECRET)]).await;
    let url = format!("{}/api/resource", api.url());
    Vendor {
        setup: Setup {
            proxy,
            book,
            api,
            url,
            credential: "itsyou".into(),
            calls_per_token: if flavor == Flavor::JwtExchange { 2 } else { 1 },
        },
        token_server,
    }
}

/// A token lifetime long enough that no proactive refresh falls inside a 500-request burst
/// (which takes over a second on a busy 2-core machine in a debug build).
const BURST_LIFETIME: Duration = Duration::from_secs(30);

async fn started_with(flavor: Flavor, lifetime: Duration) -> Setup {
    let mut settings = OAuth2Vendor::new(CLIENT_ID, CLIENT_SECRET);
    settings.access_lifetime = lifetime;
    settings.jwt_lifetime = lifetime;
    start(flavor, settings).await.setup
}

async fn started(flavor: Flavor) -> Setup {
    start(flavor, OAuth2Vendor::new(CLIENT_ID, CLIENT_SECRET))
        .await
        .setup
}

macro_rules! lifecycle_tests {
    ($module:ident, $flavor:expr) => {
        mod $module {
            use super::*;

            #[tokio::test]
            async fn first_request_gets_token() {
                lifecycle::first_request_gets_token(&started($flavor).await).await;
            }

            #[tokio::test]
            async fn refreshes_before_expiry() {
                lifecycle::refreshes_before_expiry(&started($flavor).await, LIFETIME).await;
            }

            #[tokio::test]
            async fn revoked_token_is_refreshed_and_body_replayed() {
                lifecycle::revoked_token_is_refreshed_and_body_replayed(&started($flavor).await)
                    .await;
            }

            #[tokio::test]
            async fn burst_causes_one_fetch() {
                lifecycle::burst_causes_one_fetch(
                    &started_with($flavor, BURST_LIFETIME).await,
                    500,
                )
                .await;
            }

            #[tokio::test]
            async fn failing_endpoint_backs_off_then_recovers() {
                lifecycle::failing_endpoint_backs_off_then_recovers(&started($flavor).await, 3)
                    .await;
            }
        }
    };
}

lifecycle_tests!(post, Flavor::Post);
lifecycle_tests!(basic, Flavor::Basic);
lifecycle_tests!(jwt_exchange, Flavor::JwtExchange);

fn form(body: &[u8]) -> Vec<(String, String)> {
    serde_urlencoded::from_bytes(body).unwrap()
}

#[tokio::test]
async fn post_auth_sends_the_client_in_the_form_body() {
    let v = start(Flavor::Post, OAuth2Vendor::new(CLIENT_ID, CLIENT_SECRET)).await;
    let res = v.setup.get().await;
    assert_eq!(res.status(), 200);
    let token_call = v.token_server.last();
    assert_eq!(token_call.method, "POST");
    assert_eq!(token_call.target, "/v1/oauth/access_token");
    assert_eq!(
        token_call.header("content-type"),
        "application/x-www-form-urlencoded"
    );
    assert_eq!(token_call.header("authorization"), "");
    let mut fields = form(&token_call.body);
    fields.sort();
    assert_eq!(
        fields,
        [
            ("client_id".to_string(), CLIENT_ID.to_string()),
            ("client_secret".into(), CLIENT_SECRET.into()),
            ("grant_type".into(), "client_credentials".into()),
            ("scope".into(), "user:name".into()),
        ]
    );
    let api_call = v.setup.api.last();
    let presented = api_call.header("authorization");
    let token = presented.strip_prefix("Bearer ").expect("`Bearer <token>`");
    assert!(token.starts_with("itsyou-access-"), "{presented}");
}

#[tokio::test]
async fn basic_auth_form_encodes_id_and_secret() {
    let v = start(Flavor::Basic, OAuth2Vendor::new(CLIENT_ID, CLIENT_SECRET)).await;
    let res = v.setup.get().await;
    assert_eq!(res.status(), 200);
    let token_call = v.token_server.last();
    let expected = base64::engine::general_purpose::STANDARD.encode("client+1:s3cr3t%3A%2B%2F%25");
    assert_eq!(
        token_call.header("authorization"),
        format!("Basic {expected}")
    );
    let mut fields = form(&token_call.body);
    fields.sort();
    assert_eq!(
        fields,
        [
            ("grant_type".to_string(), "client_credentials".to_string()),
            ("scope".into(), "user:name".into()),
        ]
    );
}

#[tokio::test]
async fn jwt_exchange_sends_token_scheme_and_injects_lowercase_bearer_jwt() {
    let v = start(
        Flavor::JwtExchange,
        OAuth2Vendor::new(CLIENT_ID, CLIENT_SECRET),
    )
    .await;
    let res = v.setup.get().await;
    assert_eq!(res.status(), 200);
    let calls = v.token_server.requests();
    assert_eq!(calls.len(), 2);
    // The JWT call presents the access token from the first call with the `token` scheme.
    let jwt_call = &calls[1];
    assert_eq!(jwt_call.method, "GET");
    let (path, query) = jwt_call.target.split_once('?').expect("query");
    assert_eq!(path, "/v1/oauth/jwt");
    let mut params: Vec<(String, String)> = serde_urlencoded::from_str(query).unwrap();
    params.sort();
    assert_eq!(
        params,
        [
            ("aud".to_string(), "api-1".to_string()),
            ("scope".into(), "user:memberof:org1,offline_access".into()),
            ("validity".into(), "2".into()),
        ]
    );
    let presented = jwt_call.header("authorization");
    let access_token = presented
        .strip_prefix("token ")
        .expect("`token <access token>`");
    assert!(access_token.starts_with("itsyou-access-"), "{presented}");
    let presented = v.setup.api.last().header("authorization");
    let jwt = presented
        .strip_prefix("bearer ")
        .expect("lower-case `bearer <jwt>`");
    let header = jsonwebtoken::decode_header(jwt).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES384);
    let claims: serde_json::Value = {
        let payload = jwt.split('.').nth(1).unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(claims["iss"], "itsyouonline");
    assert_eq!(claims["azp"], CLIENT_ID);
    assert_eq!(
        claims["scope"],
        serde_json::json!(["user:memberof:org1", "offline_access"])
    );
}

#[tokio::test]
async fn expires_in_as_a_string_is_honoured() {
    let mut settings = OAuth2Vendor::new(CLIENT_ID, CLIENT_SECRET);
    settings.expires_in_as_string = true;
    let v = start(Flavor::Post, settings).await;
    lifecycle::refreshes_before_expiry(&v.setup, LIFETIME).await;
}

#[tokio::test]
async fn wrong_secret_is_a_502_without_the_secret() {
    let v = start(
        Flavor::Basic,
        OAuth2Vendor::new(CLIENT_ID, "the-real-secret"),
    )
    .await;
    let res = v.setup.get().await;
    assert_eq!(res.status(), 502);
    let body = res.text().await.unwrap();
    assert!(body.contains("credential_unavailable"), "{body}");
    assert!(body.contains("invalid client credentials"), "{body}");
    assert!(body.contains("400"), "{body}");
    assert!(
        !body.contains(CLIENT_SECRET) && !body.contains("s3cr3t"),
        "{body}"
    );
    let status = format!("{:?}", v.setup.proxy.state().snapshot().config);
    assert!(
        !status.contains("s3cr3t"),
        "Debug of the config leaks the secret"
    );
}

#[tokio::test]
async fn config_debug_and_problems_hide_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secret.txt"), "file-secret-value\n").unwrap();
    let yaml = "credentials:
  a:
    type: oauth2_client_credentials
    token_url: http://127.0.0.1:9/token
    client_id: id
    client_secret_file: secret.txt
    jwt_exchange:
      url: http://127.0.0.1:9/jwt
routes: []
";
    let path = dir.path().join("routes.yaml");
    std::fs::write(&path, yaml).unwrap();
    let env = std::collections::HashMap::<String, String>::new();
    let config = authrelay::Config::load(&path, &env).unwrap();
    let debug = format!("{config:?}");
    assert!(!debug.contains("file-secret-value"), "{debug}");
    assert!(
        debug.contains("\"bearer\""),
        "jwt_exchange defaults to `bearer`: {debug}"
    );

    let bad = yaml
        .replace(
            "token_url: http://127.0.0.1:9/token",
            "token_url: not a url",
        )
        .replace("client_secret_file: secret.txt", "client_secret: ${NOPE}");
    std::fs::write(&path, bad).unwrap();
    let err = authrelay::Config::load(&path, &env)
        .unwrap_err()
        .to_string();
    assert!(err.contains("credentials.a.token_url"), "{err}");
    assert!(err.contains("credentials.a.client_secret"), "{err}");
}

#[tokio::test]
async fn unreachable_token_endpoint_is_a_502() {
    let api = server::echo_origin().await;
    let yaml = format!(
        "{TEST_TOKENS_YAML}credentials:
  down:
    type: oauth2_client_credentials
    token_url: http://127.0.0.1:9/token?client_secret=query-secret
    client_id: id
    client_secret: also-secret
routes:
  - name: api
    host: \"{}\"
    credential: down
",
        api.addr
    );
    let proxy = support::proxy(&yaml).await;
    let res = proxy
        .client()
        .get(format!("{}/x", api.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502);
    let body = res.text().await.unwrap();
    assert!(body.contains("unreachable"), "{body}");
    assert!(!body.contains("secret"), "{body}");
    assert_eq!(api.count(), 0);
}

#[tokio::test]
async fn a_redirecting_token_endpoint_never_gets_the_secret_to_another_host() {
    let elsewhere = crate::support::server::echo_origin().await;
    let target = format!("{}/steal", elsewhere.url());
    let redirecting = crate::support::server::serve(move |_| {
        let target = target.clone();
        async move {
            let mut r = crate::support::server::respond(307, "");
            r.headers_mut()
                .insert("location", http::HeaderValue::from_str(&target).unwrap());
            r
        }
    })
    .await;
    let api = crate::support::server::echo_origin().await;
    let yaml = format!(
        "credentials:\n  oa:\n    type: oauth2_client_credentials\n    token_url: {}/token\n    client_id: app\n    client_secret: very-secret-value\nroutes:\n  - name: api\n    mount: /api\n    upstream: {}\n    credential: oa\n",
        redirecting.url(),
        api.url()
    );
    let proxy = crate::support::proxy(&yaml).await;
    let res = crate::support::direct_client()
        .get(format!("{}/api/x", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["credential"], "oa");
    assert!(body["detail"].as_str().unwrap().contains("307"), "{body}");
    assert_eq!(redirecting.count(), 1);
    assert_eq!(
        elsewhere.count(),
        0,
        "the form with the secret was not re-sent elsewhere"
    );
    assert_eq!(api.count(), 0);
    proxy.stop().await;
}

/// Paths the token server was asked for, in order.
fn token_paths(v: &Vendor) -> Vec<String> {
    v.token_server
        .requests()
        .iter()
        .map(|r| r.target.split('?').next().unwrap_or_default().to_string())
        .collect()
}

#[tokio::test]
async fn jwt_exchange_keeps_the_access_token_for_the_next_jwts() {
    let mut settings = OAuth2Vendor::new(CLIENT_ID, CLIENT_SECRET);
    settings.access_lifetime = Duration::from_secs(600);
    let v = start(Flavor::JwtExchange, settings).await;
    let client = v.setup.proxy.client();
    let end = std::time::Instant::now() + LIFETIME * 3;
    while std::time::Instant::now() < end {
        let res = client.get(&v.setup.url).send().await.unwrap();
        assert_eq!(res.status(), 200);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let paths = token_paths(&v);
    let access_calls = paths
        .iter()
        .filter(|p| *p == "/v1/oauth/access_token")
        .count();
    let jwt_calls = paths.iter().filter(|p| *p == "/v1/oauth/jwt").count();
    assert_eq!(
        access_calls, 1,
        "the client secret was sent once: {paths:?}"
    );
    assert!(jwt_calls >= 3, "JWTs were refreshed: {paths:?}");
    assert_eq!(
        v.setup.book.api_stats().1,
        0,
        "the API never saw a bad token"
    );
}

#[tokio::test]
async fn a_refused_kept_access_token_falls_back_to_the_client_secret() {
    let mut settings = OAuth2Vendor::new(CLIENT_ID, CLIENT_SECRET);
    settings.access_lifetime = Duration::from_secs(600);
    let v = start(Flavor::JwtExchange, settings).await;
    assert_eq!(v.setup.get().await.status(), 200);
    v.setup.book.revoke_all();
    let res = v.setup.get().await;
    assert_eq!(res.status(), 200, "refreshed and replayed");
    assert_eq!(
        token_paths(&v),
        [
            "/v1/oauth/access_token",
            "/v1/oauth/jwt",
            "/v1/oauth/jwt",
            "/v1/oauth/access_token",
            "/v1/oauth/jwt"
        ],
        "the kept access token was tried once, then a new one obtained"
    );
}
