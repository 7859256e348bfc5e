//! `token_cache: type: file` — the tokens a person consented to, kept across restarts in one
//! file on this machine. Each credential's record is sealed as the Redis records are
//! (`seal.rs`: AES-256-GCM, bound to the credential's name and definition), so the file
//! reveals nothing without the key and a record never opens for another credential.
//!
//! A write replaces the whole file: a temporary file beside it (mode 0600) is written,
//! fsync'd and renamed over the old one, and the folder is fsync'd, so a crash at any
//! moment leaves either the old file or the new one, never half of each. Writers (the proxy
//! and `authrelay authorize`, possibly at once) take an exclusive lock on `PATH.lock` around
//! their read-modify-write, so neither drops the other's record. Refreshers take
//! `PATH.refresh.lock` around reading a refresh token, spending it and writing its
//! successor, so that two processes sharing the file never send one single-use refresh
//! token twice.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::seal::{Sealer, SharedToken};
use crate::config::FileCacheSettings;
use crate::credentials::{DurableTokens, RefreshLock, Token};

/// Version of the file's layout (the records inside carry their own).
const LAYOUT: u32 = 1;

/// The file as written: credential name → sealed record (base64).
#[derive(Default, Serialize, Deserialize)]
struct Layout {
    layout: u32,
    credentials: BTreeMap<String, String>,
}

/// One store file and the key that seals its records.
#[derive(Debug)]
pub struct FileStore {
    path: PathBuf,
    sealer: Sealer,
}

impl FileStore {
    /// A store at `settings.path`; nothing is read or created until it is used.
    pub fn new(settings: &FileCacheSettings) -> Self {
        Self {
            path: settings.path.clone(),
            sealer: Sealer::new(&settings.encryption_key),
        }
    }

    fn aad(credential: &str, identity: &str) -> String {
        format!("file-store\n{credential}\n{identity}")
    }

    fn read(&self) -> Result<Layout, String> {
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Layout::default()),
            Err(e) => return Err(format!("cannot read {}: {e}", self.path.display())),
        };
        let layout: Layout = serde_json::from_slice(&text).map_err(|e| {
            format!(
                "{} is not a token store file (line {}, column {})",
                self.path.display(),
                e.line(),
                e.column()
            )
        })?;
        if layout.layout != LAYOUT {
            return Err(format!(
                "{} has layout {}, this version reads {LAYOUT}",
                self.path.display(),
                layout.layout
            ));
        }
        Ok(layout)
    }

    /// Runs `change` on the file's contents under the writers' lock and writes the result
    /// durably.
    fn update<T>(&self, change: impl FnOnce(&mut Layout) -> T) -> Result<T, String> {
        let lock_path = with_suffix(&self.path, ".lock");
        let lock = private_file(&lock_path, false)
            .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
        // Held until `lock` is dropped at the end of this call (closing the file unlocks).
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?;
        let mut layout = self.read()?;
        layout.layout = LAYOUT;
        let result = change(&mut layout);
        self.write(&layout)?;
        Ok(result)
    }

    fn write(&self, layout: &Layout) -> Result<(), String> {
        let fail =
            |what: &str, e: std::io::Error| format!("cannot {what} {}: {e}", self.path.display());
        let body = serde_json::to_vec_pretty(layout)
            .map_err(|e| format!("cannot encode the store: {e}"))?;
        let temporary = with_suffix(&self.path, ".tmp");
        let mut file =
            private_file(&temporary, true).map_err(|e| fail("create a file beside", e))?;
        file.write_all(&body)
            .map_err(|e| fail("write a file beside", e))?;
        file.sync_all().map_err(|e| fail("sync a file beside", e))?;
        drop(file);
        std::fs::rename(&temporary, &self.path).map_err(|e| fail("replace", e))?;
        // The rename itself is durable only once the folder is.
        let folder = self.path.parent().filter(|p| !p.as_os_str().is_empty());
        File::open(folder.unwrap_or(Path::new(".")))
            .and_then(|d| d.sync_all())
            .map_err(|e| fail("sync the folder of", e))
    }
}

impl DurableTokens for FileStore {
    fn load(&self, credential: &str, identity: &str) -> Result<Option<Token>, String> {
        let layout = self.read()?;
        let Some(encoded) = layout.credentials.get(credential) else {
            return Ok(None);
        };
        let sealed = base64::engine::general_purpose::STANDARD
            .decode(encoded)
            .map_err(|_| {
                format!(
                    "{}: the record of `{credential}` is damaged",
                    self.path.display()
                )
            })?;
        // Sealed for another definition (a new client id, token URL) or another key: the
        // tokens in it belong to something else and are not sent.
        Ok(self
            .sealer
            .open(&Self::aad(credential, identity), &sealed)
            .map(|shared| shared.token))
    }

