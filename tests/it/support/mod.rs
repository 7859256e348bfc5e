//! Test support shared by every integration test: in-process HTTP servers on 127.0.0.1 (origins
//! and vendor token endpoints), and a harness that starts authrelay from YAML.

#![allow(dead_code)]

pub mod redis;
pub mod server;
pub mod tls;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use authrelay::{Config, Running, StartOptions};

/// A running proxy started from a YAML file in a temporary folder.
pub struct Proxy {
    pub addr: SocketAddr,
    pub running: Option<Running>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl Proxy {
    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The running proxy's state (snapshot, metrics, reload).
    pub fn state(&self) -> &Arc<authrelay::State> {
        &self.running.as_ref().expect("running").state
    }

    /// A client that sends every request through this proxy (absolute-form, as with
    /// `HTTP_PROXY`).
    pub fn client(&self) -> reqwest::Client {
        authrelay::upstream::install_crypto_provider();
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::all(self.url()).expect("proxy url"))
            .build()
            .expect("client")
    }

    /// Overwrites the config file (the watcher or an explicit reload picks it up).
    pub fn write_config(&self, yaml: &str) {
        std::fs::write(&self.config_path, yaml).expect("write config");
    }

    /// Stops the proxy and waits for it to drain.
    pub async fn stop(mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }
}

/// The value of one Prometheus text line (`name{labels} value`), 0 when absent; `inf` is
/// infinity.
pub fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().to_ascii_lowercase().parse().expect("a number"))
        .unwrap_or(0.0)
}

/// A plain client (no proxy), for reverse-proxy (mount) requests and direct calls.
pub fn direct_client() -> reqwest::Client {
    authrelay::upstream::install_crypto_provider();
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

/// Starts authrelay on `127.0.0.1:0` with `yaml` (its `listen` is overridden) and the given
/// variables for `${VAR}`. The file is not watched; call `state().reload()` to reload.
pub async fn proxy_with_env(yaml: &str, env: &[(&str, &str)]) -> Proxy {
    start(yaml, env, false).await
}

/// Like [`proxy_with_env`] with no variables.
pub async fn proxy(yaml: &str) -> Proxy {
    start(yaml, &[], false).await
}

/// Like [`proxy`] but watching the file for changes, as the binary does.
pub async fn watched_proxy(yaml: &str) -> Proxy {
    start(yaml, &[], true).await
}

async fn start(yaml: &str, env: &[(&str, &str)], watch: bool) -> Proxy {
    let dir = tempfile::tempdir().expect("tempdir");
    let config_path = dir.path().join("routes.yaml");
    let yaml = with_test_listen(yaml);
    std::fs::write(&config_path, &yaml).expect("write config");
    let env: HashMap<String, String> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let config = Config::load(&config_path, &env).unwrap_or_else(|e| panic!("config refused: {e}"));
    let running = authrelay::start(
        config,
        StartOptions {
            config_path: Some(config_path.clone()),
            env: Arc::new(env),
            watch,
        },
    )
    .await
    .expect("proxy starts");
    Proxy {
        addr: running.proxy_addr,
        running: Some(running),
        dir,
        config_path,
    }
}

/// Puts `listen: 127.0.0.1:0` first unless the YAML sets `listen` itself.
pub fn with_test_listen(yaml: &str) -> String {
    if yaml.lines().any(|l| l.starts_with("listen:")) {
        yaml.to_string()
    } else {
        format!("listen: 127.0.0.1:0\n{yaml}")
    }
}
pub mod lifecycle;
pub mod vendor;
pub mod vendors;

/// Makes every log callsite ask the current thread's subscriber each time, so that a test
/// capturing logs with `tracing::subscriber::set_default` sees every line. Without a global
/// subscriber, a callsite first reached on another test thread while no subscriber exists
/// anywhere can be cached as "never interested", and its lines are then lost to the capture.
pub fn route_logs_to_thread_subscribers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let _ = tracing::subscriber::set_global_default(AskEachTime);
    });
}

/// A global subscriber that records nothing and keeps every callsite's interest open.
struct AskEachTime;

impl tracing::Subscriber for AskEachTime {
    fn register_callsite(
        &self,
        _: &'static tracing::Metadata<'static>,
    ) -> tracing::subscriber::Interest {
        tracing::subscriber::Interest::sometimes()
    }
    fn max_level_hint(&self) -> Option<tracing::level_filters::LevelFilter> {
        Some(tracing::level_filters::LevelFilter::TRACE)
    }
    fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
        false
    }
    fn new_span(&self, _: &tracing::span::Attributes<'_>) -> tracing::span::Id {
        tracing::span::Id::from_u64(1)
    }
    fn record(&self, _: &tracing::span::Id, _: &tracing::span::Record<'_>) {}
    fn record_follows_from(&self, _: &tracing::span::Id, _: &tracing::span::Id) {}
    fn event(&self, _: &tracing::Event<'_>) {}
    fn enter(&self, _: &tracing::span::Id) {}
    fn exit(&self, _: &tracing::span::Id) {}
}

/// Sends `CONNECT authority` to the proxy and returns the stream and the response head.
pub async fn connect_tunnel(proxy: &Proxy, authority: &str) -> (tokio::net::TcpStream, String) {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    s.write_all(format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    (s, head)
}

/// Reads an HTTP response head (up to the blank line) byte by byte, leaving the rest unread.
pub async fn read_head<S: tokio::io::AsyncRead + Unpin>(s: &mut S) -> String {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    String::from_utf8(head).unwrap()
}
