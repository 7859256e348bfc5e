//! The admin actions under a hostile caller, one table per family: a web page's cross-site
//! POSTs (the admin is on loopback without `admin_token`, the documented default) reach no
//! token endpoint; a burst of legitimate POSTs makes one token call; a refused secret is not
//! sent again before its backoff ends, whichever action asks.

use std::sync::Arc;

use crate::support::vendor::TokenBook;
use crate::support::{self, metric, Proxy};
use crate::token_admin::{itsyou_proxy, strict_token_endpoint};

fn admin_url(proxy: &Proxy) -> String {
    format!(
        "http://{}",
        proxy.running.as_ref().unwrap().admin_addr.unwrap()
    )
}

async fn admin_metrics(proxy: &Proxy) -> String {
    support::direct_client()
        .get(format!("{}/metrics", admin_url(proxy)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn credential_state(proxy: &Proxy) -> String {
    let body = support::direct_client()
        .get(format!("{}/credentials", admin_url(proxy)))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let list: serde_json::Value = serde_json::from_str(&body).unwrap();
    list[0]["state"].as_str().unwrap().to_string()
}

fn actions(action: &str, outcome: &str) -> String {
    format!("authrelay_admin_actions_total{{action=\"{action}\",outcome=\"{outcome}\"}}")
}

#[tokio::test]
async fn actions_sent_by_web_pages_are_refused_and_reach_no_token_endpoint() {
    let book = TokenBook::new();
    let (proxy, _vendor, _api) = itsyou_proxy(&book, "").await;
    let admin = admin_url(&proxy);
    // A token in hand, so that an invalidate that got through would show (state `empty`).
    let res = support::direct_client()
        .get(format!("{}/api/x", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(book.token_calls(), 1);

    // What browsers send on a cross-site form POST or fetch; any `Origin` counts, even the
    // admin's own.
    let own_origin = admin.clone();
    let browser_marks: [&[(&str, &str)]; 7] = [
        &[
            ("origin", "http://evil.test"),
            ("content-type", "text/plain"),
        ],
        &[("origin", "null")],
        &[("origin", &own_origin)],
        &[("sec-fetch-site", "cross-site")],
        &[("sec-fetch-site", "same-site")],
        &[
            ("sec-fetch-site", "cross-site"),
            ("sec-fetch-mode", "no-cors"),
        ],
        &[
            ("origin", "http://evil.test"),
            ("sec-fetch-site", "same-origin"),
        ],
    ];
    let client = support::direct_client();
    let mut sent = 0;
    while sent < 100 {
        for marks in browser_marks {
            for action in ["refresh", "invalidate"] {
                let mut request = client
                    .post(format!("{admin}/credentials/itsyou/{action}"))
                    .body("x=1");
                for (name, value) in marks {
                    request = request.header(*name, *value);
                }
                let res = request.send().await.unwrap();
                assert_eq!(res.status(), 403, "{action} with {marks:?}");
                let body: serde_json::Value = res.json().await.unwrap();
                assert_eq!(body["error"], "cross_origin_refused", "{body}");
                sent += 1;
            }
        }
    }
    assert_eq!(
        book.token_calls(),
        1,
        "no cross-site POST reached the vendor"
    );
    assert_eq!(credential_state(&proxy).await, "valid");
    let metrics = admin_metrics(&proxy).await;
    let refused = metric(&metrics, &actions("refresh", "cross_origin_refused"))
        + metric(&metrics, &actions("invalidate", "cross_origin_refused"));
    assert_eq!(refused, sent as f64, "{metrics}");

    // What curl, scripts and a user typing the URL send is served.
    for site in [None, Some("none"), Some("same-origin")] {
        tokio::time::sleep(authrelay::admin::ACTION_INTERVAL).await;
        let mut request = client.post(format!("{admin}/credentials/itsyou/refresh"));
        if let Some(site) = site {
            request = request.header("sec-fetch-site", site);
        }
        assert_eq!(request.send().await.unwrap().status(), 200, "{site:?}");
    }
    assert_eq!(book.token_calls(), 4);
    proxy.stop().await;
}

#[tokio::test]
async fn a_burst_of_refreshes_makes_one_token_call_and_the_rest_wait_their_turn() {
    let book = TokenBook::new();
    let (proxy, _vendor, _api) = itsyou_proxy(&book, "").await;
    let url = format!("{}/credentials/itsyou/refresh", admin_url(&proxy));
    let burst: Vec<_> = (0..10)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move {
                let res = support::direct_client().post(url).send().await.unwrap();
                let status = res.status().as_u16();
                let retry_after = res
                    .headers()
                    .get("retry-after")
                    .map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
                let body: serde_json::Value = res.json().await.unwrap();
                (status, retry_after, body)
            })
        })
        .collect();
    let mut answers = Vec::new();
    for answer in burst {
        answers.push(answer.await.unwrap());
    }
    let done = answers.iter().filter(|(s, _, _)| *s == 200).count();
    assert_eq!(done, 1, "{answers:?}");
    for (status, retry_after, body) in answers.iter().filter(|(s, _, _)| *s != 200) {
        assert_eq!(*status, 429, "{body}");
        assert_eq!(*retry_after, Some(1), "{body}");
        assert_eq!(body["error"], "admin_action_rate_limited");
        assert_eq!(body["credential"], "itsyou");
    }
    assert_eq!(book.token_calls(), 1);
    let metrics = admin_metrics(&proxy).await;
    assert_eq!(metric(&metrics, &actions("refresh", "done")), 1.0);
    assert_eq!(metric(&metrics, &actions("refresh", "rate_limited")), 9.0);
    proxy.stop().await;
}

#[tokio::test]
async fn a_refused_secret_is_not_sent_again_by_any_action_during_its_backoff() {
    let book = TokenBook::new();
    let endpoint = strict_token_endpoint(Arc::clone(&book), "right-secret").await;
    let yaml = format!(
        "admin: 127.0.0.1:0\ntokens:\n  backoff_initial: 100ms\n  backoff_max: 1h\ncredentials:\n  vendor:\n    type: oauth2_client_credentials\n    token_url: {}/token\n    client_id: relay\n    client_secret: wrong-secret\nroutes:\n  - name: api\n    mount: /api\n    upstream: http://127.0.0.1:9\n    credential: vendor\n",
        endpoint.url(),
    );
    let proxy = support::proxy(&yaml).await;
    let client = support::direct_client();
    let res = client
        .get(format!("{}/api/x", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502);
    assert_eq!(book.token_calls(), 1);
    assert_eq!(credential_state(&proxy).await, "rejected");

    // Each row is one action; each must leave the vendor alone and keep the backoff (an
    // invalidate that lifted it would let the next request send the secret again).
    let admin = admin_url(&proxy);
    let rows = ["refresh", "invalidate", "refresh", "invalidate", "refresh"];
    for action in rows {
        let res = client
            .post(format!("{admin}/credentials/vendor/{action}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 503, "{action}");
        let retry_after: u64 = res.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(
            retry_after > 60,
            "{action}: the backoff is an hour, not {retry_after} s"
        );
        let body = res.text().await.unwrap();
        assert!(!body.contains("wrong-secret"), "{body}");
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["error"], "credential_refused", "{action}: {body}");
        assert_eq!(body["credential"], "vendor");
        let res = client
            .get(format!("{}/api/x", proxy.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 502, "after {action}");
    }
    assert_eq!(book.token_calls(), 1, "the refused secret was sent once");
    assert_eq!(credential_state(&proxy).await, "rejected");
    let metrics = admin_metrics(&proxy).await;
    assert_eq!(
        metric(&metrics, &actions("refresh", "refused_backing_off")),
        3.0
    );
    assert_eq!(
        metric(&metrics, &actions("invalidate", "refused_backing_off")),
        2.0
    );
    proxy.stop().await;
}
