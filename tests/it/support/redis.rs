//! A real `redis-server` for the shared-token-cache tests: started on a free loopback port
//! with no persistence, in a temporary folder, stopped by PID (and on drop). It can be
//! stopped and started again on the same port to play an outage. `.ci/run` installs the
//! server from the OS packages.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How the server is reached.
#[derive(Clone, Default)]
pub struct RedisOptions {
    /// `requirepass`.
    pub password: Option<String>,
    /// Serve TLS only, with this certificate and key (PEM files), on the port.
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// A running (or stopped) redis-server.
pub struct RedisServer {
    pub port: u16,
    options: RedisOptions,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl RedisServer {
    /// Starts a plain server without a password.
    pub fn start() -> Self {
        Self::start_with(RedisOptions::default())
    }

    /// Starts a server with `options`.
    pub fn start_with(options: RedisOptions) -> Self {
        let mut server = Self {
            port: free_port(),
            options,
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
        };
        server.resume();
        server
    }

    /// `redis://127.0.0.1:PORT/0` (or `rediss://`); the password is configured apart.
    pub fn url(&self) -> String {
        let scheme = if self.options.tls.is_some() {
            "rediss"
        } else {
            "redis"
        };
        format!("{scheme}://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (by PID) and waits for it to exit; its data is gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port, empty.
    pub fn resume(&mut self) {
        let port = self.port.to_string();
        let mut args: Vec<String> = vec![
            "--bind".into(),
            "127.0.0.1".into(),
            "--save".into(),
            String::new(),
            "--appendonly".into(),
            "no".into(),
            "--daemonize".into(),
            "no".into(),
            "--dir".into(),
            self.dir.path().display().to_string(),
        ];
        match &self.options.tls {
            None => args.extend(["--port".into(), port]),
            Some((cert, key)) => args.extend([
                "--port".into(),
                "0".into(),
                "--tls-port".into(),
                port,
                "--tls-cert-file".into(),
                cert.display().to_string(),
                "--tls-key-file".into(),
                key.display().to_string(),
                "--tls-auth-clients".into(),
                "no".into(),
            ]),
        }
        if let Some(p) = &self.options.password {
            args.extend(["--requirepass".into(), p.clone()]);
        }
        let child = Command::new("redis-server")
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server runs (install it: apt-get install redis-server; .ci/run does)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A client for inspecting the server from a test.
    async fn connection(&self) -> redis::aio::MultiplexedConnection {
        use redis::IntoConnectionInfo;
        let mut info = self.url().into_connection_info().expect("url");
        if let Some(p) = &self.options.password {
            let redis = info.redis_settings().clone().set_password(p);
            info = info.set_redis_settings(redis);
        }
        redis::Client::open(info)
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connect to the test redis")
    }

    /// Every key and its value (strings only; the cache writes nothing else).
    pub async fn dump(&self) -> Vec<(Vec<u8>, Vec<u8>)> {
        let mut conn = self.connection().await;
        let keys: Vec<Vec<u8>> = redis::cmd("KEYS")
            .arg("*")
            .query_async(&mut conn)
            .await
            .expect("KEYS");
        let mut all = Vec::new();
        for key in keys {
            let value: Option<Vec<u8>> = redis::cmd("GET")
                .arg(&key)
                .query_async(&mut conn)
                .await
                .expect("GET");
            all.push((key, value.unwrap_or_default()));
        }
        all
    }

    /// Runs one command (a test playing another replica or an operator).
    pub async fn command(&self, args: &[&str]) -> redis::Value {
        let mut conn = self.connection().await;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query_async(&mut conn).await.expect("command")
    }

    /// Sets `key` to `value`, bytes as they are (a record put back by someone with access
    /// to Redis).
    pub async fn set_bytes(&self, key: &str, value: &[u8]) {
        let mut conn = self.connection().await;
        let _: () = redis::cmd("SET")
            .arg(key)
            .arg(value)
            .query_async(&mut conn)
            .await
            .expect("SET");
    }

    /// Deletes every key (a flushed cache).
    pub async fn flush(&self) {
        let mut conn = self.connection().await;
        let _: () = redis::cmd("FLUSHALL")
            .query_async(&mut conn)
            .await
            .expect("FLUSHALL");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
