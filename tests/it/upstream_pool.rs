//! The upstream pool: keep-alive reuse across bodies of every framing, upstreams that close
//! idle connections or cut a response short, the idle sweep, and concurrency; over TCP and
//! over TLS (HTTP/1.1 chosen by ALPN), which never share a connection, and HTTP/2 upstreams
//! that still get HTTP/2. The upstream here is a hand-written HTTP/1.1 server so that each
//! test decides exactly when connections are closed, and counts them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::support;
use crate::support::tls::{https_origin, TestCa};

/// What the raw upstream does after writing an answer.
#[derive(Clone, Copy, Debug)]
enum After {
    /// Waits for the next request on the same connection.
    KeepAlive,
    /// Closes the connection after this long, without telling the client beforehand.
    CloseIdle(Duration),
    /// Closes at once (the answer itself was cut short).
    Close,
}

/// How the raw upstream takes its connections.
#[derive(Clone)]
enum Wire {
    Plain,
    Tls(TlsAcceptor),
    /// TLS when the first byte opens a TLS handshake record, else plain: one port for both.
    Either(TlsAcceptor),
}

/// A hand-written upstream that counts the connections it accepted and closed, and the
/// requests it read over TLS and in clear.
struct RawUpstream {
    addr: SocketAddr,
    counts: Arc<Counts>,
    /// The folder of the CA file the proxy trusts it by, when it speaks TLS.
    files: Option<tempfile::TempDir>,
}

/// Which leg of the pool a test goes through: TCP, or TLS (the upstream offering only
/// `http/1.1`).
#[derive(Clone, Copy, Debug)]
enum Leg {
    Clear,
    Tls,
}

/// An upstream answering `answer` on `leg`, and a proxy in front with a route for it (and
/// `extra` YAML on top).
async fn upstream_and_proxy<F>(leg: Leg, extra: &str, answer: F) -> (RawUpstream, support::Proxy)
where
    F: Fn(&str, usize) -> (Vec<u8>, After) + Send + Sync + 'static,
{
    match leg {
        Leg::Clear => {
            let upstream = raw_upstream(answer).await;
            let proxy = support::proxy(&routes(upstream.addr, extra)).await;
            (upstream, proxy)
        }
        Leg::Tls => {
            let ca = TestCa::new();
            let mut upstream =
                raw_upstream_on(Wire::Tls(acceptor(&ca, &["http/1.1"])), answer).await;
            let files = tempfile::tempdir().unwrap();
            let ca_file = ca.write(files.path(), "upstream-ca.pem");
            let route = format!("    upstream: \"https://{}\"\n", upstream.addr);
            let extra = format!("tls:\n  ca_file: {}\n{extra}", ca_file.display());
            let proxy = support::proxy(&routes_via(upstream.addr, &route, &extra)).await;
            upstream.files = Some(files);
            (upstream, proxy)
        }
    }
}

/// Idle pooled connections of `leg` the proxy holds now.
fn idle_connections(proxy: &support::Proxy, leg: Leg) -> usize {
    match leg {
        Leg::Clear => proxy.state().upstream.idle_plain_connections(),
        Leg::Tls => proxy.state().upstream.idle_https_connections(),
    }
}

#[derive(Default)]
struct Counts {
    accepted: AtomicUsize,
    closed: AtomicUsize,
    over_tls: AtomicUsize,
    in_clear: AtomicUsize,
}

impl RawUpstream {
    fn accepted(&self) -> usize {
        self.counts.accepted.load(Ordering::SeqCst)
    }
    fn closed(&self) -> usize {
        self.counts.closed.load(Ordering::SeqCst)
    }
    /// Requests read over TLS and in clear.
    fn requests(&self) -> (usize, usize) {
        (
            self.counts.over_tls.load(Ordering::SeqCst),
            self.counts.in_clear.load(Ordering::SeqCst),
        )
    }
}

/// Serves requests (heads only; a Content-Length body is read and ignored) with `answer`,
/// which gets the request line and headers and the request's index on its connection (0 for
/// the first) and returns the raw response bytes (none: close without answering).
async fn raw_upstream<F>(answer: F) -> RawUpstream
where
    F: Fn(&str, usize) -> (Vec<u8>, After) + Send + Sync + 'static,
{
    raw_upstream_on(Wire::Plain, answer).await
}

