//! Hot reload: the config file is watched (its folder, so that editors that replace the file
//! are seen too), and so are the files it names (`*_file` secrets, keys, CAs) and the
//! Kubernetes `..data` symlink of a mounted folder; `SIGHUP` reloads as well. Bursts of file
//! events are coalesced, and a file is parsed only once it is stable — unchanged, together
//! with the files it names, across [`STABLE`] — so a half-written file is never taken as final.

use std::collections::HashSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::{mpsc, watch};

use crate::config::ConfigError;
use crate::state::State;

/// How long file events are collected before one reload.
const SETTLE: Duration = Duration::from_millis(150);

/// How long the config file and the files it names must stay unchanged before they are read
/// as final.
pub const STABLE: Duration = Duration::from_millis(300);

/// How many [`STABLE`] periods a file that keeps changing is waited for; after that the
/// round is skipped (the writer's next event starts a new one).
const MAX_STABLE_ROUNDS: usize = 20;

/// Keeps the file watcher alive; dropping it stops watching.
pub struct ReloadHandle {
    _watcher: Option<Arc<Mutex<notify::RecommendedWatcher>>>,
}

impl ReloadHandle {
    /// A handle that watches nothing.
    pub fn none() -> Self {
        Self { _watcher: None }
    }
}

/// The file names whose events mean "reload": the config file's and those of the files it
/// names. Shared between the watcher's callback and the reload task, which updates it.
#[derive(Default)]
struct Relevant {
    names: HashSet<OsString>,
    dirs: HashSet<PathBuf>,
}

impl Relevant {
    fn matches(&self, path: &Path) -> bool {
        path.file_name().is_some_and(|name| {
            // `..data`, `..data_tmp`, `..2026_…`: a Kubernetes volume's atomic swap.
            self.names.contains(name) || name.to_string_lossy().starts_with("..")
        })
    }
}

/// Starts watching `state`'s config file and listening for `SIGHUP`, until `shutdown`.
pub fn spawn(state: Arc<State>, mut shutdown: watch::Receiver<bool>) -> ReloadHandle {
    let Some(path) = state.config_path.clone() else {
        return ReloadHandle::none();
    };
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let relevant = Arc::new(Mutex::new(Relevant::default()));
    let watcher = start_watcher(Arc::clone(&relevant), tx.clone());
    if let Some(w) = &watcher {
        watch_files(w, &relevant, &path, &state.snapshot().config.files);
    }
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
                    _ = crate::vocab::shutdown::shutdown_requested(&mut hup_shutdown) => break,
                }
            }
        });
    }
    drop(tx);
    let task_watcher = watcher.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                got = rx.recv() => {
                    if got.is_none() { break; }
                    tokio::time::sleep(SETTLE).await;
                    while rx.try_recv().is_ok() {}
                    reload_when_stable(&state, &path).await;
                    while rx.try_recv().is_ok() {}
                    if let Some(w) = &task_watcher {
                        watch_files(w, &relevant, &path, &state.snapshot().config.files);
                    }
                }
                _ = crate::vocab::shutdown::shutdown_requested(&mut shutdown) => break,
            }
        }
    });
    ReloadHandle { _watcher: watcher }
}

/// Waits until the config file and the files the running config names are unchanged across
/// [`STABLE`], then reloads from the text read.
async fn reload_when_stable(state: &Arc<State>, path: &Path) {
    let files = state.snapshot().config.files.clone();
    let mut seen = fingerprint(path, &files).await;
    for _ in 0..MAX_STABLE_ROUNDS {
        tokio::time::sleep(STABLE).await;
        let now = fingerprint(path, &files).await;
        if now == seen {
            let state = Arc::clone(state);
            let text = now.0;
            let _ = tokio::task::spawn_blocking(move || match text {
                Ok(text) => state.reload_text(&text),
                Err(_) => state.reload(),
            })
            .await;
            return;
        }
        seen = now;
    }
    tracing::warn!(path = %path.display(), "the config file kept changing; reload postponed to its next change");
}

/// What a reload would read: the config text (or its read error, by kind) and the named
/// files' bytes.
type Fingerprint = (Result<String, String>, Vec<Option<Vec<u8>>>);

async fn fingerprint(path: &Path, files: &[PathBuf]) -> Fingerprint {
    let text = tokio::fs::read_to_string(path).await.map_err(|e| {
        ConfigError::Read {
            path: path.to_path_buf(),
            source: e,
        }
        .to_string()
    });
    let mut contents = Vec::with_capacity(files.len());
    for f in files {
        contents.push(tokio::fs::read(f).await.ok());
    }
    (text, contents)
}

fn start_watcher(
    relevant: Arc<Mutex<Relevant>>,
    tx: mpsc::UnboundedSender<()>,
) -> Option<Arc<Mutex<notify::RecommendedWatcher>>> {
    let handler = move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            let relevant = !event.kind.is_access() && {
                let r = relevant.lock().unwrap_or_else(|p| p.into_inner());
                event.paths.iter().any(|p| r.matches(p))
            };
            if relevant {
                let _ = tx.send(());
            }
        }
    };
    match notify::recommended_watcher(handler) {
        Ok(w) => Some(Arc::new(Mutex::new(w))),
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch the config file; SIGHUP still reloads");
            None
        }
    }
}

/// Watches the folders of the config file and of `files` (those not watched yet) and makes
/// their names relevant.
fn watch_files(
    watcher: &Mutex<notify::RecommendedWatcher>,
    relevant: &Mutex<Relevant>,
    config: &Path,
    files: &[PathBuf],
) {
    let mut watcher = watcher.lock().unwrap_or_else(|p| p.into_inner());
    let mut relevant = relevant.lock().unwrap_or_else(|p| p.into_inner());
    for file in std::iter::once(config).chain(files.iter().map(PathBuf::as_path)) {
        let Some(name) = file.file_name() else {
            continue;
        };
        relevant.names.insert(name.to_owned());
        let dir = match file.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if relevant.dirs.contains(&dir) {
            continue;
        }
        match watcher.watch(&dir, RecursiveMode::NonRecursive) {
            Ok(()) => {
                relevant.dirs.insert(dir);
            }
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot watch a config folder; SIGHUP still reloads");
            }
        }
    }
}
