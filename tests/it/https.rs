//! HTTPS both ways: TLS to `https://` upstreams (trust, name checks, ALPN h2), CONNECT
//! tunnels (plain, refused ports, `unmatched: deny`), and interception of tunnels to hosts a
//! route names with `intercept: true` (injected credential, HTTP/2 on both sides), plus
//! `ca init`.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};

use http::Version;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::tls::{https_origin, TestCa};
use crate::support::{self, Proxy};

const H2_AND_H1: &[&str] = &["h2", "http/1.1"];
const H1_ONLY: &[&str] = &["http/1.1"];

/// A static-credential route for host `api.test` sent to `upstream`, with extra YAML on top.
fn routes(top: &str, upstream: &str, intercept: bool) -> String {
    format!(
        r#"
{top}
credentials:
  api_key:
    type: static
    value: "Bearer ${{TOKEN}}"
routes:
  - name: api
    host: api.test
    upstream: {upstream}
    credential: api_key
    intercept: {intercept}
"#
    )
}

async fn start(yaml: &str) -> Proxy {
    support::proxy_with_env(yaml, &[("TOKEN", "s3cret-token")]).await
}

async fn error_body(res: reqwest::Response) -> (u16, serde_json::Value) {
    let status = res.status().as_u16();
    (status, res.json().await.unwrap())
}

#[tokio::test]
async fn https_upstream_trusted_by_ca_file_gets_h2_when_offered_else_h1() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path(), "upstream-ca.pem");
    for (alpn, expected) in [(H2_AND_H1, Version::HTTP_2), (H1_ONLY, Version::HTTP_11)] {
        let origin = https_origin(&ca, &["api.test", "127.0.0.1"], alpn).await;
        let top = format!("tls:\n  ca_file: {}", ca_file.display());
        let proxy = start(&routes(&top, &origin.url(), false)).await;
        let res = proxy
            .client()
            .get("http://api.test/v1/me?x=1")
            .header("host", "other-tenant.test")
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        assert_eq!(res.text().await.unwrap(), "secure ok");
        let seen = origin.last();
        assert_eq!(seen.version, expected, "ALPN {alpn:?}");
        assert_eq!(seen.target, "/v1/me?x=1");
        assert_eq!(seen.headers["authorization"], "Bearer s3cret-token");
        // The client's Host never reaches the upstream: HTTP/1.1 gets the upstream's own,
        // HTTP/2 names the host in `:authority` and gets no `host` header.
        let hosts: Vec<_> = seen.headers.get_all("host").iter().collect();
        if expected == Version::HTTP_11 {
            assert_eq!(hosts, [&origin.addr.to_string()], "ALPN {alpn:?}");
        } else {
            assert!(hosts.is_empty(), "ALPN {alpn:?}: {hosts:?}");
        }
        proxy.stop().await;
    }
}

/// An https upstream whose body stops mid-way is cut after `timeouts.upstream_body_idle`,
/// on HTTP/2 (the multiplexing client's leg) and on a pooled HTTP/1.1 connection (which
/// keeps the limit on its own timer) alike: the client gets the head and the first bytes,
/// then its connection is closed rather than left waiting.
#[tokio::test]
async fn a_stalled_https_response_body_is_cut_after_the_idle_limit_on_h2_and_h1() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path(), "upstream-ca.pem");
    for (alpn, expected) in [(H2_AND_H1, Version::HTTP_2), (H1_ONLY, Version::HTTP_11)] {
        let origin = https_origin(&ca, &["api.test", "127.0.0.1"], alpn).await;
        let top = format!(
            "tls:\n  ca_file: {}\ntimeouts:\n  upstream_body_idle: 300ms",
            ca_file.display()
        );
        let proxy = start(&routes(&top, &origin.url(), false)).await;
        let mut client = TcpStream::connect(proxy.addr).await.unwrap();
        client
            .write_all(b"GET http://api.test/stall-body HTTP/1.1\r\nHost: api.test\r\n\r\n")
            .await
            .unwrap();
        // Read until the proxy closes the connection; the limit is 300 ms, the origin would
        // stall forever, and this bound only keeps a regression from hanging the suite.
        let mut answer = Vec::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(30),
            client.read_to_end(&mut answer),
        )
        .await;
        assert!(read.is_ok(), "the connection was cut ({alpn:?})");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.contains("partial "),
            "the first bytes arrived: {answer}"
        );
        assert!(
            !answer.ends_with("0\r\n\r\n"),
            "the body was cut, not ended as if complete: {answer}"
        );
        assert_eq!(origin.last().version, expected, "ALPN {alpn:?}");
        proxy.stop().await;
    }
}

