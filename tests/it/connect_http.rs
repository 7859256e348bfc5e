//! Plain HTTP inside a CONNECT tunnel (what undici does for `http://` URLs): served request by
//! request like forward-proxy traffic — route, injection, refresh-and-replay — on the route's
//! port even when it is not in `connect.allowed_ports`; other bytes to such a port are not
//! tunnelled, and unrouted hosts keep the old rules.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support;
use crate::support::lifecycle::TEST_TOKENS_YAML;
use crate::support::vendor::{protected_api, TokenBook};
use crate::support::vendors::oauth2::{self, OAuth2Vendor};

/// An HTTP/1.1 client speaking through an open tunnel.
async fn http_through(stream: TcpStream) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

async fn send(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    method: &str,
    path: &str,
    body: &str,
) -> (u16, String) {
    let request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "api.test")
        .header("authorization", "Bearer from-the-client")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn plain_http_in_a_tunnel_to_a_routed_host_gets_the_credential_and_the_replay() {
    let book = TokenBook::new();
    let mut vendor = OAuth2Vendor::new("cid", "csecret");
    vendor.access_lifetime = std::time::Duration::from_secs(30);
    let token_endpoint = oauth2::start(Arc::clone(&book), vendor).await;
    let api = protected_api(Arc::clone(&book), "authorization", "Bearer", 401).await;
    let yaml = format!(
        "{TEST_TOKENS_YAML}unmatched: deny\n\
         credentials:\n  oa:\n    type: oauth2_client_credentials\n    token_url: {}/v1/oauth/access_token\n\
         \x20   client_id: cid\n    client_secret: csecret\n\
         routes:\n  - name: api\n    host: api.test\n    upstream: {}\n    credential: oa\n",
        token_endpoint.url(),
        api.url()
    );
    let proxy = support::proxy(&yaml).await;

    // Port 80 is not in the default allowed_ports ([443]), but the route names the host.
    let (stream, head) = support::connect_tunnel(&proxy, "api.test:80").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut sender = http_through(stream).await;
    let (status, body) = send(&mut sender, "GET", "/v1/me", "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(book.token_calls(), 1);

    // A second request on the same tunnel, after the vendor revoked every token: refreshed
    // once and replayed with its body; the client never sees the 401.
    book.revoke_all();
    let (status, body) = send(&mut sender, "POST", "/v1/items", "replay me in the tunnel").await;
    assert_eq!(status, 200, "{body}");
    let echoed: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echoed["body"], "replay me in the tunnel");
    assert_eq!(book.token_calls(), 2, "one refresh");
    assert_eq!(book.api_stats().1, 1, "one request was refused upstream");
    proxy.stop().await;
}

#[tokio::test]
async fn a_routed_port_outside_allowed_ports_carries_only_http() {
    // The routed host:port is a raw TCP echo: a blind tunnel to it would echo the bytes back.
    let echo = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let echo_addr = echo.local_addr().unwrap();
    let received: Arc<std::sync::Mutex<Vec<u8>>> = Arc::default();
    let record = Arc::clone(&received);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            let record = Arc::clone(&record);
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    record.lock().unwrap().extend_from_slice(&buf[..n]);
                    if s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let yaml = format!(
        "credentials:\n  key:\n    type: static\n    value: \"Bearer k\"\n\
         routes:\n  - name: api\n    host: \"{echo_addr}\"\n    credential: key\n"
    );
    let proxy = support::proxy(&yaml).await;
    let authority = echo_addr.to_string();

    // Bytes that are neither HTTP nor TLS to a port only the route opens (not in
    // `allowed_ports`): the tunnel is closed, nothing is relayed.
    for first in [&b"\x00\x01binary"[..], &b"\x16\x03\x01\x00\x05hello"[..]] {
        let (mut stream, head) = support::connect_tunnel(&proxy, &authority).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        stream.write_all(first).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(std::time::Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("the proxy closes the tunnel")
            .unwrap_or(0);
        assert_eq!(n, 0, "nothing comes back through the tunnel");
    }
    assert!(
        received.lock().unwrap().is_empty(),
        "nothing reached the routed port"
    );

    // An unrouted host on a port outside allowed_ports keeps the old rule.
    let (_s, head) = support::connect_tunnel(&proxy, "other.test:80").await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    proxy.stop().await;
}
