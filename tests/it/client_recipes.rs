//! The client recipes of docs/operations.md and docs/https.md, run for real: curl, Python
//! requests and httpx, Node's undici `fetch` and Java's `HttpClient` call the real `authrelay`
//! binary in forward-proxy, base-URL (mount) and intercepted-HTTPS mode with exactly the
//! settings the docs show (the scripts are `tests/recipes/*`), and the upstream must see the
//! injected credential each time. A client whose runtime is not installed is skipped with a
//! printed reason; `.ci/run` installs them all.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::support::server;
use crate::support::tls::{https_origin, TestCa};

const BIN: &str = env!("CARGO_BIN_EXE_authrelay");
const TOKEN: &str = "Bearer recipe-token-5d1c";

pub(crate) fn recipes_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/recipes")
}

/// Where `.ci/run` installs the npm package `undici` for the Node recipe.
pub(crate) fn node_modules() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/client-recipes/node_modules")
}

/// The real binary, killed on drop; its output is collected for the failure messages.
/// `docs.rs` runs the documentation's blocks against it too.
pub(crate) struct Authrelay {
    child: std::process::Child,
    out: Arc<Mutex<Vec<String>>>,
}

impl Authrelay {
    /// Starts the binary on `config` and waits for its listener: (process, `http://ADDR`).
    pub(crate) fn start(config: &Path) -> (Authrelay, String) {
        let mut child = Command::new(BIN)
            .arg("--config")
            .arg(config)
            .env_remove("AUTHRELAY_CONFIG")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn authrelay");
        let out: Arc<Mutex<Vec<String>>> = Arc::default();
        let stderr = child.stderr.take().unwrap();
        let lines = Arc::clone(&out);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(line);
            }
        });
        let proxy = Authrelay { child, out };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(url) = proxy.logged_url("authrelay listening") {
                return (proxy, url);
            }
            assert!(
                Instant::now() < deadline,
                "authrelay did not start:\n{}",
                proxy.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `http://ADDR` from the first log line containing `message` and a loopback address
    /// (`authrelay listening`, `admin endpoint listening`).
    pub(crate) fn logged_url(&self, message: &str) -> Option<String> {
        let out = self.out.lock().unwrap();
        let line = out.iter().find(|l| l.contains(message))?;
        let start = line.find("127.0.0.1:")?;
        let addr: String = line[start..]
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect();
        Some(format!("http://{addr}"))
    }

    pub(crate) fn output(&self) -> String {
        self.out.lock().unwrap().join("\n")
    }
}

