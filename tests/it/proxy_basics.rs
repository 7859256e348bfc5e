//! The request path with a static credential: forward and mount forms, unmatched policy,
//! host-matching tricks, header hygiene, errors.

use crate::support::{self, server};

fn static_routes(origin: &str, host_rule: &str) -> String {
    format!(
        r#"
unmatched: pass
credentials:
  outseta_api:
    type: static
    value: "Outseta ${{KEY}}:${{SECRET}}"
routes:
  - name: outseta-admin
    host: "{host_rule}"
    path_prefix: /api/v1/
    methods: [GET, POST, PUT]
    credential: outseta_api
  - name: outseta-mount
    mount: /outseta
    upstream: {origin}
    credential: outseta_api
"#
    )
}

#[tokio::test]
async fn absolute_form_request_gets_the_static_header() {
    let origin = server::echo_origin().await;
    let proxy = support::proxy_with_env(
        &static_routes(&origin.url(), &origin.addr.to_string()),
        &[("KEY", "k1"), ("SECRET", "s1")],
    )
    .await;
    let res = proxy
        .client()
        .get(format!("{}/api/v1/profile?x=1", origin.url()))
        .header("Authorization", "Bearer client-supplied")
        // A virtual host the route does not name, on the route's own address.
        .header("Host", "other-tenant.test")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "ok");
    let seen = origin.last();
    assert_eq!(seen.target, "/api/v1/profile?x=1");
    assert_eq!(seen.header("authorization"), "Outseta k1:s1");
    assert_eq!(seen.headers.get_all("authorization").iter().count(), 1);
    assert_eq!(
        seen.headers.get_all("host").iter().collect::<Vec<_>>(),
        [&origin.addr.to_string()],
        "the upstream gets the Host of the URI routed, never the client's"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn mount_form_request_strips_the_prefix_and_gets_the_header() {
    let origin = server::echo_origin().await;
    let proxy = support::proxy_with_env(
        &static_routes(&origin.url(), &origin.addr.to_string()),
        &[("KEY", "k"), ("SECRET", "s")],
    )
    .await;
    let res = support::direct_client()
        .put(format!("{}/outseta/api/v1/people/1?expand=*", proxy.url()))
        .body("{\"a\":1}")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let seen = origin.last();
    assert_eq!(seen.method, "PUT");
    assert_eq!(seen.target, "/api/v1/people/1?expand=*");
    assert_eq!(seen.header("authorization"), "Outseta k:s");
    assert_eq!(
        seen.header("host"),
        origin.addr.to_string(),
        "Host names the upstream"
    );
    assert_eq!(&seen.body[..], b"{\"a\":1}");

    let res = support::direct_client()
        .get(format!("{}/elsewhere/x", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 404);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"], "no_route");
    proxy.stop().await;
}

#[tokio::test]
async fn unmatched_traffic_passes_without_credential() {
    let origin = server::echo_origin().await;
    let proxy = support::proxy_with_env(
        &static_routes(&origin.url(), &origin.addr.to_string()),
        &[("KEY", "k"), ("SECRET", "s")],
    )
    .await;
    let client = proxy.client();
    // Outside the path prefix, and a method the route does not list.
    let res = client
        .get(format!("{}/api/v2/profile", origin.url()))
        .header("Authorization", "Basic own")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(
        origin.last().header("authorization"),
        "Basic own",
        "the client's own header is untouched"
    );
    let res = client
        .delete(format!("{}/api/v1/profile", origin.url()))
        .header("Host", "other-tenant.test")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(origin.last().header("authorization"), "");
    assert_eq!(origin.last().header("host"), origin.addr.to_string());
    proxy.stop().await;
}

#[tokio::test]
async fn unmatched_traffic_is_denied_when_configured() {
    let origin = server::echo_origin().await;
    let yaml = static_routes(&origin.url(), &origin.addr.to_string())
        .replace("unmatched: pass", "unmatched: deny");
    let proxy = support::proxy_with_env(&yaml, &[("KEY", "k"), ("SECRET", "s")]).await;
    let res = proxy
        .client()
        .get(format!("{}/api/v2/profile", origin.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"], "unmatched_denied");
    assert_eq!(origin.count(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn host_tricks_never_match_the_route() {
    let origin = server::echo_origin().await;
    let yaml = static_routes(&origin.url(), "acme.outseta.com")
        .replace("unmatched: pass", "unmatched: deny");
    let proxy = support::proxy_with_env(&yaml, &[("KEY", "k"), ("SECRET", "s")]).await;
    for url in [
        "http://acme.outseta.com.evil.test/api/v1/x",
        "http://evil.test/?acme.outseta.com",
        "http://evil.test/api/v1/acme.outseta.com",
        "http://xacme.outseta.com/api/v1/x",
    ] {
        let res = crate::raw::send(
            proxy.addr,
            &format!("GET {url} HTTP/1.1\r\nHost: acme.outseta.com\r\n\r\n"),
        )
        .await;
        assert!(res.starts_with("HTTP/1.1 403"), "{url}: {res}");
        assert!(res.contains("unmatched_denied"), "{url}: {res}");
    }
    // User info that names the host: refused outright.
    let res = crate::raw::send(
        proxy.addr,
        "GET http://acme.outseta.com@evil.test/api/v1/x HTTP/1.1\r\nHost: evil.test\r\n\r\n",
    )
    .await;
    assert!(res.starts_with("HTTP/1.1 400"), "{res}");
    assert_eq!(origin.count(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn hop_by_hop_and_proxy_headers_are_stripped() {
    let origin = server::echo_origin().await;
    let proxy = support::proxy_with_env(
        &static_routes(&origin.url(), &origin.addr.to_string()),
        &[("KEY", "k"), ("SECRET", "s")],
    )
    .await;
    let request = format!(
        "GET http://{}/api/v1/x HTTP/1.1\r\nHost: {}\r\nConnection: keep-alive, X-Hop\r\nX-Hop: secret-hop\r\n\
         Keep-Alive: timeout=5\r\nProxy-Authorization: Basic cHJveHk6cHc=\r\nProxy-Connection: keep-alive\r\n\
         TE: trailers\r\nUpgrade: websocket\r\nX-End: kept\r\n\r\n",
        origin.addr, origin.addr
    );
    let res = crate::raw::send(proxy.addr, &request).await;
    assert!(res.starts_with("HTTP/1.1 200"), "{res}");
    let seen = origin.last();
    for gone in [
        "x-hop",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "upgrade",
    ] {
        assert!(
            !seen.headers.contains_key(gone),
            "{gone} reached the upstream"
        );
    }
    assert_eq!(seen.header("x-end"), "kept");
    assert_eq!(seen.header("authorization"), "Outseta k:s");
    proxy.stop().await;
}

#[tokio::test]
async fn bad_requests_get_400() {
    let origin = server::echo_origin().await;
    let proxy = support::proxy_with_env(
        &static_routes(&origin.url(), &origin.addr.to_string()),
        &[("KEY", "k"), ("SECRET", "s")],
    )
    .await;
    let garbage = crate::raw::send(proxy.addr, "GARBAGE\r\n\r\n").await;
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
    let dots = crate::raw::send(
        proxy.addr,
        &format!(
            "GET http://{}/api/v1/../admin HTTP/1.1\r\nHost: x\r\n\r\n",
            origin.addr
        ),
    )
    .await;
    assert!(
        dots.starts_with("HTTP/1.1 400") && dots.contains("dot segments"),
        "{dots}"
    );
    let ftp = crate::raw::send(
        proxy.addr,
        "GET ftp://127.0.0.1/x HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(ftp.starts_with("HTTP/1.1 400"), "{ftp}");
    assert_eq!(origin.count(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn unreachable_upstream_is_502_and_slow_upstream_is_504() {
    let slow = server::serve(|_| async {
        tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        server::respond(200, "late")
    })
    .await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let yaml = format!(
        r#"
timeouts:
  upstream: 300ms
credentials:
  c:
    type: static
    value: "Token t"
routes:
  - name: dead
    mount: /dead
    upstream: http://{closed}
    credential: c
  - name: slow
    mount: /slow
    upstream: {}
    credential: c
"#,
        slow.url()
    );
    let proxy = support::proxy(&yaml).await;
    let res = support::direct_client()
        .get(format!("{}/dead/x", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"], "upstream_unreachable");
    assert_eq!(body["route"], "dead");
    let res = support::direct_client()
        .get(format!("{}/slow/x", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 504);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"], "upstream_timeout");
    assert!(!body.to_string().contains("Token t"));
    proxy.stop().await;
}
