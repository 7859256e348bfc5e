//! Client certificates to the upstream (mutual TLS, `tls_client_cert`): against an HTTPS
//! upstream on 127.0.0.1 that refuses any handshake without a certificate its own CA signed
//! and echoes the subject it was shown. Forward, mount and intercepted requests and
//! WebSocket handshakes present the route's certificate; none or a wrong one is a 502 naming
//! the route; a certificate goes with a bearer credential; rotated files are used by new
//! connections and bad ones are refused; connections made with different certificates are
//! never shared.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::support::tls::{
    https_origin, mtls_origin, mtls_server_config, subject, write_private, TestCa, TlsOrigin,
};
use crate::support::{self, Proxy};

const H2_AND_H1: &[&str] = &["h2", "http/1.1"];
const H1_ONLY: &[&str] = &["http/1.1"];

/// The upstream's CA (trusted by the proxy), the CA that signs accepted client
/// certificates, and a folder for the files.
struct Bank {
    server_ca: TestCa,
    client_ca: TestCa,
    dir: tempfile::TempDir,
    server_ca_file: PathBuf,
}

impl Bank {
    fn new() -> Self {
        let server_ca = TestCa::new();
        let dir = tempfile::tempdir().unwrap();
        let server_ca_file = server_ca.write(dir.path(), "bank-ca.pem");
        Self {
            server_ca,
            client_ca: TestCa::new(),
            dir,
            server_ca_file,
        }
    }

    async fn origin(&self, alpn: &[&str]) -> TlsOrigin {
        mtls_origin(&self.server_ca, &self.client_ca, &["127.0.0.1"], alpn).await
    }

    /// A client certificate the bank accepts, with subject `CN=<name>`.
    fn client_cert(&self, name: &str) -> (PathBuf, PathBuf) {
        self.client_ca.client_files(self.dir.path(), name, name)
    }

    /// A config file with one mount route `bank` presenting `files`.
    fn config_file(&self, files: &(PathBuf, PathBuf)) -> PathBuf {
        let path = self.dir.path().join("routes.yaml");
        let yaml = format!(
            "routes:\n  - name: bank\n    mount: /bank\n    upstream: https://127.0.0.1:8443\n{}",
            cert_yaml(files)
        );
        std::fs::write(&path, yaml).unwrap();
        path
    }

    /// `tls:` trusting the bank's server certificate.
    fn tls(&self) -> String {
        format!("tls:\n  ca_file: {}\n", self.server_ca_file.display())
    }
}

/// A route's YAML lines (6 spaces in) for a client certificate.
fn cert_yaml((cert, key): &(PathBuf, PathBuf)) -> String {
    format!(
        "    tls_client_cert:\n      cert_file: {}\n      key_file: {}\n",
        cert.display(),
        key.display()
    )
}

async fn get(client: &reqwest::Client, url: &str) -> (u16, String) {
    let res = client.get(url).send().await.unwrap();
    (res.status().as_u16(), res.text().await.unwrap())
}

#[tokio::test]
async fn forward_and_mount_requests_present_the_routes_certificate() {
    let bank = Bank::new();
    let origin = bank.origin(H2_AND_H1).await;
    let cert = bank.client_cert("billing-app");
    let yaml = format!(
        "{tls}routes:\n  - name: bank\n    host: bank.test\n    upstream: {url}\n{c}\
         \n  - name: bank-mount\n    mount: /bank\n    upstream: {url}\n{c}",
        tls = bank.tls(),
        url = origin.url(),
        c = cert_yaml(&cert),
    );
    let proxy = support::proxy(&yaml).await;
    let (status, body) = get(&proxy.client(), "http://bank.test/v1/accounts").await;
    assert_eq!((status, body.as_str()), (200, "client CN=billing-app"));
    let (status, body) = get(
        &support::direct_client(),
        &format!("{}/bank/v1/payments?x=1", proxy.url()),
    )
    .await;
    assert_eq!((status, body.as_str()), (200, "client CN=billing-app"));
    let seen = origin.requests();
    assert_eq!(seen[0].target, "/v1/accounts");
    assert_eq!(seen[1].target, "/v1/payments?x=1");
    proxy.stop().await;
}

