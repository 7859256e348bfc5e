//! WebSocket upgrades on routed requests: a vendor-like echo server that demands a valid
//! bearer token on the handshake; clients through the proxy in mount mode, forward mode
//! (absolute-form and through a CONNECT tunnel) and an intercepted TLS tunnel exchange 100
//! messages each, and a token revoked before the handshake is cured by one refresh.

use std::sync::{Arc, Mutex};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::support::lifecycle::TEST_TOKENS_YAML;
use crate::support::vendor::TokenBook;
use crate::support::vendors::oauth2::{self, OAuth2Vendor};
use crate::support::{self, Proxy};

/// An echo WebSocket server that accepts a handshake only with `Authorization: Bearer <t>`
/// for a token the vendor's book holds valid (401 otherwise), and only with its own address
/// as `Host` (421 otherwise). Returns its address and the handshakes it refused for their
/// token.
async fn echo_server(book: Arc<TokenBook>) -> (std::net::SocketAddr, Arc<Mutex<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let refused: Arc<Mutex<usize>> = Arc::default();
    let count = Arc::clone(&refused);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let book = Arc::clone(&book);
            let count = Arc::clone(&count);
            tokio::spawn(async move {
                // The callback's error type is tungstenite's, sized as it is.
                #[allow(clippy::result_large_err)]
                let check = |request: &Request, response: Response| {
                    // The client's Host (the route's name, or the proxy's) never comes
                    // through: the handshake must name this server.
                    let host = request.headers().get("host").and_then(|v| v.to_str().ok());
                    if host != Some(addr.to_string().as_str()) {
                        let mut refusal = ErrorResponse::new(Some("not this host".into()));
                        *refusal.status_mut() = http::StatusCode::MISDIRECTED_REQUEST;
                        return Err(refusal);
                    }
                    let token = request
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.strip_prefix("Bearer "));
                    if token.is_some_and(|t| book.is_valid(t)) {
                        Ok(response)
                    } else {
                        *count.lock().unwrap() += 1;
                        let mut refusal = ErrorResponse::new(Some("invalid token".into()));
                        *refusal.status_mut() = http::StatusCode::UNAUTHORIZED;
                        Err(refusal)
                    }
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(stream, check).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    if message.is_text() && ws.send(message).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, refused)
}

/// Sends 100 text messages and checks each echo.
async fn exchange<S>(ws: &mut WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    for i in 0..100 {
        let text = format!("message {i}");
        ws.send(Message::text(text.clone())).await.unwrap();
        let echoed = ws.next().await.expect("an echo").unwrap();
        assert_eq!(echoed.into_text().unwrap().as_str(), text);
    }
    ws.close(None).await.unwrap();
}

/// Opens a tunnel through the proxy; the proxy must answer 200.
async fn connect(proxy: &Proxy, authority: &str) -> TcpStream {
    let (s, head) = support::connect_tunnel(proxy, authority).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    s
}

struct Scene {
    proxy: Proxy,
    book: Arc<TokenBook>,
    refused: Arc<Mutex<usize>>,
    ca_pem: String,
    _dir: tempfile::TempDir,
}

async fn scene() -> Scene {
    let book = TokenBook::new();
    let mut vendor = OAuth2Vendor::new("cid", "csecret");
    vendor.access_lifetime = std::time::Duration::from_secs(60);
    let token_endpoint = oauth2::start(Arc::clone(&book), vendor).await;
    let (echo, refused) = echo_server(Arc::clone(&book)).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = authrelay::intercept::init_ca(&dir.path().join("ca"), false).unwrap();
    let yaml = format!(
        "{TEST_TOKENS_YAML}unmatched: deny\n\
         intercept_ca:\n  cert_file: {}\n  key_file: {}\n\
         credentials:\n  oa:\n    type: oauth2_client_credentials\n    token_url: {}/v1/oauth/access_token\n\
         \x20   client_id: cid\n    client_secret: csecret\n\
         routes:\n\
         \x20 - name: ws-forward\n    host: ws.test\n    upstream: http://{echo}\n    credential: oa\n\
         \x20 - name: ws-secure\n    host: wss.test\n    upstream: http://{echo}\n    credential: oa\n    intercept: true\n\
         \x20 - name: ws-mount\n    mount: /ws\n    upstream: http://{echo}\n    credential: oa\n",
        ca.cert.display(),
        ca.key.display(),
        token_endpoint.url(),
    );
    Scene {
        proxy: support::proxy(&yaml).await,
        book,
        refused,
        ca_pem: std::fs::read_to_string(&ca.cert).unwrap(),
        _dir: dir,
    }
}

#[tokio::test]
async fn websockets_get_the_credential_in_every_mode() {
    let s = scene().await;

    // Mount mode: the client calls the proxy as its base URL.
    let stream = TcpStream::connect(s.proxy.addr).await.unwrap();
    let url = format!("ws://{}/ws/echo", s.proxy.addr);
    let (mut ws, response) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    assert_eq!(response.status(), 101);
    exchange(&mut ws).await;

    // Forward mode through a CONNECT tunnel (how WebSocket clients use HTTP proxies).
    let stream = connect(&s.proxy, "ws.test:80").await;
    let (mut ws, _) = tokio_tungstenite::client_async("ws://ws.test/echo", stream)
        .await
        .unwrap();
    exchange(&mut ws).await;

    // Forward mode, absolute-form handshake written by hand.
    let mut stream = TcpStream::connect(s.proxy.addr).await.unwrap();
    stream
        .write_all(
            b"GET http://ws.test/echo HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\n\
              Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
              Sec-WebSocket-Version: 13\r\n\r\n",
        )
        .await
        .unwrap();
    let head = support::read_head(&mut stream).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
        "{head}"
    );
    let mut ws = WebSocketStream::from_raw_socket(stream, Role::Client, None).await;
    exchange(&mut ws).await;

    // Intercepted TLS tunnel (wss://).
    let stream = connect(&s.proxy, "wss.test:443").await;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut s.ca_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let stream = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect("wss.test".try_into().unwrap(), stream)
        .await
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async("wss://wss.test/echo", stream)
        .await
        .unwrap();
    exchange(&mut ws).await;

    assert_eq!(s.book.token_calls(), 1, "one token served every handshake");
    assert_eq!(*s.refused.lock().unwrap(), 0);
    s.proxy.stop().await;
}

#[tokio::test]
async fn a_handshake_refused_for_a_revoked_token_is_refreshed_and_retried() {
    let s = scene().await;
    let url = format!("ws://{}/ws/echo", s.proxy.addr);
    let stream = TcpStream::connect(s.proxy.addr).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(url.clone(), stream)
        .await
        .unwrap();
    exchange(&mut ws).await;
    assert_eq!(s.book.token_calls(), 1);

    s.book.revoke_all();
    let stream = TcpStream::connect(s.proxy.addr).await.unwrap();
    let (mut ws, response) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    assert_eq!(response.status(), 101, "the client never sees the 401");
    exchange(&mut ws).await;
    assert_eq!(s.book.token_calls(), 2, "one refresh");
    assert_eq!(
        *s.refused.lock().unwrap(),
        1,
        "one handshake was refused upstream"
    );
    s.proxy.stop().await;
}
