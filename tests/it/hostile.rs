//! Hostile upstreams and hostile clients, one table each: every case has its expected
//! answer, and after every case the proxy still serves a good route (a refreshable
//! credential against a protected API). Upstream cases are scripted byte for byte by a raw
//! TCP server; client cases are raw bytes written to the proxy.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::lifecycle::TEST_TOKENS_YAML;
use crate::support::server::{self, Origin};
use crate::support::vendor::{protected_api, TokenBook};
use crate::support::vendors::oauth2::{self as vendor, OAuth2Vendor};
use crate::support::{self, Proxy};

const CLIENT_SECRET: &str = "hostile-client-secret-4711";
/// Upper bound for any wait in these tests (none of them asserts a duration).
const BOUND: Duration = Duration::from_secs(5);

/// What the scripted upstream does after writing its bytes.
#[derive(Clone, Copy, Debug)]
enum Then {
    /// Closes the connection.
    Close,
    /// Keeps the connection open and sends nothing more.
    Stall,
}

/// What the client should see.
#[derive(Debug, PartialEq)]
enum Expect {
    /// A complete response with this status.
    Status(u16),
    /// No complete response: the connection breaks off (after the head or before it).
    Cut,
}

struct UpstreamCase {
    name: &'static str,
    answer: Vec<u8>,
    then: Then,
    expect: Expect,
}

