//! A credential goes only where its route says: one table of look-alike hosts, ports,
//! schemes, methods and path tricks, each sent raw through one proxy (`unmatched: pass`,
//! admin on) in front of two loopback origins, with the expected status and where — if
//! anywhere — the credential arrived.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::support::{self, server};

const SECRET: &str = "Bearer confined-3f9a";
const LOCAL_SECRET: &str = "Bearer localhost-77c1";

/// What may reach the origins for one case.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Arrives {
    /// The credential origin gets the request with the credential.
    Credential,
    /// The request reaches origin `A` (0) or `B` (1) without any credential.
    Bare(usize),
    /// No origin sees a request.
    Nothing,
}

use Arrives::{Bare, Credential, Nothing};

fn yaml(a: SocketAddr, ports: &[u16]) -> String {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    format!(
        r#"admin: 127.0.0.1:0
unmatched: pass
connect:
  allowed_ports: [{ports}]
credentials:
  a:
    type: static
    value: "{SECRET}"
  local:
    type: static
    value: "{LOCAL_SECRET}"
routes:
  - name: api
    host: "{a}"
    path_prefix: /api/v1/
    methods: [GET, POST]
    credential: a
  - name: open
    host: "{a}"
    path_prefix: /open/
    credential: a
  - name: local
    host: localhost
    credential: local
  - name: clear
    host: api.example:8080
    credential: a
  - name: mounted
    mount: /m
    upstream: http://{a}/api/v1
    credential: a
"#,
        ports = ports.join(", ")
    )
}

/// Sends `request` on a new connection; returns the status and the text read. A CONNECT
/// answered 200 is a tunnel: only its head is read.
async fn exchange(proxy: SocketAddr, request: &str) -> (u16, String) {
    if !request.starts_with("CONNECT ") {
        let text = crate::raw::send(proxy, request).await;
        return (status_of(&text), text);
    }
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("CONNECT answered within 10 s")
            .unwrap_or(0);
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    (status_of(&text), text)
}

