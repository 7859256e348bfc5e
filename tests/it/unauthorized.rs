//! 401/403 from upstream, decided by what the upstream said: a refused token is refreshed and
//! the request replayed however young the token; a refusal that no token cures (a missing
//! permission, `insufficient_scope`) costs a bounded handful of token calls and reaches the
//! client as the upstream sent it; other routes on the credential are not disturbed.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use authrelay::Config;

use crate::support::lifecycle::TEST_TOKENS_YAML;
use crate::support::server::{self, Origin, Seen};
use crate::support::vendor::{accepted, protected_api, TokenBook};
use crate::support::vendors::oauth2::{self as vendor, OAuth2Vendor};
use crate::support::{self, metric, Proxy};

const CLIENT_ID: &str = "relay";
const CLIENT_SECRET: &str = "relay-secret";

/// The bearer token of a request, if it carries a valid one in `book`.
fn valid_token(book: &TokenBook, seen: &Seen) -> bool {
    seen.header("authorization")
        .split_once(' ')
        .is_some_and(|(scheme, token)| {
            scheme.eq_ignore_ascii_case("bearer") && book.is_valid(token)
        })
}

/// An API where the token is fine but lacks a permission: a valid token gets `status` with
/// `challenge` (if any) and the vendor's own body; an invalid one gets 401 `invalid_token`.
async fn refusing_api(
    book: Arc<TokenBook>,
    status: u16,
    challenge: Option<&'static str>,
) -> Origin {
    server::serve(move |seen: Seen| {
        let book = Arc::clone(&book);
        async move {
            if !valid_token(&book, &seen) {
                let mut r = server::json(401, serde_json::json!({"Message": "Unauthorized"}));
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
                return r;
            }
            let mut r = server::json(
                status,
                serde_json::json!({"Message": "the token lacks the `admin` permission"}),
            );
            if let Some(c) = challenge {
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static(c),
                );
            }
            r
        }
    })
    .await
}

/// An API that answers an expired or revoked token with 403, as TeleTracker does, adding
/// `challenge` when given.
async fn forbidding_api(book: Arc<TokenBook>, challenge: Option<&'static str>) -> Origin {
    server::serve(move |seen: Seen| {
        let book = Arc::clone(&book);
        async move {
            if valid_token(&book, &seen) {
                return accepted(&seen);
            }
            let mut r = server::json(403, serde_json::json!({"Message": "Token expired"}));
            if let Some(c) = challenge {
                r.headers_mut().insert(
                    http::header::WWW_AUTHENTICATE,
                    http::HeaderValue::from_static(c),
                );
            }
            r
        }
    })
    .await
}

/// The ItsYou-like OAuth2 vendor issuing one-minute tokens, and a proxy whose credential
/// `itsyou` uses it, with `routes` (YAML list items) appended.
async fn proxy_with(book: &Arc<TokenBook>, routes: &str) -> (Proxy, Origin) {
    let mut settings = OAuth2Vendor::new(CLIENT_ID, CLIENT_SECRET);
    settings.access_lifetime = Duration::from_secs(60);
    let token_server = vendor::start(Arc::clone(book), settings).await;
    let yaml = format!(
        "admin: 127.0.0.1:0\n{TEST_TOKENS_YAML}credentials:\n  itsyou:\n    type: oauth2_client_credentials\n    token_url: {}/v1/oauth/access_token\n    client_id: {CLIENT_ID}\n    client_secret: {CLIENT_SECRET}\nroutes:\n{routes}",
        token_server.url()
    );
    (support::proxy(&yaml).await, token_server)
}

fn mount(name: &str, api: &Origin, extra: &str) -> String {
    format!(
        "  - name: {name}\n    mount: /{name}\n    upstream: {}\n    credential: itsyou\n{extra}",
        api.url()
    )
}

fn retries(proxy: &Proxy, route: &str) -> f64 {
    let text = proxy.state().metrics.encode();
    ["success", "failed", "unavailable"]
        .iter()
        .map(|outcome| {
            metric(
                &text,
                &format!("authrelay_unauthorized_retries_total{{route=\"{route}\",credential=\"itsyou\",outcome=\"{outcome}\"}}"),
            )
        })
        .sum()
}

