//! The hostile-input matrix, token-endpoint and config side: a token endpoint that answers
//! huge, endless, dripping, non-JSON, CR/LF-laden, absurd-lifetime and secret-echoing
//! answers, and config files that are empty, truncated, deleted, swapped or unreadable. Each
//! case has its expected answer; after each, the proxy still serves a good route, and every
//! output (client answers, admin `/credentials`, captured logs) is scanned for the secrets.

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{self, server};

/// The client secret every hostile case configures: characters that form-encoding and JSON
/// escaping change, so that echoes in those forms are caught too.
const SECRET: &str = "s3cr3t\"\\+/ &=x9Q";
const CLIENT_ID: &str = "hostile-client";

/// What the hostile token endpoint does with a request.
#[derive(Clone)]
enum Answer {
    /// A complete answer: status, content type, body. `{ECHO}` in the body is replaced by the
    /// request body (as received, form-encoded), `{SECRET}` by the decoded `client_secret`,
    /// `{SECRET_JSON}` by the same escaped for a JSON string, and `{AUTH}` by the
    /// Authorization header.
    Full(u16, &'static str, String),
    /// A head with `Content-Length: 100 MB`, then data as fast as the client reads.
    HugeDeclared,
    /// A chunked body that never ends.
    Endless,
    /// A head, then one byte every 200 ms.
    Drip,
    /// Reads the request and never answers.
    Silent,
    /// Closes the connection as soon as the request arrived.
    Close,
    /// Bytes that are not HTTP.
    Garbage,
}

/// What the proxy must answer on the hostile route.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    /// 200, with `Bearer <token>` injected.
    Works(&'static str),
    /// 502 `credential_unavailable`.
    Unavailable,
}

struct Case {
    name: &'static str,
    auth: &'static str,
    answer: Answer,
    expect: Expect,
}

fn full(status: u16, content_type: &'static str, body: impl Into<String>) -> Answer {
    Answer::Full(status, content_type, body.into())
}

fn jwt_with_exp(exp: &str) -> String {
    let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    format!(
        "{}.{}.c2ln",
        enc(r#"{"alg":"RS256"}"#),
        enc(&format!(r#"{{"exp":{exp},"sub":"x"}}"#))
    )
}

fn token_cases() -> Vec<Case> {
    let json = "application/json";
    let ok = |name, body: String, token| Case {
        name,
        auth: "post",
        answer: full(200, json, body),
        expect: Expect::Works(token),
    };
    let bad = |name, answer| Case {
        name,
        auth: "post",
        answer,
        expect: Expect::Unavailable,
    };
    let big_jwt = jwt_with_exp("1e20");
    let old_jwt = jwt_with_exp("1000");
    let leaked_jwt: &'static str = Box::leak(big_jwt.clone().into_boxed_str());
    vec![
        bad(
            "echo: form body in text/plain 400",
            full(400, "text/plain", "rejected request: {ECHO}"),
        ),
        bad(
            "echo: form body in JSON error_description",
            full(
                400,
                json,
                r#"{"error":"invalid_client","error_description":"got {ECHO}"}"#,
            ),
        ),
        bad(
            "echo: form body in a 200 message",
            full(200, json, r#"{"message":"cannot issue for {ECHO}"}"#),
        ),
        bad(
            "echo: form body in an HTML 500",
            full(500, "text/html", "<html><body>{ECHO}</body></html>"),
        ),
        bad(
            "echo: decoded secret in text/plain",
            full(400, "text/plain", "client_secret={SECRET} is wrong"),
        ),
        bad(
            "echo: decoded secret in JSON error_description",
            full(
                401,
                json,
                r#"{"error":"invalid_client","error_description":"secret {SECRET_JSON} unknown"}"#,
            ),
        ),
        bad(
            "echo: decoded secret beside a token in a 200",
            full(
                200,
                json,
                r#"{"refresh_token":"rt-hostile-1","message":"{SECRET_JSON} and rt-hostile-1"}"#,
            ),
        ),
        bad(
            "echo: form body in a 429",
            full(429, "text/plain", "slow down {ECHO}"),
        ),
        Case {
            name: "echo: Basic header in a 401",
            auth: "basic",
            answer: full(401, "text/plain", "bad client {AUTH}"),
            expect: Expect::Unavailable,
        },
        Case {
            name: "echo: Basic header in JSON",
            auth: "basic",
            answer: full(
                400,
                json,
                r#"{"error":"invalid_client","error_description":"{AUTH}"}"#,
            ),
            expect: Expect::Unavailable,
        },
        bad(
            "echo: JSON:API errors[0].detail",
            full(
                403,
                "application/vnd.api+json",
                r#"{"errors":[{"detail":"{ECHO}"}]}"#,
            ),
        ),
        bad(
            "CR/LF inside the access token",
            full(
                200,
                json,
                r#"{"access_token":"tok\r\nX-Evil: 1","expires_in":60}"#,
            ),
        ),
        bad(
            "access token is a number",
            full(200, json, r#"{"access_token":12345,"expires_in":60}"#),
        ),
        bad("200 non-JSON body", full(200, "text/plain", "hello there")),
        bad("200 empty body", full(200, json, "")),
        bad("200 JSON array", full(200, json, "[]")),
        bad(
            "JWT exp far in the past",
            full(200, json, format!(r#"{{"access_token":"{old_jwt}"}}"#)),
        ),
        bad("3xx redirect", full(302, "text/plain", "")),
        bad(
            "2 MiB JSON body",
            full(
                200,
                json,
                format!(r#"{{"access_token":"t","pad":"{}"}}"#, "x".repeat(2 << 20)),
            ),
        ),
        bad("Content-Length 100 MB", Answer::HugeDeclared),
        bad("endless chunked body", Answer::Endless),
        bad("dripping body", Answer::Drip),
        bad("no answer", Answer::Silent),
        bad("connection closed", Answer::Close),
        bad("garbage, not HTTP", Answer::Garbage),
        ok(
            "expires_in 1e20",
            r#"{"access_token":"tok-a","expires_in":1e20}"#.into(),
            "tok-a",
        ),
        ok(
            "expires_in 1e308",
            r#"{"access_token":"tok-b","expires_in":1e308}"#.into(),
            "tok-b",
        ),
        ok(
            "expires_in \"1e19\" as a string",
            r#"{"access_token":"tok-c","expires_in":"1e19"}"#.into(),
            "tok-c",
        ),
        ok(
            "expires_in negative",
            r#"{"access_token":"tok-d","expires_in":-5}"#.into(),
            "tok-d",
        ),
        ok(
            "expires_in \"NaN\"",
            r#"{"access_token":"tok-e","expires_in":"NaN"}"#.into(),
            "tok-e",
        ),
        ok(
            "expires_in \"inf\"",
            r#"{"access_token":"tok-f","expires_in":"inf"}"#.into(),
            "tok-f",
        ),
        ok(
            "expires_in 0",
            r#"{"access_token":"tok-g","expires_in":0}"#.into(),
            "tok-g",
        ),
        ok(
            "JWT exp 1e20",
            format!(r#"{{"access_token":"{big_jwt}"}}"#),
            leaked_jwt,
        ),
        ok(
            "expires_in null",
            r#"{"access_token":"tok-h","expires_in":null}"#.into(),
            "tok-h",
        ),
    ]
}

/// A token endpoint on 127.0.0.1 that answers every request with `answer`; returns its
/// address and a call counter.
async fn hostile_endpoint(answer: Answer) -> (SocketAddr, Arc<Mutex<usize>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(Mutex::new(0));
    let counter = Arc::clone(&calls);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            *counter.lock().unwrap() += 1;
            tokio::spawn(answer_one(stream, answer.clone()));
        }
    });
    (addr, calls)
}

/// Reads one request (head and `Content-Length` body) and answers it as told.
async fn answer_one(mut stream: TcpStream, answer: Answer) {
    let mut data = Vec::new();
    let mut buf = [0u8; 4096];
    let (head, body) = loop {
        let Ok(n) = stream.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        data.extend_from_slice(&buf[..n]);
        if let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&data[..end]).to_string();
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().ok())?
                })
                .unwrap_or(0);
            while data.len() < end + 4 + length {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => data.extend_from_slice(&buf[..n]),
                }
            }
            break (head, String::from_utf8_lossy(&data[end + 4..]).to_string());
        }
    };
    let auth = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("authorization")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    let _ = match answer {
        Answer::Full(status, content_type, template) => {
            let secret = serde_urlencoded::from_str::<Vec<(String, String)>>(&body)
                .unwrap_or_default()
                .into_iter()
                .find(|(k, _)| k == "client_secret")
                .map(|(_, v)| v)
                .unwrap_or_default();
            let secret_json = serde_json::to_string(&secret).unwrap();
            let body = template
                .replace("{ECHO}", &body)
                .replace("{SECRET_JSON}", &secret_json[1..secret_json.len() - 1])
                .replace("{SECRET}", &secret)
                .replace("{AUTH}", &auth);
            let location = if (300..400).contains(&status) {
                "Location: http://127.0.0.1:9/elsewhere\r\n"
            } else {
                ""
            };
            let head = format!(
                "HTTP/1.1 {status} X\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{location}Connection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            stream.write_all(body.as_bytes()).await
        }
        Answer::HugeDeclared => {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n";
            let _ = stream.write_all(head.as_bytes()).await;
            let chunk = vec![b' '; 64 * 1024];
            let mut result = Ok(());
            for _ in 0..1600 {
                result = stream.write_all(&chunk).await;
                if result.is_err() {
                    break;
                }
            }
            result
        }
        Answer::Endless => {
            let head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
            let _ = stream.write_all(head.as_bytes()).await;
            let chunk = format!("10000\r\n{}\r\n", " ".repeat(0x10000));
            loop {
                if stream.write_all(chunk.as_bytes()).await.is_err() {
                    break Ok(());
                }
            }
        }
        Answer::Drip => {
            let head =
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n";
            let _ = stream.write_all(head.as_bytes()).await;
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                if stream.write_all(b" ").await.is_err() {
                    break Ok(());
                }
            }
        }
        Answer::Silent => {
            let _ = stream.read(&mut buf).await;
            Ok(())
        }
        Answer::Close => Ok(()),
        Answer::Garbage => stream.write_all(b"\x00\x01garbage\xff\r\n\r\n").await,
    };
}

/// Log lines written while a test runs (every level), for the secret scan.
#[derive(Clone, Default)]
struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLogs {
    /// Captures the current thread's logs (the test runtime is single-threaded) until the
    /// guard is dropped.
    fn install(&self) -> tracing::subscriber::DefaultGuard {
        crate::support::route_logs_to_thread_subscribers();
        let writer = self.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        tracing::subscriber::set_default(subscriber)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).to_string()
    }
}