/// [`raw_upstream`] taking its connections as `wire` says.
async fn raw_upstream_on<F>(wire: Wire, answer: F) -> RawUpstream
where
    F: Fn(&str, usize) -> (Vec<u8>, After) + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let counts = Arc::new(Counts::default());
    let answer: Arc<Answer> = Arc::new(answer);
    let all = Arc::clone(&counts);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            all.accepted.fetch_add(1, Ordering::SeqCst);
            let (answer, counts, wire) = (Arc::clone(&answer), Arc::clone(&all), wire.clone());
            tokio::spawn(async move {
                let mut first = [0u8; 1];
                let acceptor = match wire {
                    Wire::Plain => None,
                    Wire::Tls(acceptor) => Some(acceptor),
                    Wire::Either(acceptor) => {
                        let handshake =
                            matches!(stream.peek(&mut first).await, Ok(1) if first[0] == 0x16);
                        handshake.then_some(acceptor)
                    }
                };
                match acceptor {
                    None => serve_raw(stream, &*answer, &counts.in_clear).await,
                    Some(acceptor) => {
                        if let Ok(tls) = acceptor.accept(stream).await {
                            serve_raw(tls, &*answer, &counts.over_tls).await;
                        }
                    }
                }
                counts.closed.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    RawUpstream {
        addr,
        counts,
        files: None,
    }
}

/// A TLS acceptor for `127.0.0.1` with a leaf `ca` signed, offering `alpn`.
fn acceptor(ca: &TestCa, alpn: &[&str]) -> TlsAcceptor {
    let (chain, key) = ca.leaf(&["127.0.0.1"]);
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    TlsAcceptor::from(Arc::new(config))
}

/// What the raw upstream answers: request head and index on its connection -> bytes, then.
type Answer = dyn Fn(&str, usize) -> (Vec<u8>, After) + Send + Sync;

/// Serves one connection, counting its requests in `requests`. A close after an idle pause
/// is a clean one (TLS: close_notify first); a close right after an answer is abrupt.
async fn serve_raw<S>(mut stream: S, answer: &Answer, requests: &AtomicUsize)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    for nth in 0.. {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let body_len: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())?
            })
            .unwrap_or(0);
        while buf.len() < head_end + body_len {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + body_len);
        requests.fetch_add(1, Ordering::SeqCst);
        let (response, after) = answer(&head, nth);
        // A test may ask for a slow answer.
        if let Some(ms) = head
            .lines()
            .find_map(|l| l.strip_prefix("x-answer-after-ms: "))
        {
            tokio::time::sleep(Duration::from_millis(ms.trim().parse().unwrap_or(0))).await;
        }
        if response.is_empty() {
            return;
        }
        // A test may ask for a pause after the head and the first KiB of the body, and
        // after each KiB up to `x-body-pieces` pieces (two when not said).
        let pause = head
            .lines()
            .find_map(|l| l.strip_prefix("x-body-pause-ms: "))
            .and_then(|ms| ms.trim().parse().ok())
            .map(Duration::from_millis);
        let pieces: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("x-body-pieces: "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(2);
        let mut written = 0;
        for piece in 1..=pieces {
            let end = match pause {
                Some(_) if piece < pieces => response
                    .windows(4)
                    .position(|w| w == b"\r\n\r\n")
                    .map_or(response.len(), |i| {
                        (i + 4 + 1024 * piece).min(response.len())
                    }),
                _ => response.len(),
            };
            if written > 0 {
                if let Some(pause) = pause {
                    tokio::time::sleep(pause).await;
                }
            }
            if stream.write_all(&response[written..end]).await.is_err()
                || stream.flush().await.is_err()
            {
                return;
            }
            written = end;
            if written == response.len() {
                break;
            }
        }
        match after {
            After::KeepAlive => {}
            After::Close => return,
            After::CloseIdle(delay) => {
                tokio::time::sleep(delay).await;
                let _ = stream.shutdown().await;
                return;
            }
        }
    }
}

fn routes(upstream: SocketAddr, extra: &str) -> String {
    routes_via(upstream, "", extra)
}

/// [`routes`] with more lines for the route (4 spaces in), such as its `upstream`.
fn routes_via(upstream: SocketAddr, route: &str, extra: &str) -> String {
    format!(
        r#"
credentials:
  api:
    type: static
    value: "Bearer pool-token"
routes:
  - name: api
    host: "{upstream}"
    credential: api
{route}{extra}"#
    )
}