#[tokio::test]
async fn tokens_revoked_right_after_a_refresh_are_refreshed_and_posts_replayed() {
    let book = TokenBook::new();
    let api = protected_api(Arc::clone(&book), "authorization", "Bearer", 401).await;
    let (proxy, _vendor) = proxy_with(&book, &mount("api", &api, "")).await;
    let client = support::direct_client();
    let url = format!("{}/api/orders", proxy.url());
    for delay in [
        Duration::ZERO,
        Duration::from_millis(100),
        Duration::from_secs(2),
    ] {
        // A refresh: the previous token is revoked, so this GET is refreshed and replayed.
        book.revoke_all();
        let res = client.get(&url).send().await.unwrap();
        assert_eq!(res.status(), 200, "refresh before {delay:?}");
        tokio::time::sleep(delay).await;
        book.revoke_all();
        let before = book.token_calls();
        let body: String = "relay-ü€\r\n".chars().cycle().take(20_000).collect();
        let res = client.post(&url).body(body.clone()).send().await.unwrap();
        assert_eq!(res.status(), 200, "revoked {delay:?} after a refresh");
        let echoed: serde_json::Value = res.json().await.unwrap();
        assert_eq!(
            echoed["body"].as_str().unwrap(),
            body,
            "replayed byte for byte"
        );
        assert_eq!(book.token_calls() - before, 1, "one refresh ({delay:?})");
    }
    let seen = api.requests();
    let posts: Vec<&Seen> = seen.iter().filter(|s| s.method == "POST").collect();
    assert_eq!(
        posts.len(),
        6,
        "each POST sent twice: refused, then replayed"
    );
    for pair in posts.chunks(2) {
        assert_eq!(
            pair[0].body, pair[1].body,
            "the upstream saw the same bytes twice"
        );
        assert_ne!(
            pair[0].header("authorization"),
            pair[1].header("authorization")
        );
    }
    proxy.stop().await;
}

