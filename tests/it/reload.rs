//! Hot reload: a new file replaces routes without losing a request; a bad file is refused
//! and the running config stays.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::{self, server};

fn config(origin: &str, value: &str) -> String {
    format!(
        r#"
credentials:
  c:
    type: static
    value: "Token {value}"
routes:
  - name: r
    host: 127.0.0.1
    upstream: {origin}
    credential: c
"#
    )
}

#[tokio::test]
async fn hundred_reloads_under_load_lose_no_request() {
    let origin = server::echo_origin().await;
    let v1 = support::with_test_listen(&config(&origin.url(), "v1"));
    let v2 = support::with_test_listen(&config(&origin.url(), "v2"));
    let proxy = support::proxy(&v1).await;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..4 {
        let client = proxy.client();
        let url = format!("{}/x", origin.url());
        let (stop, done) = (Arc::clone(&stop), Arc::clone(&done));
        workers.push(tokio::spawn(async move {
            let mut failures = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match client.get(&url).send().await {
                    Ok(r) if r.status() == 200 => {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => failures.push(format!("status {}", r.status())),
                    Err(e) => failures.push(e.to_string()),
                }
            }
            failures
        }));
    }
    for i in 0..100 {
        proxy.write_config(if i % 2 == 0 { &v2 } else { &v1 });
        proxy.state().reload().expect("valid config reloads");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let failures = w.await.unwrap();
        assert!(failures.is_empty(), "lost requests: {failures:?}");
    }
    assert!(
        done.load(Ordering::Relaxed) >= 100,
        "traffic flowed during the reloads"
    );
    let seen: std::collections::HashSet<String> = origin
        .requests()
        .iter()
        .map(|s| s.header("authorization"))
        .collect();
    assert_eq!(
        seen,
        ["Token v1", "Token v2"].map(String::from).into(),
        "every request had one of the two values"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn a_bad_file_is_refused_with_its_location_and_the_old_routes_stay() {
    let origin = server::echo_origin().await;
    let proxy = support::proxy(&config(&origin.url(), "old")).await;
    proxy.write_config("listen: 127.0.0.1:0\nroutes:\n  - name: r\n    hots: typo\n");
    let err = proxy.state().reload().expect_err("refused").to_string();
    assert!(
        err.contains("unknown field `hots`") && err.contains("line 4 column 5"),
        "{err}"
    );
    proxy.write_config(&support::with_test_listen(&config(
        &origin.url(),
        "${MISSING_VAR}",
    )));
    let err = proxy.state().reload().expect_err("refused").to_string();
    assert!(err.contains("`MISSING_VAR` is not set"), "{err}");
    let res = proxy
        .client()
        .get(format!("{}/x", origin.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(origin.last().header("authorization"), "Token old");
    proxy.stop().await;
}

#[tokio::test]
async fn the_watched_file_is_reloaded_when_it_changes() {
    let origin = server::echo_origin().await;
    let proxy = support::watched_proxy(&config(&origin.url(), "before")).await;
    let client = proxy.client();
    let url = format!("{}/x", origin.url());
    client.get(&url).send().await.unwrap();
    assert_eq!(origin.last().header("authorization"), "Token before");
    proxy.write_config(&support::with_test_listen(&config(&origin.url(), "after")));
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        client.get(&url).send().await.unwrap();
        if origin.last().header("authorization") == "Token after" {
            break;
        }
        assert!(Instant::now() < deadline, "the change was not picked up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    proxy.stop().await;
}

#[tokio::test]
async fn unchanged_credentials_keep_their_slot_across_reloads() {
    let origin = server::echo_origin().await;
    let yaml = config(&origin.url(), "same");
    let proxy = support::proxy(&yaml).await;
    let before = Arc::clone(&proxy.state().snapshot().slots["c"]);
    proxy.write_config(&support::with_test_listen(&format!(
        "{yaml}  - name: extra\n    host: other.test\n    credential: c\n"
    )));
    proxy.state().reload().unwrap();
    let snapshot = proxy.state().snapshot();
    assert_eq!(snapshot.routes.len(), 2);
    assert!(
        Arc::ptr_eq(&before, &snapshot.slots["c"]),
        "same definition, same slot (and cached token)"
    );
    proxy.write_config(&support::with_test_listen(&config(
        &origin.url(),
        "changed",
    )));
    proxy.state().reload().unwrap();
    assert!(!Arc::ptr_eq(&before, &proxy.state().snapshot().slots["c"]));
    proxy.stop().await;
}

#[tokio::test]
async fn a_reload_keeps_cached_tokens_of_unchanged_credentials_only() {
    use crate::support::vendor::{protected_api, TokenBook};
    use crate::support::vendors::oauth2::{self, OAuth2Vendor};

    let book = TokenBook::new();
    let mut vendor = OAuth2Vendor::new("cid", "csecret");
    vendor.access_lifetime = Duration::from_secs(60);
    let token_endpoint = oauth2::start(Arc::clone(&book), vendor).await;
    let api = protected_api(Arc::clone(&book), "authorization", "Bearer", 401).await;
    let yaml = |scope: &str, extra_route: bool| {
        let mut y = support::with_test_listen(&format!(
            "credentials:\n  oa:\n    type: oauth2_client_credentials\n    token_url: {}/v1/oauth/access_token\n    client_id: cid\n    client_secret: csecret\n    scope: {scope}\nroutes:\n  - name: api\n    mount: /api\n    upstream: {}\n    credential: oa\n",
            token_endpoint.url(),
            api.url()
        ));
        if extra_route {
            y.push_str("  - name: extra\n    host: extra.test\n    credential: oa\n");
        }
        y
    };
    let proxy = support::proxy(&yaml("read", false)).await;
    let url = format!("{}/api/v1/x", proxy.url());
    let get = || async {
        support::direct_client()
            .get(&url)
            .send()
            .await
            .unwrap()
            .status()
    };
    assert_eq!(get().await, 200);
    assert_eq!(book.token_calls(), 1);

    proxy.write_config(&yaml("read", true));
    proxy.state().reload().unwrap();
    assert_eq!(get().await, 200);
    assert_eq!(
        book.token_calls(),
        1,
        "unchanged credential: cached token kept"
    );

    proxy.write_config(&yaml("write", true));
    proxy.state().reload().unwrap();
    assert_eq!(get().await, 200);
    assert_eq!(book.token_calls(), 2, "changed credential: new token");
    proxy.stop().await;
}
