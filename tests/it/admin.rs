//! The admin listener: health, readiness, Prometheus metrics that move as traffic flows, and
//! the credentials view (expiry, failures, never a secret).

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use authrelay::credentials::{CredentialError, FetchFuture, Token, TokenSource};
use authrelay::vocab::secret::Secret;
use authrelay::{Config, Running, StartOptions};

use crate::support::lifecycle::TEST_TOKENS_YAML;
use crate::support::vendor::{protected_api, TokenBook};
use crate::support::{self, server};

/// A token source backed by the test vendor's book: each fetch issues a one-minute token,
/// or fails when the book has failures queued.
struct BookSource(Arc<TokenBook>);

impl TokenSource for BookSource {
    fn fetch<'a>(&'a self, _previous: Option<&'a Token>) -> FetchFuture<'a> {
        Box::pin(async move {
            if !self.0.token_call() {
                return Err(CredentialError::Rejected {
                    status: 401,
                    detail: "invalid_client".into(),
                });
            }
            let token = self.0.issue("adm", Duration::from_secs(60));
            Ok(Token {
                value: Secret::new(format!("Bearer {token}")),
                expires_at: Some(SystemTime::now() + Duration::from_secs(60)),
                refresh: None,
            })
        })
    }
}

async fn get(url: String) -> (u16, String, String) {
    let res = support::direct_client().get(url).send().await.unwrap();
    let status = res.status().as_u16();
    let content_type = res
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default();
    (status, content_type, res.text().await.unwrap())
}

/// The value of one metric line (`name{labels} value`), 0 when absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

