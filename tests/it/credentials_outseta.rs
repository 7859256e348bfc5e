//! `type: outseta` end to end against an in-process Outseta: every lifecycle scenario for
//! person login and for the API-key form, the exact header forms the vendor sees, account
//! selection by `account_uid` (paginated) and `subscription_uid`, and errors that name the
//! credential without leaking a secret.

use std::time::Duration;

use crate::support::lifecycle::{self, Setup, TEST_TOKENS_YAML};
use crate::support::vendor::protected_api;
use crate::support::vendors::outseta::{self, Outseta, OutsetaOptions, Person};
use crate::support::{self, server::Origin};

const LIFETIME: Duration = Duration::from_secs(2);

/// `auth` is the YAML for the login fields (indented by four spaces).
fn config(vendor: &Outseta, api: &Origin, auth: &str) -> String {
    format!(
        "{TEST_TOKENS_YAML}credentials:\n  outseta_app:\n    type: outseta\n    base_url: {}\n{auth}routes:\n  - name: app\n    host: {}\n    path_prefix: /api/\n    credential: outseta_app\n",
        vendor.url(),
        api.addr
    )
}

const PERSON: &str = "    username: ann@example.com\n    password: ${OUTSETA_PASSWORD}\n";
const SERVER_SIDE: &str =
    "    username: ann@example.com\n    api_key: ${OUTSETA_KEY}\n    api_secret: ${OUTSETA_SECRET}\n";
const ENV: &[(&str, &str)] = &[
    ("OUTSETA_PASSWORD", "pw-ann-123"),
    ("OUTSETA_KEY", "key-abc"),
    ("OUTSETA_SECRET", "secret-xyz"),
];

async fn setup_with(options: OutsetaOptions, auth: &str) -> (Setup, Outseta) {
    let vendor = outseta::start(options).await;
    let api: Origin = protected_api(vendor.book.clone(), "authorization", "Bearer", 401).await;
    let proxy = support::proxy_with_env(&config(&vendor, &api, auth), ENV).await;
    let url = format!("{}/api/v1/profile", api.url());
    let setup = Setup {
        proxy,
        book: vendor.book.clone(),
        api,
        url,
        credential: "outseta_app".into(),
        calls_per_token: 1,
    };
    (setup, vendor)
}

async fn person() -> (Setup, Outseta) {
    setup_with(OutsetaOptions::default(), PERSON).await
}

async fn server_side() -> (Setup, Outseta) {
    setup_with(OutsetaOptions::default(), SERVER_SIDE).await
}

/// For the burst: 500 requests through a debug build on a busy machine can outlast half of a
/// 2 s token, and a proactive refresh would then (rightly) add a second fetch. Single flight
/// is about concurrency, not expiry, so this scenario uses a token that outlives the burst.
fn long_lived() -> OutsetaOptions {
    OutsetaOptions {
        lifetime: Duration::from_secs(60),
        ..OutsetaOptions::default()
    }
}

async fn person_long_lived() -> (Setup, Outseta) {
    setup_with(long_lived(), PERSON).await
}

async fn server_side_long_lived() -> (Setup, Outseta) {
    setup_with(long_lived(), SERVER_SIDE).await
}

macro_rules! lifecycle_scenarios {
    ($module:ident, $setup:ident, $long_lived:ident) => {
        mod $module {
            use super::*;

            #[tokio::test]
            async fn first_request_gets_token() {
                let (s, _vendor) = $setup().await;
                lifecycle::first_request_gets_token(&s).await;
            }

            #[tokio::test]
            async fn refreshes_before_expiry() {
                let (s, _vendor) = $setup().await;
                lifecycle::refreshes_before_expiry(&s, LIFETIME).await;
            }

            #[tokio::test]
            async fn revoked_token_is_refreshed_and_body_replayed() {
                let (s, _vendor) = $setup().await;
                lifecycle::revoked_token_is_refreshed_and_body_replayed(&s).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn burst_causes_one_fetch() {
                let (s, _vendor) = $long_lived().await;
                lifecycle::burst_causes_one_fetch(&s, 500).await;
            }

            #[tokio::test]
            async fn failing_endpoint_backs_off_then_recovers() {
                let (s, _vendor) = $setup().await;
                lifecycle::failing_endpoint_backs_off_then_recovers(&s, 3).await;
            }
        }
    };
}

lifecycle_scenarios!(person_login, person, person_long_lived);
lifecycle_scenarios!(api_key, server_side, server_side_long_lived);

fn injected_jwt(s: &Setup) -> String {
    let seen = s.api.last();
    let header = seen.header("authorization");
    let jwt = header.strip_prefix("Bearer ").expect("Bearer scheme");
    jwt.to_string()
}

#[tokio::test]
async fn api_key_form_sends_outseta_key_secret_and_injects_bearer_jwt() {
    let (s, vendor) = server_side().await;
    let res = s.proxy.client().get(&s.url).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let token_call = vendor.token_requests().pop().unwrap();
    assert_eq!(
        token_call.header("authorization"),
        "Outseta key-abc:secret-xyz"
    );
    let body: serde_json::Value = serde_json::from_slice(&token_call.body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"username": "ann@example.com", "password": ""})
    );
    let claims = outseta::verified_claims(&injected_jwt(&s)).expect("a JWT signed by Outseta");
    assert_eq!(claims["sub"], "person-1");
    assert_eq!(claims["outseta:accountUid"], "acc-primary");
    s.proxy.stop().await;
}