#[tokio::test]
async fn untrusted_upstream_certificate_is_a_502_naming_the_reason() {
    let ca = TestCa::new();
    let origin = https_origin(&ca, &["127.0.0.1"], H2_AND_H1).await;
    let proxy = start(&routes("", &origin.url(), false)).await;
    let res = proxy
        .client()
        .get("http://api.test/x")
        .send()
        .await
        .unwrap();
    let (status, body) = error_body(res).await;
    assert_eq!(status, 502);
    assert_eq!(body["error"], "upstream_unreachable");
    assert_eq!(body["route"], "api");
    let detail = body["detail"].as_str().unwrap().to_ascii_lowercase();
    assert!(
        detail.contains("unknownissuer") || detail.contains("unknown issuer"),
        "{detail}"
    );
    assert_eq!(origin.count(), 0);
    proxy.stop().await;
}

#[tokio::test]
async fn upstream_certificate_for_another_name_is_a_502_naming_the_reason() {
    let ca = TestCa::new();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path(), "upstream-ca.pem");
    let origin = https_origin(&ca, &["other.test"], H2_AND_H1).await;
    let top = format!("tls:\n  ca_file: {}", ca_file.display());
    let proxy = start(&routes(&top, &origin.url(), false)).await;
    let res = proxy
        .client()
        .get("http://api.test/x")
        .send()
        .await
        .unwrap();
    let (status, body) = error_body(res).await;
    assert_eq!(status, 502);
    assert_eq!(body["error"], "upstream_unreachable");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("not valid for name"), "{detail}");
    assert!(!detail.contains("s3cret"), "{detail}");
    proxy.stop().await;
}

/// A TCP server that echoes every byte and keeps a copy of what it received.
async fn tcp_echo() -> (SocketAddr, Arc<Mutex<Vec<u8>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received: Arc<Mutex<Vec<u8>>> = Arc::default();
    let copy = Arc::clone(&received);
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let copy = Arc::clone(&copy);
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    copy.lock().unwrap().extend_from_slice(&buf[..n]);
                    if s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    (addr, received)
}

