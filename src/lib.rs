//! authrelay: an outbound authenticating proxy. Legacy applications send their API calls
//! through it (as `HTTP_PROXY` or by base URL); it matches each request against the routes
//! in `routes.yaml` and adds the credential the vendor expects, obtaining and refreshing
//! tokens itself.
//!
//! The modules follow a request's path: `config` → `routes` → `credentials` →
//! `token_store` (with `token_cache` when replicas share tokens through Redis) → `proxy` →
//! `upstream`, plus `state` (the swapped snapshot), `reload`,
//! `metrics` and `telemetry`; `admin` serves health, metrics and credential status, and
//! `commands` and `demo` hold what the CLI's `check --fetch`, `token`, `health` and `demo` do.

pub mod access;
pub mod access_log;
pub mod admin;
pub mod authorize;
pub mod commands;
pub mod config;
pub mod credentials;
pub mod demo;
pub mod expiry;
pub mod intercept;
pub mod metrics;
pub mod proxy;
pub mod reload;
pub mod routes;
pub mod state;
pub mod telemetry;
pub mod token_cache;
pub mod token_store;
pub mod upstream;
pub mod vocab;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use config::{Config, ConfigError, Environment, ProcessEnv};
pub use state::{StartError, State};

/// How to start the proxy.
pub struct StartOptions {
    /// The config file, watched for reloads; `None` for an in-memory config (no reloads).
    pub config_path: Option<PathBuf>,
    /// Where `${VAR}` references are resolved on reload.
    pub env: Arc<dyn Environment>,
    /// Watch the file and listen for SIGHUP.
    pub watch: bool,
}

/// A running proxy.
pub struct Running {
    /// The proxy listener's address (useful when the config says port 0).
    pub proxy_addr: SocketAddr,
    /// The admin listener's address, when `admin` is configured.
    pub admin_addr: Option<SocketAddr>,
    /// The shared state (snapshot, metrics).
    pub state: Arc<State>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<()>,
    admin: Option<JoinHandle<()>>,
    _reload: reload::ReloadHandle,
}

impl Running {
    /// Stops accepting, drains requests in flight (up to `timeouts.drain`) and returns.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        let _ = self.server.await;
        if let Some(admin) = self.admin {
            let _ = admin.await;
        }
    }

    /// A receiver that turns true when shutdown starts (for companion tasks).
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }
}

/// Binds the listener and starts serving `config`.
pub async fn start(config: Config, options: StartOptions) -> Result<Running, StartError> {
    let listen = config.listen;
    let admin_listen = config.admin;
    let drain = config.timeouts.drain;
    let state = State::new(config, options.config_path, options.env)?;
    let (listener, proxy_addr) = bind(listen).await?;
    let admin_listener = match admin_listen {
        Some(addr) => Some(bind(addr).await?),
        None => None,
    };
    let mut own = vec![proxy_addr];
    own.extend(admin_listener.as_ref().map(|(_, addr)| *addr));
    state.serve(own);
    if let Some(risk) = state.snapshot().config.clients.open_relay_risk(proxy_addr) {
        tracing::warn!("OPEN PROXY: {risk}");
    }
    let notes = commands::access_notes(&state.snapshot().config);
    tracing::info!("{}", notes.unmatched);
    if let Some(line) = notes.open_credentials {
        tracing::warn!("{line}");
    }
    let (shutdown, shutdown_rx) = watch::channel(false);
    let mut admin_addr = None;
    let admin = admin_listener.map(|(listener, addr)| {
        admin_addr = Some(addr);
        tracing::info!(addr = %addr, "admin endpoint listening");
        if !addr.ip().is_loopback() {
            tracing::warn!(addr = %addr, "the admin endpoint listens beyond loopback: it shows credential names, states and expiry (never secrets); expose it only to trusted networks");
        }
        tokio::spawn(admin::serve(
            listener,
            Arc::clone(&state),
            shutdown_rx.clone(),
        ))
    });
    let reload = if options.watch {
        reload::spawn(Arc::clone(&state), shutdown_rx.clone())
    } else {
        reload::ReloadHandle::none()
    };
    let server = tokio::spawn(proxy::serve(
        listener,
        Arc::clone(&state),
        shutdown_rx,
        drain,
    ));
    tracing::info!(addr = %proxy_addr, "authrelay listening");
    Ok(Running {
        proxy_addr,
        admin_addr,
        state,
        shutdown,
        server,
        admin,
        _reload: reload,
    })
}

async fn bind(addr: SocketAddr) -> Result<(TcpListener, SocketAddr), StartError> {
    let bind_error = |source| StartError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    Ok((listener, local))
}