/// Every form in which `secret` could leak: raw, form-encoded (`+` and `%20`), JSON-escaped,
/// and inside an HTTP Basic header.
fn leak_forms(secret: &str) -> Vec<String> {
    let form = serde_urlencoded::to_string([("x", secret)]).unwrap()[2..].to_string();
    let json = serde_json::to_string(secret).unwrap();
    let basic = base64::engine::general_purpose::STANDARD.encode(format!(
        "{}:{}",
        &serde_urlencoded::to_string([("x", CLIENT_ID)]).unwrap()[2..],
        form
    ));
    vec![
        secret.to_string(),
        form.clone(),
        form.replace('+', "%20"),
        json[1..json.len() - 1].to_string(),
        basic,
    ]
}

fn scan(label: &str, text: &str, forms: &[String]) -> Option<String> {
    forms
        .iter()
        .find(|f| text.contains(f.as_str()))
        .map(|f| format!("{label} shows the secret as `{f}`"))
}

fn hostile_config(endpoint: SocketAddr, auth: &str, origin: &str, good: &str) -> String {
    format!(
        "admin: 127.0.0.1:0
tokens:
  fetch_timeout: 1s
  backoff_initial: 50ms
  backoff_max: 100ms
credentials:
  hostile:
    type: oauth2_client_credentials
    token_url: http://{endpoint}/oauth/token
    client_id: {CLIENT_ID}
    client_secret: ${{HOSTILE_SECRET}}
    auth: {auth}
  good:
    type: static
    value: \"Token good-value\"
routes:
  - name: hostile
    mount: /hostile
    upstream: {origin}
    credential: hostile
  - name: good
    mount: /good
    upstream: {good}
    credential: good
"
    )
}

