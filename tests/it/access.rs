//! Who may use the proxy: client addresses (`clients.allow_from`), named users with
//! `Proxy-Authorization: Basic` in every mode, per-route `clients`, unmatched destinations,
//! and the admin listener's Host check and connection cap.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::support::{self, server};

const CREDENTIAL: &str = "Bearer route-secret-51";

/// Connects to `to` from the loopback address `from` (Linux routes all of 127.0.0.0/8 to lo).
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// Writes `request` and reads until the peer closes or a full response arrives; "" when the
/// connection was closed (or reset) without a byte.
async fn send_on(mut s: TcpStream, request: &str) -> String {
    let _ = s.write_all(request.as_bytes()).await;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("answer or close within 10 s");
        match read {
            Ok(0) | Err(_) => break,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
        let text = String::from_utf8_lossy(&buf);
        if text.contains("\r\n\r\n") && (text.contains("}\n") || text.ends_with("ok")) {
            break;
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn basic(user: &str, password: &str) -> String {
    format!(
        "Proxy-Authorization: Basic {}\r\n",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn clients_outside_allow_from_are_refused_before_a_request_is_read() {
    let origin = server::echo_origin().await;
    let yaml = format!(
        "clients:\n  allow_from: [127.0.0.1/32]\ncredentials:\n  c:\n    type: static\n    value: \"{CREDENTIAL}\"\nroutes:\n  - name: r\n    host: \"{}\"\n    credential: c\n",
        origin.addr
    );
    let proxy = support::proxy(&yaml).await;
    let request = format!(
        "GET http://{0}/x HTTP/1.1\r\nHost: {0}\r\nConnection: close\r\n\r\n",
        origin.addr
    );

    let refused = send_on(connect_from("127.0.0.2", proxy.addr).await, &request).await;
    assert_eq!(refused, "", "nothing is answered to 127.0.0.2");
    assert_eq!(origin.count(), 0);
    let metrics = proxy.state().metrics.encode();
    assert_eq!(
        metric(&metrics, "authrelay_refused_client_connections_total"),
        1.0,
        "{metrics}"
    );

    let served = send_on(connect_from("127.0.0.1", proxy.addr).await, &request).await;
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    assert_eq!(origin.last().header("authorization"), CREDENTIAL);
    proxy.stop().await;
}

#[tokio::test]
async fn users_must_authenticate_in_forward_connect_and_mount_mode() {
    let origin = server::echo_origin().await;
    let tunnel_end = server::echo_origin().await;
    let dir = tempfile::tempdir().unwrap();
    let password_file = dir.path().join("ops.pw");
    std::fs::write(&password_file, "ops-pw-2\n").unwrap();
    let yaml = format!(
        r#"connect:
  allowed_ports: [{tunnel_port}]
clients:
  users:
    app:
      password: ${{APP_PW}}
    ops:
      password_file: {password_file}
credentials:
  c:
    type: static
    value: "{CREDENTIAL}"
routes:
  - name: fwd
    host: "{origin}"
    credential: c
  - name: mnt
    mount: /m
    upstream: http://{origin}
    credential: c
"#,
        tunnel_port = tunnel_end.addr.port(),
        password_file = password_file.display(),
        origin = origin.addr,
    );
    let proxy = support::proxy_with_env(&yaml, &[("APP_PW", "app-pw-1")]).await;
    let forward = |auth: &str| {
        format!(
            "GET http://{0}/x HTTP/1.1\r\nHost: {0}\r\n{auth}Connection: close\r\n\r\n",
            origin.addr
        )
    };
    let mount =
        |auth: &str| format!("GET /m/x HTTP/1.1\r\nHost: p\r\n{auth}Connection: close\r\n\r\n");
    let tunnel = |auth: &str| {
        format!(
            "CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n{auth}\r\n",
            tunnel_end.addr
        )
    };
    // Each mode from its own address: the 4 failures each stay below the throttle's burst.
    for (mode, from, build) in [
        ("forward", "127.0.0.11", &forward as &dyn Fn(&str) -> String),
        ("mount", "127.0.0.12", &mount),
        ("CONNECT", "127.0.0.13", &tunnel),
    ] {
        for auth in [
            String::new(),
            basic("app", "wrong"),
            basic("nobody", "app-pw-1"),
            basic("ops", "app-pw-1"),
            "Proxy-Authorization: Bearer app-pw-1\r\n".to_string(),
        ] {
            let res = send_on(connect_from(from, proxy.addr).await, &build(&auth)).await;
            assert!(res.starts_with("HTTP/1.1 407"), "{mode} {auth}: {res}");
            assert!(
                res.to_ascii_lowercase()
                    .contains("proxy-authenticate: basic realm=\"authrelay\""),
                "{mode}: {res}"
            );
            assert!(res.contains("proxy_auth_required"), "{mode}: {res}");
            assert!(!res.contains("app-pw-1"), "{mode}: {res}");
        }
    }
    assert_eq!(origin.count(), 0, "no refused request reached the upstream");

    for (user, password) in [("app", "app-pw-1"), ("ops", "ops-pw-2")] {
        for request in [
            forward(&basic(user, password)),
            mount(&basic(user, password)),
        ] {
            let res = crate::raw::send(proxy.addr, &request).await;
            assert!(res.starts_with("HTTP/1.1 200"), "{user}: {res}");
            let seen = origin.last();
            assert_eq!(seen.header("authorization"), CREDENTIAL);
            assert!(
                !seen.headers.contains_key("proxy-authorization"),
                "Proxy-Authorization reached the upstream"
            );
        }
    }
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(tunnel(&basic("app", "app-pw-1")).as_bytes())
        .await
        .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    proxy.stop().await;
}

#[tokio::test]
async fn a_route_serves_only_the_clients_it_names() {
    let origin = server::echo_origin().await;
    let yaml = format!(
        r#"clients:
  users:
    billing:
      password: b-pw
    reports:
      password: r-pw
credentials:
  c:
    type: static
    value: "{CREDENTIAL}"
routes:
  - name: billing-only
    host: "{0}"
    path_prefix: /invoices/
    credential: c
    clients: [billing]
  - name: mount-billing
    mount: /billing
    upstream: http://{0}
    credential: c
    clients: [billing]
"#,
        origin.addr
    );
    let proxy = support::proxy(&yaml).await;
    let requests = |auth: String| {
        [
            format!(
                "GET http://{0}/invoices/1 HTTP/1.1\r\nHost: {0}\r\n{auth}\r\n",
                origin.addr
            ),
            format!("GET /billing/invoices/1 HTTP/1.1\r\nHost: p\r\n{auth}\r\n"),
        ]
    };
    for request in requests(basic("reports", "r-pw")) {
        let res = crate::raw::send(proxy.addr, &request).await;
        assert!(res.starts_with("HTTP/1.1 403"), "{res}");
        assert!(res.contains("client_not_allowed"), "{res}");
    }
    assert_eq!(origin.count(), 0, "the upstream was not contacted");
    // Counted on the routes that refused them, not as unmatched traffic.
    let metrics = proxy.state().metrics.encode();
    for route in ["billing-only", "mount-billing"] {
        let series = format!("authrelay_requests_total{{route=\"{route}\",class=\"4xx\"}}");
        assert_eq!(metric(&metrics, &series), 1.0, "{series}\n{metrics}");
    }
    assert_eq!(
        metric(
            &metrics,
            "authrelay_requests_total{route=\"unmatched\",class=\"4xx\"}"
        ),
        0.0,
        "{metrics}"
    );
    for request in requests(basic("billing", "b-pw")) {
        let res = crate::raw::send(proxy.addr, &request).await;
        assert!(res.starts_with("HTTP/1.1 200"), "{res}");
        assert_eq!(origin.last().header("authorization"), CREDENTIAL);
    }
    assert_eq!(origin.count(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn unmatched_deny_ranges_are_never_reached() {
    let listener = tokio::net::TcpListener::bind("127.0.0.2:0").await.unwrap();
    let internal = listener.local_addr().unwrap();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = std::sync::Arc::clone(&accepted);
    tokio::spawn(async move {
        while let Ok((_s, _)) = listener.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    });
    let yaml = format!(
        "unmatched_deny: [127.0.0.2/32, 10.0.0.0/8]\nconnect:\n  allowed_ports: [{}]\n",
        internal.port()
    );
    let proxy = support::proxy(&yaml).await;
    for request in [
        format!("GET http://{internal}/ HTTP/1.1\r\nHost: {internal}\r\n\r\n"),
        format!("CONNECT {internal} HTTP/1.1\r\nHost: {internal}\r\n\r\n"),
    ] {
        let res = crate::raw::send(proxy.addr, &request).await;
        assert!(res.starts_with("HTTP/1.1 403"), "{res}");
        assert!(res.contains("destination_denied"), "{res}");
    }
    assert_eq!(accepted.load(std::sync::atomic::Ordering::SeqCst), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn admin_answers_only_its_own_host_names_and_caps_connections() {
    let proxy = support::proxy("admin: 127.0.0.1:0\nadmin_hosts: [authrelay.internal]\n").await;
    let admin = proxy.running.as_ref().unwrap().admin_addr.unwrap();
    let get =
        |host: &str| format!("GET /healthz HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    for refused in [
        "attacker.example",
        "attacker.example:80",
        "localhost.attacker.example",
    ] {
        let res = crate::raw::send(admin, &get(refused)).await;
        assert!(res.starts_with("HTTP/1.1 403"), "{refused}: {res}");
    }
    for allowed in [
        admin.to_string(),
        format!("localhost:{}", admin.port()),
        "[::1]".to_string(),
        "authrelay.internal".to_string(),
        "AuthRelay.Internal:9901".to_string(),
    ] {
        let res = crate::raw::send(admin, &get(&allowed)).await;
        assert!(res.starts_with("HTTP/1.1 200"), "{allowed}: {res}");
    }

    // Beyond the cap, a new connection is served and the one idle the longest is closed.
    let cap = authrelay::admin::MAX_CONNECTIONS;
    let mut held = Vec::new();
    for _ in 0..cap {
        held.push(TcpStream::connect(admin).await.unwrap());
    }
    let over = send_on(TcpStream::connect(admin).await.unwrap(), &get("localhost")).await;
    assert!(over.starts_with("HTTP/1.1 200"), "{over}");
    let mut oldest = held.remove(0);
    let mut buf = [0u8; 1];
    let read = tokio::time::timeout(Duration::from_secs(30), oldest.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0) | Err(_))),
        "the idlest connection was closed"
    );
    proxy.stop().await;
}

#[test]
fn access_settings_are_validated_with_every_problem_listed() {
    let yaml = r#"
clients:
  allow_from: ["${WIDE}", "::1"]
  users:
    app:
      password: ""
    "a:b":
      password: x
unmatched_ports: [0]
credentials:
  c:
    type: static
    value: v
routes:
  - name: r
    host: api.example.com
    credential: c
    clients: [nobody]
  - name: clear
    host: api.example.com
    upstream: http://api.example.com
    credential: c
  - name: clear-allowed
    host: api.example.com
    upstream: http://api.example.com
    credential: c
    allow_cleartext: true
  - name: loopback
    host: api.example.com
    upstream: http://127.0.0.1:9000
    credential: c
"#;
    let env: std::collections::HashMap<String, String> =
        [("WIDE".to_string(), "10.0.0.0/33".to_string())].into();
    let err = authrelay::Config::from_yaml(yaml, Path::new("routes.yaml"), &env)
        .unwrap_err()
        .to_string();
    for expected in [
        "clients.allow_from: `10.0.0.0/33` is not an address range",
        "clients.users.app.password: must not be empty",
        "`a:b`",
        "unmatched_ports: must list ports from 1 to 65535",
        "routes[0] (r).clients: `nobody` is not defined under `clients.users`",
        "routes[1] (clear).upstream: `http://api.example.com` would send the credential in clear",
    ] {
        assert!(err.contains(expected), "missing {expected:?} in:\n{err}");
    }
    assert!(!err.contains("clear-allowed"), "{err}");
    assert!(!err.contains("(loopback)"), "{err}");
}

/// Log output captured in memory.
#[derive(Clone, Default)]
pub(crate) struct Captured(pub(crate) std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test]
async fn the_access_log_names_the_client_never_its_password() {
    support::route_logs_to_thread_subscribers();
    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    // The test runtime runs every task on this thread, so they all log here.
    let _guard = tracing::subscriber::set_default(subscriber);
    let origin = server::echo_origin().await;
    let yaml = format!(
        "clients:\n  users:\n    billing:\n      password: pw-never-logged-9\ncredentials:\n  c:\n    type: static\n    value: \"{CREDENTIAL}\"\nroutes:\n  - name: r\n    host: \"{}\"\n    credential: c\n",
        origin.addr
    );
    let proxy = support::proxy(&yaml).await;
    let ok = format!(
        "GET http://{0}/x HTTP/1.1\r\nHost: {0}\r\n{1}\r\n",
        origin.addr,
        basic("billing", "pw-never-logged-9")
    );
    assert!(crate::raw::send(proxy.addr, &ok)
        .await
        .starts_with("HTTP/1.1 200"));
    let refused = format!(
        "GET http://{0}/x HTTP/1.1\r\nHost: {0}\r\n{1}\r\n",
        origin.addr,
        basic("billing", "wrong-pw-also-secret")
    );
    assert!(crate::raw::send(proxy.addr, &refused)
        .await
        .starts_with("HTTP/1.1 407"));
    proxy.stop().await;
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let access = text
        .lines()
        .find(|l| l.contains("route=\"r\"") || l.contains("route=r"))
        .unwrap_or_else(|| panic!("no access line in:\n{text}"));
    assert!(
        access.contains("user=\"billing\"") || access.contains("user=billing"),
        "{access}"
    );
    assert!(access.contains("client=127.0.0.1"), "{access}");
    assert!(text.contains("proxy authentication failed"), "{text}");
    // The refusal has its access line too, like every answer.
    let refused_line = text
        .lines()
        .find(|l| l.contains("status=407"))
        .unwrap_or_else(|| panic!("no access line for the 407 in:\n{text}"));
    assert!(refused_line.contains("client=127.0.0.1"), "{refused_line}");
    for secret in [
        "pw-never-logged-9",
        "wrong-pw-also-secret",
        "route-secret-51",
    ] {
        assert!(!text.contains(secret), "{secret} logged:\n{text}");
    }
}

#[test]
fn address_ranges_and_ports_are_refused_at_their_line_and_column() {
    let wide = "clients:\n  allow_from: [10.0.0.0/8]\n";
    let cases = [
        (
            "clients:\n  allow_from: [127.0.0.1/32, nope]\n",
            "line 2 column",
        ),
        (
            "unmatched_deny:\n  - 10.0.0.0/8\n  - 300.1.2.3\n",
            "line 3 column",
        ),
        (
            &format!("{wide}unmatched_allow: [10.0.0.0/33]\n"),
            "line 3 column",
        ),
        ("unmatched_ports: [443, 70000]\n", "line 1 column"),
    ];
    let env = std::collections::HashMap::<String, String>::new();
    for (yaml, at) in cases {
        let err = authrelay::Config::from_yaml(yaml, Path::new("routes.yaml"), &env)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("routes.yaml") && err.contains(at),
            "{yaml}: {err}"
        );
    }
    let err = authrelay::Config::from_yaml(
        "unmatched_allow: [127.0.0.1/32]\n",
        Path::new("routes.yaml"),
        &env,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("unmatched_allow: applies only when `clients.allow_from` admits"),
        "{err}"
    );
}

/// Log lines captured from the current thread for the duration of a test.
pub(crate) fn capture_logs() -> (Captured, tracing::subscriber::DefaultGuard) {
    support::route_logs_to_thread_subscribers();
    let logs = Captured::default();
    let sink = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || sink.clone())
        .finish();
    (logs, tracing::subscriber::set_default(subscriber))
}

#[tokio::test]
async fn wrong_passwords_make_an_address_wait_before_any_password_is_checked() {
    // The test runtime runs every task on this thread, so they all log here.
    let (logs, _guard) = capture_logs();
    let origin = server::echo_origin().await;
    let tunnel_end = server::echo_origin().await;
    let yaml = format!(
        "connect:\n  allowed_ports: [{}]\nclients:\n  users:\n    app:\n      password: right-pw-3\ncredentials:\n  c:\n    type: static\n    value: \"{CREDENTIAL}\"\nroutes:\n  - name: fwd\n    host: \"{1}\"\n    credential: c\n  - name: mnt\n    mount: /m\n    upstream: http://{1}\n    credential: c\n",
        tunnel_end.addr.port(),
        origin.addr
    );
    let proxy = support::proxy(&yaml).await;
    let forward = |auth: &str| {
        format!(
            "GET http://{0}/x HTTP/1.1\r\nHost: {0}\r\n{auth}Connection: close\r\n\r\n",
            origin.addr
        )
    };
    let mount =
        |auth: &str| format!("GET /m/x HTTP/1.1\r\nHost: p\r\n{auth}Connection: close\r\n\r\n");
    let tunnel = |auth: &str| {
        format!(
            "CONNECT {0} HTTP/1.1\r\nHost: {0}\r\n{auth}\r\n",
            tunnel_end.addr
        )
    };
    let modes: [&dyn Fn(&str) -> String; 3] = [&forward, &mount, &tunnel];

    // Ten failures in every way a client authenticates; a missing header is no failure.
    let missing = send_on(connect_from("127.0.0.5", proxy.addr).await, &forward("")).await;
    assert!(missing.starts_with("HTTP/1.1 407"), "{missing}");
    for i in 0..10 {
        let guess = basic(&format!("guessed-user-{i}"), "guessed-pw-8");
        let wrong = basic("app", "wrong-pw-9");
        let auth = if i % 2 == 0 { guess } else { wrong };
        let res = send_on(
            connect_from("127.0.0.5", proxy.addr).await,
            &modes[i % 3](&auth),
        )
        .await;
        assert!(res.starts_with("HTTP/1.1 407"), "failure {i}: {res}");
    }
    // Now the right password is not even looked at, in any mode.
    for build in modes {
        let res = send_on(
            connect_from("127.0.0.5", proxy.addr).await,
            &build(&basic("app", "right-pw-3")),
        )
        .await;
        assert!(res.starts_with("HTTP/1.1 429"), "{res}");
        assert!(res.contains("proxy_auth_throttled"), "{res}");
        let retry_after = res
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("retry-after: ")
                    .map(str::to_string)
            })
            .unwrap_or_else(|| panic!("no Retry-After in {res}"));
        let secs: u64 = retry_after.trim().parse().unwrap();
        assert!((1..=30).contains(&secs), "{res}");
    }
    assert_eq!(origin.count(), 0, "nothing reached the upstream");
    // Another address with the right password is served.
    let served = send_on(
        connect_from("127.0.0.6", proxy.addr).await,
        &forward(&basic("app", "right-pw-3")),
    )
    .await;
    assert!(served.starts_with("HTTP/1.1 200"), "{served}");
    assert_eq!(origin.last().header("authorization"), CREDENTIAL);

    let metrics = proxy.state().metrics.encode();
    assert_eq!(
        metric(&metrics, "authrelay_proxy_auth_failures_total"),
        10.0,
        "{metrics}"
    );
    proxy.stop().await;
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let throttled: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("proxy logins throttled"))
        .collect();
    assert_eq!(throttled.len(), 1, "one line per burst:\n{text}");
    // Every answer has one access line: the missing header, ten failures, three throttled
    // attempts (forward, mount, CONNECT) and the one served from the other address.
    let statuses: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" request ") || l.ends_with(" request"))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("status=")))
        .collect();
    assert_eq!(
        statuses.iter().filter(|s| **s == "status=407").count(),
        11,
        "{text}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == "status=429").count(),
        3,
        "{text}"
    );
    assert_eq!(
        statuses.iter().filter(|s| **s == "status=200").count(),
        1,
        "{text}"
    );
    assert!(throttled[0].contains("127.0.0.5"), "{}", throttled[0]);
    for secret in ["guessed-user", "guessed-pw-8", "wrong-pw-9", "right-pw-3"] {
        assert!(!text.contains(secret), "{secret} logged:\n{text}");
    }
}