const OK_LENGTH: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello";
const OK_CHUNKED: &[u8] =
    b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nhel\r\n2\r\nlo\r\n0\r\n\r\n";
const NO_CONTENT: &[u8] = b"HTTP/1.1 204 No Content\r\n\r\n";
const HEAD_ANSWER: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n";

/// Answers by path: `/chunked`, `/empty` (204), HEAD (no body), else a Content-Length body;
/// every answer first checks that the credential and Host arrived.
fn by_path(head: &str, upstream: &str) -> Vec<u8> {
    if !head.contains("authorization: Bearer pool-token")
        || !head
            .to_ascii_lowercase()
            .contains(&format!("host: {upstream}"))
    {
        return b"HTTP/1.1 401 Unauthorized\r\ncontent-length: 0\r\n\r\n".to_vec();
    }
    let line = head.lines().next().unwrap_or_default();
    if line.starts_with("HEAD ") {
        HEAD_ANSWER.to_vec()
    } else if line.contains(" /chunked ") {
        OK_CHUNKED.to_vec()
    } else if line.contains(" /empty ") {
        NO_CONTENT.to_vec()
    } else {
        OK_LENGTH.to_vec()
    }
}

#[tokio::test]
async fn one_upstream_connection_serves_every_kind_of_body_in_turn() {
    let slot = Arc::new(std::sync::OnceLock::<String>::new());
    let host = Arc::clone(&slot);
    let upstream = raw_upstream(move |head, _| {
        (
            by_path(head, host.get().map_or("", String::as_str)),
            After::KeepAlive,
        )
    })
    .await;
    slot.set(upstream.addr.to_string()).unwrap();
    let proxy = support::proxy(&routes(upstream.addr, "")).await;
    let client = proxy.client();
    let base = format!("http://{}", upstream.addr);
    for round in 0..5 {
        let res = client.get(format!("{base}/length")).send().await.unwrap();
        assert_eq!(res.status(), 200, "round {round}");
        assert_eq!(res.text().await.unwrap(), "hello");
        let res = client.get(format!("{base}/chunked")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.text().await.unwrap(), "hello");
        let res = client.get(format!("{base}/empty")).send().await.unwrap();
        assert_eq!(res.status(), 204);
        let res = client.head(format!("{base}/length")).send().await.unwrap();
        assert_eq!(res.status(), 200);
        let res = client
            .post(format!("{base}/length"))
            .body("a request body")
            .send()
            .await
            .unwrap();
        assert_eq!(res.text().await.unwrap(), "hello");
    }
    assert_eq!(
        upstream.accepted(),
        1,
        "every request reused the first connection"
    );
    assert_eq!(proxy.state().upstream.idle_plain_connections(), 1);
    proxy.stop().await;
}