impl Drop for Authrelay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether `program args…` runs and exits 0 (a runtime or package is present).
pub(crate) fn available(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// One client run: a command line and the environment the docs tell the user to set.
struct Run {
    client: &'static str,
    mode: &'static str,
    program: &'static str,
    args: Vec<String>,
    env: BTreeMap<&'static str, String>,
}

/// Runs `run` with a clean environment (only PATH, HOME and what the recipe sets), and
/// returns (status, body) as printed by the recipe.
fn execute(run: &Run) -> Result<(u16, String), String> {
    let mut cmd = Command::new(run.program);
    cmd.args(&run.args)
        .env_clear()
        .stdin(Stdio::null())
        .current_dir(recipes_dir());
    for keep in ["PATH", "HOME", "PYENV_ROOT", "JAVA_HOME", "LANG"] {
        if let Ok(v) = std::env::var(keep) {
            cmd.env(keep, v);
        }
    }
    cmd.envs(&run.env);
    let out = cmd.output().map_err(|e| format!("cannot run: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "exit {:?}\nstdout: {stdout}\nstderr: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let (status, body) = stdout.split_once('\n').unwrap_or((&stdout, ""));
    let status = status
        .trim()
        .parse()
        .map_err(|_| format!("no status in output: {stdout}"))?;
    Ok((status, body.trim().to_string()))
}

/// The recipe runs for every client present on this machine.
fn runs(proxy: &str, ca_pem: &Path, truststore: Option<&Path>) -> Vec<Run> {
    let port = proxy.rsplit(':').next().unwrap().to_string();
    let no_proxy = "127.0.0.1,localhost".to_string();
    let forward = |client: &str| format!("http://api.test/v1/recipe/{client}-forward");
    let mount = |client: &str| format!("{proxy}/api/v1/recipe/{client}-mount");
    let secure = |client: &str| format!("https://secure.test/v1/recipe/{client}-intercept");
    let env = |pairs: &[(&'static str, String)]| pairs.iter().cloned().collect();
    let mut runs = Vec::new();

    if available("curl", &["--version"]) {
        let curl = |url: String| {
            vec![
                "--silent".into(),
                "--show-error".into(),
                "--write-out".into(),
                "%{http_code}\\n".into(),
                "--output".into(),
                "/dev/null".into(),
                url,
            ]
        };
        runs.push(Run {
            client: "curl",
            mode: "forward",
            program: "curl",
            args: curl(forward("curl")),
            // curl reads only the lower-case `http_proxy`.
            env: env(&[("http_proxy", proxy.into())]),
        });
        runs.push(Run {
            client: "curl",
            mode: "mount",
            program: "curl",
            args: curl(mount("curl")),
            env: env(&[("http_proxy", proxy.into()), ("NO_PROXY", no_proxy.clone())]),
        });
        runs.push(Run {
            client: "curl",
            mode: "intercept",
            program: "curl",
            args: curl(secure("curl")),
            env: env(&[
                ("HTTPS_PROXY", proxy.into()),
                ("CURL_CA_BUNDLE", ca_pem.display().to_string()),
            ]),
        });
    } else {
        eprintln!("client recipes: curl not installed; skipping curl");
    }

    for (client, script, module, ca_var) in [
        (
            "requests",
            "requests_get.py",
            "requests",
            "REQUESTS_CA_BUNDLE",
        ),
        ("httpx", "httpx_get.py", "httpx", "SSL_CERT_FILE"),
    ] {
        if !available("python3", &["-c", &format!("import {module}")]) {
            eprintln!("client recipes: python3 with `{module}` not installed; skipping {client}");
            continue;
        }
        let py = |url: String| vec![script.to_string(), url];
        runs.push(Run {
            client,
            mode: "forward",
            program: "python3",
            args: py(forward(client)),
            env: env(&[("HTTP_PROXY", proxy.into())]),
        });
        runs.push(Run {
            client,
            mode: "mount",
            program: "python3",
            args: py(mount(client)),
            env: env(&[("HTTP_PROXY", proxy.into()), ("NO_PROXY", no_proxy.clone())]),
        });
        runs.push(Run {
            client,
            mode: "intercept",
            program: "python3",
            args: py(secure(client)),
            env: env(&[
                ("HTTPS_PROXY", proxy.into()),
                (ca_var, ca_pem.display().to_string()),
            ]),
        });
    }

    let modules = node_modules();
    if !available("node", &["--version"]) {
        eprintln!("client recipes: node not installed; skipping Node fetch");
    } else if !modules.join("undici").exists() {
        eprintln!(
            "client recipes: npm package undici not in {}; skipping Node fetch (.ci/run installs it)",
            modules.display()
        );
    } else {
        let node_path = modules.display().to_string();
        let node = |url: String, dispatcher: &str| {
            vec!["undici_fetch.cjs".to_string(), url, dispatcher.to_string()]
        };
        // EnvHttpProxyAgent with default options, and ProxyAgent(url): both tunnel every
        // request with CONNECT, http:// included.
        for (client, dispatcher) in [("node", "env"), ("node-proxyagent", "proxy")] {
            let proxy_env = if dispatcher == "env" {
                ("HTTP_PROXY", "HTTPS_PROXY")
            } else {
                ("PROXY", "PROXY")
            };
            runs.push(Run {
                client,
                mode: "forward",
                program: "node",
                args: node(forward(client), dispatcher),
                env: env(&[
                    (proxy_env.0, proxy.into()),
                    ("NODE_PATH", node_path.clone()),
                ]),
            });
            runs.push(Run {
                client,
                mode: "intercept",
                program: "node",
                args: node(secure(client), dispatcher),
                env: env(&[
                    (proxy_env.1, proxy.into()),
                    ("NODE_EXTRA_CA_CERTS", ca_pem.display().to_string()),
                    ("NODE_PATH", node_path.clone()),
                ]),
            });
        }
        runs.push(Run {
            client: "node",
            mode: "mount",
            program: "node",
            args: node(mount("node"), "env"),
            env: env(&[
                ("HTTP_PROXY", proxy.into()),
                ("NO_PROXY", no_proxy.clone()),
                ("NODE_PATH", node_path),
            ]),
        });
    }

    match truststore {
        Some(store) => {
            let java = |props: &[String], url: String| {
                let mut args = props.to_vec();
                args.push("Recipe.java".into());
                args.push(url);
                args
            };
            let http_props = [
                "-Dhttp.proxyHost=127.0.0.1".to_string(),
                format!("-Dhttp.proxyPort={port}"),
            ];
            runs.push(Run {
                client: "java",
                mode: "forward",
                program: "java",
                args: java(&http_props, forward("java")),
                env: BTreeMap::new(),
            });
            // The JVM's default selector skips localhost and 127.* (http.nonProxyHosts).
            runs.push(Run {
                client: "java",
                mode: "mount",
                program: "java",
                args: java(&http_props, mount("java")),
                env: BTreeMap::new(),
            });
            let https_props = [
                "-Dhttps.proxyHost=127.0.0.1".to_string(),
                format!("-Dhttps.proxyPort={port}"),
                format!("-Djavax.net.ssl.trustStore={}", store.display()),
                "-Djavax.net.ssl.trustStorePassword=changeit".to_string(),
            ];
            runs.push(Run {
                client: "java",
                mode: "intercept",
                program: "java",
                args: java(&https_props, secure("java")),
                env: BTreeMap::new(),
            });
        }
        None => eprintln!("client recipes: no JDK (java and keytool); skipping Java"),
    }
    runs
}

/// The authrelay CA in a PKCS#12 trust store, as docs/https.md makes it with `keytool`.
fn java_truststore(dir: &Path, ca_pem: &Path) -> Option<PathBuf> {
    if !available("java", &["-version"]) {
        return None;
    }
    let store = dir.join("truststore.p12");
    let made = Command::new("keytool")
        .args([
            "-importcert",
            "-noprompt",
            "-alias",
            "authrelay-ca",
            "-file",
        ])
        .arg(ca_pem)
        .arg("-keystore")
        .arg(&store)
        .args(["-storetype", "PKCS12", "-storepass", "changeit"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    made.then_some(store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_client_recipe_gets_the_credential() {
    let plain = server::serve(|_| async { server::respond(200, "plain ok") }).await;
    let upstream_ca = TestCa::new();
    let secure = https_origin(&upstream_ca, &["127.0.0.1"], &["h2", "http/1.1"]).await;
    let dir = tempfile::tempdir().unwrap();
    let ca = authrelay::intercept::init_ca(&dir.path().join("ca"), false).unwrap();
    let upstream_ca_file = upstream_ca.write(dir.path(), "upstream-ca.pem");
    let config = dir.path().join("routes.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:0\n\
             unmatched: deny\n\
             tls:\n  ca_file: {}\n\
             intercept_ca:\n  cert_file: {}\n  key_file: {}\n\
             credentials:\n  api_key:\n    type: static\n    value: \"{TOKEN}\"\n\
             routes:\n\
             \x20 - name: forward\n    host: api.test\n    upstream: {}\n    credential: api_key\n\
             \x20 - name: mount\n    mount: /api\n    upstream: {}\n    credential: api_key\n\
             \x20 - name: secure\n    host: secure.test\n    upstream: {}\n    credential: api_key\n    intercept: true\n",
            upstream_ca_file.display(),
            ca.cert.display(),
            ca.key.display(),
            plain.url(),
            plain.url(),
            secure.url(),
        ),
    )
    .unwrap();
    let (proxy, url) = Authrelay::start(&config);
    let truststore = java_truststore(dir.path(), &ca.cert);
    let runs = runs(&url, &ca.cert, truststore.as_deref());

    let mut failures = Vec::new();
    for run in &runs {
        let what = format!("{} ({} mode)", run.client, run.mode);
        let path = format!("/v1/recipe/{}-{}", run.client, run.mode);
        let result = tokio::task::block_in_place(|| execute(run));
        let (status, body) = match result {
            Ok(answer) => answer,
            Err(e) => {
                failures.push(format!("{what}: {e}"));
                continue;
            }
        };
        let intercepted = run.mode == "intercept";
        let seen_token = if intercepted {
            secure
                .requests()
                .into_iter()
                .find(|s| s.target == path)
                .map(|s| s.headers["authorization"].to_str().unwrap().to_string())
        } else {
            plain
                .requests()
                .into_iter()
                .find(|s| s.target == path)
                .map(|s| s.header("authorization"))
        };
        let expected_body = match (run.client, intercepted) {
            ("curl", _) => "",
            (_, true) => "secure ok",
            (_, false) => "plain ok",
        };
        if status != 200 || body != expected_body || seen_token.as_deref() != Some(TOKEN) {
            failures.push(format!(
                "{what}: status {status}, body {body:?}, upstream saw authorization {seen_token:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} recipe runs failed:\n{}\n--- authrelay log ---\n{}",
        failures.len(),
        runs.len(),
        failures.join("\n"),
        proxy.output()
    );
    // The access log names the host the client asked for and the upstream it went to.
    let log = proxy.output();
    let forward_line = log
        .lines()
        .find(|l| l.contains("route=\"forward\"") && l.contains("status=200"))
        .expect("an access line for the forward route");
    assert!(forward_line.contains("host=\"api.test\""), "{forward_line}");
    assert!(
        forward_line.contains(&format!("upstream=\"{}\"", plain.addr)),
        "{forward_line}"
    );
    eprintln!("client recipes: {} runs passed", runs.len());
}
