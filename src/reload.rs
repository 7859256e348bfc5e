//! Hot reload: the config file is watched (its folder, so that editors that replace the file
//! are seen too) and `SIGHUP` reloads as well. Bursts of file events are coalesced.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::state::State;

/// How long file events are collected before one reload.
const SETTLE: Duration = Duration::from_millis(150);

/// Keeps the file watcher alive; dropping it stops watching.
pub struct ReloadHandle {
    _watcher: Option<notify::RecommendedWatcher>,
}

impl ReloadHandle {
    /// A handle that watches nothing.
    pub fn none() -> Self {
        Self { _watcher: None }
    }
}

/// Starts watching `state`'s config file and listening for `SIGHUP`, until `shutdown`.
pub fn spawn(state: Arc<State>, mut shutdown: watch::Receiver<bool>) -> ReloadHandle {
    let Some(path) = state.config_path.clone() else {
        return ReloadHandle::none();
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let watcher = watch_file(&path, tx.clone());
    #[cfg(unix)]
    {
        let tx = tx.clone();
        let mut hup_shutdown = shutdown.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            loop {
                tokio::select! {
                    got = hup.recv() => {
                        if got.is_none() { break; }
                        tracing::info!("SIGHUP: reloading config");
                        let _ = tx.send(());
                    }
                    _ = crate::shutdown_requested(&mut hup_shutdown) => break,
                }
            }
        });
    }
    drop(tx);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                got = rx.recv() => {
                    if got.is_none() { break; }
                    tokio::time::sleep(SETTLE).await;
                    while rx.try_recv().is_ok() {}
                    let state = Arc::clone(&state);
                    let _ = tokio::task::spawn_blocking(move || state.reload()).await;
                }
                _ = crate::shutdown_requested(&mut shutdown) => break,
            }
        }
    });
    ReloadHandle { _watcher: watcher }
}

fn watch_file(path: &Path, tx: mpsc::UnboundedSender<()>) -> Option<notify::RecommendedWatcher> {
    let file_name = path.file_name()?.to_owned();
    let dir: PathBuf = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let handler = move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            let relevant = !event.kind.is_access()
                && event
                    .paths
                    .iter()
                    .any(|p| p.file_name() == Some(file_name.as_os_str()));
            if relevant {
                let _ = tx.send(());
            }
        }
    };
    match notify::recommended_watcher(handler) {
        Ok(mut w) => match w.watch(&dir, RecursiveMode::NonRecursive) {
            Ok(()) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch the config file; SIGHUP still reloads");
                None
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config file; SIGHUP still reloads");
            None
        }
    }
}