#[tokio::test]
async fn person_login_sends_credentials_in_the_body_only() {
    let (s, vendor) = person().await;
    assert_eq!(
        s.proxy.client().get(&s.url).send().await.unwrap().status(),
        200
    );
    let token_call = vendor.token_requests().pop().unwrap();
    assert_eq!(token_call.header("authorization"), "");
    assert_eq!(token_call.target, "/api/v1/tokens");
    let body: serde_json::Value = serde_json::from_slice(&token_call.body).unwrap();
    assert_eq!(body["username"], "ann@example.com");
    assert_eq!(body["password"], "pw-ann-123");
    assert!(outseta::verified_claims(&injected_jwt(&s)).is_some());
    s.proxy.stop().await;
}

fn many_accounts() -> OutsetaOptions {
    let accounts = (1..=5)
        .map(|i| (format!("acc-{i}"), format!("sub-{i}")))
        .collect();
    OutsetaOptions {
        people: vec![Person {
            uid: "person-1".into(),
            username: "ann@example.com".into(),
            password: "pw-ann-123".into(),
            accounts,
        }],
        page_size: 2,
        ..OutsetaOptions::default()
    }
}

#[tokio::test]
async fn account_uid_is_found_across_pages_and_its_token_injected() {
    let auth = format!("{PERSON}    account_uid: acc-5\n");
    let (s, vendor) = setup_with(many_accounts(), &auth).await;
    let res = s.proxy.client().get(&s.url).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let claims = outseta::verified_claims(&injected_jwt(&s)).unwrap();
    assert_eq!(claims["outseta:accountUid"], "acc-5");
    assert_eq!(claims["outseta:subscriptionUid"], "sub-5");
    let tokens = vendor.token_requests();
    assert_eq!(tokens.len(), 2, "a person token, then the account's");
    assert_eq!(tokens[0].target, "/api/v1/tokens");
    assert_eq!(tokens[1].target, "/api/v1/tokens?subscriptionUid=sub-5");
    let lists = vendor.subscription_requests();
    assert_eq!(lists.len(), 3, "three pages of two");
    assert!(lists[2].target.contains("offset=4"), "{}", lists[2].target);
    assert!(lists
        .iter()
        .all(|l| l.header("authorization").starts_with("Bearer ey")));
    s.proxy.stop().await;
}

#[tokio::test]
async fn account_uid_is_looked_up_once_then_refreshed_with_one_call() {
    let auth = format!("{PERSON}    account_uid: acc-3\n");
    let (mut s, vendor) = setup_with(many_accounts(), &auth).await;
    s.calls_per_token = 2;
    lifecycle::first_request_gets_token(&s).await;
    let lists = vendor.subscription_count();
    assert_eq!(lists, 2, "two pages of two to find acc-3");
    // A refresh (here after a revocation) asks for the found subscription's token directly.
    s.calls_per_token = 1;
    lifecycle::revoked_token_is_refreshed_and_body_replayed(&s).await;
    assert_eq!(vendor.subscription_count(), lists, "no second lookup");
    let last = vendor.token_requests().pop().unwrap();
    assert_eq!(last.target, "/api/v1/tokens?subscriptionUid=sub-3");
    s.proxy.stop().await;
}

