//! The real binary as a subprocess: the log of a full run holds no secret, SIGTERM drains a
//! request in flight and exits 0, and the `check`, `token`, `health` and `demo` commands.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::{self, server};

const BIN: &str = env!("CARGO_BIN_EXE_authrelay");

/// A running `authrelay` with its stdout and stderr collected line by line.
struct Process {
    child: Child,
    out: Arc<Mutex<Vec<String>>>,
}

fn collect(stream: impl Read + Send + 'static, into: Arc<Mutex<Vec<String>>>) {
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            into.lock().unwrap().push(line);
        }
    });
}

impl Process {
    fn spawn(args: &[&str], env: &[(&str, &str)]) -> Process {
        let mut cmd = Command::new(BIN);
        cmd.args(args)
            .env_remove("AUTHRELAY_CONFIG")
            .env_remove("HTTP_PROXY")
            .env_remove("http_proxy")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("spawn authrelay");
        let out: Arc<Mutex<Vec<String>>> = Arc::default();
        collect(child.stdout.take().unwrap(), Arc::clone(&out));
        collect(child.stderr.take().unwrap(), Arc::clone(&out));
        Process { child, out }
    }

    /// Waits (up to 15 s) for an output line containing `needle` and returns it.
    async fn wait_for(&self, needle: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(l) = self.out.lock().unwrap().iter().find(|l| l.contains(needle)) {
                return l.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no line with `{needle}` in:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn output(&self) -> String {
        self.out.lock().unwrap().join("\n")
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits (up to 15 s) for the process to exit; returns its exit code.
    async fn exit_code(&mut self) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                tokio::time::sleep(Duration::from_millis(50)).await; // let readers finish
                return status.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < deadline,
                "still running:\n{}",
                self.output()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `addr=127.0.0.1:PORT` (text log) or `"addr":"127.0.0.1:PORT"` (JSON log) from a line.
fn addr_in(line: &str) -> String {
    let start = line.find("127.0.0.1:").expect("an address");
    line[start..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
        .collect()
}

/// Runs a command to completion: (exit code, stdout, stderr).
fn run(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("AUTHRELAY_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn write(dir: &Path, yaml: &str) -> String {
    let path = dir.join("routes.yaml");
    std::fs::write(&path, yaml).unwrap();
    path.display().to_string()
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{:032x}", rand::random::<u128>())
}

#[tokio::test]
async fn full_run_logs_hold_no_secret() {
    let origin = server::serve(|_| async { server::respond(401, "no") }).await;
    let dead = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let secret = unique("sk-live-");
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "listen: 127.0.0.1:0\nadmin: 127.0.0.1:0\ncredentials:\n  api_key:\n    type: static\n    value: \"Bearer ${{API_SECRET}}\"\nroutes:\n  - name: origin\n    mount: /origin\n    upstream: {}\n    credential: api_key\n  - name: dead\n    mount: /dead\n    upstream: http://{dead}\n    credential: api_key\n",
        origin.url()
    );
    let config = write(dir.path(), &yaml);
    let mut p = Process::spawn(
        &["--config", &config, "--log-format", "json"],
        &[("API_SECRET", &secret), ("RUST_LOG", "debug")],
    );
    let proxy = addr_in(&p.wait_for("authrelay listening").await);
    let admin = addr_in(&p.wait_for("admin endpoint listening").await);
    let client = support::direct_client();

    // The origin refuses: a static credential cannot be refreshed, the 401 is passed on.
    let res = client
        .post(format!("http://{proxy}/origin/x"))
        .body(format!("payload mentioning {secret}? no: only the header"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 401);
    assert_eq!(
        origin.last().header("authorization"),
        format!("Bearer {secret}")
    );
    // The upstream is down: 502.
    let res = client
        .get(format!("http://{proxy}/dead/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 502);
    // Admin views.
    for path in ["credentials", "metrics", "readyz"] {
        let body = client
            .get(format!("http://{admin}/{path}"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(!body.contains(&secret), "/{path}: {body}");
    }
    // Bad reloads: malformed YAML (seen by the file watcher), then a missing variable
    // (by SIGHUP).
    std::fs::write(
        &config,
        format!("{yaml}  - name: broken\n    mount: [\n    value: {secret}\n"),
    )
    .unwrap();
    p.wait_for("config reload refused").await;
    std::fs::write(&config, yaml.replace("API_SECRET", "MISSING_VAR")).unwrap();
    p.signal("HUP");
    p.wait_for("MISSING_VAR").await;

    p.signal("TERM");
    assert_eq!(p.exit_code().await, 0);
    let log = p.output();
    assert!(log.contains("\"status\":401"), "{log}");
    assert!(log.contains("\"status\":502"), "{log}");
    for line in log.lines() {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "not a JSON line: {line}"
        );
    }
    assert!(
        !log.contains(&secret),
        "the secret leaked into the log:\n{log}"
    );
}

#[tokio::test]
async fn sigterm_drains_a_slow_request_then_exits_zero() {
    let origin = server::serve(|_| async {
        tokio::time::sleep(Duration::from_secs(1)).await;
        server::respond(200, "slow but complete")
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        &format!(
            "listen: 127.0.0.1:0\nroutes:\n  - name: slow\n    mount: /slow\n    upstream: {}\n",
            origin.url()
        ),
    );
    let mut p = Process::spawn(&["--config", &config], &[]);
    let proxy = addr_in(&p.wait_for("authrelay listening").await);
    let request = tokio::spawn(async move {
        let res = support::direct_client()
            .get(format!("http://{proxy}/slow/x"))
            .send()
            .await
            .unwrap();
        (res.status().as_u16(), res.text().await.unwrap())
    });
    while origin.count() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    p.signal("TERM");
    let (status, body) = request.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, "slow but complete");
    assert_eq!(p.exit_code().await, 0, "{}", p.output());
    assert!(p.output().contains("draining"));
}

#[test]
fn check_accepts_a_good_file_and_points_at_the_error_in_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        "routes:\n  - name: a\n    mount: /a\n    upstream: http://127.0.0.1:9\n",
    );
    let (code, out, _) = run(&["--config", &config, "check"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("ok (1 routes, 0 credentials)"), "{out}");

    let config = write(
        dir.path(),
        "routes:\n  - name: a\n    mount: /a\n    upstreem: http://127.0.0.1:9\n",
    );
    let (code, _, err) = run(&["--config", &config, "check"], &[]);
    assert_eq!(code, 64);
    assert!(err.contains("upstreem"), "{err}");
    assert!(err.contains("line 4 column"), "{err}");
}

#[test]
fn check_says_who_may_spend_the_credentials_and_where_unmatched_traffic_goes() {
    let dir = tempfile::tempdir().unwrap();
    let credentials = "credentials:\n  c:\n    type: static\n    value: v-1\n";
    let open = "every local process may use these credentials: name the apps in clients.users";
    let users = "clients:\n  users:\n    app:\n      password: pw-1\n";
    let wide = "clients:\n  allow_from: [10.0.0.0/8]\n  users:\n    app:\n      password: pw-1\n";
    // (config, whether the open-credentials line is printed, the regime's words)
    let cases = [
        (credentials.to_string(), true, "clients are loopback-only"),
        (
            format!("{users}{credentials}"),
            false,
            "clients are loopback-only",
        ),
        (
            "routes: []\n".to_string(),
            false,
            "clients are loopback-only",
        ),
        (
            format!("{wide}{credentials}"),
            false,
            "clients beyond loopback may connect",
        ),
        (
            format!("unmatched: deny\n{credentials}"),
            true,
            "unmatched traffic: refused",
        ),
    ];
    for (yaml, says_open, regime) in cases {
        let config = write(dir.path(), &yaml);
        let (code, out, err) = run(&["--config", &config, "check"], &[]);
        assert_eq!(code, 0, "{yaml}: {err}");
        assert_eq!(out.contains(open), says_open, "{yaml}: {out}");
        let regime_lines: Vec<&str> = out
            .lines()
            .filter(|l| l.starts_with("unmatched traffic: "))
            .collect();
        assert_eq!(regime_lines.len(), 1, "{yaml}: {out}");
        assert!(regime_lines[0].contains(regime), "{yaml}: {out}");
    }
}

#[test]
fn check_fetch_and_token_report_without_revealing_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    let secret = unique("tok");
    let config = write(
        dir.path(),
        "credentials:\n  api_key:\n    type: static\n    value: \"Bearer ${TOKEN}\"\n  other:\n    type: static\n    header: X-Api-Key\n    value: short\nroutes: []\n",
    );
    let env = [("TOKEN", secret.as_str())];
    let (code, out, err) = run(&["--config", &config, "check", "--fetch"], &env);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("api_key: ok, does not expire"), "{out}");
    assert!(out.contains("other: ok, does not expire"), "{out}");
    assert!(!out.contains(&secret) && !err.contains(&secret));

    let (code, out, err) = run(&["--config", &config, "token", "api_key"], &env);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.trim(), "authorization: Bearer ***(35 chars)");
    assert!(!err.contains(&secret));

    let (code, out, _) = run(&["--config", &config, "token", "api_key", "--reveal"], &env);
    assert_eq!(code, 0);
    assert_eq!(out.trim(), format!("authorization: Bearer {secret}"));

    let (code, _, err) = run(&["--config", &config, "token", "nope"], &env);
    assert_eq!(code, 64);
    assert!(err.contains("no credential named `nope`"), "{err}");
    assert!(err.contains("api_key, other"), "{err}");
}

#[tokio::test]
async fn demo_injects_refreshes_after_revocation_and_stops_on_ctrl_c() {
    let mut p = Process::spawn(
        &[
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            "127.0.0.1:0",
            "--token-lifetime",
            "30s",
        ],
        &[("RUST_LOG", "debug")],
    );
    let line = p.wait_for("proxy listening on").await;
    let mut addrs = line.split("http://").skip(1).map(addr_in);
    let (proxy, vendor, admin) = (
        addrs.next().unwrap(),
        addrs.next().unwrap(),
        addrs.next().unwrap(),
    );
    p.wait_for("Press Ctrl-C").await;
    assert!(p
        .output()
        .contains(&format!("curl -x http://{proxy} http://{vendor}/v1/hello")));
    let client = support::direct_client();

    let direct = client
        .get(format!("http://{vendor}/v1/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(direct.status(), 401);

    let via_mount: serde_json::Value = client
        .get(format!("http://{proxy}/demo-api/v1/hello"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(via_mount["message"], "hello from the demo API");
    let first = via_mount["token_number"].as_u64().unwrap();

    let forward = reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(format!("http://{proxy}")).unwrap())
        .build()
        .unwrap();
    let res = forward
        .get(format!("http://{vendor}/v1/hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    let revoked = client
        .post(format!("http://{vendor}/demo/revoke"))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    let after: serde_json::Value = client
        .get(format!("http://{proxy}/demo-api/v1/hello"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(after["token_number"].as_u64().unwrap() > first, "{after}");

    let creds: serde_json::Value = client
        .get(format!("http://{admin}/credentials"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(creds[0]["name"], "demo_api");
    assert_eq!(creds[0]["state"], "valid");
    assert!(creds[0]["expires_at"].is_string());

    let (code, _, err) = run(&["health", "--admin", &admin], &[]);
    assert_eq!(code, 0, "{err}");

    p.signal("INT");
    assert_eq!(p.exit_code().await, 0, "{}", p.output());
    // Neither the client secret nor any issued token (`demo<N>-<32 hex>`) was printed.
    let output = p.output();
    assert!(contains_demo_token(&format!(
        "x demo12-{:032x} y",
        u128::MAX
    )));
    assert!(!output.contains("demo-secret-"), "{output}");
    assert!(!contains_demo_token(&output), "{output}");
}

fn contains_demo_token(text: &str) -> bool {
    text.match_indices("demo").any(|(i, _)| {
        let rest = &text[i + 4..];
        let digits = rest.chars().take_while(char::is_ascii_digit).count();
        digits > 0
            && rest[digits..].starts_with('-')
            && rest[digits + 1..]
                .chars()
                .take(32)
                .filter(char::is_ascii_hexdigit)
                .count()
                == 32
    })
}

#[test]
fn health_fails_when_nothing_listens() {
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (code, _, err) = run(&["health", "--admin", &dead.to_string()], &[]);
    assert_eq!(code, 1);
    assert!(err.contains("unhealthy"), "{err}");
}

#[test]
fn check_fetch_reports_a_failing_credential_and_exits_non_zero() {
    let dir = tempfile::tempdir().unwrap();
    let secret = unique("client-secret");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let config = write(
        dir.path(),
        &format!(
            "credentials:\n  good:\n    type: static\n    value: \"Bearer fixed\"\n  broken:\n    type: oauth2_client_credentials\n    token_url: http://{closed}/oauth/token\n    client_id: app\n    client_secret: \"${{SECRET}}\"\nroutes: []\n"
        ),
    );
    let (code, out, err) = run(
        &["--config", &config, "check", "--fetch"],
        &[("SECRET", secret.as_str())],
    );
    assert_ne!(code, 0, "{out}{err}");
    assert!(out.contains("good: ok"), "{out}");
    let broken = out
        .lines()
        .find(|l| l.starts_with("broken:"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(broken.contains("unreachable"), "{broken}");
    assert!(!out.contains(&secret) && !err.contains(&secret));
}

#[test]
fn check_fetch_verifies_the_shared_token_cache() {
    let mut redis = crate::support::redis::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        dir.path(),
        &format!(
            "token_cache:\n  type: redis\n  url: {}\n  encryption_key: ${{CACHE_KEY}}\n  timeout: 300ms\nroutes: []\n",
            redis.url()
        ),
    );
    let key = "q1n0yF7l3bqk2JXk1pXkq0m8mB7c2fQkA6yO0u1ZxWg=";
    let (code, out, err) = run(
        &["--config", &config, "check", "--fetch"],
        &[("CACHE_KEY", key)],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("token_cache: ok"), "{out}");
    let other = "ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff";
    let (code, out, err) = run(
        &["--config", &config, "check", "--fetch"],
        &[("CACHE_KEY", other)],
    );
    assert_ne!(code, 0);
    assert!(out.contains("encryption_key differs"), "{out}");
    assert!(!out.contains(other) && !err.contains(other) && !out.contains(key));
    redis.stop();
    let (code, out, _) = run(
        &["--config", &config, "check", "--fetch"],
        &[("CACHE_KEY", key)],
    );
    assert_ne!(code, 0);
    assert!(out.contains("token_cache: FAILED"), "{out}");
}

/// The allocator settings of `.cargo/config.toml` are built into the binary (jemalloc prints
/// its options when asked to at exit): without them the thread cache is the default one and
/// every request pays ~1 100-1 700 instructions more (docs/performance.md).
#[test]
fn the_binary_carries_the_thread_cache_settings() {
    let (code, _, stderr) = run(&["--version"], &[("_RJEM_MALLOC_CONF", "stats_print:true")]);
    assert_eq!(code, 0, "{stderr}");
    for option in [
        "opt.tcache_nslots_small_min: 256",
        "opt.tcache_nslots_small_max: 1024",
        "opt.tcache_gc_incr_bytes: 8388608",
    ] {
        assert!(stderr.contains(option), "{option} missing from:\n{stderr}");
    }
}

/// The access line follows `RUST_LOG` for its own target: `info` writes one per request,
/// and an operator who turns `authrelay::proxy::dispatch` down to `warn` gets none, also on
/// the binary's fast path (stderr not a terminal) that writes the line without `tracing`.
#[tokio::test]
async fn the_access_line_follows_the_filter_of_its_target() {
    let origin = server::serve(|_| async { server::respond(200, "ok") }).await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "listen: 127.0.0.1:0\ncredentials:\n  c:\n    type: static\n    value: \"Bearer t\"\nroutes:\n  - name: origin\n    mount: /origin\n    upstream: {}\n    credential: c\n",
        origin.url()
    );
    let config = write(dir.path(), &yaml);
    for (filter, lines) in [("info", 1), ("info,authrelay::proxy::dispatch=warn", 0)] {
        let mut p = Process::spawn(&["--config", &config], &[("RUST_LOG", filter)]);
        let proxy = addr_in(&p.wait_for("authrelay listening").await);
        let res = support::direct_client()
            .get(format!("http://{proxy}/origin/x"))
            .send()
            .await
            .unwrap();
        assert_eq!(res.status(), 200);
        p.signal("TERM");
        assert_eq!(p.exit_code().await, 0);
        let log = p.output();
        assert_eq!(
            log.matches(" request status=200").count(),
            lines,
            "RUST_LOG={filter}:\n{log}"
        );
    }
}
