//! `type: login` end to end against an in-process TeleTracker-like API: every lifecycle
//! scenario, the integer `account_id`, the refresh-token path before expiry, the fall back
//! to a fresh login when the refresh token is refused (401 or `success: false`) or expired,
//! form bodies and renamed fields, and no secret in errors or Debug output.

use std::collections::HashMap;
use std::time::Duration;

use crate::support::lifecycle::{self, Setup, TEST_TOKENS_YAML};
use crate::support::vendor::protected_api;
use crate::support::vendors::login::{self, LoginOptions, LoginServer, Names};
use crate::support::{self, server::Origin};

const ENV: &[(&str, &str)] = &[("TT_PASSWORD", "pw-dispatch-123")];

fn config(vendor: &LoginServer, api: &Origin, extra: &str) -> String {
    format!(
        "{TEST_TOKENS_YAML}credentials:\n  teletracker:\n    type: login\n    login_url: {}\n    refresh_url: {}\n    username: dispatch\n    password: ${{TT_PASSWORD}}\n{extra}routes:\n  - name: tt\n    host: {}\n    path_prefix: /api/\n    credential: teletracker\n",
        vendor.login_url(),
        vendor.refresh_url(),
        api.addr
    )
}

async fn setup_with(options: LoginOptions, extra: &str) -> (Setup, LoginServer) {
    let vendor = login::start(options).await;
    let api: Origin = protected_api(vendor.book.clone(), "authorization", "Bearer", 401).await;
    let proxy = support::proxy_with_env(&config(&vendor, &api, extra), ENV).await;
    let setup = Setup {
        url: format!("{}/api/vehicles", api.url()),
        proxy,
        book: vendor.book.clone(),
        api,
        credential: "teletracker".into(),
        calls_per_token: 1,
    };
    (setup, vendor)
}

async fn default_setup() -> (Setup, LoginServer) {
    setup_with(LoginOptions::default(), "").await
}

mod lifecycle_scenarios {
    use super::*;

    #[tokio::test]
    async fn first_request_gets_token() {
        let (s, _vendor) = default_setup().await;
        lifecycle::first_request_gets_token(&s).await;
    }

    #[tokio::test]
    async fn refreshes_before_expiry() {
        let (s, _vendor) = default_setup().await;
        lifecycle::refreshes_before_expiry(&s, LoginOptions::default().lifetime).await;
    }

    #[tokio::test]
    async fn revoked_token_is_refreshed_and_body_replayed() {
        let (s, vendor) = default_setup().await;
        lifecycle::revoked_token_is_refreshed_and_body_replayed(&s).await;
        assert_eq!(vendor.logins(), 1, "the refresh token did the work");
        assert_eq!(vendor.refreshes(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn burst_causes_one_fetch() {
        // A token that outlives the burst: 500 requests through a debug build can take
        // longer than half of 1.5 s, and the proactive refresh would add a second fetch.
        let options = LoginOptions {
            lifetime: Duration::from_secs(60),
            ..LoginOptions::default()
        };
        let (s, _vendor) = setup_with(options, "").await;
        lifecycle::burst_causes_one_fetch(&s, 500).await;
    }

    #[tokio::test]
    async fn failing_endpoint_backs_off_then_recovers() {
        let (s, _vendor) = default_setup().await;
        lifecycle::failing_endpoint_backs_off_then_recovers(&s, 3).await;
    }
}

#[tokio::test]
async fn first_login_sends_json_and_injects_bearer() {
    let (s, vendor) = default_setup().await;
    assert_eq!(
        s.proxy.client().get(&s.url).send().await.unwrap().status(),
        200
    );
    let login = vendor.origin.last();
    assert_eq!(login.target, "/auth/login");
    assert!(login.header("content-type").starts_with("application/json"));
    let body: serde_json::Value = serde_json::from_slice(&login.body).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"username": "dispatch", "password": "pw-dispatch-123"})
    );
    let injected = s.api.last().header("authorization");
    assert!(injected.starts_with("Bearer tt-"), "{injected}");
    s.proxy.stop().await;
}

