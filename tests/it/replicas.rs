//! Several replicas sharing one token through a real Redis (`token_cache: type: redis`):
//! one vendor call per token across replicas (cold start, early refresh, a revocation seen
//! by all), single-use refresh tokens used exactly once, Redis outages that fail no request,
//! nothing readable at rest, a restarted replica that needs no vendor call, replicas
//! whose credential or key differ never reading each other's tokens, and a Redis someone
//! else writes to: an older record put back is not taken, a value that is no record (another
//! type, too large, sealed otherwise) is replaced, and a lease that never ends holds a
//! request no longer than `tokens.fetch_timeout`.
//!
//! Each replica is an in-process authrelay with its own state, slots and Redis connections;
//! the vendor is the in-process TeleTracker-like login API, whose refresh tokens are
//! single-use and counted.

use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::support::lifecycle::TEST_TOKENS_YAML;
use crate::support::redis::{RedisOptions, RedisServer};
use crate::support::server::Origin;
use crate::support::vendor::protected_api;
use crate::support::vendors::login::{self, LoginOptions, LoginServer};
use crate::support::{self, Proxy};

const PASSWORD: &str = "pw-dispatch-123";
const CACHE_KEY: &str = "q1n0yF7l3bqk2JXk1pXkq0m8mB7c2fQkA6yO0u1ZxWg=";
const OTHER_KEY: &str = "0000000000000000000000000000000000000000000000000000000000000000";

struct Cluster {
    redis: RedisServer,
    vendor: LoginServer,
    api: Origin,
    replicas: Vec<Proxy>,
    yaml: String,
}

fn config(redis: &RedisServer, vendor: &LoginServer, api: &Origin, extra_cache: &str) -> String {
    format!(
        "{TEST_TOKENS_YAML}token_cache:\n  type: redis\n  url: {}\n  encryption_key: ${{CACHE_KEY}}\n{extra_cache}credentials:\n  teletracker:\n    type: login\n    login_url: {}\n    refresh_url: {}\n    username: dispatch\n    password: ${{TT_PASSWORD}}\nroutes:\n  - name: tt\n    host: {}\n    path_prefix: /api/\n    credential: teletracker\n",
        redis.url(),
        vendor.login_url(),
        vendor.refresh_url(),
        api.addr
    )
}

fn env<'a>(key: &'a str, redis_password: &'a str) -> [(&'a str, &'a str); 3] {
    [
        ("TT_PASSWORD", PASSWORD),
        ("CACHE_KEY", key),
        ("REDIS_PASSWORD", redis_password),
    ]
}

async fn cluster_with(options: LoginOptions, redis: RedisOptions, replicas: usize) -> Cluster {
    let extra = if redis.password.is_some() {
        "  password: ${REDIS_PASSWORD}\n"
    } else {
        ""
    };
    let redis_password = redis.password.clone().unwrap_or_default();
    let redis = RedisServer::start_with(redis);
    let vendor = login::start(options).await;
    let api = protected_api(vendor.book.clone(), "authorization", "Bearer", 401).await;
    let yaml = config(&redis, &vendor, &api, extra);
    let mut started = Vec::new();
    for _ in 0..replicas {
        started.push(support::proxy_with_env(&yaml, &env(CACHE_KEY, &redis_password)).await);
    }
    Cluster {
        redis,
        vendor,
        api,
        replicas: started,
        yaml,
    }
}

async fn cluster(lifetime: Duration, replicas: usize) -> Cluster {
    let options = LoginOptions {
        lifetime,
        ..LoginOptions::default()
    };
    cluster_with(options, RedisOptions::default(), replicas).await
}

impl Cluster {
    fn url(&self) -> String {
        format!("{}/api/vehicles", self.api.url())
    }