fn upstream_cases() -> Vec<UpstreamCase> {
    let case = |name, answer: &[u8], then, expect| UpstreamCase {
        name,
        answer: answer.to_vec(),
        then,
        expect,
    };
    let mut huge_header = b"HTTP/1.1 200 OK\r\nX-Big: ".to_vec();
    huge_header.extend(std::iter::repeat_n(b'a', 1 << 20));
    huge_header.extend_from_slice(b"\r\nContent-Length: 2\r\n\r\nok");
    let mut many_headers = b"HTTP/1.1 200 OK\r\n".to_vec();
    for i in 0..500 {
        many_headers.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
    }
    many_headers.extend_from_slice(b"Content-Length: 2\r\n\r\nok");
    use Expect::*;
    use Then::*;
    vec![
        case("huge header", &huge_header, Close, Status(502)),
        case("too many headers", &many_headers, Close, Status(502)),
        case("no head, closed", b"", Close, Status(502)),
        case("no head, stalled", b"", Stall, Status(504)),
        case("half a head, stalled", b"HTTP/1.1 200 OK\r\nConte", Stall, Status(504)),
        case("garbage", b"\x00\x01garbage\r\n\r\n", Close, Status(502)),
        case("not http", b"SSH-2.0-OpenSSH_9.6\r\n", Close, Status(502)),
        case("bad status code", b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n", Close, Status(502)),
        case("bad content-length", b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\nok", Close, Status(502)),
        case("two content-lengths", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok", Close, Status(502)),
        case("mid-body close", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b", Close, Cut),
        case("mid-body stall", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b", Stall, Cut),
        case("chunked mid-body stall", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n", Stall, Cut),
        case("bad chunk size", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n", Close, Cut),
        case("100 continue, then 200", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", Close, Status(200)),
        case("103 early hints, then 200", b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", Close, Status(200)),
        case("1xx, then stall", b"HTTP/1.1 100 Continue\r\n\r\n", Stall, Status(504)),
    ]
}

/// A raw upstream: for each connection, reads one request head, looks the case up by the
/// request path (`/case/N`), writes its bytes and closes or stalls.
async fn scripted_upstream(cases: Arc<Vec<UpstreamCase>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            let cases = Arc::clone(&cases);
            tokio::spawn(async move {
                let head = read_head(&mut stream).await;
                let index: Option<usize> = head
                    .split_whitespace()
                    .nth(1)
                    .and_then(|path| path.strip_prefix("/case/"))
                    .and_then(|n| n.parse().ok());
                let Some(case) = index.and_then(|i| cases.get(i)) else {
                    return;
                };
                let _ = stream.write_all(&case.answer).await;
                if let Then::Stall = case.then {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            });
        }
    });
    addr
}

async fn read_head(stream: &mut TcpStream) -> String {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// The proxy with a good route: an OAuth2 credential (refreshable, so request bodies are
/// kept for replay) in front of a protected API.
struct Harness {
    proxy: Proxy,
    api: Origin,
    book: Arc<TokenBook>,
    _token_server: Origin,
}

impl Harness {
    async fn start(extra: &str) -> Self {
        let book = TokenBook::new();
        // Tokens outlive every test here, so no refresh falls between a revocation and the
        // request that must meet it.
        let mut oauth2 = OAuth2Vendor::new("hostile", CLIENT_SECRET);
        oauth2.access_lifetime = Duration::from_secs(300);
        let token_server = vendor::start(Arc::clone(&book), oauth2).await;
        let api = protected_api(Arc::clone(&book), "authorization", "Bearer", 401).await;
        let yaml = format!(
            "{TEST_TOKENS_YAML}{extra}credentials:
  cred:
    type: oauth2_client_credentials
    token_url: {}/v1/oauth/access_token
    client_id: hostile
    client_secret: ${{SECRET}}
routes:
  - name: good
    host: \"{}\"
    credential: cred
",
            token_server.url(),
            api.addr
        );
        let proxy = support::proxy_with_env(&yaml, &[("SECRET", CLIENT_SECRET)]).await;
        Self {
            proxy,
            api,
            book,
            _token_server: token_server,
        }
    }

    /// The good route answers 200 with the credential accepted by the API.
    async fn assert_good_route(&self, after: &str) {
        let response = tokio::time::timeout(
            BOUND,
            self.proxy
                .client()
                .post(format!("{}/good", self.api.url()))
                .body("payload")
                .send(),
        )
        .await
        .unwrap_or_else(|_| panic!("good route answered within 5 s after `{after}`"))
        .unwrap();
        assert_eq!(response.status(), 200, "good route after `{after}`");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["body"], "payload", "after `{after}`");
    }
}

const TIMEOUTS: &str = "timeouts:
  upstream: 1s
  client_idle: 1s
  client_body: 300ms
  upstream_body_idle: 300ms
";

#[tokio::test]
async fn hostile_upstreams_get_their_expected_answer_and_the_proxy_keeps_serving() {
    let cases = Arc::new(upstream_cases());
    let upstream = scripted_upstream(Arc::clone(&cases)).await;
    let h = Harness::start(TIMEOUTS).await;
    let client = h.proxy.client();
    // The cases run concurrently (each on its own upstream connection); the good route is
    // checked after each one.
    let checks = cases.iter().enumerate().map(|(i, case)| {
        let client = client.clone();
        let h = &h;
        async move {
            let url = format!("http://{upstream}/case/{i}");
            let seen = tokio::time::timeout(BOUND, async {
                match client.get(&url).send().await {
                    Err(_) => Expect::Cut,
                    Ok(response) => {
                        let status = response.status().as_u16();
                        match response.text().await {
                            Ok(text) => {
                                assert!(!leaks_a_secret(&text), "`{}` answer: {text}", case.name);
                                Expect::Status(status)
                            }
                            Err(_) => Expect::Cut,
                        }
                    }
                }
            })
            .await
            .unwrap_or_else(|_| panic!("case `{}` ended within 5 s", case.name));
            h.assert_good_route(case.name).await;
            (seen != case.expect_ref())
                .then(|| format!("`{}`: expected {:?}, saw {seen:?}", case.name, case.expect))
        }
    });
    let wrong: Vec<String> = futures_join_all(checks)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert!(cases.len() >= 15);
}

impl UpstreamCase {
    fn expect_ref(&self) -> Expect {
        match self.expect {
            Expect::Status(s) => Expect::Status(s),
            Expect::Cut => Expect::Cut,
        }
    }
}

/// What a raw client saw: every status line, and whether the proxy closed the connection.
#[derive(Debug)]
struct RawSeen {
    statuses: Vec<u16>,
    closed: bool,
    /// Everything the proxy sent, for the secret scan.
    text: String,
}

/// Whether `text` shows the client secret or an issued access token.
fn leaks_a_secret(text: &str) -> bool {
    text.contains(CLIENT_SECRET) || text.contains("itsyou-access")
}

/// Writes `bytes` to the proxy, keeps the connection open (a client that stalls), and reads
/// until the proxy closes it or `BOUND` passes.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> RawSeen {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(bytes).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let closed = loop {
        match tokio::time::timeout(BOUND, stream.read(&mut chunk)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => buf.extend_from_slice(&chunk[..n]),
        }
    };
    RawSeen {
        statuses: statuses(&buf),
        closed,
        text: String::from_utf8_lossy(&buf).into_owned(),
    }
}

/// The status of every response in `buf`, framed by `Content-Length` (the proxy's answers
/// and the echo origin's all carry one).
fn statuses(mut buf: &[u8]) -> Vec<u16> {
    let mut found = Vec::new();
    while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
        let Some(status) = head.get(9..12).and_then(|s| s.parse().ok()) else {
            break;
        };
        found.push(status);
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        buf = buf.get(end + 4 + length..).unwrap_or_default();
    }
    found
}

struct ClientCase {
    name: &'static str,
    request: String,
    statuses: &'static [u16],
    closed: bool,
}

fn client_cases(api: SocketAddr, echo: SocketAddr) -> Vec<ClientCase> {
    let case = |name, request: String, statuses, closed| ClientCase {
        name,
        request,
        statuses,
        closed,
    };
    let big = "a".repeat(1 << 20);
    vec![
        case(
            "CL and TE together",
            format!("POST http://{echo}/a HTTP/1.1\r\nHost: {echo}\r\nContent-Length: 40\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET http://{echo}/smuggled HTTP/1.1\r\nHost: {echo}\r\n\r\n"),
            // RFC 9112 §6.3: Transfer-Encoding wins, and the connection closes after the
            // answer, so the rest is never read as a request.
            &[200],
            true,
        ),
        case(
            "two different content-lengths",
            format!("POST http://{echo}/a HTTP/1.1\r\nHost: {echo}\r\nContent-Length: 5\r\nContent-Length: 30\r\n\r\nhelloGET /smuggled HTTP/1.1\r\n\r\n"),
            &[400],
            true,
        ),
        case(
            "TE that is not chunked",
            format!("POST http://{echo}/a HTTP/1.1\r\nHost: {echo}\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
            &[400],
            true,
        ),
        case(
            "bad chunk size",
            format!("POST http://{echo}/a HTTP/1.1\r\nHost: {echo}\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
            &[400],
            true,
        ),
        case(
            "obs-fold header",
            format!("GET http://{echo}/a HTTP/1.1\r\nHost: {echo}\r\nX-Folded: one\r\n two\r\n\r\n"),
            &[400],
            true,
        ),
        case(
            "NUL in a header",
            format!("GET http://{echo}/a HTTP/1.1\r\nHost: {echo}\r\nX-Bad: a\0b\r\n\r\n"),
            &[400],
            true,
        ),
        case("garbage request line", "\x16\x03\x01 hello\r\n\r\n".to_string(), &[400], true),
        case(
            "huge header",
            format!("GET http://{echo}/a HTTP/1.1\r\nHost: {echo}\r\nX-Big: {big}\r\n\r\n"),
            &[431],
            true,
        ),
        case(
            "user info in the URL",
            format!("GET http://user:pw@{api}/a HTTP/1.1\r\nHost: {api}\r\nConnection: close\r\n\r\n"),
            &[400],
            true,
        ),
        case(
            "stalled head",
            format!("GET http://{echo}/a HTTP/1.1\r\nHost: {echo}\r\nX-Slow"),
            &[],
            true,
        ),
        case(
            "stalled body, kept for replay",
            format!("POST http://{api}/a HTTP/1.1\r\nHost: {api}\r\nContent-Length: 1000\r\n\r\nonly part of it"),
            &[408],
            true,
        ),
        case(
            "stalled body, streamed",
            format!("POST http://{echo}/stalled HTTP/1.1\r\nHost: {echo}\r\nContent-Length: 1000\r\n\r\nonly part of it"),
            &[408],
            true,
        ),
        case(
            "stalled chunked body",
            format!("POST http://{echo}/stalled HTTP/1.1\r\nHost: {echo}\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n"),
            &[408],
            true,
        ),
        case(
            "half an HTTP/2 preface, stalled",
            // Told neither HTTP/1.1 nor HTTP/2 yet: waited for (ever more patiently, never in
            // a spin) until the idle limit closes the connection.
            "PRI * HTTP/2.0\r\n".to_string(),
            &[],
            true,
        ),
        case(
            "an HTTP/2 preface, then no HTTP/2",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nGET / HTTP/1.1\r\n\r\n".to_string(),
            &[],
            true,
        ),
        case(
            "pipelined requests",
            format!("GET http://{echo}/one HTTP/1.1\r\nHost: {echo}\r\n\r\nGET http://{echo}/two HTTP/1.1\r\nHost: {echo}\r\n\r\nGET http://{echo}/three HTTP/1.1\r\nHost: {echo}\r\nConnection: close\r\n\r\n"),
            &[200, 200, 200],
            true,
        ),
    ]
}

#[tokio::test]
async fn hostile_clients_get_their_expected_answer_and_the_proxy_keeps_serving() {
    let h = Harness::start(TIMEOUTS).await;
    let echo = server::echo_origin().await;
    let cases = client_cases(h.api.addr, echo.addr);
    let checks = cases.iter().map(|case| {
        let h = &h;
        async move {
            let seen = raw(h.proxy.addr, case.request.as_bytes()).await;
            assert!(
                !leaks_a_secret(&seen.text),
                "`{}` answer: {}",
                case.name,
                seen.text
            );
            h.assert_good_route(case.name).await;
            (seen.statuses != case.statuses || seen.closed != case.closed).then(|| {
                format!(
                    "`{}`: expected {:?} (closed: {}), saw {seen:?}",
                    case.name, case.statuses, case.closed
                )
            })
        }
    });
    let wrong: Vec<String> = futures_join_all(checks)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
    // Stalled uploads reach the echo origin cut short; every other request must be framed
    // exactly by what the proxy sent.
    for seen in echo
        .requests()
        .into_iter()
        .filter(|r| r.target != "/stalled")
    {
        assert!(
            !seen.target.contains("smuggled"),
            "a smuggled request reached the upstream"
        );
        let length = seen.header("content-length");
        assert!(
            length.is_empty() || length == seen.body.len().to_string(),
            "the upstream got a Content-Length that does not frame its body: {length}"
        );
    }
    assert!(cases.len() >= 16);
}

/// Idle sockets (silent, or sending a head byte by byte) cannot hold every slot: at
/// `max_connections` each new connection closes the one idle the longest, and a real request
/// is served while they are still open.
#[tokio::test]
async fn idle_connections_cannot_starve_requests_at_max_connections() {
    let h = Harness::start("max_connections: 4\ntimeouts:\n  client_idle: 60s\n").await;
    let mut idle = Vec::new();
    for i in 0..10 {
        let mut s = TcpStream::connect(h.proxy.addr).await.unwrap();
        if i % 2 == 1 {
            s.write_all(b"GET http://127.0.0.1/ HTTP/1.1\r\nHo")
                .await
                .unwrap();
        }
        idle.push(s);
    }
    h.assert_good_route("10 idle connections").await;
    let closed = Arc::new(AtomicUsize::new(0));
    let reads = idle.into_iter().map(|mut s| {
        let closed = Arc::clone(&closed);
        async move {
            let mut byte = [0u8; 1];
            if let Ok(Ok(0)) =
                tokio::time::timeout(Duration::from_millis(1500), s.read(&mut byte)).await
            {
                closed.fetch_add(1, Ordering::SeqCst);
            }
            s
        }
    });
    let still_open = futures_join_all(reads).await;
    assert!(
        closed.load(Ordering::SeqCst) >= 7,
        "10 idle + 1 real connection under a limit of 4: at least 7 idle ones closed, saw {}",
        closed.load(Ordering::SeqCst)
    );
    drop(still_open);
}

/// Awaits every future (the test crate has no `futures` dependency).
async fn futures_join_all<F: std::future::Future>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let handles: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut out = Vec::with_capacity(handles.len());
    let mut pending: Vec<_> = handles.into_iter().map(Some).collect();
    let mut results: Vec<Option<F::Output>> = (0..pending.len()).map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut all = true;
        for (i, slot) in pending.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        results[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => all = false,
                }
            }
        }
        if all {
            std::task::Poll::Ready(())
        } else {
            std::task::Poll::Pending
        }
    })
    .await;
    out.extend(results.into_iter().flatten());
    out
}

/// Bodies kept for replay share `retry.max_buffered_total`: while a stalled upload holds most
/// of it, another body streams without replay (its 401 reaches the client); once the stalled
/// one is answered 408 its bytes are given back and bodies are replayed again.
#[tokio::test]
async fn the_replay_budget_is_shared_and_given_back() {
    let h = Harness::start("retry:\n  max_buffered_total: 1500\ntimeouts:\n  client_body: 500ms\n")
        .await;
    let budget = Arc::clone(h.proxy.state().upstream.replay_budget());
    h.assert_good_route("start").await;
    let mut stalled = TcpStream::connect(h.proxy.addr).await.unwrap();
    let api = h.api.addr;
    stalled
        .write_all(
            format!(
                "POST http://{api}/a HTTP/1.1\r\nHost: {api}\r\nContent-Length: 1000\r\n\r\npart"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let held = tokio::time::timeout(BOUND, async {
        while budget.used() < 1000 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(held.is_ok(), "the stalled upload holds its declared length");

    let post = || async {
        h.proxy
            .client()
            .post(format!("{}/b", h.api.url()))
            .body("x".repeat(1000))
            .send()
            .await
            .unwrap()
            .status()
    };
    h.book.revoke_all();
    assert_eq!(
        post().await,
        401,
        "over the budget: streamed, so the 401 is passed on"
    );

    let mut answer = Vec::new();
    let _ = tokio::time::timeout(BOUND, stalled.read_to_end(&mut answer)).await;
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 408"));
    assert_eq!(budget.used(), 0, "every reservation was given back");
    tokio::time::sleep(Duration::from_millis(200)).await;
    h.book.revoke_all();
    assert_eq!(
        post().await,
        200,
        "within the budget again: refreshed and replayed"
    );
    assert_eq!(budget.used(), 0);
}

/// SIGTERM-style shutdown waits for a CONNECT tunnel too: a response still on its way
/// through the tunnel arrives before shutdown completes, and shutdown completes once the
/// client closes the tunnel.
#[tokio::test]
async fn shutdown_waits_for_requests_inside_a_tunnel() {
    let origin = server::serve(|_seen| async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        server::respond(200, "slow")
    })
    .await;
    let port = origin.addr.port();
    let mut proxy = support::proxy(&format!(
        "connect:\n  allowed_ports: [{port}]\ntimeouts:\n  drain: 10s\n"
    ))
    .await;
    let mut tunnel = TcpStream::connect(proxy.addr).await.unwrap();
    tunnel
        .write_all(
            format!("CONNECT 127.0.0.1:{port} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let established = read_head(&mut tunnel).await;
    assert!(established.starts_with("HTTP/1.1 200"), "{established}");
    tunnel
        .write_all(
            format!("GET /slow HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let arrived = tokio::time::timeout(BOUND, async {
        while origin.count() == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(arrived.is_ok(), "the request went through the tunnel");

    let running = proxy.running.take().unwrap();
    let stopping = tokio::spawn(running.shutdown());
    let mut answer = Vec::new();
    tokio::time::timeout(BOUND, tunnel.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&answer).ends_with("slow"));
    assert!(
        !stopping.is_finished(),
        "shutdown did not complete while the tunnel was open"
    );
    drop(tunnel);
    tokio::time::timeout(BOUND, stopping)
        .await
        .expect("shutdown completes once the tunnel is closed")
        .unwrap();
}

/// Shutdown drains an intercepted tunnel: its request in flight finishes with its answer,
/// then the proxy itself closes the HTTP/2 connection (GOAWAY) and shutdown completes —
/// without waiting for the client to go away.
#[tokio::test]
async fn shutdown_drains_requests_inside_an_intercepted_tunnel() {
    use crate::support::tls::{https_origin, TestCa};
    let upstream_ca = TestCa::new();
    let origin = https_origin(&upstream_ca, &["127.0.0.1"], &["h2", "http/1.1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = authrelay::intercept::init_ca(&dir.path().join("ca"), false).unwrap();
    let yaml = format!(
        "timeouts:\n  drain: 10s\ntls:\n  ca_file: {}\nintercept_ca:\n  cert_file: {}\n  key_file: {}\n\
         credentials:\n  key:\n    type: static\n    value: \"Bearer intercepted\"\n\
         routes:\n  - name: api\n    host: api.test\n    upstream: {}\n    credential: key\n    intercept: true\n",
        upstream_ca.write(dir.path(), "upstream-ca.pem").display(),
        ca.cert.display(),
        ca.key.display(),
        origin.url()
    );
    let mut proxy = support::proxy(&yaml).await;

    let mut tunnel = TcpStream::connect(proxy.addr).await.unwrap();
    tunnel
        .write_all(b"CONNECT api.test:443 HTTP/1.1\r\nHost: api.test:443\r\n\r\n")
        .await
        .unwrap();
    assert!(read_head(&mut tunnel).await.starts_with("HTTP/1.1 200"));
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut std::fs::read(&ca.cert).unwrap().as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls::pki_types::ServerName::try_from("api.test").unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls))
        .connect(name, tunnel)
        .await
        .unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    let closed = tokio::spawn(connection);

    let request = http::Request::get("https://api.test/slow/2000")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    // A second handle keeps the client side of the connection open: only the proxy may end it.
    let _keep_open = sender.clone();
    let in_flight = tokio::spawn(async move {
        let response = sender.send_request(request).await.unwrap();
        let status = response.status();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        (status, body)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopping = tokio::spawn(proxy.running.take().unwrap().shutdown());
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !stopping.is_finished(),
        "shutdown waits for the request in the intercepted tunnel"
    );
    let (status, body) = tokio::time::timeout(BOUND, in_flight)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((status.as_u16(), &body[..]), (200, &b"secure ok"[..]));
    assert_eq!(origin.last().headers["authorization"], "Bearer intercepted");
    assert!(
        tokio::time::timeout(BOUND, closed).await.is_ok(),
        "the proxy closed the drained HTTP/2 connection"
    );
    assert!(tokio::time::timeout(BOUND, stopping).await.is_ok());
}

/// The new limits have their documented defaults, and values that would disable them are
/// config errors.
#[test]
fn limits_have_defaults_and_zero_is_refused() {
    let env: std::collections::HashMap<String, String> = Default::default();
    let path = std::path::Path::new("limits.yaml");
    let config = authrelay::Config::from_yaml("listen: 127.0.0.1:0\n", path, &env).unwrap();
    assert_eq!(config.timeouts.client_body, Duration::from_secs(30));
    assert_eq!(config.timeouts.upstream_body_idle, Duration::from_secs(60));
    assert_eq!(config.retry.max_buffered_total, 64 << 20);
    assert_eq!(config.max_connections, None);
    let bad = "listen: 127.0.0.1:0\nmax_connections: 0\ntimeouts:\n  client_body: 0s\n  upstream_body_idle: 0s\n";
    let error = authrelay::Config::from_yaml(bad, path, &env)
        .unwrap_err()
        .to_string();
    for key in [
        "max_connections",
        "timeouts.client_body",
        "timeouts.upstream_body_idle",
    ] {
        assert!(error.contains(key), "{key} named in: {error}");
    }
}