/// Sends `request` on a new connection and returns the final answer's head and body: after
/// a `200` to a CONNECT, `through` is sent inside the tunnel and its answer returned.
async fn exchange(proxy: SocketAddr, request: &str, through: &str) -> String {
    let mut s = TcpStream::connect(proxy).await.unwrap();
    s.write_all(request.as_bytes()).await.unwrap();
    let mut head = support::read_head(&mut s).await;
    if request.starts_with("CONNECT") && head.starts_with("HTTP/1.1 200") {
        s.write_all(through.as_bytes()).await.unwrap();
        head = support::read_head(&mut s).await;
    }
    let length = head
        .to_ascii_lowercase()
        .lines()
        .find_map(|l| l.strip_prefix("content-length:")?.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).await.unwrap();
    head + &String::from_utf8_lossy(&body)
}

#[tokio::test]
async fn clients_beyond_loopback_close_the_inside_to_unmatched_traffic() {
    let inside = server::echo_origin().await;
    let routed = server::echo_origin().await;
    let port = inside.addr.port();
    let wide = "clients:\n  allow_from: [127.0.0.0/8, 10.0.0.0/8]\n";
    let allow = "unmatched_allow: [127.0.0.1/32]\n";
    let tunnel_port = format!("connect:\n  allowed_ports: [{port}, 443]\n");
    let configs = [
        ("loopback-only clients (default)", tunnel_port.clone()),
        ("wide", format!("{wide}{tunnel_port}")),
        (
            "wide, allowed range and port",
            format!("{wide}{allow}unmatched_ports: [{port}]\n{tunnel_port}"),
        ),
        (
            "wide, allowed range, default ports",
            format!("{wide}{allow}{tunnel_port}"),
        ),
        (
            "wide, allowed, but not a CONNECT port",
            format!("{wide}{allow}unmatched_ports: [{port}]\n"),
        ),
    ];
    let o = inside.addr;
    let mapped = format!("[::ffff:127.0.0.1]:{port}");
    let ws = "Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
    let requests = [
        (
            "forward",
            format!("GET http://{o}/f HTTP/1.1\r\nHost: {o}\r\n\r\n"),
        ),
        (
            "mapped",
            format!("GET http://{mapped}/f HTTP/1.1\r\nHost: {mapped}\r\n\r\n"),
        ),
        (
            "websocket",
            format!("GET http://{o}/ws HTTP/1.1\r\nHost: {o}\r\n{ws}\r\n"),
        ),
        (
            "CONNECT",
            format!("CONNECT {o} HTTP/1.1\r\nHost: {o}\r\n\r\n"),
        ),
    ];
    use Reach::*;
    // One column per request above, one row per config.
    let expected = [
        [Reached, Reached, Reached, Reached],
        [DENIED, DENIED, DENIED, DENIED],
        [Reached, Reached, Reached, Reached],
        [DENIED, DENIED, DENIED, DENIED],
        [Reached, Reached, Reached, Refused("connect_port_denied")],
    ];
    let through = format!("GET /t HTTP/1.1\r\nHost: {o}\r\nConnection: close\r\n\r\n");
    for ((name, config), row) in configs.iter().zip(expected) {
        let yaml = format!(
            "{config}credentials:\n  c:\n    type: static\n    value: \"{CREDENTIAL}\"\nroutes:\n  - name: r\n    host: \"{}\"\n    credential: c\n",
            routed.addr
        );
        let proxy = support::proxy(&yaml).await;
        for ((kind, request), expect) in requests.iter().zip(row) {
            let before = inside.count();
            let res = exchange(proxy.addr, request, &through).await;
            match expect {
                Reached => {
                    assert!(!res.contains("\"error\""), "{name}, {kind}: {res}");
                    assert_eq!(inside.count(), before + 1, "{name}, {kind}: {res}");
                }
                Refused(code) => {
                    assert!(res.starts_with("HTTP/1.1 403"), "{name}, {kind}: {res}");
                    assert!(res.contains(code), "{name}, {kind}: {res}");
                    assert_eq!(inside.count(), before, "{name}, {kind}: {res}");
                }
            }
        }
        // Routed hosts name their hosts explicitly: every regime serves them.
        let res = crate::raw::send(
            proxy.addr,
            &format!(
                "GET http://{0}/r HTTP/1.1\r\nHost: {0}\r\n\r\n",
                routed.addr
            ),
        )
        .await;
        assert!(res.starts_with("HTTP/1.1 200"), "{name}, routed: {res}");
        assert_eq!(routed.last().header("authorization"), CREDENTIAL);
        proxy.stop().await;
    }
}

/// Whether unmatched traffic reaches the inside origin.
#[derive(Debug, Clone, Copy)]
enum Reach {
    Reached,
    Refused(&'static str),
}

const DENIED: Reach = Reach::Refused("destination_denied");