#[tokio::test]
async fn intercepted_tunnels_present_the_routes_certificate() {
    let bank = Bank::new();
    let origin = bank.origin(H2_AND_H1).await;
    let cert = bank.client_cert("tunnel-app");
    let ca = authrelay::intercept::init_ca(&bank.dir.path().join("ca"), false).unwrap();
    let yaml = format!(
        "{tls}intercept_ca:\n  cert_file: {}\n  key_file: {}\n\
         routes:\n  - name: bank\n    host: bank.test\n    upstream: {url}\n    intercept: true\n{c}",
        ca.cert.display(),
        ca.key.display(),
        tls = bank.tls(),
        url = origin.url(),
        c = cert_yaml(&cert),
    );
    let proxy = support::proxy(&yaml).await;
    let authrelay_ca = std::fs::read(&ca.cert).unwrap();
    let client = reqwest::Client::builder()
        .proxy(reqwest::Proxy::all(proxy.url()).unwrap())
        .add_root_certificate(reqwest::Certificate::from_pem(&authrelay_ca).unwrap())
        .build()
        .unwrap();
    let (status, body) = get(&client, "https://bank.test/v1/accounts").await;
    assert_eq!((status, body.as_str()), (200, "client CN=tunnel-app"));
    assert_eq!(origin.last().target, "/v1/accounts");
    proxy.stop().await;
}

#[tokio::test]
async fn websocket_handshakes_present_the_routes_certificate() {
    let bank = Bank::new();
    let mut config = mtls_server_config(&bank.server_ca, &bank.client_ca, &["127.0.0.1"]);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Greets each WebSocket with the subject of the certificate its connection presented.
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let Ok(tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let shown = tls.get_ref().1.peer_certificates().map(|c| subject(&c[0]));
            let Ok(mut ws) = tokio_tungstenite::accept_async(tls).await else {
                continue;
            };
            let greeting = format!("client {}", shown.unwrap_or_default());
            let _ = ws.send(Message::text(greeting)).await;
        }
    });
    let cert = bank.client_cert("socket-app");
    let yaml = format!(
        "{tls}routes:\n  - name: bank-ws\n    mount: /ws\n    upstream: https://{addr}\n{c}",
        tls = bank.tls(),
        c = cert_yaml(&cert),
    );
    let proxy = support::proxy(&yaml).await;
    let stream = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let url = format!("ws://{}/ws/stream", proxy.addr);
    let (mut ws, response) = tokio_tungstenite::client_async(url, stream).await.unwrap();
    assert_eq!(response.status(), 101);
    let greeting = ws.next().await.expect("a greeting").unwrap();
    assert_eq!(
        greeting.into_text().unwrap().as_str(),
        "client CN=socket-app"
    );
    proxy.stop().await;
}