#[tokio::test]
async fn hostile_token_endpoints_give_their_expected_answer_and_leak_nothing() {
    let logs = CapturedLogs::default();
    let _guard = logs.install();
    let origin = server::echo_origin().await;
    let good = server::echo_origin().await;
    let mut forms = leak_forms(SECRET);
    forms.push("rt-hostile-1".into());
    let client = support::direct_client();
    let mut failures = Vec::new();
    let cases = token_cases();
    assert!(cases.len() >= 25, "{} cases", cases.len());
    for case in cases {
        let (endpoint, calls) = hostile_endpoint(case.answer.clone()).await;
        let yaml = hostile_config(endpoint, case.auth, &origin.url(), &good.url());
        let proxy = support::proxy_with_env(&yaml, &[("HOSTILE_SECRET", SECRET)]).await;
        let admin = proxy.running.as_ref().unwrap().admin_addr.unwrap();
        let res = client
            .get(format!("{}/hostile/x", proxy.url()))
            .send()
            .await
            .unwrap();
        let status = res.status().as_u16();
        let body = res.text().await.unwrap();
        let mut problems = Vec::new();
        match case.expect {
            Expect::Works(token) => {
                if status != 200 {
                    problems.push(format!("status {status}: {body}"));
                } else if origin.last().header("authorization") != format!("Bearer {token}") {
                    problems.push("the issued token was not injected".into());
                }
            }
            Expect::Unavailable => {
                if status != 502 || !body.contains("credential_unavailable") {
                    problems.push(format!("status {status}: {body}"));
                }
            }
        }
        if *calls.lock().unwrap() == 0 {
            problems.push("the token endpoint was never called".into());
        }
        let good_res = client
            .get(format!("{}/good/x", proxy.url()))
            .send()
            .await
            .unwrap();
        if good_res.status() != 200 || good.last().header("authorization") != "Token good-value" {
            problems.push(format!("the good route answered {}", good_res.status()));
        }
        let credentials = client
            .get(format!("http://{admin}/credentials"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let listed: serde_json::Value = serde_json::from_str(&credentials).unwrap();
        let last_error = listed
            .as_array()
            .and_then(|l| l.iter().find(|c| c["name"] == "hostile"))
            .map(|c| c["last_error"].clone());
        if case.expect == Expect::Unavailable && !last_error.is_some_and(|e| e.is_string()) {
            problems.push(format!("no last_error in /credentials: {credentials}"));
        }
        problems.extend(scan("the client answer", &body, &forms));
        problems.extend(scan("/credentials", &credentials, &forms));
        proxy.stop().await;
        if !problems.is_empty() {
            failures.push(format!("{}: {}", case.name, problems.join("; ")));
        }
    }
    let logs = logs.text();
    assert!(logs.contains("token fetch failed"), "logs were captured");
    failures.extend(scan("the logs", &logs, &forms));
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test]
async fn absurd_login_and_outseta_lifetimes_give_working_tokens() {
    let origin = server::echo_origin().await;
    let cases = [
        (
            "login",
            r#"{"success":true,"token":"lt-1","tokenLifetime":1e19}"#,
        ),
        (
            "login",
            r#"{"success":true,"token":"lt-2","tokenExpiration":"99999-01-01T00:00:00Z","tokenLifetime":-1}"#,
        ),
        (
            "login",
            r#"{"success":true,"token":"lt-3","tokenExpiration":"2030-01-01T99999999999999:00:00Z"}"#,
        ),
        ("outseta", r#"{"access_token":"os-1","expires_in":1e20}"#),
        (
            "outseta",
            r#"{"access_token":"os-2","expires_in":"-1e300"}"#,
        ),
    ];
    for (kind, body) in cases {
        let (endpoint, _) = hostile_endpoint(full(200, "application/json", body)).await;
        let credential = match kind {
            "login" => format!(
                "    type: login\n    login_url: http://{endpoint}/auth/login\n    username: u\n    password: pw-{SECRET}\n"
            ),
            _ => format!(
                "    type: outseta\n    base_url: http://{endpoint}\n    username: u\n    password: pw-{SECRET}\n"
            ),
        };
        let yaml = format!(
            "credentials:\n  c:\n{credential}routes:\n  - name: r\n    mount: /r\n    upstream: {}\n    credential: c\n",
            origin.url()
        );
        let proxy = support::proxy(&yaml).await;
        let res = support::direct_client()
            .get(format!("{}/r/x", proxy.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200, "{body}: {}", res.text().await.unwrap());
        let token = serde_json::from_str::<serde_json::Value>(body).unwrap();
        let token = token
            .get("token")
            .or(token.get("access_token"))
            .and_then(|t| t.as_str())
            .unwrap()
            .to_string();
        assert_eq!(
            origin.last().header("authorization"),
            format!("Bearer {token}")
        );
        proxy.stop().await;
    }
}

/// A config folder laid out as Kubernetes mounts a ConfigMap: `routes.yaml -> ..data/routes.yaml`,
/// `..data -> ..v1`; [`swap`] publishes a new version the way the kubelet does.
struct KubeDir {
    dir: tempfile::TempDir,
    version: usize,
}

impl KubeDir {
    fn new(files: &[(&str, &str)]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut k = Self { dir, version: 0 };
        k.swap(files);
        for (name, _) in files {
            std::os::unix::fs::symlink(format!("..data/{name}"), k.dir.path().join(name)).unwrap();
        }
        k
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn swap(&mut self, files: &[(&str, &str)]) {
        self.version += 1;
        let version = format!("..v{}", self.version);
        std::fs::create_dir(self.dir.path().join(&version)).unwrap();
        for (name, text) in files {
            std::fs::write(self.dir.path().join(&version).join(name), text).unwrap();
        }
        let tmp = self.dir.path().join("..data_tmp");
        std::os::unix::fs::symlink(&version, &tmp).unwrap();
        std::fs::rename(&tmp, self.dir.path().join("..data")).unwrap();
    }
}

async fn start_watched(path: &Path) -> authrelay::Running {
    let env = Arc::new(std::collections::HashMap::<String, String>::new());
    let config = authrelay::Config::load(path, env.as_ref()).unwrap();
    authrelay::start(
        config,
        authrelay::StartOptions {
            config_path: Some(path.to_path_buf()),
            env,
            watch: true,
        },
    )
    .await
    .unwrap()
}

/// Requests `url` until the origin saw `expected` as the Authorization header (bounded).
async fn until_injected(url: &str, origin: &server::Origin, expected: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let res = support::direct_client().get(url).send().await.unwrap();
        if res.status() == 200 && origin.last().header("authorization") == expected {
            return;
        }
        assert!(Instant::now() < deadline, "never saw `{expected}`");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn static_config(origin: &str, value: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\ncredentials:\n  c:\n    type: static\n    value: \"{value}\"\nroutes:\n  - name: r\n    mount: /r\n    upstream: {origin}\n    credential: c\n"
    )
}

#[tokio::test]
async fn a_kubernetes_data_swap_of_config_and_secret_is_picked_up() {
    let origin = server::echo_origin().await;
    let config = |origin: &str| {
        format!(
            "listen: 127.0.0.1:0\ncredentials:\n  c:\n    type: static\n    value_file: secret\nroutes:\n  - name: r\n    mount: /r\n    upstream: {origin}\n    credential: c\n"
        )
    };
    let mut kube = KubeDir::new(&[
        ("routes.yaml", &config(&origin.url())),
        ("secret", "Token one"),
    ]);
    let running = start_watched(&kube.path("routes.yaml")).await;
    let url = format!("http://{}/r/x", running.proxy_addr);
    until_injected(&url, &origin, "Token one").await;
    kube.swap(&[
        ("routes.yaml", &config(&origin.url())),
        ("secret", "Token two"),
    ]);
    until_injected(&url, &origin, "Token two").await;
    running.shutdown().await;
}

#[tokio::test]
async fn a_rotated_secret_file_reloads_its_credential_and_drops_its_token() {
    let (endpoint, calls) = hostile_endpoint(full(
        200,
        "application/json",
        r#"{"access_token":"rot-1","expires_in":3600}"#,
    ))
    .await;
    let origin = server::echo_origin().await;
    let secrets = tempfile::tempdir().unwrap();
    let secret_file = secrets.path().join("client_secret");
    std::fs::write(&secret_file, "first\n").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.yaml");
    std::fs::write(
        &path,
        format!(
            "listen: 127.0.0.1:0\ncredentials:\n  c:\n    type: oauth2_client_credentials\n    token_url: http://{endpoint}/t\n    client_id: id\n    client_secret_file: {}\nroutes:\n  - name: r\n    mount: /r\n    upstream: {}\n    credential: c\n",
            secret_file.display(),
            origin.url()
        ),
    )
    .unwrap();
    let running = start_watched(&path).await;
    let url = format!("http://{}/r/x", running.proxy_addr);
    until_injected(&url, &origin, "Bearer rot-1").await;
    assert_eq!(*calls.lock().unwrap(), 1);
    // Written in place, as `kubectl create secret` tooling and editors do.
    std::fs::write(&secret_file, "second\n").unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while *calls.lock().unwrap() < 2 {
        let res = support::direct_client().get(&url).send().await.unwrap();
        assert_eq!(res.status(), 200);
        assert!(Instant::now() < deadline, "the rotated secret was not seen");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    running.shutdown().await;
}

/// How a hostile config file is written, and whether the proxy must take it.
struct ConfigCase {
    name: &'static str,
    apply: fn(&Path, &str),
    applied: bool,
}

fn config_cases() -> Vec<ConfigCase> {
    vec![
        ConfigCase {
            name: "empty file",
            apply: |p, _| std::fs::write(p, "").unwrap(),
            applied: false,
        },
        ConfigCase {
            name: "comments only",
            apply: |p, _| std::fs::write(p, "# emptied\n").unwrap(),
            applied: false,
        },
        ConfigCase {
            name: "only `listen:` (truncated)",
            apply: |p, _| std::fs::write(p, "listen: 127.0.0.1:0\n").unwrap(),
            applied: false,
        },
        ConfigCase {
            name: "truncated mid-route",
            apply: |p, good| {
                let text = static_config(good, "Token next");
                std::fs::write(p, &text[..text.find("next").unwrap()]).unwrap();
            },
            applied: false,
        },
        ConfigCase {
            name: "deleted",
            apply: |p, _| std::fs::remove_file(p).unwrap(),
            applied: false,
        },
        ConfigCase {
            name: "unreadable (a folder in its place)",
            apply: |p, _| {
                std::fs::remove_file(p).unwrap();
                std::fs::create_dir(p).unwrap();
            },
            applied: false,
        },
        ConfigCase {
            name: "secret in a mis-indented value",
            apply: |p, _| {
                std::fs::write(
            p,
            "listen: 127.0.0.1:0\ncredentials:\n  c:\n    type: static\n  value: \"Outseta KEY-hostile:SECRET-hostile\"\n",
        ).unwrap()
            },
            applied: false,
        },
        ConfigCase {
            name: "secret in a bad ${…}",
            apply: |p, _| {
                std::fs::write(
            p,
            "listen: 127.0.0.1:0\ncredentials:\n  c:\n    type: static\n    value: \"Outseta ${KEY-hostile:SECRET-hostile}\"\nroutes: []\n",
        ).unwrap()
            },
            applied: false,
        },
        ConfigCase {
            name: "a route named `unmatched`",
            apply: |p, good| {
                std::fs::write(
                    p,
                    static_config(good, "Token next").replace("name: r", "name: unmatched"),
                )
                .unwrap()
            },
            applied: false,
        },
        ConfigCase {
            name: "contradictory token timing",
            apply: |p, good| {
                std::fs::write(
                    p,
                    format!(
                        "tokens:\n  refresh_before: 0s\n  refresh_at_fraction: 1.0\n{}",
                        static_config(good, "Token next")
                    ),
                )
                .unwrap()
            },
            applied: false,
        },
        ConfigCase {
            name: "explicit `routes: []`",
            apply: |p, _| std::fs::write(p, "listen: 127.0.0.1:0\nroutes: []\n").unwrap(),
            applied: true,
        },
        ConfigCase {
            name: "a good new file",
            apply: |p, good| std::fs::write(p, static_config(good, "Token next")).unwrap(),
            applied: true,
        },
    ]
}

#[tokio::test]
async fn hostile_config_files_are_refused_and_the_running_config_keeps_serving() {
    let logs = CapturedLogs::default();
    let _guard = logs.install();
    let origin = server::echo_origin().await;
    let forms = ["KEY-hostile".to_string(), "SECRET-hostile".to_string()];
    let mut failures = Vec::new();
    for case in config_cases() {
        let proxy = support::proxy(&static_config(&origin.url(), "Token first")).await;
        let url = format!("{}/r/x", proxy.url());
        (case.apply)(&proxy.config_path, &origin.url());
        let outcome = proxy.state().reload();
        let res = support::direct_client().get(&url).send().await.unwrap();
        let status = res.status().as_u16();
        let seen = if origin.count() > 0 {
            origin.last().header("authorization")
        } else {
            String::new()
        };
        let problem = match (&outcome, case.applied) {
            (Err(e), false) if status == 200 && seen == "Token first" => {
                scan("the reload error", &e.to_string(), &forms)
            }
            (Ok(()), true) => None,
            (Err(e), _) => Some(format!("refused: {e}; then {status} with `{seen}`")),
            (Ok(()), _) => Some(format!("accepted; then {status} with `{seen}`")),
        };
        if let Some(p) = problem {
            failures.push(format!("{}: {p}", case.name));
        }
        proxy.stop().await;
    }
    failures.extend(scan("the logs", &logs.text(), &forms));
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test]
async fn a_slowly_written_file_is_read_once_complete() {
    let origin = server::echo_origin().await;
    let proxy = support::watched_proxy(&format!(
        "admin: 127.0.0.1:0\n{}",
        static_config(&origin.url(), "Token first")
    ))
    .await;
    let admin = proxy.running.as_ref().unwrap().admin_addr.unwrap();
    let url = format!("{}/r/x", proxy.url());
    until_injected(&url, &origin, "Token first").await;
    let next = format!(
        "admin: 127.0.0.1:0\n{}",
        static_config(&origin.url(), "Token second")
    );
    let (first, rest) = next.split_at(next.len() / 2);
    let mut file = std::fs::File::create(&proxy.config_path).unwrap();
    file.write_all(first.as_bytes()).unwrap();
    file.flush().unwrap();
    // Longer than the watcher's event settling (150 ms), well within settling plus the
    // stability wait (450 ms).
    tokio::time::sleep(Duration::from_millis(250)).await;
    file.write_all(rest.as_bytes()).unwrap();
    drop(file);
    until_injected(&url, &origin, "Token second").await;
    let metrics = support::direct_client()
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let count = |outcome: &str| {
        let series = format!("authrelay_config_reloads_total{{outcome=\"{outcome}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series.as_str()))
            .map_or(0, |v| v.trim().parse::<u32>().unwrap())
    };
    assert!(count("success") >= 1, "{metrics}");
    assert_eq!(count("failure"), 0, "the half-written file was parsed");
    proxy.stop().await;
}

#[tokio::test]
async fn a_removed_route_loses_its_metric_series() {
    let origin = server::echo_origin().await;
    let yaml = format!(
        "admin: 127.0.0.1:0\nroutes:\n  - name: keep\n    mount: /keep\n    upstream: {0}\n  - name: gone\n    mount: /gone\n    upstream: {0}\n",
        origin.url()
    );
    let proxy = support::proxy(&yaml).await;
    let admin = proxy.running.as_ref().unwrap().admin_addr.unwrap();
    let client = support::direct_client();
    for path in ["keep", "gone"] {
        let res = client
            .get(format!("{}/{path}/x", proxy.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
    }
    let metrics = || async {
        client
            .get(format!("http://{admin}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    assert!(metrics().await.contains("route=\"gone\""));
    proxy.write_config(&support::with_test_listen(&format!(
        "admin: 127.0.0.1:0\nroutes:\n  - name: keep\n    mount: /keep\n    upstream: {}\n",
        origin.url()
    )));
    proxy.state().reload().unwrap();
    let after = metrics().await;
    assert!(!after.contains("route=\"gone\""), "{after}");
    assert!(after.contains("route=\"keep\""), "{after}");
    proxy.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fetch_exits_cleanly_on_absurd_lifetimes() {
    for (body, ok) in [
        (r#"{"access_token":"cf-1","expires_in":1e20}"#, true),
        (r#"{"access_token":"cf-2","expires_in":"-1e300"}"#, true),
        (r#"{"access_token":"cf-3","expires_in":"NaN"}"#, true),
        (r#"{"message":"{SECRET}"}"#, false),
    ] {
        let (endpoint, _) = hostile_endpoint(full(200, "application/json", body)).await;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routes.yaml");
        std::fs::write(
            &path,
            format!(
                "credentials:\n  c:\n    type: oauth2_client_credentials\n    token_url: http://{endpoint}/t\n    client_id: id\n    client_secret: ${{CF_SECRET}}\nroutes: []\n"
            ),
        )
        .unwrap();
        let output = tokio::task::spawn_blocking(move || {
            std::process::Command::new(env!("CARGO_BIN_EXE_authrelay"))
                .args(["--config", path.to_str().unwrap(), "check", "--fetch"])
                .env("CF_SECRET", SECRET)
                .env("RUST_LOG", "debug")
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let code = output.status.code();
        if ok {
            assert_eq!(code, Some(0), "{body}: {out}");
            assert!(out.contains("c: ok, expires"), "{body}: {out}");
        } else {
            assert!(code.is_some_and(|c| c != 0 && c != 101), "{body}: {out}");
            assert!(out.contains("c: FAILED"), "{body}: {out}");
        }
        assert_eq!(scan("check --fetch", &out, &leak_forms(SECRET)), None);
    }
}

#[tokio::test]
async fn each_variable_of_a_secret_is_hidden_on_its_own() {
    let (endpoint, _) = hostile_endpoint(full(
        400,
        "text/plain",
        "unknown key half-b-93417; did you mean half-a-26153?",
    ))
    .await;
    let origin = server::echo_origin().await;
    let yaml = format!(
        "credentials:\n  c:\n    type: oauth2_client_credentials\n    token_url: http://{endpoint}/t\n    client_id: id\n    client_secret: \"${{HALF_A}}.${{HALF_B}}\"\nroutes:\n  - name: r\n    mount: /r\n    upstream: {}\n    credential: c\n",
        origin.url()
    );
    let proxy = support::proxy_with_env(
        &yaml,
        &[("HALF_A", "half-a-26153"), ("HALF_B", "half-b-93417")],
    )
    .await;
    let res = support::direct_client()
        .get(format!("{}/r/x", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502);
    let body = res.text().await.unwrap();
    assert!(
        body.contains("unknown key ***; did you mean ***?"),
        "{body}"
    );
    proxy.stop().await;
}