/// The pooled connection is polled with a waker of its own (`upstream/conn_waker.rs`): a
/// wake it gets while the request polls it is answered in that poll, any other wakes the
/// request's task. An answer whose head and body pieces each come after a pause needs every
/// one of those outside wakes: one lost, and the request hangs.
#[tokio::test]
async fn an_answer_that_arrives_in_pieces_is_read_whole_and_its_connection_kept() {
    let body: String = (0..5 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let answer = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes();
    for leg in [Leg::Clear, Leg::Tls] {
        let answer = answer.clone();
        let (upstream, proxy) =
            upstream_and_proxy(leg, "", move |_, _| (answer.clone(), After::KeepAlive)).await;
        let client = proxy.client();
        let url = format!("http://{}/pieces", upstream.addr);
        let fetch = |client: reqwest::Client, url: String| async move {
            let res = client
                .get(url)
                .header("x-answer-after-ms", "20")
                .header("x-body-pause-ms", "20")
                .header("x-body-pieces", "5")
                .send()
                .await
                .unwrap();
            assert_eq!(res.status(), 200);
            res.text().await.unwrap()
        };
        for round in 0..3 {
            let read =
                tokio::time::timeout(Duration::from_secs(20), fetch(client.clone(), url.clone()))
                    .await
                    .unwrap_or_else(|_| {
                        panic!("{leg:?} round {round}: the answer never completed")
                    });
            assert_eq!(read, body, "{leg:?} round {round}");
        }
        // Four at once, on one runtime thread of the proxy's: each wake must reach its own
        // request.
        let together = (0..4).map(|_| tokio::spawn(fetch(client.clone(), url.clone())));
        let read = tokio::time::timeout(
            Duration::from_secs(20),
            futures_util::future::join_all(together),
        )
        .await
        .unwrap_or_else(|_| panic!("{leg:?}: concurrent answers never completed"));
        for text in read {
            assert_eq!(text.unwrap(), body, "{leg:?}");
        }
        assert!(
            upstream.accepted() <= 4,
            "{leg:?}: {} connections for at most 4 at once",
            upstream.accepted()
        );
        assert!(
            idle_connections(&proxy, leg) >= 1,
            "{leg:?}: kept for reuse"
        );
        proxy.stop().await;
    }
}

#[tokio::test]
async fn a_connection_the_upstream_closed_while_idle_is_not_used_again() {
    for leg in [Leg::Clear, Leg::Tls] {
        // The close is a clean one: over TLS, close_notify first.
        let (upstream, proxy) = upstream_and_proxy(leg, "", |_, _| {
            (
                OK_LENGTH.to_vec(),
                After::CloseIdle(Duration::from_millis(50)),
            )
        })
        .await;
        let client = proxy.client();
        let url = format!("http://{}/x", upstream.addr);
        for _ in 0..3 {
            let res = client.get(&url).send().await.unwrap();
            assert_eq!(res.status(), 200, "{leg:?}");
            assert_eq!(res.text().await.unwrap(), "hello");
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert_eq!(
            upstream.accepted(),
            3,
            "{leg:?}: a fresh connection after each close"
        );
        proxy.stop().await;
    }
}

/// The pool takes a connection back as soon as its answer was read to the end, without
/// polling it once more for a close: an upstream that closes right after a whole answer, or
/// a moment later (over TLS without `close_notify`), has its close found at the latest when
/// the next request goes out, which is then sent on a new connection — a POST as much as a
/// GET, since nothing of it went out on the closed one.
#[tokio::test]
async fn a_connection_closed_right_after_its_answer_is_not_used_again() {
    for (leg, close) in [
        (Leg::Clear, After::Close),
        (Leg::Tls, After::Close),
        (Leg::Clear, After::CloseIdle(Duration::from_millis(5))),
        (Leg::Tls, After::CloseIdle(Duration::from_millis(5))),
    ] {
        let (upstream, proxy) =
            upstream_and_proxy(leg, "", move |_, _| (OK_LENGTH.to_vec(), close)).await;
        let client = proxy.client();
        let url = format!("http://{}/x", upstream.addr);
        for round in 0..4 {
            let request = if round % 2 == 0 {
                client.get(&url)
            } else {
                client.post(&url).body("a body")
            };
            let res = request.send().await.unwrap();
            assert_eq!(res.status(), 200, "{leg:?}, {close:?}, request {round}");
            assert_eq!(res.text().await.unwrap(), "hello");
            // Long enough for the close to have arrived before the next request, and short
            // enough that taking the connection out does not poll it (`RECHECK_AFTER`).
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            upstream.accepted(),
            4,
            "{leg:?}, {close:?}: a new connection each time"
        );
        proxy.stop().await;
    }
}

#[tokio::test]
async fn a_response_cut_short_fails_that_request_only() {
    let upstream = raw_upstream(|head, _| {
        if head.starts_with("GET /cut ") {
            (
                b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial".to_vec(),
                After::Close,
            )
        } else {
            (OK_LENGTH.to_vec(), After::KeepAlive)
        }
    })
    .await;
    let proxy = support::proxy(&routes(upstream.addr, "")).await;
    let client = proxy.client();
    let base = format!("http://{}", upstream.addr);
    // hyper may abort the client connection before its head is flushed: either way the
    // client must see a failure, never a short body passed off as whole.
    let cut = match client.get(format!("{base}/cut")).send().await {
        Ok(res) => res.bytes().await.map(|b| b.len()),
        Err(e) => Err(e),
    };
    assert!(cut.is_err(), "a cut body read as complete: {cut:?}");
    let res = client.get(format!("{base}/after")).send().await.unwrap();
    assert_eq!(res.text().await.unwrap(), "hello");
    assert_eq!(upstream.accepted(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn idle_connections_are_closed_after_the_pool_idle_timeout() {
    for leg in [Leg::Clear, Leg::Tls] {
        let (upstream, proxy) =
            upstream_and_proxy(leg, "timeouts:\n  pool_idle: 200ms\n", |_, _| {
                (OK_LENGTH.to_vec(), After::KeepAlive)
            })
            .await;
        let res = proxy
            .client()
            .get(format!("http://{}/x", upstream.addr))
            .send()
            .await
            .unwrap();
        assert_eq!(res.text().await.unwrap(), "hello");
        assert_eq!(idle_connections(&proxy, leg), 1, "{leg:?}");
        let mut waited = Duration::ZERO;
        while upstream.closed() == 0 && waited < Duration::from_secs(5) {
            tokio::time::sleep(Duration::from_millis(50)).await;
            waited += Duration::from_millis(50);
        }
        assert_eq!(
            upstream.closed(),
            1,
            "{leg:?}: the idle connection was closed by the proxy"
        );
        assert_eq!(idle_connections(&proxy, leg), 0, "{leg:?}");
        proxy.stop().await;
    }
}

#[tokio::test]
async fn concurrent_requests_open_at_most_one_connection_each_and_then_reuse_them() {
    let upstream = raw_upstream(|_, _| (OK_LENGTH.to_vec(), After::KeepAlive)).await;
    let proxy = support::proxy(&routes(upstream.addr, "")).await;
    let url = format!("http://{}/x", upstream.addr);
    for wave in 0..3 {
        let requests = (0..40).map(|_| {
            let client = proxy.client();
            let url = url.clone();
            tokio::spawn(async move {
                let res = client.get(&url).send().await.unwrap();
                (res.status().as_u16(), res.text().await.unwrap())
            })
        });
        for answer in futures_join(requests).await {
            assert_eq!(answer, (200, "hello".to_string()), "wave {wave}");
        }
    }
    assert!(
        upstream.accepted() <= 40,
        "{} connections for at most 40 requests at a time",
        upstream.accepted()
    );
    proxy.stop().await;
}

async fn futures_join<T: Send + 'static>(
    handles: impl Iterator<Item = tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let mut out = Vec::new();
    for handle in handles.collect::<Vec<_>>() {
        out.push(handle.await.unwrap());
    }
    out
}

#[tokio::test]
async fn an_idle_connection_closed_as_a_bodiless_get_goes_out_is_retried_once() {
    // Both legs at once (the test waits on idle time): over TLS the close is abrupt, a TCP
    // close without close_notify.
    let (clear, tls) = tokio::join!(
        retried_once_after_a_close(Leg::Clear),
        retried_once_after_a_close(Leg::Tls)
    );
    clear.stop().await;
    tls.stop().await;
}

async fn retried_once_after_a_close(leg: Leg) -> support::Proxy {
    // Every connection answers its first request, then closes when the second arrives:
    // the upstream's keep-alive timeout firing just as the proxy reuses the connection.
    let (upstream, proxy) = upstream_and_proxy(leg, "", |_, nth| {
        if nth == 0 {
            (OK_LENGTH.to_vec(), After::KeepAlive)
        } else {
            (Vec::new(), After::Close)
        }
    })
    .await;
    let client = proxy.client();
    let url = format!("http://{}/x", upstream.addr);
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);

    // Reused at once: the connection was not idle long enough to be at risk, no copy was
    // kept, so the close reaches the client as a 502.
    let res = client.get(&url).send().await.unwrap();
    assert_eq!(res.status(), 502, "{leg:?}");
    assert_eq!(upstream.accepted(), 1);

    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    assert_eq!(upstream.accepted(), 2);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Idle over a second: the GET meets the close, goes out again on a new connection.
    let res = client.get(&url).send().await.unwrap();
    assert_eq!(res.status(), 200, "{leg:?}");
    assert_eq!(res.text().await.unwrap(), "hello");
    assert_eq!(upstream.accepted(), 3, "{leg:?}");

    tokio::time::sleep(Duration::from_millis(1200)).await;
    // A POST with a body may have been acted on: it is not sent twice.
    let res = client.post(&url).body("once").send().await.unwrap();
    assert_eq!(res.status(), 502, "{leg:?}");
    assert_eq!(upstream.accepted(), 3);
    proxy
}

#[tokio::test]
async fn an_https_upstream_that_chooses_http1_keeps_one_connection_alive() {
    let slot = Arc::new(std::sync::OnceLock::<String>::new());
    let host = Arc::clone(&slot);
    let (upstream, proxy) = upstream_and_proxy(Leg::Tls, "", move |head, _| {
        (
            by_path(head, host.get().map_or("", String::as_str)),
            After::KeepAlive,
        )
    })
    .await;
    slot.set(upstream.addr.to_string()).unwrap();
    let client = proxy.client();
    let base = format!("http://{}", upstream.addr);
    for round in 0..3 {
        for path in ["length", "chunked"] {
            let res = client.get(format!("{base}/{path}")).send().await.unwrap();
            assert_eq!(res.status(), 200, "{path} {round}");
            assert_eq!(res.text().await.unwrap(), "hello");
        }
        let res = client.get(format!("{base}/empty")).send().await.unwrap();
        assert_eq!(res.status(), 204);
        let res = client
            .post(format!("{base}/length"))
            .body("a body")
            .send()
            .await;
        assert_eq!(res.unwrap().text().await.unwrap(), "hello");
    }
    assert_eq!(upstream.requests(), (12, 0), "all over TLS");
    assert_eq!(
        upstream.accepted(),
        1,
        "every request reused the first connection"
    );
    assert_eq!(proxy.state().upstream.idle_https_connections(), 1);
    proxy.stop().await;
}

#[tokio::test]
async fn an_http_and_an_https_connection_to_one_authority_never_mix() {
    let ca = TestCa::new();
    let upstream = raw_upstream_on(Wire::Either(acceptor(&ca, &["http/1.1"])), |_, _| {
        (OK_LENGTH.to_vec(), After::KeepAlive)
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "tls:\n  ca_file: {ca}\nroutes:\n  - name: clear\n    host: clear.test\n    upstream: http://{up}\
         \n  - name: secure\n    host: secure.test\n    upstream: https://{up}\n",
        ca = ca.write(dir.path(), "ca.pem").display(),
        up = upstream.addr,
    );
    let proxy = support::proxy(&yaml).await;
    let client = proxy.client();
    for _ in 0..3 {
        for host in ["clear.test", "secure.test"] {
            let res = client.get(format!("http://{host}/x")).send().await.unwrap();
            assert_eq!(res.status(), 200, "{host}");
        }
    }
    assert_eq!(
        upstream.requests(),
        (3, 3),
        "https over TLS only, http in clear only"
    );
    assert_eq!(upstream.accepted(), 2, "one kept-alive connection each");
    proxy.stop().await;
}

#[tokio::test]
async fn an_https_upstream_that_chooses_h2_gets_every_request_over_http2() {
    let ca = TestCa::new();
    let origin = https_origin(&ca, &["127.0.0.1"], &["h2", "http/1.1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "tls:\n  ca_file: {ca}\nroutes:\n  - name: api\n    host: api.test\n    upstream: {url}\n",
        ca = ca.write(dir.path(), "ca.pem").display(),
        url = origin.url(),
    );
    let proxy = support::proxy(&yaml).await;
    let client = proxy.client();
    for i in 0..4 {
        let res = client
            .get(format!("http://api.test/n/{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.text().await.unwrap(), "secure ok");
    }
    let seen = origin.requests();
    assert!(
        seen.iter().all(|s| s.version == http::Version::HTTP_2),
        "{seen:?}"
    );
    // The first request went on the connection that found out; the rest share one.
    let later: std::collections::BTreeSet<usize> = seen[1..].iter().map(|s| s.connection).collect();
    assert_eq!(later.len(), 1, "{later:?}");
    assert_eq!(
        proxy.state().upstream.idle_https_connections(),
        0,
        "none in the HTTP/1.1 pool"
    );
    proxy.stop().await;
}

/// An HTTP/2 client's request to an upstream that speaks HTTP/1.1 only goes out as
/// HTTP/1.1 (hyper-util's client refuses an HTTP/2 request on an HTTP/1 connection).
#[tokio::test]
async fn an_http2_clients_request_reaches_an_http1_tls_upstream_as_http1() {
    let (upstream, proxy) = upstream_and_proxy(Leg::Tls, "", |head, _| {
        let http1 = head
            .lines()
            .next()
            .unwrap_or_default()
            .ends_with(" HTTP/1.1");
        let answer = if http1 {
            OK_LENGTH.to_vec()
        } else {
            Vec::new()
        };
        (answer, After::KeepAlive)
    })
    .await;
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(connection);
    for _ in 0..2 {
        let request = http::Request::get(format!("http://{}/x", upstream.addr))
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap();
        let response = sender.send_request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let body = http_body_util::BodyExt::collect(response.into_body()).await;
        assert_eq!(body.unwrap().to_bytes(), "hello");
    }
    assert_eq!(upstream.requests(), (2, 0));
    assert_eq!(upstream.accepted(), 1);
    proxy.stop().await;
}

/// A client that goes away while its answer is on the way: over TLS the proxy finishes the
/// exchange in the background and keeps the connection (a new one would cost a handshake);
/// over plain TCP it closes it, as before. The plain case shows the client's going away was
/// noticed before the answer came (else both would keep their connection).
#[tokio::test]
async fn an_exchange_the_client_abandons_keeps_its_tls_connection_but_not_a_plain_one() {
    for (leg, connections) in [(Leg::Tls, 1), (Leg::Clear, 2)] {
        let (upstream, proxy) =
            upstream_and_proxy(leg, "", |_, _| (OK_LENGTH.to_vec(), After::KeepAlive)).await;
        let target = format!("http://{}/slow", upstream.addr);
        let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        client
            .write_all(
                format!(
                    "GET {target} HTTP/1.1\r\nHost: {}\r\nx-answer-after-ms: 300\r\n\r\n",
                    upstream.addr
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        drop(client);
        tokio::time::sleep(Duration::from_millis(700)).await;
        let answer = crate::raw::send(
            proxy.addr,
            &format!("GET {target} HTTP/1.1\r\nHost: {}\r\n\r\n", upstream.addr),
        )
        .await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{leg:?}: {answer}");
        assert_eq!(upstream.accepted(), connections, "{leg:?}");
        proxy.stop().await;
    }
}

/// A client that goes away in the middle of a body: over TLS the rest is read and the
/// connection kept when the rest is small; past the cap (64 KiB) the connection is closed
/// rather than read on the client's behalf; over plain TCP it is closed (the difference
/// shows the body was abandoned mid-way, not finished before the client left).
#[tokio::test]
async fn a_body_the_client_abandons_is_finished_over_tls_only_up_to_a_cap() {
    for (leg, size, connections) in [
        (Leg::Tls, 48 * 1024, 1),
        (Leg::Clear, 48 * 1024, 2),
        (Leg::Tls, 4 * 1024 * 1024, 2),
    ] {
        let body = vec![b'x'; size];
        let answer = move |head: &str, _| {
            if head.starts_with("GET /big ") {
                let mut bytes =
                    format!("HTTP/1.1 200 OK\r\ncontent-length: {size}\r\n\r\n").into_bytes();
                bytes.extend_from_slice(&body);
                (bytes, After::KeepAlive)
            } else {
                (OK_LENGTH.to_vec(), After::KeepAlive)
            }
        };
        let (upstream, proxy) = upstream_and_proxy(leg, "", answer).await;
        let mut client = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
        client
            .write_all(
                format!(
                    "GET http://{0}/big HTTP/1.1\r\nHost: {0}\r\nx-body-pause-ms: 300\r\n\r\n",
                    upstream.addr
                )
                .as_bytes(),
            )
            .await
            .unwrap();
        // The head and the start of the body, then the client goes away (a reset, so that
        // the proxy's next write fails).
        let mut start = [0u8; 512];
        let n = client.read(&mut start).await.unwrap();
        assert!(start[..n].starts_with(b"HTTP/1.1 200"), "{leg:?} {size}");
        socket2::SockRef::from(&client)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(client);
        tokio::time::sleep(Duration::from_millis(900)).await;
        let answer = crate::raw::send(
            proxy.addr,
            &format!(
                "GET http://{0}/ HTTP/1.1\r\nHost: {0}\r\n\r\n",
                upstream.addr
            ),
        )
        .await;
        assert!(
            answer.starts_with("HTTP/1.1 200"),
            "{leg:?} {size}: {answer}"
        );
        assert_eq!(
            upstream.accepted(),
            connections,
            "{leg:?}, body of {size} bytes"
        );
        proxy.stop().await;
    }
}
