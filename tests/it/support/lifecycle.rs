//! The token lifecycle scenarios that every credential type must pass, written once and run
//! against each vendor's in-process server: first injection, refresh before expiry, refresh
//! and replay after revocation, single flight under a burst, backoff and recovery.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::server::Origin;
use super::vendor::TokenBook;
use super::Proxy;

/// Token timing for test configs: fast backoff (the defaults would slow every test down).
pub const TEST_TOKENS_YAML: &str = "tokens:\n  backoff_initial: 100ms\n  backoff_max: 2s\n";

/// One credential type wired up: proxy, vendor book, the vendor's protected API, and the URL
/// (through the proxy) of a protected resource.
pub struct Setup {
    pub proxy: Proxy,
    pub book: Arc<TokenBook>,
    pub api: Origin,
    /// Absolute URL of a protected resource, requested through the proxy.
    pub url: String,
    /// The credential's name in the config.
    pub credential: String,
    /// Token endpoint calls needed for one token (2 for flows that exchange a token).
    pub calls_per_token: usize,
}

impl Setup {
    /// A GET of the protected resource through the proxy.
    pub async fn get(&self) -> reqwest::Response {
        self.proxy.client().get(&self.url).send().await.unwrap()
    }
}

/// The first request obtains a token and reaches the API with it.
pub async fn first_request_gets_token(s: &Setup) {
    let before = s.book.token_calls();
    let res = s.proxy.client().get(&s.url).send().await.unwrap();
    assert_eq!(
        res.status(),
        200,
        "body: {}",
        res.text().await.unwrap_or_default()
    );
    assert_eq!(s.book.token_calls() - before, s.calls_per_token);
    assert_eq!(s.book.api_stats().1, 0, "the API never saw a bad token");
}

/// Under steady traffic for three token lifetimes, tokens are replaced before they expire:
/// every request succeeds and the API refuses nothing.
pub async fn refreshes_before_expiry(s: &Setup, lifetime: Duration) {
    let client = s.proxy.client();
    let before_calls = s.book.token_calls();
    let (_, rejected_before) = s.book.api_stats();
    let end = Instant::now() + lifetime * 3;
    let mut sent = 0;
    while Instant::now() < end {
        let res = client.get(&s.url).send().await.unwrap();
        assert_eq!(
            res.status(),
            200,
            "request {sent} failed: {}",
            res.text().await.unwrap_or_default()
        );
        sent += 1;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let (_, rejected_after) = s.book.api_stats();
    assert_eq!(
        rejected_after, rejected_before,
        "no request reached the API with an expired token"
    );
    let fetched = (s.book.token_calls() - before_calls) / s.calls_per_token;
    assert!(
        fetched >= 2,
        "tokens were refreshed during {sent} requests (fetched {fetched})"
    );
}

/// After the vendor revokes every token, a POST still succeeds for the client: the proxy
/// refreshes once and replays the body byte for byte.
pub async fn revoked_token_is_refreshed_and_body_replayed(s: &Setup) {
    let client = s.proxy.client();
    assert_eq!(client.get(&s.url).send().await.unwrap().status(), 200);
    s.book.revoke_all();
    let before = s.book.token_calls();
    let body: String = (0..50_000)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let res = client.post(&s.url).body(body.clone()).send().await.unwrap();
    assert_eq!(res.status(), 200);
    let echoed: serde_json::Value = res.json().await.unwrap();
    assert_eq!(echoed["method"], "POST");
    assert_eq!(
        echoed["body"].as_str().unwrap(),
        body,
        "body replayed byte for byte"
    );
    assert_eq!(
        s.book.token_calls() - before,
        s.calls_per_token,
        "exactly one refresh"
    );
}

/// `n` concurrent requests with no cached token cause exactly one token fetch.
pub async fn burst_causes_one_fetch(s: &Setup, n: usize) {
    let client = s.proxy.client();
    let before = s.book.token_calls();
    let mut tasks = Vec::new();
    for _ in 0..n {
        let client = client.clone();
        let url = s.url.clone();
        tasks.push(tokio::spawn(async move {
            client.get(&url).send().await.map(|r| r.status().as_u16())
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap().unwrap(), 200);
    }
    assert_eq!(
        s.book.token_calls() - before,
        s.calls_per_token,
        "single flight: one fetch for {n} requests"
    );
}

/// With the token endpoint failing `failures` times, clients get 502 JSON errors naming the
/// credential; attempts are spaced by growing gaps; then the proxy recovers by itself.
pub async fn failing_endpoint_backs_off_then_recovers(s: &Setup, failures: usize) {
    s.book.revoke_all();
    s.book.fail_next(failures);
    let client = s.proxy.client();
    let first_call = s.book.token_calls();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut errors = 0;
    loop {
        assert!(Instant::now() < deadline, "did not recover");
        let res = client.get(&s.url).send().await.unwrap();
        match res.status().as_u16() {
            200 => break,
            502 => {
                let body: serde_json::Value = res.json().await.unwrap();
                assert_eq!(body["error"], "credential_unavailable");
                assert_eq!(body["credential"], s.credential.as_str());
                assert!(body["detail"].as_str().is_some_and(|d| !d.is_empty()));
                errors += 1;
            }
            other => panic!("unexpected status {other}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        errors >= failures,
        "each failed attempt reached a client ({errors} errors)"
    );
    let times = s.book.token_call_times();
    let attempts: Vec<Instant> = times[first_call..].iter().step_by(1).copied().collect();
    assert!(attempts.len() > failures, "attempts: {}", attempts.len());
    let gaps: Vec<Duration> = attempts
        .windows(2)
        .map(|w| w[1] - w[0])
        .take(failures)
        .collect();
    for pair in gaps.windows(2) {
        assert!(pair[1] > pair[0], "gaps between attempts grow: {gaps:?}");
    }
    assert!(
        attempts.len() <= failures + s.calls_per_token + 1,
        "no hot loop: {} token calls for {failures} failures",
        attempts.len()
    );
}