#[tokio::test]
async fn connect_to_unnamed_host_is_a_byte_tunnel_without_credential() {
    let (echo, received) = tcp_echo().await;
    let top = format!("connect:\n  allowed_ports: [443, {}]", echo.port());
    let proxy = start(&routes(&top, "https://127.0.0.1:9", false)).await;
    let (mut s, head) = support::connect_tunnel(&proxy, &echo.to_string()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let payload: Vec<u8> = b"GET /x HTTP/1.1\r\nHost: api.test\r\n\r\n\x00\xff\x16\x03\x01"
        .iter()
        .copied()
        .chain((0..=255u8).cycle().take(40_000))
        .collect();
    s.write_all(&payload).await.unwrap();
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(back, payload);
    assert_eq!(
        *received.lock().unwrap(),
        payload,
        "upstream saw exactly the client's bytes"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn connect_to_a_port_not_allowed_is_refused() {
    let (echo, received) = tcp_echo().await;
    let proxy = start(&routes("", "https://127.0.0.1:9", false)).await;
    let (_s, head) = support::connect_tunnel(&proxy, &echo.to_string()).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    assert!(received.lock().unwrap().is_empty());
    proxy.stop().await;
}

#[tokio::test]
async fn connect_to_unnamed_host_with_unmatched_deny_is_refused() {
    let (echo, _received) = tcp_echo().await;
    let top = format!(
        "unmatched: deny\nconnect:\n  allowed_ports: [{}]",
        echo.port()
    );
    let proxy = start(&routes(&top, "https://127.0.0.1:9", false)).await;
    let (_s, head) = support::connect_tunnel(&proxy, &echo.to_string()).await;
    assert!(head.starts_with("HTTP/1.1 403"), "{head}");
    proxy.stop().await;
}

/// The authrelay CA (made by `ca init`) and YAML naming it, for an intercepting proxy in
/// front of `origin`, trusting the origin's CA.
fn intercepting_config(dir: &Path, upstream_ca: &TestCa, origin_url: &str) -> (String, String) {
    let files = authrelay::intercept::init_ca(&dir.join("ca"), false).unwrap();
    let upstream_ca_file = upstream_ca.write(dir, "upstream-ca.pem");
    let top = format!(
        "tls:\n  ca_file: {}\nintercept_ca:\n  cert_file: {}\n  key_file: {}",
        upstream_ca_file.display(),
        files.cert.display(),
        files.key.display()
    );
    (
        routes(&top, origin_url, true),
        std::fs::read_to_string(files.cert).unwrap(),
    )
}

fn https_client(proxy: &Proxy, ca_pem: &str, http1_only: bool) -> reqwest::Client {
    authrelay::upstream::install_crypto_provider();
    let mut b = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(proxy.url()).unwrap())
        .add_root_certificate(reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap());
    if http1_only {
        b = b.http1_only();
    }
    b.build().unwrap()
}

#[tokio::test]
async fn intercepted_https_gets_the_credential_over_h1_and_h2() {
    let upstream_ca = TestCa::new();
    let origin = https_origin(&upstream_ca, &["127.0.0.1"], H2_AND_H1).await;
    let dir = tempfile::tempdir().unwrap();
    let (yaml, authrelay_ca) = intercepting_config(dir.path(), &upstream_ca, &origin.url());
    let proxy = start(&yaml).await;
    for (http1_only, client_version) in [(true, Version::HTTP_11), (false, Version::HTTP_2)] {
        let client = https_client(&proxy, &authrelay_ca, http1_only);
        for i in 0..2 {
            let res = client
                .get(format!("https://api.test/v1/items/{i}?q=1"))
                .header("Authorization", "Bearer from-client")
                .send()
                .await
                .unwrap();
            assert_eq!(res.version(), client_version);
            assert_eq!(res.status(), 200);
            assert_eq!(res.text().await.unwrap(), "secure ok");
            let seen = origin.last();
            assert_eq!(seen.target, format!("/v1/items/{i}?q=1"));
            assert_eq!(seen.headers["authorization"], "Bearer s3cret-token");
            assert_eq!(seen.headers.get_all("authorization").iter().count(), 1);
            assert_eq!(seen.version, Version::HTTP_2, "h2 to the upstream");
        }
    }
    proxy.stop().await;
}

#[tokio::test]
async fn idle_intercepted_h2_connections_are_closed_but_not_while_a_request_runs() {
    let upstream_ca = TestCa::new();
    let origin = https_origin(&upstream_ca, &["127.0.0.1"], H2_AND_H1).await;
    let dir = tempfile::tempdir().unwrap();
    let (yaml, authrelay_ca) = intercepting_config(dir.path(), &upstream_ca, &origin.url());
    let proxy = start(&format!("timeouts:\n  client_idle: 400ms\n{yaml}")).await;

    let (tunnel, head) = support::connect_tunnel(&proxy, "api.test:443").await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut authrelay_ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
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
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .unwrap();
    let closed = tokio::spawn(connection);

    // A request that outlasts the idle timeout is not cut.
    let request = http::Request::get("https://api.test/slow/900")
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    assert_eq!(response.status(), 200);
    let body = http_body_util::BodyExt::collect(response.into_body())
        .await
        .unwrap()
        .to_bytes();
    assert_eq!(&body[..], b"secure ok");
    assert_eq!(
        origin.last().headers["authorization"],
        "Bearer s3cret-token"
    );

    // Then, with nothing in flight, the proxy ends the connection after about 400 ms.
    let idle_from = std::time::Instant::now();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(5), closed).await;
    assert!(ended.is_ok(), "the idle HTTP/2 connection was not closed");
    assert!(
        idle_from.elapsed() >= std::time::Duration::from_millis(300),
        "closed after {:?}, before the idle timeout",
        idle_from.elapsed()
    );
    proxy.stop().await;
}

#[tokio::test]
async fn intercepted_tunnel_refuses_clients_that_do_not_trust_the_ca() {
    let upstream_ca = TestCa::new();
    let origin = https_origin(&upstream_ca, &["127.0.0.1"], H2_AND_H1).await;
    let dir = tempfile::tempdir().unwrap();
    let (yaml, _authrelay_ca) = intercepting_config(dir.path(), &upstream_ca, &origin.url());
    let proxy = start(&yaml).await;
    let other = TestCa::new();
    let res = https_client(&proxy, &other.pem, false)
        .get("https://api.test/x")
        .send()
        .await;
    assert!(res.is_err(), "a client without the authrelay CA must fail");
    assert_eq!(origin.count(), 0);
    proxy.stop().await;
}

#[test]
fn intercept_without_intercept_ca_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let yaml = routes("", "https://127.0.0.1:9", true);
    let env: std::collections::HashMap<String, String> =
        [("TOKEN".to_string(), "t".to_string())].into();
    let err = authrelay::Config::from_yaml(&yaml, &dir.path().join("routes.yaml"), &env)
        .unwrap_err()
        .to_string();
    assert!(err.contains("intercept_ca"), "{err}");
    assert!(err.contains("ca init"), "{err}");
}