async fn start(yaml: &str, env: &[(&str, &str)], prefetch: &[&str]) -> Running {
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let text = format!("listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\n{yaml}");
    let mut config = Config::from_yaml(&text, Path::new("routes.yaml"), &env).unwrap();
    for name in prefetch {
        config.credentials.get_mut(*name).unwrap().prefetch = true;
    }
    authrelay::start(
        config,
        StartOptions {
            config_path: None,
            env: Arc::new(env),
            watch: false,
        },
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn health_metrics_and_credentials_follow_static_traffic() {
    let origin = server::echo_origin().await;
    let secret = format!("s3cr3t-{:x}", rand::random::<u64>());
    let yaml = format!(
        "credentials:\n  api_key:\n    type: static\n    value: \"Key ${{SECRET}}\"\nroutes:\n  - name: echo\n    mount: /echo\n    upstream: {}\n    credential: api_key\n",
        origin.url()
    );
    let running = start(&yaml, &[("SECRET", &secret)], &[]).await;
    let admin = format!("http://{}", running.admin_addr.unwrap());
    let proxy = format!("http://{}", running.proxy_addr);

    assert_eq!(get(format!("{admin}/healthz")).await.0, 200);
    assert_eq!(get(format!("{admin}/healthz")).await.2.trim(), "ok");
    let (status, _, body) = get(format!("{admin}/readyz")).await;
    assert_eq!(status, 200, "{body}");

    let (status, content_type, before) = get(format!("{admin}/metrics")).await;
    assert_eq!(status, 200);
    assert!(
        content_type.starts_with("text/plain; version=0.0.4"),
        "{content_type}"
    );
    let ok_series = "authrelay_requests_total{route=\"echo\",class=\"2xx\"}";
    assert_eq!(metric(&before, ok_series), 0.0);

    let client = support::direct_client();
    for _ in 0..3 {
        let res = client.get(format!("{proxy}/echo/x")).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(
        origin.last().header("authorization"),
        format!("Key {secret}")
    );

    let after = get(format!("{admin}/metrics")).await.2;
    assert_eq!(metric(&after, ok_series), 3.0, "{after}");
    assert_eq!(
        metric(
            &after,
            "authrelay_upstream_latency_seconds_count{route=\"echo\"}"
        ),
        3.0
    );
    assert_eq!(
        metric(
            &after,
            "authrelay_token_fetches_total{credential=\"api_key\",outcome=\"success\"}"
        ),
        1.0
    );
    assert!(
        metric(&after, "authrelay_client_connections") >= 1.0,
        "the client's keep-alive connection is open: {after}"
    );
    assert!(after.contains("authrelay_tunnels "), "{after}");
    assert!(
        after.contains("\nauthrelay_access_log_dropped_total 0\n"),
        "{after}"
    );
    assert!(!after.contains(&secret));

    let (status, content_type, body) = get(format!("{admin}/credentials")).await;
    assert_eq!(status, 200);
    assert_eq!(content_type, "application/json");
    assert!(!body.contains(&secret), "{body}");
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list[0]["name"], "api_key");
    assert_eq!(list[0]["type"], "static");
    assert_eq!(list[0]["state"], "valid");
    assert!(list[0]["expires_at"].is_null());
    assert!(list[0]["last_refresh"].is_string());

    assert_eq!(get(format!("{admin}/nothing")).await.0, 404);
    let res = client
        .post(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 405);
    running.shutdown().await;
}

#[tokio::test]
async fn readiness_credentials_and_retry_metrics_track_a_refreshing_credential() {
    let book = TokenBook::new();
    let api = protected_api(Arc::clone(&book), "authorization", "Bearer", 401).await;
    let yaml = format!(
        "{TEST_TOKENS_YAML}credentials:\n  vendor:\n    type: static\n    value: placeholder\nroutes:\n  - name: api\n    mount: /api\n    upstream: {}\n    credential: vendor\n",
        api.url()
    );
    book.fail_next(3);
    let running = start(&yaml, &[], &[]).await;
    let mut config_prefetch = (*running.state.snapshot().config).clone();
    config_prefetch
        .credentials
        .get_mut("vendor")
        .unwrap()
        .prefetch = true;
    running.state.install(config_prefetch);
    running
        .state
        .use_source("vendor", Arc::new(BookSource(Arc::clone(&book))));
    let admin = format!("http://{}", running.admin_addr.unwrap());

    // The first fetches fail: not ready, and the credential says why.
    let deadline = Instant::now() + Duration::from_secs(5);
    let (failing, (status, _, body)) = loop {
        let answer = get(format!("{admin}/credentials")).await;
        if answer.2.contains("\"failing\"") || Instant::now() > deadline {
            break (answer.2, get(format!("{admin}/readyz")).await);
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let list: serde_json::Value = serde_json::from_str(&failing).unwrap();
    assert_eq!(list[0]["state"], "failing", "{failing}");
    assert_eq!(
        list[0]["last_error"],
        "token endpoint answered 401: invalid_client"
    );
    assert!(list[0]["consecutive_failures"].as_u64().unwrap() >= 1);
    assert_eq!(status, 503, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["ready"], false);
    assert_eq!(ready["not_ready"], serde_json::json!(["vendor"]));

    // Backoff ends, the keeper succeeds: ready, valid with an expiry.
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(format!("{admin}/readyz")).await.0 != 200 {
        assert!(Instant::now() < deadline, "never became ready");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let body = get(format!("{admin}/credentials")).await.2;
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(list[0]["state"], "valid", "{body}");
    assert!(list[0]["expires_at"].is_string());
    assert!(list[0]["fetches"].as_u64().unwrap() >= 3);

    // A revoked token: 401, refresh, replay — counted as a successful retry.
    let proxy = format!("http://{}", running.proxy_addr);
    let client = support::direct_client();
    book.revoke_all();
    let res = client.get(format!("{proxy}/api/x")).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let metrics = get(format!("{admin}/metrics")).await.2;
    assert_eq!(
        metric(
            &metrics,
            "authrelay_unauthorized_retries_total{route=\"api\",credential=\"vendor\",outcome=\"success\"}"
        ),
        1.0,
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "authrelay_token_fetches_total{credential=\"vendor\",outcome=\"failure\"}"
        ) >= 2.0
    );
    assert!(
        metric(
            &metrics,
            "authrelay_token_fetches_total{credential=\"vendor\",outcome=\"success\"}"
        ) >= 2.0
    );
    let body = get(format!("{admin}/credentials")).await.2;
    for token in ["adm-1", "adm-2", "adm-3", "adm-4"] {
        assert!(!body.contains(token), "{body}");
    }
    running.shutdown().await;
}

#[tokio::test]
async fn reload_outcomes_are_counted() {
    let origin = server::echo_origin().await;
    let proxy = support::proxy(&format!(
        "admin: 127.0.0.1:0\nroutes:\n  - name: echo\n    mount: /echo\n    upstream: {}\n",
        origin.url()
    ))
    .await;
    let admin = format!(
        "http://{}",
        proxy.running.as_ref().unwrap().admin_addr.unwrap()
    );
    proxy.write_config("routes: [\n");
    assert!(proxy.state().reload().is_err());
    proxy.write_config(&format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\nroutes:\n  - name: echo2\n    mount: /echo\n    upstream: {}\n",
        origin.url()
    ));
    proxy.state().reload().unwrap();
    let metrics = get(format!("{admin}/metrics")).await.2;
    assert_eq!(
        metric(
            &metrics,
            "authrelay_config_reloads_total{outcome=\"failure\"}"
        ),
        1.0
    );
    assert_eq!(
        metric(
            &metrics,
            "authrelay_config_reloads_total{outcome=\"success\"}"
        ),
        1.0
    );
    proxy.stop().await;
}

/// The admin endpoint's own limits: a client holding more idle connections than the cap
/// (some silent, some halfway through a request head) cannot keep liveness and readiness
/// probes out — a new connection makes room by closing the connection idle the longest — and
/// a client that sends no request head is disconnected (after 10 s) instead of holding a
/// connection forever.
#[tokio::test]
async fn probes_are_answered_while_a_client_holds_more_idle_connections_than_the_cap() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let running = start("routes: []\n", &[], &[]).await;
    let admin = running.admin_addr.unwrap();
    let mut held = Vec::new();
    for i in 0..40 {
        let mut stream = tokio::net::TcpStream::connect(admin).await.unwrap();
        if i % 4 == 0 {
            stream
                .write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0")
                .await
                .unwrap();
        }
        held.push(stream);
    }
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap();
    for path in ["/healthz", "/readyz", "/healthz"] {
        let res = client
            .get(format!("http://{admin}{path}"))
            .send()
            .await
            .unwrap_or_else(|e| panic!("{path} unanswered: {e}"));
        assert_eq!(res.status(), 200, "{path}");
    }

    // Every held connection ends: the oldest made room, the others ran out of time to send a
    // head; none got an answer.
    for (i, mut stream) in held.into_iter().enumerate() {
        let mut answer = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), stream.read_to_end(&mut answer))
            .await
            .unwrap_or_else(|_| panic!("held connection {i} was never closed"));
        drop(read);
        assert!(
            answer.is_empty(),
            "{i}: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    running.shutdown().await;
}