    /// `n` concurrent requests spread round-robin over the replicas; POSTs carry a body
    /// that the API echoes, so a replay that lost it shows. Returns (status, sent, echoed).
    async fn burst(&self, n: usize) -> Vec<(u16, String, String)> {
        let clients: Vec<reqwest::Client> = self.replicas.iter().map(Proxy::client).collect();
        let mut tasks = JoinSet::new();
        for i in 0..n {
            let client = clients[i % clients.len()].clone();
            let url = self.url();
            tasks.spawn(async move {
                let body = format!("order-{i}");
                let res = client.post(&url).body(body.clone()).send().await.unwrap();
                let status = res.status().as_u16();
                let json: serde_json::Value = res.json().await.unwrap_or_default();
                let echoed = json["body"].as_str().unwrap_or_default().to_string();
                (status, body, echoed)
            });
        }
        let mut all = Vec::new();
        while let Some(r) = tasks.join_next().await {
            all.push(r.unwrap());
        }
        all
    }

    /// Steady traffic from every replica (one request at a time each, 20 ms apart) for
    /// `period`; returns the statuses that were not 200.
    async fn steady(&self, period: Duration) -> Vec<u16> {
        let mut tasks = JoinSet::new();
        for proxy in &self.replicas {
            let client = proxy.client();
            let url = self.url();
            tasks.spawn(async move {
                let end = Instant::now() + period;
                let mut failed = Vec::new();
                while Instant::now() < end {
                    let status = client.get(&url).send().await.unwrap().status().as_u16();
                    if status != 200 {
                        failed.push(status);
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                failed
            });
        }
        let mut failed = Vec::new();
        while let Some(r) = tasks.join_next().await {
            failed.extend(r.unwrap());
        }
        failed
    }

    fn gauge(proxy: &Proxy) -> f64 {
        support::metric(&proxy.state().metrics.encode(), "authrelay_token_cache_up")
    }

    /// Waits (up to 10 s) until every replica's `authrelay_token_cache_up` is `value`.
    async fn gauges_become(&self, value: f64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.replicas.iter().all(|p| Self::gauge(p) == value) {
            assert!(
                Instant::now() < deadline,
                "token_cache_up never became {value} on every replica"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The Redis key of the stored token (there must be one).
    async fn token_key(&self) -> String {
        self.redis
            .dump()
            .await
            .iter()
            .map(|(k, _)| String::from_utf8_lossy(k).to_string())
            .find(|k| k.starts_with("authrelay:token:teletracker:"))
            .expect("a stored token")
    }

    fn origin(proxy: &Proxy) -> Option<&'static str> {
        authrelay::admin::credentials(proxy.state())[0].origin
    }
}

fn assert_all_ok(results: &[(u16, String, String)]) {
    for (status, sent, echoed) in results {
        assert_eq!(*status, 200, "a request failed");
        assert_eq!(sent, echoed, "the body reached the API as sent");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_burst_across_three_replicas_makes_one_token_call() {
    let c = cluster(Duration::from_secs(60), 3).await;
    let results = c.burst(300).await;
    assert_all_ok(&results);
    assert_eq!(
        c.vendor.book.token_calls(),
        1,
        "one login for all three replicas"
    );
    assert_eq!(c.vendor.logins(), 1);
    let origins: Vec<_> = c.replicas.iter().map(Cluster::origin).collect();
    assert_eq!(
        origins.iter().filter(|o| **o == Some("fetched")).count(),
        1,
        "exactly one replica fetched: {origins:?}"
    );
    assert_eq!(
        origins.iter().filter(|o| **o == Some("redis")).count(),
        2,
        "the others read it from Redis: {origins:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocation_seen_by_every_replica_causes_one_refresh() {
    let c = cluster(Duration::from_secs(60), 3).await;
    assert_all_ok(&c.burst(3).await);
    assert_eq!(c.vendor.book.token_calls(), 1);
    c.vendor.book.revoke_all();
    let results = c.burst(100).await;
    assert_all_ok(&results);
    assert_eq!(c.vendor.logins(), 1, "no second login");
    assert_eq!(
        c.vendor.refreshes(),
        1,
        "one refresh in total for 100 refused requests on 3 replicas"
    );
    assert_eq!(c.vendor.book.token_calls(), 2);
    let (_, rejected) = c.vendor.book.api_stats();
    assert!(rejected >= 3, "every replica did see a 401 ({rejected})");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_use_refresh_tokens_are_used_once_across_replicas() {
    let lifetime = Duration::from_millis(1500);
    let c = cluster(lifetime, 3).await;
    let failed = c.steady(lifetime * 5).await;
    assert!(failed.is_empty(), "failed requests: {failed:?}");
    assert_eq!(
        c.vendor.logins(),
        1,
        "one password login, then refreshes only"
    );
    assert_eq!(
        c.vendor.reused_refreshes(),
        0,
        "no refresh token used twice"
    );
    assert_eq!(c.vendor.refused_refreshes(), 0);
    assert!(
        c.vendor.refreshes() >= 4,
        "tokens were renewed each lifetime ({} refreshes)",
        c.vendor.refreshes()
    );
    // A 1.5 s token is renewed at half-life, so one replica alone would refresh about 10
    // times in 7.5 s; three replicas refreshing each on their own would refresh about 30.
    assert!(
        c.vendor.refreshes() <= 11,
        "{} refreshes in 5 lifetimes: one per renewal, not one per replica",
        c.vendor.refreshes()
    );
    let (_, rejected) = c.vendor.book.api_stats();
    assert_eq!(rejected, 0, "no replica ever sent an expired token");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_fails_no_request_and_the_gauge_follows() {
    let lifetime = Duration::from_millis(1500);
    let mut c = cluster(lifetime, 3).await;
    c.gauges_become(1.0).await;
    assert!(c.steady(lifetime).await.is_empty());
    c.redis.stop();
    // Two lifetimes without Redis: every replica has to renew on its own.
    let failed = c.steady(lifetime * 2).await;
    assert!(failed.is_empty(), "failed during the outage: {failed:?}");
    c.gauges_become(0.0).await;
    for p in &c.replicas {
        let text = p.state().metrics.encode();
        assert!(
            support::metric(&text, "authrelay_token_cache_fallbacks_total") >= 1.0,
            "fallbacks are counted"
        );
        let status = &authrelay::admin::credentials(p.state())[0];
        assert_eq!(status.cache.state, "down");
    }
    c.redis.resume();
    c.gauges_become(1.0).await;
    let failed = c.steady(lifetime * 2).await;
    assert!(failed.is_empty(), "failed after the restart: {failed:?}");
    // Back to sharing: the tokens the replicas renew go through the (new, empty) Redis.
    let stored = c.redis.dump().await;
    assert!(
        stored
            .iter()
            .any(|(k, _)| k.starts_with(b"authrelay:token:teletracker:")),
        "a token is stored again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_holds_no_token_or_secret_in_clear() {
    let lifetime = Duration::from_millis(1500);
    let options = LoginOptions {
        lifetime,
        ..LoginOptions::default()
    };
    let redis = RedisOptions {
        password: Some("redis-pass-7731".into()),
        tls: None,
    };
    let c = cluster_with(options, redis, 2).await;
    assert!(c.steady(lifetime * 2).await.is_empty());
    assert!(c.vendor.refreshes() >= 1, "a refresh token is in play");
    let stored = c.redis.dump().await;
    assert!(stored.len() >= 2, "a token and the key check: {stored:?}");
    let mut secrets: Vec<String> = c.vendor.book.issued();
    secrets.extend(c.vendor.refresh_book.issued());
    secrets.extend(
        [PASSWORD, CACHE_KEY, "redis-pass-7731", "dispatch"]
            .iter()
            .map(|s| s.to_string()),
    );
    let key_bytes = {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD
            .decode(CACHE_KEY)
            .unwrap()
    };
    for (key, value) in &stored {
        for blob in [key, value] {
            let text = String::from_utf8_lossy(blob);
            for secret in &secrets {
                assert!(
                    !text.contains(secret.as_str()),
                    "`{secret}` stored in clear"
                );
            }
            assert!(
                !blob.windows(key_bytes.len()).any(|w| w == key_bytes),
                "the raw key is stored"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_replica_serves_its_first_request_from_the_cache() {
    let mut c = cluster(Duration::from_secs(60), 1).await;
    assert_all_ok(&c.burst(1).await);
    assert_eq!(c.vendor.book.token_calls(), 1);
    let old = c.replicas.pop().unwrap();
    old.stop().await;
    let fresh = support::proxy_with_env(&c.yaml, &env(CACHE_KEY, "")).await;
    c.replicas.push(fresh);
    assert_all_ok(&c.burst(1).await);
    assert_eq!(
        c.vendor.book.token_calls(),
        1,
        "the restarted replica took the stored token"
    );
    assert_eq!(Cluster::origin(&c.replicas[0]), Some("redis"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_with_another_key_or_definition_never_read_the_token() {
    let c = cluster(Duration::from_secs(60), 1).await;
    assert_all_ok(&c.burst(1).await);
    assert_eq!(c.vendor.book.token_calls(), 1);
    // Another key: its fingerprint, its keys and its seal differ; it fetches its own.
    let other = support::proxy_with_env(&c.yaml, &env(OTHER_KEY, "")).await;
    let res = other.client().get(c.url()).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(c.vendor.book.token_calls(), 2);
    assert_eq!(Cluster::origin(&other), Some("fetched"));
    // And it says why the replicas do not share.
    let check = authrelay::commands::check_token_cache(other.state())
        .await
        .unwrap();
    let message = check.unwrap_err();
    assert!(message.contains("encryption_key differs"), "{message}");
    assert!(!message.contains(OTHER_KEY) && !message.contains(CACHE_KEY));
    // Same key, same name, another definition (a changed username): a new token.
    let changed = c.yaml.replace("username: dispatch", "username: dispatch2");
    let moved = support::proxy_with_env(&changed, &env(CACHE_KEY, "")).await;
    let res = moved.client().get(c.url()).send().await.unwrap();
    assert_eq!(res.status(), 502, "the vendor refuses dispatch2");
    assert_eq!(c.vendor.logins(), 2, "no stored token was taken for it");
    assert_eq!(
        c.vendor
            .counts
            .refused_logins
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "it asked the vendor with its own definition"
    );
    assert_eq!(Cluster::origin(&moved), None);
    let ok = authrelay::commands::check_token_cache(c.replicas[0].state())
        .await
        .unwrap();
    assert!(ok.unwrap().contains("encryption key matches"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushed_redis_is_refilled_without_a_failed_request() {
    let c = cluster(Duration::from_secs(60), 2).await;
    assert_all_ok(&c.burst(4).await);
    c.redis.flush().await;
    c.vendor.book.revoke_all();
    assert_all_ok(&c.burst(20).await);
    assert_eq!(c.vendor.logins(), 1);
    assert_eq!(
        c.vendor.refreshes(),
        1,
        "one refresh with the replica's own refresh token, then shared"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_redis_with_a_private_ca() {
    let ca = crate::support::tls::TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let (chain, key) = ca.leaf(&["127.0.0.1"]);
    let cert_path = dir.path().join("redis.pem");
    let key_path = dir.path().join("redis.key");
    let pem = |label: &str, der: &[u8]| {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    };
    std::fs::write(&cert_path, pem("CERTIFICATE", chain[0].as_ref())).unwrap();
    std::fs::write(&key_path, pem("PRIVATE KEY", key.secret_der())).unwrap();
    let ca_path = ca.write(dir.path(), "ca.pem");
    let options = RedisOptions {
        password: None,
        tls: Some((cert_path, key_path)),
    };
    let redis = RedisServer::start_with(options);
    let vendor = login::start(LoginOptions::default()).await;
    let api = protected_api(vendor.book.clone(), "authorization", "Bearer", 401).await;
    let extra = format!("  ca_file: {}\n", ca_path.display());
    let yaml = config(&redis, &vendor, &api, &extra);
    let a = support::proxy_with_env(&yaml, &env(CACHE_KEY, "")).await;
    let b = support::proxy_with_env(&yaml, &env(CACHE_KEY, "")).await;
    let url = format!("{}/api/vehicles", api.url());
    for p in [&a, &b] {
        let res = p.client().get(&url).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
    assert_eq!(vendor.book.token_calls(), 1, "shared over rediss://");
    assert_eq!(Cluster::origin(&b), Some("redis"));
    let ok = authrelay::commands::check_token_cache(b.state())
        .await
        .unwrap();
    assert!(ok.is_ok(), "{ok:?}");
    drop(redis);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_while_redis_is_down_serves_and_joins_later() {
    let mut c = cluster(Duration::from_secs(60), 0).await;
    c.redis.stop();
    let proxy = support::proxy_with_env(&c.yaml, &env(CACHE_KEY, "")).await;
    let res = proxy.client().get(c.url()).send().await.unwrap();
    assert_eq!(res.status(), 200, "no Redis, still served");
    assert_eq!(Cluster::origin(&proxy), Some("fetched"));
    c.replicas.push(proxy);
    c.gauges_become(0.0).await;
    c.redis.resume();
    c.gauges_become(1.0).await;
    assert!(c
        .redis
        .dump()
        .await
        .iter()
        .any(|(k, _)| k == b"authrelay:keycheck"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_moves_a_replica_from_memory_to_redis() {
    let c = cluster(Duration::from_secs(60), 0).await;
    let block = format!(
        "token_cache:\n  type: redis\n  url: {}\n  encryption_key: ${{CACHE_KEY}}\n",
        c.redis.url()
    );
    let memory = c.yaml.replace(&block, "");
    assert_ne!(memory, c.yaml);
    let a = support::proxy_with_env(&memory, &env(CACHE_KEY, "")).await;
    let status = &authrelay::admin::credentials(a.state())[0];
    assert_eq!(status.cache.kind, "memory");
    assert_eq!(a.client().get(c.url()).send().await.unwrap().status(), 200);
    assert_eq!(c.vendor.book.token_calls(), 1);
    a.write_config(&support::with_test_listen(&c.yaml));
    a.state().reload().expect("the redis config is accepted");
    assert_eq!(
        authrelay::admin::credentials(a.state())[0].cache.kind,
        "redis"
    );
    assert_eq!(a.client().get(c.url()).send().await.unwrap().status(), 200);
    assert_eq!(
        c.vendor.book.token_calls(),
        2,
        "a new slot in the shared cache"
    );
    let b = support::proxy_with_env(&c.yaml, &env(CACHE_KEY, "")).await;
    assert_eq!(b.client().get(c.url()).send().await.unwrap().status(), 200);
    assert_eq!(
        c.vendor.book.token_calls(),
        2,
        "the second replica shares it"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_left_by_a_dead_replica_expires() {
    let c = cluster(Duration::from_secs(60), 1).await;
    assert_all_ok(&c.burst(1).await);
    let token_key = c.token_key().await;
    let lease_key = token_key.replace(":token:", ":lease:");
    // A replica took the lease and died mid-fetch: its lease is there, no token.
    c.redis.command(&["DEL", &token_key]).await;
    c.redis
        .command(&["SET", &lease_key, "dead-replica", "PX", "1500"])
        .await;
    let fresh = support::proxy_with_env(&c.yaml, &env(CACHE_KEY, "")).await;
    let client = fresh.client();
    let url = c.url();
    let request = tokio::spawn(async move { client.get(&url).send().await.unwrap().status() });
    // Causality, not time: while the dead replica's lease is there, nobody calls the vendor.
    loop {
        let calls = c.vendor.book.token_calls();
        let lease = c.redis.command(&["GET", &lease_key]).await;
        if lease != redis::Value::BulkString(b"dead-replica".to_vec()) {
            break;
        }
        assert_eq!(
            calls, 1,
            "a vendor call while another replica held the lease"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(request.await.unwrap(), 200);
    assert_eq!(c.vendor.book.token_calls(), 2, "then it fetched, once");
    assert_eq!(Cluster::origin(&fresh), Some("fetched"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_token_is_not_taken_back_from_redis() {
    let c = cluster(Duration::from_secs(60), 2).await;
    assert_all_ok(&c.burst(2).await);
    assert_eq!(c.vendor.book.token_calls(), 1);
    let slot = c.replicas[0].state().snapshot().slots["teletracker"].clone();
    slot.invalidate();
    let res = c.replicas[0].client().get(c.url()).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        c.vendor.book.token_calls(),
        2,
        "the dropped token was not re-read"
    );
    assert_eq!(Cluster::origin(&c.replicas[0]), Some("fetched"));
    let later = support::proxy_with_env(&c.yaml, &env(CACHE_KEY, "")).await;
    assert_eq!(
        later.client().get(c.url()).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        c.vendor.book.token_calls(),
        2,
        "the new token is the shared one"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_record_is_replaced_not_obeyed() {
    let c = cluster(Duration::from_secs(60), 1).await;
    assert_all_ok(&c.burst(1).await);
    let token_key = c.token_key().await;
    c.redis
        .command(&["SET", &token_key, "\u{1}not a sealed record, Bearer forged"])
        .await;
    let second = support::proxy_with_env(&c.yaml, &env(CACHE_KEY, "")).await;
    assert_eq!(
        second.client().get(c.url()).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        c.vendor.book.token_calls(),
        2,
        "the corrupt record was not used"
    );
    let third = support::proxy_with_env(&c.yaml, &env(CACHE_KEY, "")).await;
    assert_eq!(
        third.client().get(c.url()).send().await.unwrap().status(),
        200
    );
    assert_eq!(
        c.vendor.book.token_calls(),
        2,
        "the lease holder replaced it, and the next replica took the new token"
    );
    assert!(c
        .api
        .requests()
        .iter()
        .all(|r| !r.header("authorization").contains("forged")));
}

/// Log output captured in memory (the test's runtime runs every task on its thread).
#[derive(Clone, Default)]
struct CapturedLogs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLogs {
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        support::route_logs_to_thread_subscribers();
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).to_string()
    }
}

/// Plants `commands` (`{key}` stands for the token key) where a replica stored its token,
/// then shows that the next replica's lease replaces it (one vendor call), that the one
/// after takes the new record (no vendor call), and that the log names what was found.
async fn an_unreadable_value_is_replaced(commands: &[&[&str]], found: &str) {
    let logs = CapturedLogs::default();
    let _guard = logs.install();
    let c = cluster(Duration::from_secs(60), 1).await;
    assert_all_ok(&c.burst(1).await);
    let token_key = c.token_key().await;
    for command in commands {
        let args: Vec<String> = command
            .iter()
            .map(|a| a.replace("{key}", &token_key))
            .collect();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        c.redis.command(&args).await;
    }
    let second = support::proxy_with_env(&c.yaml, &env(CACHE_KEY, "")).await;
    let res = second.client().get(c.url()).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        c.vendor.book.token_calls(),
        2,
        "the value was not taken for a token"
    );
    assert_eq!(
        Cluster::gauge(&second),
        1.0,
        "and Redis is not counted as down"
    );
    assert_eq!(
        c.redis.command(&["TYPE", &token_key]).await,
        redis::Value::SimpleString("string".into()),
        "replaced by a record"
    );
    let third = support::proxy_with_env(&c.yaml, &env(CACHE_KEY, "")).await;
    let res = third.client().get(c.url()).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        c.vendor.book.token_calls(),
        2,
        "sharing goes on: the next replica took the new record"
    );
    assert_eq!(Cluster::origin(&third), Some("redis"));
    let text = logs.text();
    assert!(
        text.contains("holds no readable record") && text.contains(found),
        "the log says what was found ({found}):\n{text}"
    );
    assert!(!text.contains("another replica wrote"), "{text}");
}

#[tokio::test]
async fn an_oversized_value_is_replaced_and_named_in_the_log() {
    let huge = "x".repeat(3 * 1024 * 1024);
    an_unreadable_value_is_replaced(&[&["SET", "{key}", &huge]], "too large").await;
}

#[tokio::test]
async fn a_value_of_another_type_is_replaced_and_named_in_the_log() {
    an_unreadable_value_is_replaced(
        &[&["DEL", "{key}"], &["RPUSH", "{key}", "a", "b"]],
        "wrong type (list",
    )
    .await;
}

#[tokio::test]
async fn a_record_that_does_not_open_is_named_in_the_log() {
    an_unreadable_value_is_replaced(
        &[&["SET", "{key}", "\u{1}not a sealed record"]],
        "does not open",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_older_record_put_back_is_never_taken() {
    let c = cluster(Duration::from_secs(60), 2).await;
    assert_all_ok(&c.burst(2).await);
    assert_eq!(c.vendor.book.token_calls(), 1, "generation 1, shared");
    let token_key = c.token_key().await;
    let first = c
        .redis
        .dump()
        .await
        .into_iter()
        .find(|(k, _)| *k == token_key.as_bytes())
        .map(|(_, v)| v)
        .unwrap();
    c.vendor.book.revoke_all();
    assert_all_ok(&c.burst(10).await);
    assert_eq!(c.vendor.book.token_calls(), 2, "generation 2, seen by both");
    // Someone with access to Redis (not to the key) puts the older sealed record back.
    c.redis.set_bytes(&token_key, &first).await;
    let (_, refused_before) = c.vendor.book.api_stats();
    for proxy in &c.replicas {
        proxy.state().snapshot().slots["teletracker"].invalidate();
        let res = proxy.client().get(c.url()).send().await.unwrap();
        assert_eq!(res.status(), 200);
    }
    let (_, refused_after) = c.vendor.book.api_stats();
    assert_eq!(
        refused_after, refused_before,
        "no replica sent the revoked generation-1 token"
    );
    assert_eq!(
        Cluster::origin(&c.replicas[0]),
        Some("fetched"),
        "the first replica fetched instead of taking the old record"
    );
    assert_eq!(c.vendor.book.token_calls(), 3, "once, for both replicas");
    assert_eq!(Cluster::origin(&c.replicas[1]), Some("redis"));
    assert_eq!(
        c.vendor.reused_refreshes(),
        0,
        "no refresh token used twice"
    );
    let stored = c.redis.dump().await;
    assert!(
        stored.iter().all(|(_, v)| *v != first),
        "the old record was replaced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_never_ends_holds_requests_no_longer_than_fetch_timeout() {
    let c = cluster(Duration::from_secs(60), 0).await;
    let yaml = c
        .yaml
        .replace("tokens:\n", "tokens:\n  fetch_timeout: 1s\n");
    assert_ne!(yaml, c.yaml);
    let first = support::proxy_with_env(&yaml, &env(CACHE_KEY, "")).await;
    assert_eq!(
        first.client().get(c.url()).send().await.unwrap().status(),
        200
    );
    let token_key = c.token_key().await;
    let lease_key = token_key.replace(":token:", ":lease:");
    let first_record = c
        .redis
        .dump()
        .await
        .into_iter()
        .find(|(k, _)| *k == token_key.as_bytes())
        .map(|(_, v)| v)
        .unwrap();
    // A writer took the lease and hangs: its lease outlives the whole test.
    c.redis.command(&["DEL", &token_key]).await;
    c.redis
        .command(&["SET", &lease_key, "stuck-writer", "PX", "600000"])
        .await;
    let late = support::proxy_with_env(&yaml, &env(CACHE_KEY, "")).await;
    let client = late.client();
    let requests = (0..5).map(|_| client.get(c.url()).send());
    // Not a measurement: the bound only tells fetch_timeout (1 s) from the former wait of
    // twice the lease, (1 s + 5 s) × 2.
    let answers = tokio::time::timeout(
        Duration::from_secs(8),
        futures_util::future::join_all(requests),
    )
    .await
    .expect("answered once fetch_timeout passed, not held for the lease");
    for answer in answers {
        assert_eq!(answer.unwrap().status(), 200);
    }
    assert_eq!(
        c.vendor.book.token_calls(),
        2,
        "the replica fetched alone, once for all its requests"
    );
    assert_eq!(Cluster::origin(&late), Some("fetched"));
    assert_eq!(
        c.redis.command(&["GET", &lease_key]).await,
        redis::Value::BulkString(b"stuck-writer".to_vec()),
        "the lease was not taken from its holder"
    );
    let text = late.state().metrics.encode();
    assert!(support::metric(&text, "authrelay_token_cache_fallbacks_total") >= 1.0);
    // The record of the first replica comes back, the writer is gone: it was issued before
    // the token the late replica fetched alone, so that replica does not go back to it.
    c.redis.set_bytes(&token_key, &first_record).await;
    c.redis.command(&["DEL", &lease_key]).await;
    late.state().snapshot().slots["teletracker"].invalidate();
    let res = late.client().get(c.url()).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        Cluster::origin(&late),
        Some("fetched"),
        "not the older record"
    );
    assert_eq!(c.vendor.book.token_calls(), 3);
}