#[test]
fn ca_init_writes_a_private_key_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("ca");
    let run = |force: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_authrelay"));
        cmd.args(["ca", "init", "--out"]).arg(&out);
        if force {
            cmd.arg("--force");
        }
        cmd.output().unwrap()
    };
    let first = run(false);
    assert!(first.status.success(), "{first:?}");
    let cert = std::fs::read_to_string(out.join("ca.pem")).unwrap();
    assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(out.join("ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let again = run(false);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("--force"));
    assert_eq!(std::fs::read_to_string(out.join("ca.pem")).unwrap(), cert);
    assert!(run(true).status.success());
    assert_ne!(std::fs::read_to_string(out.join("ca.pem")).unwrap(), cert);
}

/// The issue's own acceptance check, with the real curl when it is installed.
#[tokio::test]
async fn curl_through_the_proxy_with_the_authrelay_ca_gets_the_credential() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("curl not installed; skipping");
        return;
    }
    let upstream_ca = TestCa::new();
    let origin = https_origin(&upstream_ca, &["127.0.0.1"], H2_AND_H1).await;
    let dir = tempfile::tempdir().unwrap();
    let (yaml, authrelay_ca) = intercepting_config(dir.path(), &upstream_ca, &origin.url());
    let ca_path = dir.path().join("authrelay-ca.pem");
    std::fs::write(&ca_path, authrelay_ca).unwrap();
    let proxy = start(&yaml).await;
    let out = tokio::process::Command::new("curl")
        .args(["--silent", "--show-error", "--noproxy", "", "--proxy"])
        .arg(proxy.url())
        .arg("--cacert")
        .arg(&ca_path)
        .arg("https://api.test/v1/curl")
        .env_remove("https_proxy")
        .env_remove("HTTPS_PROXY")
        .env_remove("CURL_CA_BUNDLE")
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "secure ok");
    let seen = origin.last();
    assert_eq!(seen.target, "/v1/curl");
    assert_eq!(seen.headers["authorization"], "Bearer s3cret-token");
    proxy.stop().await;
}

#[tokio::test]
async fn connect_to_a_named_host_without_intercept_is_not_decrypted() {
    let (echo, received) = tcp_echo().await;
    let top = format!(
        "unmatched: deny\nconnect:\n  allowed_ports: [{}]",
        echo.port()
    );
    let yaml =
        routes(&top, "https://127.0.0.1:9", false).replace("host: api.test", "host: 127.0.0.1");
    let proxy = start(&yaml).await;
    let (mut s, head) = support::connect_tunnel(&proxy, &echo.to_string()).await;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let hello = b"\x16\x03\x01\x00\x05hello";
    s.write_all(hello).await.unwrap();
    let mut back = [0u8; 10];
    s.read_exact(&mut back).await.unwrap();
    assert_eq!(&back, hello);
    assert_eq!(received.lock().unwrap().as_slice(), hello);
    proxy.stop().await;
}