#[tokio::test]
async fn refusals_no_token_cures_cost_a_bounded_handful_of_token_calls() {
    let book = TokenBook::new();
    let forbidden = refusing_api(Arc::clone(&book), 403, None).await;
    let scope = refusing_api(
        Arc::clone(&book),
        401,
        Some("Bearer realm=\"api\", error=\"insufficient_scope\", scope=\"admin\""),
    )
    .await;
    let good = protected_api(Arc::clone(&book), "authorization", "Bearer", 401).await;
    let routes = format!(
        "{}{}{}",
        mount("forbidden", &forbidden, "    refresh_on: [401, 403]\n"),
        mount("scope", &scope, ""),
        mount("good", &good, "")
    );
    let (proxy, _vendor) = proxy_with(&book, &routes).await;
    let client = support::direct_client();
    let base = proxy.url();

    // 10 requests a second for 20 seconds on each route.
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let end = Instant::now() + Duration::from_secs(20);
    let mut rounds = 0;
    while Instant::now() < end {
        tick.tick().await;
        let (f, s, g) = tokio::join!(
            client.get(format!("{base}/forbidden/x")).send(),
            client.get(format!("{base}/scope/x")).send(),
            client.get(format!("{base}/good/x")).send(),
        );
        let (f, s, g) = (f.unwrap(), s.unwrap(), g.unwrap());
        assert_eq!(f.status(), 403, "round {rounds}");
        assert_eq!(s.status(), 401, "round {rounds}");
        assert!(s.headers()["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("insufficient_scope"));
        assert_eq!(
            g.status(),
            200,
            "round {rounds}: the other route is not disturbed"
        );
        for res in [f, s] {
            let body: serde_json::Value = res.json().await.unwrap();
            assert_eq!(body["Message"], "the token lacks the `admin` permission");
        }
        rounds += 1;
    }
    assert!(rounds >= 150, "{rounds} rounds");
    let calls = book.token_calls();
    assert!(calls <= 4, "{calls} token calls for {rounds} rounds");
    assert_eq!(
        retries(&proxy, "scope"),
        0.0,
        "insufficient_scope is never refreshed"
    );
    assert_eq!(retries(&proxy, "good"), 0.0);
    assert_eq!(
        book.api_stats().1,
        0,
        "the good route never sent a refused token"
    );
    let status = proxy.state().snapshot().slots["itsyou"].status();
    assert_eq!(status.quiet_routes, ["forbidden"], "{status:?}");
    proxy.stop().await;
}

#[tokio::test]
async fn a_403_is_a_refused_token_where_the_route_or_the_upstream_says_so() {
    let book = TokenBook::new();
    let silent = forbidding_api(Arc::clone(&book), None).await;
    let explicit = forbidding_api(Arc::clone(&book), Some("Bearer error=\"invalid_token\"")).await;
    let routes = format!(
        "{}{}{}",
        mount("teletracker", &silent, "    refresh_on: [401, 403]\n"),
        mount("plain", &silent, ""),
        mount("explicit", &explicit, "")
    );
    let (proxy, _vendor) = proxy_with(&book, &routes).await;
    let client = support::direct_client();
    let base = proxy.url();
    assert_eq!(
        client
            .get(format!("{base}/plain/x"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    book.revoke_all();
    let res = client.get(format!("{base}/plain/x")).send().await.unwrap();
    assert_eq!(
        res.status(),
        403,
        "a bare 403 is a permission answer by default"
    );
    assert_eq!(book.token_calls(), 1);

    let res = client
        .get(format!("{base}/teletracker/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "refresh_on: [401, 403]");
    assert_eq!(book.token_calls(), 2);

    book.revoke_all();
    let res = client
        .get(format!("{base}/explicit/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "403 with error=\"invalid_token\"");
    assert_eq!(book.token_calls(), 3);
    proxy.stop().await;
}

#[tokio::test]
async fn a_route_where_refreshing_helped_again_refreshes_at_once() {
    // A useless refresh starts a quiet period only for that route; a success ends it.
    let book = TokenBook::new();
    let api = protected_api(Arc::clone(&book), "authorization", "Bearer", 401).await;
    let (proxy, _vendor) = proxy_with(&book, &mount("api", &api, "")).await;
    let client = support::direct_client();
    let url = format!("{}/api/x", proxy.url());
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    for _ in 0..5 {
        book.revoke_all();
        assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    }
    assert_eq!(book.token_calls(), 6, "one refresh per revocation");
    proxy.stop().await;
}

#[test]
fn removed_and_misused_settings_are_explained() {
    let env = std::collections::HashMap::<String, String>::new();
    let err = Config::from_yaml(
        "tokens:\n  min_reject_age: 1s\n",
        Path::new("routes.yaml"),
        &env,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("tokens.min_reject_age: was removed"), "{err}");
    assert!(err.contains("refresh_on"), "{err}");

    let err = Config::from_yaml(
        "credentials:\n  c:\n    type: static\n    value: x\nroutes:\n  - name: r\n    mount: /r\n    upstream: http://127.0.0.1:9\n    credential: c\n    refresh_on: [403]\n",
        Path::new("routes.yaml"),
        &env,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("refresh_on: must be [401] or [401, 403]"),
        "{err}"
    );
}

/// The gap an early refresh leaves: a request sent with T1 is still in flight when T2 is
/// fetched (proactively, or here by an operator), then the vendor revokes both. The 401 on
/// T1 is replayed with T2, which is refused too — but T2 was never fetched in answer to a
/// refusal, so that proves nothing about the route: one more refresh (T3), one more replay,
/// and the client gets 200 with its body. One token call for this request.
#[tokio::test]
async fn a_request_refused_after_an_early_refresh_is_refreshed_once_more() {
    let book = TokenBook::new();
    let release = Arc::new(tokio::sync::Notify::new());
    let held = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let api = {
        let (book, release, held) = (Arc::clone(&book), Arc::clone(&release), Arc::clone(&held));
        server::serve(move |seen: Seen| {
            let (book, release, held) =
                (Arc::clone(&book), Arc::clone(&release), Arc::clone(&held));
            async move {
                // The first request to /slow is answered only once the test says so, and
                // its token is judged then.
                if seen.target.ends_with("/slow")
                    && !held.swap(true, std::sync::atomic::Ordering::SeqCst)
                {
                    release.notified().await;
                }
                if valid_token(&book, &seen) {
                    accepted(&seen)
                } else {
                    server::json(401, serde_json::json!({"Message": "Unauthorized"}))
                }
            }
        })
        .await
    };
    let (proxy, _vendor) = proxy_with(&book, &mount("api", &api, "")).await;
    let client = support::direct_client();
    let base = proxy.url();
    assert_eq!(
        client
            .get(format!("{base}/api/warm"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let slow = tokio::spawn({
        let client = client.clone();
        let url = format!("{base}/api/slow");
        async move { client.post(url).body("order-1").send().await.unwrap() }
    });
    while api.count() < 2 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let slot = proxy.state().snapshot().slots["itsyou"].clone();
    slot.refresh_now().await.expect("T2");
    book.revoke_all();
    let before = book.token_calls();
    release.notify_one();
    let res = slow.await.unwrap();
    assert_eq!(res.status(), 200, "the client never sees the 401");
    let echoed: serde_json::Value = res.json().await.unwrap();
    assert_eq!(echoed["body"], "order-1");
    assert_eq!(
        book.token_calls() - before,
        1,
        "one refresh for this request"
    );
    let sent: Vec<String> = api
        .requests()
        .iter()
        .filter(|s| s.target.ends_with("/slow"))
        .map(|s| s.header("authorization"))
        .collect();
    assert_eq!(sent.len(), 3, "T1 refused, T2 refused, T3 accepted");
    assert!(sent[0] != sent[1] && sent[1] != sent[2] && sent[0] != sent[2]);
    proxy.stop().await;
}