#[tokio::test]
async fn a_refused_found_subscription_is_looked_up_again() {
    let auth = format!("{PERSON}    account_uid: acc-3\n");
    let (s, vendor) = setup_with(many_accounts(), &auth).await;
    assert_eq!(s.get().await.status(), 200);
    vendor.resubscribe("acc-3", "sub-3b");
    tokio::time::sleep(Duration::from_millis(150)).await;
    s.book.revoke_all();
    let res = s.get().await;
    assert_eq!(res.status(), 200, "refreshed and replayed");
    let targets: Vec<String> = vendor
        .token_requests()
        .iter()
        .map(|r| r.target.clone())
        .collect();
    assert_eq!(
        targets,
        [
            "/api/v1/tokens",
            "/api/v1/tokens?subscriptionUid=sub-3",
            "/api/v1/tokens?subscriptionUid=sub-3",
            "/api/v1/tokens",
            "/api/v1/tokens?subscriptionUid=sub-3b",
        ],
        "the old subscription was refused, so the account was looked up again"
    );
    let claims = outseta::verified_claims(&injected_jwt(&s)).unwrap();
    assert_eq!(claims["outseta:subscriptionUid"], "sub-3b");
    s.proxy.stop().await;
}

#[tokio::test]
async fn missing_account_is_a_502_naming_the_credential_and_account() {
    let auth = format!("{PERSON}    account_uid: acc-nope\n");
    let (s, _vendor) = setup_with(many_accounts(), &auth).await;
    let res = s.proxy.client().get(&s.url).send().await.unwrap();
    assert_eq!(res.status(), 502);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"], "credential_unavailable");
    assert_eq!(body["credential"], "outseta_app");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("acc-nope"), "{detail}");
    assert!(!detail.contains("pw-ann-123"), "{detail}");
    assert_eq!(s.book.api_stats().0, 0, "nothing reached the API");
    s.proxy.stop().await;
}

#[tokio::test]
async fn subscription_uid_goes_straight_to_the_query() {
    let auth = format!("{SERVER_SIDE}    subscription_uid: sub-4\n");
    let (s, vendor) = setup_with(many_accounts(), &auth).await;
    assert_eq!(
        s.proxy.client().get(&s.url).send().await.unwrap().status(),
        200
    );
    let tokens = vendor.token_requests();
    assert_eq!(tokens.len(), 1);
    assert_eq!(tokens[0].target, "/api/v1/tokens?subscriptionUid=sub-4");
    assert_eq!(vendor.subscription_count(), 0);
    let claims = outseta::verified_claims(&injected_jwt(&s)).unwrap();
    assert_eq!(claims["outseta:accountUid"], "acc-4");
    s.proxy.stop().await;
}

#[tokio::test]
async fn wrong_password_gives_the_vendor_message_without_secrets() {
    let vendor = outseta::start(OutsetaOptions::default()).await;
    let api = protected_api(vendor.book.clone(), "authorization", "Bearer", 401).await;
    let env = [("OUTSETA_PASSWORD", "wrong-pw-987")];
    let proxy = support::proxy_with_env(&config(&vendor, &api, PERSON), &env).await;
    let res = proxy
        .client()
        .get(format!("{}/api/v1/profile", api.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502);
    let text = res.text().await.unwrap();
    assert!(text.contains("Invalid username or password"), "{text}");
    assert!(text.contains("400"), "{text}");
    assert!(!text.contains("wrong-pw-987"), "{text}");
    let env_map: std::collections::HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let loaded = authrelay::Config::load(&proxy.config_path, &env_map).unwrap();
    let debug = format!("{loaded:?}");
    assert!(debug.contains("outseta_app") && !debug.contains("wrong-pw-987"));
    proxy.stop().await;
}

#[tokio::test]
async fn bad_api_secret_is_refused_with_401_detail() {
    let vendor = outseta::start(OutsetaOptions::default()).await;
    let api = protected_api(vendor.book.clone(), "authorization", "Bearer", 401).await;
    let env = [
        ("OUTSETA_KEY", "key-abc"),
        ("OUTSETA_SECRET", "not-the-secret"),
    ];
    let proxy = support::proxy_with_env(&config(&vendor, &api, SERVER_SIDE), &env).await;
    let res = proxy
        .client()
        .get(format!("{}/api/v1/profile", api.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502);
    let text = res.text().await.unwrap();
    assert!(text.contains("401"), "{text}");
    assert!(
        !text.contains("not-the-secret") && !text.contains("key-abc"),
        "{text}"
    );
    proxy.stop().await;
}