#[tokio::test]
async fn account_id_is_sent_as_an_integer() {
    let options = LoginOptions {
        accounts: vec![42],
        ..LoginOptions::default()
    };
    let (s, vendor) = setup_with(options, "    account_id: 42\n").await;
    assert_eq!(
        s.proxy.client().get(&s.url).send().await.unwrap().status(),
        200
    );
    let ids = vendor.account_ids.lock().unwrap().clone();
    assert_eq!(ids.len(), 1);
    assert!(ids[0].is_i64(), "account_id is a JSON integer: {}", ids[0]);
    assert_eq!(ids[0], 42);
    s.proxy.stop().await;
}

#[tokio::test]
async fn refresh_token_is_used_before_expiry() {
    let (s, vendor) = default_setup().await;
    lifecycle::refreshes_before_expiry(&s, LoginOptions::default().lifetime).await;
    assert_eq!(vendor.logins(), 1, "one login, then refreshes only");
    assert!(vendor.refreshes() >= 2, "refreshes: {}", vendor.refreshes());
    assert_eq!(vendor.refused_refreshes(), 0);
    let refresh = vendor
        .origin
        .requests()
        .into_iter()
        .rfind(|r| r.target == "/auth/refresh")
        .unwrap();
    let body: serde_json::Value = serde_json::from_slice(&refresh.body).unwrap();
    assert!(body["refresh_token"].as_str().unwrap().starts_with("rt-"));
    assert!(body.get("password").is_none(), "no password on refresh");
    s.proxy.stop().await;
}

async fn refused_refresh_falls_back_to_login(options: LoginOptions) {
    let (s, vendor) = setup_with(options, "").await;
    let client = s.proxy.client();
    assert_eq!(client.get(&s.url).send().await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(150)).await;
    vendor.refresh_book.revoke_all();
    vendor.book.revoke_all();
    let res = client.post(&s.url).body("payload").send().await.unwrap();
    assert_eq!(res.status(), 200);
    let echoed: serde_json::Value = res.json().await.unwrap();
    assert_eq!(echoed["body"], "payload");
    assert_eq!(vendor.refused_refreshes(), 1, "the refresh token was tried");
    assert_eq!(vendor.logins(), 2, "then a fresh login, in the same fetch");
    // The new refresh token works again.
    tokio::time::sleep(Duration::from_millis(150)).await;
    vendor.book.revoke_all();
    assert_eq!(client.get(&s.url).send().await.unwrap().status(), 200);
    assert_eq!(vendor.refreshes(), 1);
    assert_eq!(vendor.logins(), 2);
    s.proxy.stop().await;
}

#[tokio::test]
async fn revoked_refresh_token_falls_back_to_login() {
    refused_refresh_falls_back_to_login(LoginOptions::default()).await;
}

#[tokio::test]
async fn success_false_refresh_falls_back_to_login() {
    refused_refresh_falls_back_to_login(LoginOptions {
        soft_refusals: true,
        ..LoginOptions::default()
    })
    .await;
}