#[tokio::test]
async fn no_or_a_wrong_certificate_is_refused_by_the_upstream_and_a_502_names_the_route() {
    let bank = Bank::new();
    let origin = bank.origin(H2_AND_H1).await;
    let stranger = TestCa::new().client_files(bank.dir.path(), "stranger", "stranger");
    let yaml = format!(
        "{tls}routes:\n  - name: no-cert\n    mount: /plain\n    upstream: {url}\n\
         \n  - name: wrong-cert\n    mount: /wrong\n    upstream: {url}\n{c}",
        tls = bank.tls(),
        url = origin.url(),
        c = cert_yaml(&stranger),
    );
    let proxy = support::proxy(&yaml).await;
    for (mount, route) in [("plain", "no-cert"), ("wrong", "wrong-cert")] {
        let res = support::direct_client()
            .get(format!("{}/{mount}/v1/accounts", proxy.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 502, "{route}");
        let body: serde_json::Value = res.json().await.unwrap();
        assert_eq!(body["error"], "upstream_unreachable", "{body}");
        assert_eq!(body["route"], route, "{body}");
        let detail = body["detail"].as_str().unwrap();
        assert!(detail.contains("refused the TLS handshake"), "{detail}");
        assert!(!detail.contains("PRIVATE"), "{detail}");
    }
    assert_eq!(origin.count(), 0, "no request got through");
    assert_eq!(origin.failed_handshakes.lock().unwrap().len(), 2);
    proxy.stop().await;
}

#[tokio::test]
async fn a_certificate_and_a_bearer_credential_go_together() {
    let bank = Bank::new();
    let origin = bank.origin(H2_AND_H1).await;
    let cert = bank.client_cert("open-banking-app");
    let yaml = format!(
        "{tls}credentials:\n  bank_token:\n    type: static\n    value: \"Bearer ${{BANK_TOKEN}}\"\n\
         routes:\n  - name: bank\n    host: bank.test\n    upstream: {url}\n    credential: bank_token\n{c}",
        tls = bank.tls(),
        url = origin.url(),
        c = cert_yaml(&cert),
    );
    let proxy = support::proxy_with_env(&yaml, &[("BANK_TOKEN", "obie-7f3a")]).await;
    let (status, body) = get(&proxy.client(), "http://bank.test/v1/accounts").await;
    assert_eq!((status, body.as_str()), (200, "client CN=open-banking-app"));
    assert_eq!(origin.last().headers["authorization"], "Bearer obie-7f3a");
    proxy.stop().await;
}

#[tokio::test]
async fn connections_made_with_different_certificates_are_never_shared() {
    for alpn in [H2_AND_H1, H1_ONLY] {
        let bank = Bank::new();
        let origin = bank.origin(alpn).await;
        let (alice, bob) = (bank.client_cert("alice"), bank.client_cert("bob"));
        let yaml = format!(
            "{tls}routes:\n  - name: alice\n    mount: /alice\n    upstream: {url}\n{a}\
             \n  - name: bob\n    mount: /bob\n    upstream: {url}\n{b}\
             \n  - name: nobody\n    mount: /nobody\n    upstream: {url}\n",
            tls = bank.tls(),
            url = origin.url(),
            a = cert_yaml(&alice),
            b = cert_yaml(&bob),
        );
        let proxy = support::proxy(&yaml).await;
        let client = support::direct_client();
        for i in 0..3 {
            for who in ["alice", "bob"] {
                let (status, body) = get(&client, &format!("{}/{who}/n/{i}", proxy.url())).await;
                assert_eq!(status, 200, "{alpn:?} {who} {i}");
                assert_eq!(body, format!("client CN={who}"), "{alpn:?} {i}");
            }
            // A route without a certificate never rides on a connection made with one.
            let (status, _) = get(&client, &format!("{}/nobody/n/{i}", proxy.url())).await;
            assert_eq!(status, 502, "{alpn:?} {i}");
        }
        let seen = origin.requests();
        assert_eq!(seen.len(), 6);
        // `after_first`: the connections of the second and third requests only. An upstream
        // that chooses HTTP/2 answers the first request on the connection that told the
        // proxy so (closed after it); the others share the multiplexing client's connection.
        let connections = |who: &str, after_first: bool| -> std::collections::BTreeSet<usize> {
            seen.iter()
                .filter(|s| s.client_subject.as_deref() == Some(&format!("CN={who}")))
                .filter(|s| !after_first || s.target != "/n/0")
                .map(|s| s.connection)
                .collect()
        };
        let (a, b) = (connections("alice", false), connections("bob", false));
        assert!(a.is_disjoint(&b), "{alpn:?}: {a:?} {b:?}");
        let (a, b) = (connections("alice", true), connections("bob", true));
        assert_eq!(
            a.len(),
            1,
            "{alpn:?}: alice's requests share one kept-alive connection"
        );
        assert_eq!(b.len(), 1, "{alpn:?}: bob's too");
        if alpn == H1_ONLY {
            let (a, b) = (connections("alice", false), connections("bob", false));
            assert_eq!(
                (a.len(), b.len()),
                (1, 1),
                "HTTP/1.1: all on one connection each"
            );
        }
        assert_eq!(
            proxy.state().upstream.client_certificates_in_use(),
            2,
            "one pool per certificate"
        );
        proxy.stop().await;
    }
}

/// Polls (without a timing assertion) until the bank sees `subject` on `url`.
async fn wait_for_subject(client: &reqwest::Client, url: &str, subject: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = get(client, url).await;
        if status == 200 && body == format!("client CN={subject}") {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still `{status} {body}`, not {subject}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn rotated_files_are_used_by_new_connections_and_bad_ones_keep_the_old_certificate() {
    let bank = Bank::new();
    let origin = bank.origin(H2_AND_H1).await;
    let files = bank.client_cert("current");
    let yaml = format!(
        "{tls}routes:\n  - name: bank\n    mount: /bank\n    upstream: {url}\n{c}",
        tls = bank.tls(),
        url = origin.url(),
        c = cert_yaml(&files),
    );
    let proxy = support::watched_proxy(&yaml).await;
    let client = support::direct_client();
    let url = format!("{}/bank/v1/accounts", proxy.url());
    assert_eq!(get(&client, &url).await.1, "client CN=current");

    // A rotation tool replaces both files: the next connection presents the new pair.
    let (next_cert, next_key) = bank.client_cert("rotated");
    write_private(&files.0, &std::fs::read_to_string(&next_cert).unwrap());
    write_private(&files.1, &std::fs::read_to_string(&next_key).unwrap());
    wait_for_subject(&client, &url, "rotated").await;

    // Half a rotation (a new certificate, the old key) and a broken key are refused; the
    // rotated pair stays in force.
    let (third_cert, _) = bank.client_cert("half");
    let rotated_key = std::fs::read_to_string(&files.1).unwrap();
    write_private(&files.0, &std::fs::read_to_string(&third_cert).unwrap());
    let err = proxy.state().reload().expect_err("refused").to_string();
    assert!(
        err.contains("routes[0] (bank).tls_client_cert.key_file")
            && err.contains("does not belong to the certificate"),
        "{err}"
    );
    write_private(&files.0, &std::fs::read_to_string(&next_cert).unwrap());
    write_private(&files.1, "-----BEGIN PRIVATE KEY-----\nnot a key\n");
    let err = proxy.state().reload().expect_err("refused").to_string();
    assert!(err.contains("tls_client_cert.key_file"), "{err}");
    assert_eq!(get(&client, &url).await.1, "client CN=rotated");
    assert!(!err.contains(&rotated_key[40..80]), "{err}");
    proxy.stop().await;
}

/// The config error for `yaml` (written beside `dir`'s files).
fn config_error(dir: &Path, yaml: &str) -> String {
    let path = dir.join("routes.yaml");
    std::fs::write(&path, yaml).unwrap();
    let env = std::collections::HashMap::<String, String>::new();
    authrelay::Config::load(&path, &env)
        .expect_err("refused")
        .to_string()
}

#[test]
fn check_refuses_bad_files_naming_the_route_and_field() {
    let bank = Bank::new();
    let dir = bank.dir.path();
    let (cert, key) = bank.client_cert("app");
    let (_, other_key) = bank.client_cert("other");
    std::fs::write(
        dir.join("garbage.pem"),
        "-----BEGIN CERTIFICATE-----\n!!!\n",
    )
    .unwrap();
    std::fs::write(dir.join("empty.pem"), "nothing here\n").unwrap();
    let route = |cert: &str, key: &str, upstream: &str| {
        format!(
            "routes:\n  - name: bank\n    mount: /bank\n    upstream: {upstream}\n    \
             tls_client_cert:\n      cert_file: {cert}\n      key_file: {key}\n"
        )
    };
    let (c, k) = (cert.to_str().unwrap(), key.to_str().unwrap());
    let https = "https://127.0.0.1:8443";
    let cases = [
        (
            route("missing.pem", k, https),
            "routes[0] (bank).tls_client_cert.cert_file: file",
        ),
        (
            route(c, "missing.key", https),
            "routes[0] (bank).tls_client_cert.key_file: file",
        ),
        (
            route("garbage.pem", k, https),
            "routes[0] (bank).tls_client_cert.cert_file",
        ),
        (
            route("empty.pem", k, https),
            "tls_client_cert.cert_file: ",
        ),
        (route(c, "empty.pem", https), "holds no PEM private key"),
        (
            route(c, other_key.to_str().unwrap(), https),
            "does not belong to the certificate",
        ),
        (
            route(c, k, "http://127.0.0.1:8080"),
            "routes[0] (bank).tls_client_cert: a client certificate is presented in a TLS handshake",
        ),
    ];
    for (yaml, expected) in cases {
        let err = config_error(dir, &yaml);
        assert!(err.contains(expected), "{expected}\n{err}");
        assert!(!err.contains("BEGIN"), "{err}");
    }
    // A missing key is a parse error with its line and column.
    let err = config_error(
        dir,
        &format!("routes:\n  - name: bank\n    mount: /b\n    upstream: {https}\n    tls_client_cert:\n      cert_file: {c}\n"),
    );
    assert!(
        err.contains("missing field `key_file`") && err.contains("line 6"),
        "{err}"
    );
}

#[test]
fn the_private_key_never_reaches_debug_output() {
    let bank = Bank::new();
    let (cert, key) = bank.client_cert("app");
    let path = bank.config_file(&(cert, key.clone()));
    let config =
        authrelay::Config::load(&path, &std::collections::HashMap::<String, String>::new())
            .unwrap();
    let debug = format!("{config:?}");
    let key_pem = std::fs::read_to_string(&key).unwrap();
    let key_body: String = key_pem.lines().nth(1).unwrap().chars().take(30).collect();
    assert!(debug.contains("tls_client_cert"), "{debug}");
    assert!(
        !debug.contains(&key_body) && !debug.contains("PRIVATE"),
        "{debug}"
    );
}

#[test]
fn check_warns_about_a_key_file_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let bank = Bank::new();
    let (cert, key) = bank.client_cert("app");
    let path = bank.config_file(&(cert, key.clone()));
    let check = || {
        let out = Command::new(env!("CARGO_BIN_EXE_authrelay"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    assert!(!check().contains("warning"), "mode 600 is fine");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = check();
    assert!(
        out.contains("warning: route `bank`: tls_client_cert.key_file")
            && out.contains("mode 644")
            && out.contains("chmod 600"),
        "{out}"
    );
}

#[tokio::test]
async fn plain_http_never_leaves_without_the_certificate() {
    // A forward route for a host on a port of its own: plain HTTP to it could not carry
    // the certificate, so it is refused rather than sent without.
    let bank = Bank::new();
    let origin = https_origin(&bank.server_ca, &["127.0.0.1"], H2_AND_H1).await;
    let cert = bank.client_cert("app");
    let yaml = format!(
        "{tls}routes:\n  - name: bank\n    host: 127.0.0.1:{port}\n{c}",
        tls = bank.tls(),
        port = origin.addr.port(),
        c = cert_yaml(&cert),
    );
    let proxy: Proxy = support::proxy(&yaml).await;
    let res = proxy
        .client()
        .get(format!("http://127.0.0.1:{}/x", origin.addr.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 403);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"], "cleartext_refused");
    assert_eq!(body["route"], "bank");
    assert_eq!(origin.count(), 0);
    proxy.stop().await;
}
