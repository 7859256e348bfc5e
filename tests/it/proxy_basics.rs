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
        &static_routes(&origin.url(), "127.0.0.1"),
        &[("KEY", "k1"), ("SECRET", "s1")],
    )
    .await;
    let res = proxy
        .client()
        .get(format!("{}/api/v1/profile?x=1", origin.url()))
        .header("Authorization", "Bearer client-supplied")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "ok");
    let seen = origin.last();
    assert_eq!(seen.target, "/api/v1/profile?x=1");
    assert_eq!(seen.header("authorization"), "Outseta k1:s1");
    assert_eq!(seen.headers.get_all("authorization").iter().count(), 1);
    proxy.stop().await;
}
