//! One pipeline for every way in: forwarded requests and WebSocket handshakes meet the same
//! refusal/replay matrix; idle WebSockets are connections (counted, evicted at
//! `max_connections`, never locking out requests); `Upgrade: h2c` offers (Java's
//! `HttpClient`, `curl --http2`) are ordinary requests with their bodies; HTTP/2 with prior
//! knowledge is served in mount and forward form.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::Message;

use crate::support::lifecycle::TEST_TOKENS_YAML;
use crate::support::server::{self, Origin};
use crate::support::vendor::TokenBook;
use crate::support::vendors::oauth2::{self, OAuth2Vendor};
use crate::support::{self, Proxy};

/// How the upstream (an HTTP origin and a WebSocket server alike) answers a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Upstream {
    /// Accepts the tokens the vendor's book holds valid; 401 `invalid_token` otherwise.
    ChecksTheBook,
    /// Refuses every token with 401 `invalid_token` (a credential the API no longer takes).
    RefusesEveryToken,
    /// 403 `insufficient_scope`: the token is fine, the permission is missing.
    LacksScope,
    /// Takes anything (an API behind the proxy that needs no token check here).
    AcceptsAnything,
}

impl Upstream {
    /// `None` to accept, else the status and `WWW-Authenticate` to refuse with.
    fn judge(self, book: &TokenBook, authorization: Option<&str>) -> Option<(u16, &'static str)> {
        let token = authorization.and_then(|v| v.strip_prefix("Bearer "));
        match self {
            Upstream::ChecksTheBook if token.is_some_and(|t| book.is_valid(t)) => None,
            Upstream::ChecksTheBook | Upstream::RefusesEveryToken => {
                Some((401, r#"Bearer error="invalid_token""#))
            }
            Upstream::LacksScope => Some((403, r#"Bearer error="insufficient_scope""#)),
            Upstream::AcceptsAnything => None,
        }
    }
}

/// A WebSocket echo server judging each handshake as `policy` says; counts handshakes.
async fn websocket_upstream(
    book: Arc<TokenBook>,
    policy: Upstream,
) -> (std::net::SocketAddr, Arc<Mutex<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes: Arc<Mutex<usize>> = Arc::default();
    let count = Arc::clone(&handshakes);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (book, count) = (Arc::clone(&book), Arc::clone(&count));
            tokio::spawn(async move {
                // The callback's error type is tungstenite's, sized as it is.
                #[allow(clippy::result_large_err)]
                let check = |request: &Request, response: Response| {
                    *count.lock().unwrap() += 1;
                    let authorization = request
                        .headers()
                        .get("authorization")
                        .and_then(|v| v.to_str().ok());
                    match policy.judge(&book, authorization) {
                        None => Ok(response),
                        Some((status, challenge)) => {
                            let mut refusal = ErrorResponse::new(None);
                            *refusal.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            refusal
                                .headers_mut()
                                .insert("www-authenticate", challenge.parse().unwrap());
                            Err(refusal)
                        }
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
    (addr, handshakes)
}

/// An HTTP origin judging each request as `policy` says.
async fn http_upstream(book: Arc<TokenBook>, policy: Upstream) -> Origin {
    server::serve(move |seen| {
        let book = Arc::clone(&book);
        async move {
            let authorization = seen.header("authorization");
            match policy.judge(&book, Some(authorization.as_str())) {
                None => server::respond(200, "ok"),
                Some((status, challenge)) => {
                    let mut r = server::respond(status, "refused");
                    r.headers_mut()
                        .insert("www-authenticate", challenge.parse().unwrap());
                    r
                }
            }
        }
    })
    .await
}

/// The way in a case is sent by.
#[derive(Debug, Clone, Copy)]
enum Leg {
    Request,
    WebSocket,
}

/// What one attempt through the proxy came to, in terms both ways in share.
#[derive(Debug, PartialEq)]
struct Seen {
    /// The client's status: 101 and 200 both read `switched_or_ok`.
    status: u16,
    token_calls: usize,
    upstream_attempts: usize,
    retried_success: f64,
    retried_failed: f64,
}

async fn run_case(policy: Upstream, revoke_first: bool, leg: Leg, attempts: usize) -> Seen {
    let book = TokenBook::new();
    let mut vendor = OAuth2Vendor::new("cid", "csecret");
    vendor.access_lifetime = Duration::from_secs(600);
    let token_endpoint = oauth2::start(Arc::clone(&book), vendor).await;
    let (ws_addr, handshakes) = websocket_upstream(Arc::clone(&book), policy).await;
    let origin = http_upstream(Arc::clone(&book), policy).await;
    let upstream = match leg {
        Leg::Request => origin.addr,
        Leg::WebSocket => ws_addr,
    };
    let yaml = format!(
        "{TEST_TOKENS_YAML}credentials:\n  oa:\n    type: oauth2_client_credentials\n\
         \x20   token_url: {}/v1/oauth/access_token\n    client_id: cid\n    client_secret: csecret\n\
         routes:\n  - name: api\n    mount: /api\n    upstream: http://{upstream}\n    credential: oa\n",
        token_endpoint.url(),
    );
    let proxy = support::proxy(&yaml).await;
    // A first exchange fetches the token; then the vendor forgets it when the case says so.
    let mut status = 0;
    for attempt in 0..attempts {
        if attempt == 0 && revoke_first {
            warm_up(&proxy, leg).await;
            book.revoke_all();
        }
        status = send(&proxy, leg).await;
    }
    let metrics = proxy.state().metrics.encode();
    let retried = |outcome: &str| {
        support::metric(
            &metrics,
            &format!("authrelay_unauthorized_retries_total{{route=\"api\",credential=\"oa\",outcome=\"{outcome}\"}}"),
        )
    };
    let upstream_attempts = match leg {
        Leg::Request => origin.count(),
        Leg::WebSocket => *handshakes.lock().unwrap(),
    };
    let seen = Seen {
        status: if status == 101 { 200 } else { status },
        token_calls: book.token_calls(),
        upstream_attempts: upstream_attempts - usize::from(revoke_first),
        retried_success: retried("success"),
        retried_failed: retried("failed"),
    };
    proxy.stop().await;
    seen
}

/// One exchange that succeeds, so that the credential holds a token.
async fn warm_up(proxy: &Proxy, leg: Leg) {
    assert!(matches!(send(proxy, leg).await, 101 | 200));
}

/// One request or handshake through the proxy in mount mode; the client's status.
async fn send(proxy: &Proxy, leg: Leg) -> u16 {
    match leg {
        Leg::Request => support::direct_client()
            .post(format!("{}/api/items", proxy.url()))
            .body("payload")
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        Leg::WebSocket => {
            let stream = TcpStream::connect(proxy.addr).await.unwrap();
            let url = format!("ws://{}/api/echo", proxy.addr);
            match tokio_tungstenite::client_async(url, stream).await {
                Ok((mut ws, response)) => {
                    ws.send(Message::text("ping")).await.unwrap();
                    let echo = ws.next().await.expect("an echo").unwrap();
                    assert_eq!(echo.into_text().unwrap().as_str(), "ping");
                    response.status().as_u16()
                }
                Err(tokio_tungstenite::tungstenite::Error::Http(refused)) => {
                    refused.status().as_u16()
                }
                Err(e) => panic!("handshake failed: {e}"),
            }
        }
    }
}

/// The same refusals meet the same replays, quiet periods and metrics, whether the request is
/// an ordinary one or a WebSocket handshake: one replay driver serves both.
#[tokio::test]
async fn requests_and_websocket_handshakes_share_one_refusal_and_replay_matrix() {
    // (case, upstream, revoke after a first success, attempts, expected)
    let cases = [
        (
            "a revoked token is refreshed once and the exchange replayed",
            Upstream::ChecksTheBook,
            true,
            1,
            Seen {
                status: 200,
                token_calls: 2,
                upstream_attempts: 2,
                retried_success: 1.0,
                retried_failed: 0.0,
            },
        ),
        (
            "a credential refused even when fresh: one replay, then a quiet period",
            Upstream::RefusesEveryToken,
            false,
            3,
            Seen {
                status: 401,
                token_calls: 2,
                upstream_attempts: 4,
                retried_success: 0.0,
                retried_failed: 1.0,
            },
        ),
        (
            "insufficient_scope is about the permission: passed on, no refresh",
            Upstream::LacksScope,
            false,
            2,
            Seen {
                status: 403,
                token_calls: 1,
                upstream_attempts: 2,
                retried_success: 0.0,
                retried_failed: 0.0,
            },
        ),
    ];
    for (case, policy, revoke, attempts, expected) in cases {
        let request = run_case(policy, revoke, Leg::Request, attempts).await;
        let websocket = run_case(policy, revoke, Leg::WebSocket, attempts).await;
        assert_eq!(request, expected, "request: {case}");
        assert_eq!(websocket, expected, "websocket handshake: {case}");
    }
}

/// A WebSocket echo server that needs no token.
async fn open_echo() -> std::net::SocketAddr {
    let (addr, _) = websocket_upstream(TokenBook::new(), Upstream::AcceptsAnything).await;
    addr
}

/// Waits (bounded) until `series` reads `want` in the proxy's metrics; returns what it read.
async fn gauge_settles(proxy: &Proxy, series: &str, want: f64) -> f64 {
    let mut last = f64::NAN;
    for _ in 0..200 {
        last = support::metric(&proxy.state().metrics.encode(), series);
        if last == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    last
}

/// With `max_connections: 20`, 20 idle WebSockets are 20 connections — counted in the
/// connection and upgrade gauges — and each new client makes the idlest one close, so plain
/// requests and new handshakes are all served.
#[tokio::test]
async fn idle_websockets_are_connections_and_never_lock_out_requests() {
    let ws_upstream = open_echo().await;
    let origin = server::echo_origin().await;
    let yaml = format!(
        "max_connections: 20\n\
         credentials:\n  k:\n    type: static\n    value: \"Bearer sk\"\n\
         routes:\n\
         \x20 - name: ws\n    mount: /ws\n    upstream: http://{ws_upstream}\n    credential: k\n\
         \x20 - name: api\n    mount: /api\n    upstream: {}\n    credential: k\n",
        origin.url()
    );
    let proxy = support::proxy(&yaml).await;
    let mut sockets = Vec::new();
    for _ in 0..20 {
        let stream = TcpStream::connect(proxy.addr).await.unwrap();
        let url = format!("ws://{}/ws/echo", proxy.addr);
        let (ws, response) = tokio_tungstenite::client_async(url, stream).await.unwrap();
        assert_eq!(response.status(), 101);
        sockets.push(ws);
    }
    assert_eq!(
        gauge_settles(&proxy, "authrelay_upgraded_connections", 20.0).await,
        20.0
    );
    assert_eq!(
        gauge_settles(&proxy, "authrelay_client_connections", 20.0).await,
        20.0
    );

    for i in 0..10 {
        let answer = crate::raw::send(
            proxy.addr,
            "GET /api/x HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "request {i}: {answer}");
    }
    for i in 0..10 {
        let stream = TcpStream::connect(proxy.addr).await.unwrap();
        let url = format!("ws://{}/ws/echo", proxy.addr);
        let (mut ws, response) = tokio_tungstenite::client_async(url, stream)
            .await
            .unwrap_or_else(|e| panic!("handshake {i} at the cap: {e}"));
        assert_eq!(response.status(), 101);
        ws.send(Message::text("hello")).await.unwrap();
        assert_eq!(
            ws.next()
                .await
                .unwrap()
                .unwrap()
                .into_text()
                .unwrap()
                .as_str(),
            "hello"
        );
        sockets.push(ws);
    }
    // Never more than 20 connections: the first plain request closed one idle WebSocket
    // (the other nine found a free place), and the 2nd to 10th new handshakes one each.
    assert_eq!(
        gauge_settles(&proxy, "authrelay_upgraded_connections", 20.0).await,
        20.0
    );
    assert_eq!(
        gauge_settles(&proxy, "authrelay_client_connections", 20.0).await,
        20.0
    );
    let mut closed = 0;
    for ws in &mut sockets[..20] {
        if let Ok(next) = tokio::time::timeout(Duration::from_millis(500), ws.next()).await {
            assert!(!matches!(next, Some(Ok(Message::Text(_)))));
            closed += 1;
        }
    }
    assert_eq!(
        closed, 10,
        "exactly as many idle WebSockets closed as room needed"
    );
    for ws in &mut sockets[20..] {
        ws.send(Message::text("still open")).await.unwrap();
        let echo = ws.next().await.unwrap().unwrap();
        assert_eq!(echo.into_text().unwrap().as_str(), "still open");
    }
    drop(sockets);
    assert_eq!(
        gauge_settles(&proxy, "authrelay_upgraded_connections", 0.0).await,
        0.0
    );
    proxy.stop().await;
}

/// An origin that records requests for the client tests below.
async fn client_scene() -> (Origin, Proxy) {
    let origin = server::echo_origin().await;
    let yaml = format!(
        "credentials:\n  k:\n    type: static\n    value: \"Bearer sk\"\n\
         routes:\n\
         \x20 - name: mounted\n    mount: /api\n    upstream: {url}\n    credential: k\n\
         \x20 - name: forward\n    host: api.test\n    upstream: {url}\n    credential: k\n",
        url = origin.url()
    );
    (origin, support::proxy(&yaml).await)
}

/// Asserts the origin's last request: method, path, body and the injected credential, and
/// that no upgrade offer crossed the proxy.
fn assert_arrived(origin: &Origin, method: &str, path: &str, body: &str, who: &str) {
    let seen = origin.last();
    assert_eq!(seen.method.as_str(), method, "{who}");
    assert_eq!(seen.target, path, "{who}");
    assert_eq!(seen.body, body.as_bytes(), "{who}");
    assert_eq!(seen.header("authorization"), "Bearer sk", "{who}");
    for gone in ["upgrade", "http2-settings"] {
        assert!(!seen.headers.contains_key(gone), "{who}: {gone} crossed");
    }
}

fn available(program: &str, args: &[&str]) -> bool {
    std::process::Command::new(program)
        .args(args)
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Runs `program` with `args` off the runtime and returns its stdout.
async fn run(program: &str, args: Vec<String>) -> String {
    let program = program.to_string();
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&program)
            .args(&args)
            .env_remove("http_proxy")
            .env_remove("HTTP_PROXY")
            .output()
            .expect("runs")
    })
    .await
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Java's `HttpClient` offers `Upgrade: h2c` on every plain-HTTP request: its POSTs and PUTs
/// reach the upstream with their bodies and the credential, in mount and forward mode.
#[tokio::test]
async fn java_http_client_posts_and_puts_arrive_with_their_bodies() {
    if !available("java", &["-version"]) {
        eprintln!("no JDK: skipping the Java HttpClient test");
        return;
    }
    let (origin, proxy) = client_scene().await;
    let source = format!("{}/tests/recipes/Upload.java", env!("CARGO_MANIFEST_DIR"));
    let port = proxy.addr.port().to_string();
    for (mode, props, url) in [
        ("mount", vec![], format!("{}/api/items", proxy.url())),
        (
            "forward",
            vec![
                "-Dhttp.proxyHost=127.0.0.1".to_string(),
                format!("-Dhttp.proxyPort={port}"),
            ],
            "http://api.test/items".to_string(),
        ),
    ] {
        for method in ["POST", "PUT"] {
            let body = format!("{method} body from java in {mode} mode");
            let mut args = props.clone();
            args.extend([source.clone(), method.into(), url.clone(), body.clone()]);
            let out = run("java", args).await;
            assert_eq!(
                out.lines().next(),
                Some("200"),
                "java {method} {mode}: {out}"
            );
            assert_arrived(
                &origin,
                method,
                "/items",
                &body,
                &format!("java {method} {mode}"),
            );
        }
    }
    proxy.stop().await;
}

/// `curl --http2` offers `Upgrade: h2c` with its POST; `--http2-prior-knowledge` speaks
/// HTTP/2 from the first byte (to a base URL; through `-x` curl speaks HTTP/1.1 to proxies).
#[tokio::test]
async fn curl_http2_offers_and_prior_knowledge_are_served_in_both_modes() {
    if !available("curl", &["--version"]) {
        eprintln!("no curl: skipping");
        return;
    }
    let (origin, proxy) = client_scene().await;
    let base = format!("{}/api/items", proxy.url());
    let via = ["-x".to_string(), proxy.url()];
    let forward = "http://api.test/items".to_string();
    let cases: Vec<(&str, Vec<String>, &str, &str)> = vec![
        (
            "--http2 -d, mount",
            vec![
                "--http2".into(),
                "-d".into(),
                "h2c offer".into(),
                base.clone(),
            ],
            "POST",
            "h2c offer",
        ),
        (
            "--http2 -d, forward",
            [
                vec!["--http2".into(), "-d".into(), "h2c offer fwd".into()],
                via.to_vec(),
                vec![forward.clone()],
            ]
            .concat(),
            "POST",
            "h2c offer fwd",
        ),
        (
            "prior knowledge GET, mount",
            vec!["--http2-prior-knowledge".into(), base.clone()],
            "GET",
            "",
        ),
        (
            "prior knowledge POST, mount",
            vec![
                "--http2-prior-knowledge".into(),
                "-d".into(),
                "h2 body".into(),
                base.clone(),
            ],
            "POST",
            "h2 body",
        ),
        (
            "prior knowledge GET, forward",
            [
                vec!["--http2-prior-knowledge".into()],
                via.to_vec(),
                vec![forward.clone()],
            ]
            .concat(),
            "GET",
            "",
        ),
        (
            "prior knowledge POST, forward",
            [
                vec![
                    "--http2-prior-knowledge".into(),
                    "-d".into(),
                    "h2 fwd".into(),
                ],
                via.to_vec(),
                vec![forward.clone()],
            ]
            .concat(),
            "POST",
            "h2 fwd",
        ),
    ];
    for (case, args, method, body) in cases {
        let mut full = vec![
            "-sS".to_string(),
            "-o".into(),
            "/dev/null".into(),
            "-w".into(),
            "%{http_code} %{http_version}".into(),
        ];
        full.extend(args);
        let out = run("curl", full).await;
        assert!(out.starts_with("200"), "{case}: {out}");
        if case.starts_with("prior knowledge") && case.ends_with("mount") {
            assert!(out.ends_with(" 2"), "{case}: answered over HTTP/2: {out}");
        }
        assert_arrived(&origin, method, "/items", body, case);
    }
    proxy.stop().await;
}

/// HTTP/2 with prior knowledge in forward form: an `:authority` that is not the proxy's own
/// port names the destination, as an absolute-form HTTP/1.1 request would; the proxy's own
/// port is the base URL.
#[tokio::test]
async fn http2_prior_knowledge_routes_by_authority() {
    let (origin, proxy) = client_scene().await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(connection);
    for (uri, body) in [
        (
            "http://api.test/items?via=forward".to_string(),
            "forward form",
        ),
        (
            format!("http://{}/api/items?via=mount", proxy.addr),
            "mount form",
        ),
    ] {
        let request = http::Request::post(&uri)
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200, "{uri}");
        assert_eq!(response.version(), http::Version::HTTP_2);
        let text = response.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(text, "ok");
        let seen = origin.last();
        assert_eq!(seen.body, body.as_bytes(), "{uri}");
        assert!(
            seen.target.starts_with("/items?via="),
            "{uri}: {}",
            seen.target
        );
        assert_eq!(seen.header("authorization"), "Bearer sk");
    }
    proxy.stop().await;
}

/// The HTTP/2 preface told apart from HTTP/1.1 when it arrives in pieces: the listener peeks
/// at the first bytes without consuming them, and waits for the rest of a partial preface.
#[tokio::test]
async fn an_http2_preface_sent_in_pieces_is_still_http2() {
    let (origin, proxy) = client_scene().await;
    let stream = TcpStream::connect(proxy.addr).await.unwrap();
    stream.set_nodelay(true).unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        TokioExecutor::new(),
        TokioIo::new(Trickle::new(stream)),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    let request = http::Request::get("http://api.test/items?via=pieces")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(origin.last().header("authorization"), "Bearer sk");

    // An HTTP/1.1 request that starts like the preface ("PRI" is a method name) is HTTP/1.1.
    let answer = crate::raw::send(proxy.addr, "PRI /x HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 "), "{answer}");
    proxy.stop().await;
}

/// A stream whose first 24 bytes (the length of the HTTP/2 preface) go out 5 bytes per
/// write, each after a short pause, so that they reach the proxy in separate segments.
struct Trickle {
    stream: TcpStream,
    trickled: usize,
    pause: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl Trickle {
    fn new(stream: TcpStream) -> Self {
        Self {
            stream,
            trickled: 0,
            pause: None,
        }
    }
}

impl tokio::io::AsyncRead for Trickle {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Trickle {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.trickled >= 24 {
            return std::pin::Pin::new(&mut self.stream).poll_write(cx, buf);
        }
        if let Some(pause) = self.pause.as_mut() {
            std::task::ready!(std::future::Future::poll(pause.as_mut(), cx));
            self.pause = None;
        }
        let n = buf.len().min(5).min(24 - self.trickled);
        let written =
            std::task::ready!(std::pin::Pin::new(&mut self.stream).poll_write(cx, &buf[..n]))?;
        self.trickled += written;
        self.pause = Some(Box::pin(tokio::time::sleep(
            std::time::Duration::from_millis(20),
        )));
        std::task::Poll::Ready(Ok(written))
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
