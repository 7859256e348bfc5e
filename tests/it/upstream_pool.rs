//! The plain-HTTP upstream pool: keep-alive reuse across bodies of every framing, upstreams
//! that close idle connections or cut a response short, the idle sweep, and concurrency.
//! The upstream here is a hand-written HTTP/1.1 server so that each test decides exactly
//! when connections are closed, and counts them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support;

/// What the raw upstream does after writing an answer.
#[derive(Clone, Copy)]
enum After {
    /// Waits for the next request on the same connection.
    KeepAlive,
    /// Closes the connection after this long, without telling the client beforehand.
    CloseIdle(Duration),
    /// Closes at once (the answer itself was cut short).
    Close,
}

/// A hand-written upstream that counts the connections it accepted and closed.
struct RawUpstream {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
}

impl RawUpstream {
    fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
    fn closed(&self) -> usize {
        self.closed.load(Ordering::SeqCst)
    }
}

/// Serves requests (heads only; a Content-Length body is read and ignored) with `answer`,
/// which gets the request line and headers and the request's index on its connection (0 for
/// the first) and returns the raw response bytes (none: close without answering).
async fn raw_upstream<F>(answer: F) -> RawUpstream
where
    F: Fn(&str, usize) -> (Vec<u8>, After) + Send + Sync + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let answer = Arc::new(answer);
    let (acc, clo) = (Arc::clone(&accepted), Arc::clone(&closed));
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            acc.fetch_add(1, Ordering::SeqCst);
            let answer = Arc::clone(&answer);
            let clo = Arc::clone(&clo);
            tokio::spawn(async move {
                serve_raw(stream, &*answer).await;
                clo.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    RawUpstream {
        addr,
        accepted,
        closed,
    }
}

/// What the raw upstream answers: request head and index on its connection -> bytes, then.
type Answer = dyn Fn(&str, usize) -> (Vec<u8>, After) + Send + Sync;

async fn serve_raw(mut stream: TcpStream, answer: &Answer) {
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
        let (response, after) = answer(&head, nth);
        if response.is_empty() {
            return;
        }
        if stream.write_all(&response).await.is_err() {
            return;
        }
        match after {
            After::KeepAlive => {}
            After::Close => return,
            After::CloseIdle(delay) => {
                tokio::time::sleep(delay).await;
                return;
            }
        }
    }
}

fn routes(upstream: SocketAddr, extra: &str) -> String {
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
{extra}"#
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

#[tokio::test]
async fn a_connection_the_upstream_closed_while_idle_is_not_used_again() {
    let upstream = raw_upstream(|_, _| {
        (
            OK_LENGTH.to_vec(),
            After::CloseIdle(Duration::from_millis(50)),
        )
    })
    .await;
    let proxy = support::proxy(&routes(upstream.addr, "")).await;
    let client = proxy.client();
    let url = format!("http://{}/x", upstream.addr);
    for _ in 0..3 {
        let res = client.get(&url).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.text().await.unwrap(), "hello");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert_eq!(
        upstream.accepted(),
        3,
        "a fresh connection after each close"
    );
    proxy.stop().await;
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
    let upstream = raw_upstream(|_, _| (OK_LENGTH.to_vec(), After::KeepAlive)).await;
    let proxy = support::proxy(&routes(upstream.addr, "timeouts:\n  pool_idle: 200ms\n")).await;
    let res = proxy
        .client()
        .get(format!("http://{}/x", upstream.addr))
        .send()
        .await
        .unwrap();
    assert_eq!(res.text().await.unwrap(), "hello");
    assert_eq!(proxy.state().upstream.idle_plain_connections(), 1);
    let mut waited = Duration::ZERO;
    while upstream.closed() == 0 && waited < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    }
    assert_eq!(
        upstream.closed(),
        1,
        "the idle connection was closed by the proxy"
    );
    assert_eq!(proxy.state().upstream.idle_plain_connections(), 0);
    proxy.stop().await;
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
    // Every connection answers its first request, then closes when the second arrives:
    // the upstream's keep-alive timeout firing just as the proxy reuses the connection.
    let upstream = raw_upstream(|_, nth| {
        if nth == 0 {
            (OK_LENGTH.to_vec(), After::KeepAlive)
        } else {
            (Vec::new(), After::Close)
        }
    })
    .await;
    let proxy = support::proxy(&routes(upstream.addr, "")).await;
    let client = proxy.client();
    let url = format!("http://{}/x", upstream.addr);
    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);

    // Reused at once: the connection was not idle long enough to be at risk, no copy was
    // kept, so the close reaches the client as a 502.
    let res = client.get(&url).send().await.unwrap();
    assert_eq!(res.status(), 502);
    assert_eq!(upstream.accepted(), 1);

    assert_eq!(client.get(&url).send().await.unwrap().status(), 200);
    assert_eq!(upstream.accepted(), 2);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    // Idle over a second: the GET meets the close, goes out again on a new connection.
    let res = client.get(&url).send().await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.text().await.unwrap(), "hello");
    assert_eq!(upstream.accepted(), 3);

    tokio::time::sleep(Duration::from_millis(1200)).await;
    // A POST with a body may have been acted on: it is not sent twice.
    let res = client.post(&url).body("once").send().await.unwrap();
    assert_eq!(res.status(), 502);
    assert_eq!(upstream.accepted(), 3);
    proxy.stop().await;
}
