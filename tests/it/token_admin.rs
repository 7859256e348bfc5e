//! The token slot as operators see and steer it: a secret the token endpoint refuses is
//! final (state `rejected`, slow retries, a 502 that says so), admin refresh and invalidate
//! (guarded by `admin_token` off loopback, never printing a token), the per-credential
//! gauges, reloads that keep cached tokens, a panicking token source and a client that gives
//! up while a fetch runs.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use authrelay::credentials::{CredentialError, FetchFuture, Token, TokenSource};
use authrelay::vocab::secret::Secret;
use authrelay::{Config, State};

use crate::support::lifecycle::TEST_TOKENS_YAML;
use crate::support::server::{self, Origin, Seen};
use crate::support::vendor::{protected_api, TokenBook};
use crate::support::vendors::oauth2::{self as vendor, OAuth2Vendor};
use crate::support::{self, metric, Proxy};

fn admin_url(proxy: &Proxy) -> String {
    format!(
        "http://{}",
        proxy.running.as_ref().unwrap().admin_addr.unwrap()
    )
}

async fn admin_get(proxy: &Proxy, path: &str) -> String {
    let url = format!("{}{path}", admin_url(proxy));
    support::direct_client()
        .get(url)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn admin_post(proxy: &Proxy, path: &str, token: Option<&str>) -> (u16, String) {
    let mut req = support::direct_client().post(format!("{}{path}", admin_url(proxy)));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let res = req.send().await.unwrap();
    (res.status().as_u16(), res.text().await.unwrap())
}

/// An RFC 6749 token endpoint that knows one client and answers anything else with
/// `401 {"error":"invalid_client"}`, counting calls in `book`.
pub async fn strict_token_endpoint(book: Arc<TokenBook>, secret: &'static str) -> Origin {
    server::serve(move |seen: Seen| {
        let book = Arc::clone(&book);
        async move {
            book.token_call();
            let form: HashMap<String, String> =
                serde_urlencoded::from_bytes(&seen.body).unwrap_or_default();
            if form.get("client_secret").map(String::as_str) != Some(secret) {
                return server::json(
                    401,
                    serde_json::json!({"error": "invalid_client", "error_description": "Client authentication failed"}),
                );
            }
            let token = book.issue("strict", Duration::from_secs(60));
            server::json(200, serde_json::json!({"access_token": token, "expires_in": 60}))
        }
    })
    .await
}

#[tokio::test]
async fn a_refused_client_secret_is_final_slow_and_said_so() {
    let book = TokenBook::new();
    let endpoint = strict_token_endpoint(Arc::clone(&book), "right-secret").await;
    let api = protected_api(Arc::clone(&book), "authorization", "Bearer", 401).await;
    let yaml = format!(
        "admin: 127.0.0.1:0\ntokens:\n  backoff_initial: 100ms\n  backoff_max: 1s\ncredentials:\n  vendor:\n    type: oauth2_client_credentials\n    token_url: {}/token\n    client_id: relay\n    client_secret: wrong-secret\nroutes:\n  - name: api\n    mount: /api\n    upstream: {}\n    credential: vendor\n",
        endpoint.url(),
        api.url()
    );
    let proxy = support::proxy(&yaml).await;
    let client = support::direct_client();
    let end = Instant::now() + Duration::from_millis(3300);
    let mut answers = 0;
    while Instant::now() < end {
        let res = client
            .get(format!("{}/api/x", proxy.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 502);
        assert!(res.headers().contains_key("retry-after"));
        let body = res.text().await.unwrap();
        assert!(!body.contains("wrong-secret"), "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"], "credential_unavailable");
        assert_eq!(body["credential"], "vendor");
        assert_eq!(body["refused"], true, "{body}");
        assert_eq!(body["vendor_error"], "invalid_client", "{body}");
        answers += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Fast exponential backoff would have called 6 times in 3.3 s (0.1, 0.2, 0.4, 0.8, 1 s
    // gaps); a refused secret waits `backoff_max` (1 s) between calls.
    let calls = book.token_calls();
    assert!(
        (2..=4).contains(&calls),
        "{calls} token calls for {answers} requests"
    );

    let list: serde_json::Value =
        serde_json::from_str(&admin_get(&proxy, "/credentials").await).unwrap();
    assert_eq!(list[0]["state"], "rejected", "{list}");
    assert!(list[0]["last_error"]
        .as_str()
        .unwrap()
        .contains("invalid_client"));
    let metrics = admin_get(&proxy, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "authrelay_credential_refused{credential=\"vendor\"}"
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "authrelay_credential_consecutive_failures{credential=\"vendor\"}"
        ),
        calls as f64
    );
    proxy.stop().await;
}

/// A proxy on loopback with the ItsYou-like vendor issuing 2-second tokens.
pub async fn itsyou_proxy(book: &Arc<TokenBook>, extra: &str) -> (Proxy, Origin, Origin) {
    let token_server =
        vendor::start(Arc::clone(book), OAuth2Vendor::new("relay", "relay-secret")).await;
    let api = protected_api(Arc::clone(book), "authorization", "Bearer", 401).await;
    let yaml = format!(
        "admin: 127.0.0.1:0\n{extra}{TEST_TOKENS_YAML}credentials:\n  itsyou:\n    type: oauth2_client_credentials\n    token_url: {}/v1/oauth/access_token\n    client_id: relay\n    client_secret: relay-secret\nroutes:\n  - name: api\n    mount: /api\n    upstream: {}\n    credential: itsyou\n",
        token_server.url(),
        api.url()
    );
    (
        support::proxy_with_env(&yaml, &[("ADMIN_TOKEN", "let-me-in")]).await,
        token_server,
        api,
    )
}

const USABLE: &str = "authrelay_credential_token_usable{credential=\"itsyou\"}";
const EXPIRES_IN: &str = "authrelay_credential_token_expires_in_seconds{credential=\"itsyou\"}";
const SINCE_FETCH: &str = "authrelay_credential_seconds_since_last_fetch{credential=\"itsyou\"}";

#[tokio::test]
async fn operators_refresh_and_invalidate_and_the_gauges_follow() {
    let book = TokenBook::new();
    let (proxy, _vendor, api) = itsyou_proxy(&book, "").await;
    let client = support::direct_client();
    let url = format!("{}/api/x", proxy.url());
    let mut admin_texts = Vec::new();

    let metrics = admin_get(&proxy, "/metrics").await;
    assert_eq!(metric(&metrics, USABLE), 0.0, "{metrics}");
    assert_eq!(metric(&metrics, SINCE_FETCH), f64::INFINITY, "{metrics}");
    admin_texts.push(metrics);

    // Refresh: fetches now and answers the expiry only.
    let (status, body) = admin_post(&proxy, "/credentials/itsyou/refresh", None).await;
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["credential"], "itsyou");
    assert!(answer["expires_at"].is_string(), "{body}");
    assert_eq!(book.token_calls(), 1);
    admin_texts.push(body);
    let metrics = admin_get(&proxy, "/metrics").await;
    assert_eq!(metric(&metrics, USABLE), 1.0, "{metrics}");
    let expires_in = metric(&metrics, EXPIRES_IN);
    assert!(expires_in > 0.0 && expires_in <= 2.0, "{metrics}");
    assert!(metric(&metrics, SINCE_FETCH) < 60.0, "{metrics}");
    admin_texts.push(metrics);

    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    assert_eq!(
        book.token_calls(),
        1,
        "the request used the refreshed token"
    );
    let first_token = api.last().header("authorization");

    // Invalidate: the cached token is dropped, the next request fetches. (Once the refresh's
    // turn is over: a credential takes one admin action per interval.)
    tokio::time::sleep(authrelay::admin::ACTION_INTERVAL).await;
    let (status, body) = admin_post(&proxy, "/credentials/itsyou/invalidate", None).await;
    assert_eq!(status, 200, "{body}");
    admin_texts.push(body);
    let list: serde_json::Value =
        serde_json::from_str(&admin_get(&proxy, "/credentials").await).unwrap();
    assert_eq!(list[0]["state"], "empty", "{list}");
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    assert_eq!(book.token_calls(), 2);
    let second_token = api.last().header("authorization");
    assert_ne!(first_token, second_token);

    // Without traffic the token expires: the gauges say so.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let metrics = admin_get(&proxy, "/metrics").await;
        if metric(&metrics, USABLE) == 0.0 {
            assert_eq!(metric(&metrics, EXPIRES_IN), 0.0, "{metrics}");
            assert!(metric(&metrics, SINCE_FETCH) > 1.0, "{metrics}");
            admin_texts.push(metrics);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the token never expired: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    assert_eq!(
        admin_post(&proxy, "/credentials/nope/refresh", None)
            .await
            .0,
        404
    );
    let res = client
        .get(format!("{}/credentials/itsyou/refresh", admin_url(&proxy)))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 405);
    assert_eq!(res.headers()["allow"], "POST");
    admin_texts.push(admin_get(&proxy, "/credentials").await);
    for text in &admin_texts {
        for token in [&first_token, &second_token] {
            let bare = token.split_once(' ').unwrap().1;
            assert!(!text.contains(bare), "a token was shown: {text}");
        }
    }
    proxy.stop().await;
}

#[tokio::test]
async fn admin_actions_need_the_admin_token_when_one_is_set_or_off_loopback() {
    let book = TokenBook::new();
    let (proxy, _vendor, _api) = itsyou_proxy(&book, "admin_token: ${ADMIN_TOKEN}\n").await;
    let path = "/credentials/itsyou/refresh";
    let (status, body) = admin_post(&proxy, path, None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(admin_post(&proxy, path, Some("guess")).await.0, 401);
    assert_eq!(book.token_calls(), 0);
    assert_eq!(admin_post(&proxy, path, Some("let-me-in")).await.0, 200);
    assert_eq!(book.token_calls(), 1);
    assert!(!admin_get(&proxy, "/credentials")
        .await
        .contains("let-me-in"));
    proxy.stop().await;

    // Off loopback without `admin_token`: reads work, actions are refused. The state is
    // built without listeners; nothing binds the wildcard address.
    let env = HashMap::<String, String>::new();
    let yaml = "admin: 0.0.0.0:9901\ncredentials:\n  key:\n    type: static\n    value: Bearer k\n";
    let config = Config::from_yaml(yaml, Path::new("routes.yaml"), &env).unwrap();
    let state = State::new(config, None, Arc::new(env.clone())).unwrap();
    let request = |method: &str, path: &str, token: Option<&str>| {
        let mut r = http::Request::builder().method(method).uri(path);
        if let Some(t) = token {
            r = r.header("authorization", format!("Bearer {t}"));
        }
        r.body(()).unwrap()
    };
    let refused = authrelay::admin::handle(
        &state,
        &request("POST", "/credentials/key/invalidate", None),
    )
    .await;
    assert_eq!(refused.status(), 403);
    let read = authrelay::admin::handle(&state, &request("GET", "/credentials", None)).await;
    assert_eq!(read.status(), 200);

    let yaml = format!("{yaml}admin_token: s3t\n");
    let config = Config::from_yaml(&yaml, Path::new("routes.yaml"), &env).unwrap();
    let state = State::new(config, None, Arc::new(env)).unwrap();
    let allowed = authrelay::admin::handle(
        &state,
        &request("POST", "/credentials/key/invalidate", Some("s3t")),
    )
    .await;
    assert_eq!(allowed.status(), 200);
    let refused = authrelay::admin::handle(
        &state,
        &request("POST", "/credentials/key/invalidate", Some("s3")),
    )
    .await;
    assert_eq!(refused.status(), 401);
}

#[tokio::test]
async fn changing_token_timing_keeps_cached_tokens() {
    let book = TokenBook::new();
    let (proxy, _vendor, _api) = itsyou_proxy(&book, "").await;
    let client = support::direct_client();
    let url = format!("{}/api/x", proxy.url());
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    assert_eq!(book.token_calls(), 1);
    let text = std::fs::read_to_string(&proxy.config_path).unwrap();
    proxy.write_config(&text.replace("backoff_max: 2s", "backoff_max: 3s\n  fetch_timeout: 7s"));
    proxy.state().reload().unwrap();
    assert_eq!(
        proxy.state().snapshot().config.tokens.backoff_max,
        Duration::from_secs(3)
    );
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    assert_eq!(
        book.token_calls(),
        1,
        "the cached token survived the reload"
    );
    proxy.stop().await;
}

/// A token source that panics on its first fetch, then issues tokens.
struct PanicsOnce {
    calls: AtomicUsize,
}

impl TokenSource for PanicsOnce {
    fn fetch<'a>(&'a self, _previous: Option<&'a Token>) -> FetchFuture<'a> {
        Box::pin(async move {
            if self.calls.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("a bug in a token source");
            }
            Ok::<_, CredentialError>(Token {
                value: Secret::new("Bearer fine"),
                expires_at: Some(SystemTime::now() + Duration::from_secs(60)),
                refresh: None,
            })
        })
    }
}

#[tokio::test]
async fn a_panicking_token_source_is_an_ordinary_failure() {
    let origin = server::echo_origin().await;
    let yaml = format!(
        "admin: 127.0.0.1:0\n{TEST_TOKENS_YAML}credentials:\n  flaky:\n    type: static\n    value: x\nroutes:\n  - name: api\n    mount: /api\n    upstream: {}\n    credential: flaky\n",
        origin.url()
    );
    let proxy = support::proxy(&yaml).await;
    proxy.state().use_source(
        "flaky",
        Arc::new(PanicsOnce {
            calls: AtomicUsize::new(0),
        }),
    );
    let client = support::direct_client();
    let url = format!("{}/api/x", proxy.url());
    let res = client.get(&url).send().await.unwrap();
    assert_eq!(res.status(), 502);
    let list: serde_json::Value =
        serde_json::from_str(&admin_get(&proxy, "/credentials").await).unwrap();
    assert_eq!(
        list[0]["state"], "failing",
        "not stuck in refreshing: {list}"
    );
    assert!(list[0]["last_error"].as_str().unwrap().contains("panic"));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = client.get(&url).send().await.unwrap().status();
        if status == 200 {
            break;
        }
        assert_eq!(status, 502);
        assert!(Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(origin.last().header("authorization"), "Bearer fine");
    proxy.stop().await;
}

/// A token source whose endpoint takes a while to answer.
struct Slow {
    calls: AtomicUsize,
}

impl TokenSource for Slow {
    fn fetch<'a>(&'a self, _previous: Option<&'a Token>) -> FetchFuture<'a> {
        Box::pin(async move {
            self.calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(400)).await;
            Ok::<_, CredentialError>(Token {
                value: Secret::new("Bearer slow"),
                expires_at: Some(SystemTime::now() + Duration::from_secs(60)),
                refresh: None,
            })
        })
    }
}

#[tokio::test]
async fn a_client_that_gives_up_does_not_cancel_the_fetch() {
    let origin = server::echo_origin().await;
    let yaml = format!(
        "{TEST_TOKENS_YAML}credentials:\n  slow:\n    type: static\n    value: x\nroutes:\n  - name: api\n    mount: /api\n    upstream: {}\n    credential: slow\n",
        origin.url()
    );
    let proxy = support::proxy(&yaml).await;
    let source = Arc::new(Slow {
        calls: AtomicUsize::new(0),
    });
    proxy.state().use_source("slow", source.clone());
    let url = format!("{}/api/x", proxy.url());
    let impatient = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_millis(50))
        .build()
        .unwrap();
    assert!(impatient.get(&url).send().await.is_err(), "gave up first");
    let slot = Arc::clone(&proxy.state().snapshot().slots["slow"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while slot.status().state != "valid" {
        assert!(Instant::now() < deadline, "stuck: {:?}", slot.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let res = support::direct_client().get(&url).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        source.calls.load(Ordering::SeqCst),
        1,
        "the first fetch finished"
    );
    proxy.stop().await;
}