#[tokio::test]
async fn intercepted_requests_are_refreshed_and_replayed_after_a_401() {
    use crate::support::lifecycle::TEST_TOKENS_YAML;
    use crate::support::vendor::{protected_api, TokenBook};
    use crate::support::vendors::oauth2::{self, OAuth2Vendor};

    let book = TokenBook::new();
    let mut vendor = OAuth2Vendor::new("cid", "csecret");
    vendor.access_lifetime = std::time::Duration::from_secs(30);
    let token_endpoint = oauth2::start(Arc::clone(&book), vendor).await;
    let api = protected_api(Arc::clone(&book), "authorization", "Bearer", 401).await;
    let dir = tempfile::tempdir().unwrap();
    let files = authrelay::intercept::init_ca(&dir.path().join("ca"), false).unwrap();
    let yaml = format!(
        "{TEST_TOKENS_YAML}intercept_ca:\n  cert_file: {}\n  key_file: {}\n\
         credentials:\n  oa:\n    type: oauth2_client_credentials\n    token_url: {}/v1/oauth/access_token\n\
         \x20   client_id: cid\n    client_secret: csecret\n\
         routes:\n  - name: api\n    host: api.test\n    upstream: {}\n    credential: oa\n    intercept: true\n",
        files.cert.display(),
        files.key.display(),
        token_endpoint.url(),
        api.url()
    );
    let proxy = support::proxy(&yaml).await;
    let client = https_client(
        &proxy,
        &std::fs::read_to_string(&files.cert).unwrap(),
        false,
    );
    let res = client.get("https://api.test/v1/me").send().await.unwrap();
    assert_eq!(res.status(), 200);
    book.revoke_all();
    let before = book.token_calls();
    let res = client
        .post("https://api.test/v1/items")
        .body("replay me inside the tunnel")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "the client never sees the 401");
    let echoed: serde_json::Value = res.json().await.unwrap();
    assert_eq!(echoed["body"], "replay me inside the tunnel");
    assert_eq!(book.token_calls() - before, 1, "one refresh");
    assert_eq!(
        book.api_stats().1,
        1,
        "exactly one request was refused upstream"
    );
    proxy.stop().await;
}

/// An unmatched absolute-form `https://` request goes to the addresses its host was checked
/// at, never to a second DNS answer: here the name resolves nowhere at all, and the request
/// still reaches the origin at the pinned address, with the name as TLS server name.
#[tokio::test]
async fn pinned_https_requests_connect_where_their_name_was_checked() {
    let ca = TestCa::new();
    let origin = https_origin(&ca, &["nowhere.invalid"], &["http/1.1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = ca.write(dir.path(), "ca.pem");
    let tls = authrelay::upstream::tls_config(&authrelay::config::TlsSettings {
        ca_file: Some(ca_file),
    })
    .unwrap();
    let config = authrelay::Config::from_yaml(
        "routes: []\n",
        Path::new("routes.yaml"),
        &std::collections::HashMap::<String, String>::new(),
    )
    .unwrap();
    let client = authrelay::upstream::UpstreamClient::new(tls, &config.timeouts);
    let port = origin.addr.port();
    let request = http::Request::builder()
        .uri(format!("https://nowhere.invalid:{port}/pinned"))
        .body(authrelay::upstream::body::empty())
        .unwrap();
    let pinned = authrelay::upstream::PinnedAddrs(vec![origin.addr].into());
    let response = client
        .send(
            request,
            Some(&pinned),
            None,
            authrelay::upstream::Deadline::after(
                std::time::Duration::from_secs(5),
                std::time::Duration::from_secs(5),
                std::time::Instant::now(),
            ),
        )
        .await
        .expect("the pinned origin answers");
    assert_eq!(response.status(), 200);
    assert_eq!(origin.last().target, "/pinned");
}