#[tokio::test]
async fn expired_refresh_token_is_not_tried() {
    let options = LoginOptions {
        refresh_lifetime: Duration::from_millis(300),
        ..LoginOptions::default()
    };
    let (s, vendor) = setup_with(options, "").await;
    let client = s.proxy.client();
    assert_eq!(client.get(&s.url).send().await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(client.get(&s.url).send().await.unwrap().status(), 200);
    assert_eq!(vendor.logins(), 2);
    assert_eq!(vendor.refreshes() + vendor.refused_refreshes(), 0);
    s.proxy.stop().await;
}

#[tokio::test]
async fn form_bodies_and_renamed_fields_for_look_alikes() {
    let options = LoginOptions {
        send_expiration: false,
        names: Names {
            username: "user",
            password: "pass",
            account_id: "acct",
            refresh_request: "rt",
            token: "access",
            token_expiration: "unused_exp",
            token_lifetime: "ttl",
            refresh_token: "renew",
            refresh_token_expiration: "renew_until",
        },
        accounts: vec![7],
        ..LoginOptions::default()
    };
    let extra = "    account_id: 7\n    body: form\n    scheme: Token\n    fields:\n      request: {username: user, password: pass, account_id: acct, refresh_token: rt}\n      response: {token: access, token_lifetime: ttl, refresh_token: renew, refresh_token_expiration: renew_until}\n";
    let (s, vendor) = setup_with(options, extra).await;
    // The API expects the configured scheme.
    let api = protected_api(vendor.book.clone(), "authorization", "Token", 401).await;
    s.proxy
        .write_config(&support::with_test_listen(&config(&vendor, &api, extra)));
    s.proxy.state().reload().unwrap();
    let url = format!("{}/api/vehicles", api.url());
    let client = s.proxy.client();
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    let login = vendor.origin.last();
    assert_eq!(
        login.header("content-type"),
        "application/x-www-form-urlencoded"
    );
    let form: HashMap<String, String> = serde_urlencoded::from_bytes(&login.body).unwrap();
    assert_eq!(form["user"], "dispatch");
    assert_eq!(form["acct"], "7");
    tokio::time::sleep(Duration::from_millis(150)).await;
    vendor.book.revoke_all();
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    assert_eq!(vendor.refreshes(), 1, "renamed refresh token used");
    s.proxy.stop().await;
}

#[tokio::test]
async fn wrong_password_and_config_debug_leak_no_secret() {
    let vendor = login::start(LoginOptions::default()).await;
    let api = protected_api(vendor.book.clone(), "authorization", "Bearer", 401).await;
    let env = [("TT_PASSWORD", "wrong-pw-555")];
    let proxy = support::proxy_with_env(&config(&vendor, &api, ""), &env).await;
    let res = proxy
        .client()
        .get(format!("{}/api/vehicles", api.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["credential"], "teletracker");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("Invalid username or password"), "{detail}");
    assert!(!detail.contains("wrong-pw-555"));
    let env_map: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let loaded = authrelay::Config::load(&proxy.config_path, &env_map).unwrap();
    let debug = format!("{loaded:?}");
    assert!(
        debug.contains("teletracker") && !debug.contains("wrong-pw-555"),
        "{debug}"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_refused_refresh_token_is_not_sent_again_while_login_fails() {
    let (s, vendor) = default_setup().await;
    let client = s.proxy.client();
    assert_eq!(client.get(&s.url).send().await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(150)).await;
    vendor.refresh_book.revoke_all();
    vendor.book.revoke_all();
    vendor
        .counts
        .failing_logins
        .store(2, std::sync::atomic::Ordering::SeqCst);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut failures = 0;
    loop {
        assert!(std::time::Instant::now() < deadline, "did not recover");
        match client.get(&s.url).send().await.unwrap().status().as_u16() {
            200 => break,
            502 | 401 => failures += 1,
            other => panic!("unexpected status {other}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(failures >= 1);
    assert_eq!(
        vendor.refused_refreshes(),
        1,
        "the dead refresh token was sent once"
    );
    assert_eq!(vendor.logins(), 2);
    s.proxy.stop().await;
}

#[tokio::test]
async fn success_false_on_the_password_login_is_a_final_refusal() {
    let options = LoginOptions {
        soft_refusals: true,
        password: "another-password".into(),
        ..LoginOptions::default()
    };
    let (s, vendor) = setup_with(options, "").await;
    let res = s.get().await;
    assert_eq!(res.status(), 502);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["refused"], true, "{body}");
    let status = &authrelay::admin::credentials(s.proxy.state())[0];
    assert_eq!(status.state, "rejected");
    assert_eq!(
        vendor
            .counts
            .refused_logins
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    s.proxy.stop().await;
}