fn status_of(text: &str) -> u16 {
    text.split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn credentials_never_reach_the_wrong_place() {
    let a = server::echo_origin().await;
    let b = server::echo_origin().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let proxy = support::proxy(&yaml(a.addr, &[443])).await;
    let admin = proxy.running.as_ref().unwrap().admin_addr.unwrap();
    let listen = proxy.addr;
    // CONNECT may reach every port involved, so that only the destination policy decides.
    proxy.write_config(&support::with_test_listen(&yaml(
        a.addr,
        &[
            a.addr.port(),
            b.addr.port(),
            admin.port(),
            listen.port(),
            closed.port(),
        ],
    )));
    proxy.state().reload().unwrap();

    let (pa, pb, pad, pl, pc) = (
        a.addr.port(),
        b.addr.port(),
        admin.port(),
        listen.port(),
        closed.port(),
    );
    let get = |target: String| format!("GET {target} HTTP/1.1\r\nHost: x\r\n\r\n");
    let with = |method: &str, target: String, header: &str| {
        format!("{method} {target} HTTP/1.1\r\nHost: x\r\n{header}\r\n")
    };
    let connect =
        |authority: String| format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    let api = |path: &str| format!("http://127.0.0.1:{pa}{path}");

    #[rustfmt::skip]
    let cases: Vec<(&str, String, u16, Arrives)> = vec![
        // The route itself.
        ("route match", get(api("/api/v1/x")), 200, Credential),
        ("route match, POST", with("POST", api("/api/v1/x"), "Content-Length: 0\r\n"), 200, Credential),
        ("mount", get("/m/items?q=1".into()), 200, Credential),
        ("route without methods, override header", with("GET", api("/open/x"), "X-HTTP-Method-Override: DELETE\r\n"), 200, Credential),
        // Look-alike paths, ports, hosts and methods: passed on without the credential.
        ("prefix is whole segments", get(api("/api/v1x")), 200, Bare(0)),
        ("other path", get(api("/admin")), 200, Bare(0)),
        ("method not in the route", with("DELETE", api("/api/v1/x"), ""), 200, Bare(0)),
        ("TRACE outside methods goes bare", with("TRACE", api("/api/v1/x"), ""), 200, Bare(0)),
        ("same host, other port", get(format!("http://127.0.0.1:{pb}/api/v1/x")), 200, Bare(1)),
        ("Host header names the route", with("GET", format!("http://127.0.0.1:{pb}/api/v1/x"), &format!("Host: 127.0.0.1:{pa}\r\n")).replacen("Host: x\r\n", "", 1), 200, Bare(1)),
        ("localhost route has no port: not port A", get(format!("http://localhost:{pa}/api/v1/x")), 200, Bare(0)),
        ("LOCALHOST in capitals, port A", get(format!("http://LOCALHOST:{pa}/x")), 200, Bare(0)),
        ("localhost route, port B", get(format!("http://localhost:{pb}/x")), 200, Bare(1)),
        ("127.0.0.1 is not localhost's route", get(format!("http://127.0.0.1:{pb}/")), 200, Bare(1)),
        ("decimal IP for the route's host", get(format!("http://2130706433:{pa}/api/v1/x")), 200, Bare(0)),
        ("hex IP for the route's host", get(format!("http://0x7f000001:{pa}/api/v1/x")), 200, Bare(0)),
        ("short IP for the route's host", get(format!("http://127.1:{pa}/api/v1/x")), 200, Bare(0)),
        // Path tricks on credential routes.
        ("..;/ (Tomcat)", get(api("/api/v1/..;/admin")), 400, Nothing),
        ("encoded ..;", get(api("/api/v1/%2e%2e%3b/admin")), 400, Nothing),
        ("double-encoded dots", get(api("/api/v1/%252e%252e/admin")), 400, Nothing),
        ("triple-encoded dots", get(api("/api/v1/%25252e%25252e/admin")), 400, Nothing),
        ("upper-case encoded dots", get(api("/api/v1/%2E%2E/admin")), 400, Nothing),
        ("one encoded dot", get(api("/api/v1/.%2e/admin")), 400, Nothing),
        ("dots and NUL", get(api("/api/v1/..%00/admin")), 400, Nothing),
        ("NUL", get(api("/api/v1/x%00.json")), 400, Nothing),
        ("overlong dot, 2 bytes", get(api("/api/v1/%c0%ae%c0%ae/admin")), 400, Nothing),
        ("overlong dot, 3 bytes", get(api("/api/v1/%e0%80%ae%e0%80%ae/admin")), 400, Nothing),
        ("overlong slash", get(api("/api/v1/..%c0%afadmin")), 400, Nothing),
        ("encoded slash", get(api("/api/v1/..%2fadmin")), 400, Nothing),
        ("double-encoded slash", get(api("/api/v1/..%252fadmin")), 400, Nothing),
        ("encoded backslash", get(api("/api/v1/..%5cadmin")), 400, Nothing),
        ("matrix parameter", get(api("/api/v1/x;jsessionid=1")), 400, Nothing),
        ("encoded semicolon", get(api("/api/v1/x%3bv=1")), 400, Nothing),
        ("plain dot segments", get(api("/api/v1/../admin")), 400, Nothing),
        ("mount with ..;", get("/m/..;/admin".into()), 400, Nothing),
        ("mount with encoded dots", get("/m/%2e%2e/admin".into()), 400, Nothing),
        // Methods and method overrides.
        ("TRACE echoes headers", with("TRACE", api("/open/x"), ""), 405, Nothing),
        ("TRACK", with("TRACK", api("/open/x"), ""), 405, Nothing),
        ("TRACE on a mount", with("TRACE", "/m/x".into(), ""), 405, Nothing),
        ("X-HTTP-Method-Override", with("GET", api("/api/v1/x"), "X-HTTP-Method-Override: DELETE\r\n"), 400, Nothing),
        ("X-HTTP-Method", with("GET", api("/api/v1/x"), "X-HTTP-Method: DELETE\r\n"), 400, Nothing),
        ("X-Method-Override", with("POST", api("/api/v1/x"), "X-Method-Override: PUT\r\nContent-Length: 0\r\n"), 400, Nothing),
        // Schemes, user info, cleartext.
        ("https to a plain origin: TLS fails first", get(format!("https://127.0.0.1:{pa}/api/v1/x")), 502, Nothing),
        ("ftp", get(format!("ftp://127.0.0.1:{pa}/api/v1/x")), 400, Nothing),
        ("user info", get(format!("http://u:p@127.0.0.1:{pa}/api/v1/x")), 400, Nothing),
        ("credential in clear to a non-loopback host", get("http://api.example:8080/x".into()), 403, Nothing),
        ("origin form naming the route's host", with("GET", "/api/v1/x".into(), &format!("Host: 127.0.0.1:{pa}\r\n")).replacen("Host: x\r\n", "", 1), 404, Nothing),
        // The proxy itself is never a destination of unmatched traffic.
        ("admin by address", get(format!("http://127.0.0.1:{pad}/credentials")), 403, Nothing),
        ("admin by name", get(format!("http://localhost:{pad}/credentials")), 403, Nothing),
        ("admin by mapped IPv6", get(format!("http://[::ffff:127.0.0.1]:{pad}/credentials")), 403, Nothing),
        ("admin by 0.0.0.0", get(format!("http://0.0.0.0:{pad}/credentials")), 403, Nothing),
        ("admin by decimal IP", get(format!("http://2130706433:{pad}/credentials")), 403, Nothing),
        ("admin by octal IP", get(format!("http://017700000001:{pad}/credentials")), 403, Nothing),
        ("own listener", get(format!("http://127.0.0.1:{pl}/x")), 403, Nothing),
        ("IPv6 loopback is another address than the admin's", get(format!("http://[::1]:{pad}/credentials")), 502, Nothing),
        ("CONNECT to admin", connect(format!("127.0.0.1:{pad}")), 403, Nothing),
        ("CONNECT to admin by name", connect(format!("localhost:{pad}")), 403, Nothing),
        ("CONNECT to own listener", connect(format!("127.0.0.1:{pl}")), 403, Nothing),
        ("CONNECT to admin by short IP", connect(format!("127.1:{pad}")), 403, Nothing),
        ("unmatched, closed port: one generic 502", get(format!("http://127.0.0.1:{pc}/x")), 502, Nothing),
        // CONNECT: malformed, closed, open.
        ("CONNECT to a closed port", connect(format!("127.0.0.1:{pc}")), 502, Nothing),
        ("CONNECT with user info", connect(format!("user@127.0.0.1:{pa}")), 400, Nothing),
        ("CONNECT without host", connect(format!(":{pa}")), 400, Nothing),
        ("CONNECT without port", connect("127.0.0.1".into()), 400, Nothing),
        ("CONNECT to a port not allowed", connect("127.0.0.1:9".into()), 403, Nothing),
        ("CONNECT to an open port", connect(format!("127.0.0.1:{pb}")), 200, Nothing),
    ];
    assert!(cases.len() >= 40);

    let origins = [&a, &b];
    let mut failures = Vec::new();
    for (name, request, want_status, want) in &cases {
        let before: Vec<usize> = origins.iter().map(|o| o.count()).collect();
        let (status, text) = exchange(proxy.addr, request).await;
        let new: Vec<Vec<server::Seen>> = origins
            .iter()
            .zip(&before)
            .map(|(o, n)| o.requests()[*n..].to_vec())
            .collect();
        let got = match (&new[0][..], &new[1][..]) {
            ([], []) => Some(Nothing),
            ([one], []) if one.header("authorization") == SECRET => Some(Credential),
            ([one], []) if !one.headers.contains_key("authorization") => Some(Bare(0)),
            ([], [one]) if !one.headers.contains_key("authorization") => Some(Bare(1)),
            _ => None,
        };
        let leaked = new
            .iter()
            .flatten()
            .any(|s| s.header("authorization") == LOCAL_SECRET);
        // Each refusal names its reason; a 502 never tells a closed port from an open one.
        let code = match *want_status {
            400 => "bad_request",
            404 => "no_route",
            405 => "method_not_allowed",
            502 if !name.starts_with("https") => r#""detail":"upstream unreachable""#,
            403 if name.contains("in clear") => "cleartext_refused",
            403 if name.contains("not allowed") => "connect_port_denied",
            403 => "destination_denied",
            _ => "",
        };
        if status != *want_status
            || !text.contains(code)
            || got != Some(*want)
            || leaked
            || text.contains("confined-3f9a")
        {
            failures.push(format!(
                "{name}: got {status} {got:?} (leaked local: {leaked}), want {want_status} {want:?}\n  {}",
                text.lines().last().unwrap_or_default()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    proxy.stop().await;
}