    fn save(&self, credential: &str, identity: &str, token: &Token) -> Result<(), String> {
        let shared = SharedToken {
            token: token.clone(),
            issued_at: SystemTime::now(),
            // One writer at a time (the lock) and no replicas reading: nothing to order.
            generation: 0,
        };
        let sealed = self
            .sealer
            .seal(&Self::aad(credential, identity), &shared)
            .ok_or_else(|| "cannot seal the token".to_string())?;
        let encoded = base64::engine::general_purpose::STANDARD.encode(sealed);
        self.update(|layout| {
            layout.credentials.insert(credential.to_string(), encoded);
        })
    }

    fn delete(&self, credential: &str) -> Result<bool, String> {
        self.update(|layout| layout.credentials.remove(credential).is_some())
    }

    /// An exclusive lock on `PATH.refresh.lock`, apart from the writers' lock (which a save
    /// made under this one takes).
    fn lock_refresh(&self) -> Result<RefreshLock, String> {
        let lock_path = with_suffix(&self.path, ".refresh.lock");
        let lock = private_file(&lock_path, false)
            .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| format!("cannot lock {}: {e}", lock_path.display()))?;
        Ok(RefreshLock(Box::new(lock)))
    }
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Opens (creating with mode 0600) a file only the proxy's user may read.
fn private_file(path: &Path, truncate: bool) -> std::io::Result<File> {
    let mut options = OpenOptions::new();
    options
        .read(true)
        .write(true)
        .create(true)
        .truncate(truncate);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::EncryptionKey;
    use crate::credentials::RefreshGrant;
    use crate::vocab::secret::Secret;

    fn store(dir: &Path, key: u8) -> FileStore {
        FileStore::new(&FileCacheSettings {
            path: dir.join("tokens.json"),
            encryption_key: EncryptionKey([key; 32]),
        })
    }

    fn token(access: &str, refresh: &str) -> Token {
        Token {
            value: Secret::new(format!("Bearer {access}")),
            expires_at: Some(SystemTime::now() + std::time::Duration::from_secs(600)),
            refresh: Some(RefreshGrant {
                token: Secret::new(refresh),
                expires_at: None,
            }),
        }
    }

    #[test]
    fn records_round_trip_sealed_and_private() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path(), 7);
        assert!(s.load("crm", "id1").unwrap().is_none());
        s.save("crm", "id1", &token("at-1", "rt-1")).unwrap();
        s.save("mail", "id2", &token("at-2", "rt-2")).unwrap();
        s.save("crm", "id1", &token("at-3", "rt-3")).unwrap();
        let crm = s.load("crm", "id1").unwrap().unwrap();
        assert_eq!(crm.value.expose(), "Bearer at-3");
        assert_eq!(crm.refresh.unwrap().token.expose(), "rt-3");
        assert!(
            s.load("mail", "id2").unwrap().is_some(),
            "the other record is kept"
        );
        let raw = std::fs::read_to_string(dir.path().join("tokens.json")).unwrap();
        assert!(!raw.contains("rt-3") && !raw.contains("at-3"), "{raw}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("tokens.json"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(s.delete("crm").unwrap());
        assert!(!s.delete("crm").unwrap());
        assert!(s.load("crm", "id1").unwrap().is_none());
        assert!(s.load("mail", "id2").unwrap().is_some());
    }

    #[test]
    fn another_definition_or_key_reads_nothing() {
        let dir = tempfile::tempdir().unwrap();
        store(dir.path(), 7)
            .save("crm", "id1", &token("a", "r"))
            .unwrap();
        assert!(store(dir.path(), 7)
            .load("crm", "other-client")
            .unwrap()
            .is_none());
        assert!(store(dir.path(), 8).load("crm", "id1").unwrap().is_none());
    }

    #[test]
    fn a_damaged_file_is_an_error_naming_its_position() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("tokens.json"),
            "{\n  \"layout\": 1,\n  oops",
        )
        .unwrap();
        let e = store(dir.path(), 7).load("crm", "id1").unwrap_err();
        assert!(e.contains("line 3"), "{e}");
    }
}
