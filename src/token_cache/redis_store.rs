//! The Redis side of the shared token cache: a few commands and two Lua scripts, each under a
//! short timeout, over the `redis` crate's connection manager (which reconnects by itself).
//! Nothing here knows about tokens; it moves sealed bytes, leases and wake-ups.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, IntoConnectionInfo, Script};
use tokio::sync::Notify;

use crate::config::RedisCacheSettings;

/// Why a Redis operation did not complete. The message never holds a URL or a password.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// No connection, a refused command, or a broken reply.
    #[error("redis error: {0}")]
    Redis(String),
    /// No answer within `token_cache.timeout`.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    /// Never connected yet.
    #[error("not connected to redis yet")]
    NotConnected,
}

/// The largest value the cache reads back (a record is a sealed token: a few KiB, and the
/// token endpoint's whole answer is capped at 1 MiB).
pub const MAX_VALUE: usize = 2 * 1024 * 1024;

/// A TTL in whole milliseconds, at least 1 (Redis refuses `PX 0`).
fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn redis_error(e: &redis::RedisError) -> StoreError {
    // The crate's messages name the command and the server's reply kind, never the URL.
    StoreError::Redis(format!("{:?}: {}", e.kind(), e.detail().unwrap_or("")))
}

/// What a token key holds, read atomically: its type, and for a string its bytes unless it is
/// longer than the read cap (`ARGV[1]`), then only its length. Values the cache never wrote
/// (another type, a huge string) are described, not read, so that nothing planted there can
/// make a read fail or allocate without bound.
const READ_SCRIPT: &str = r"
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'string' then return {kind, ''} end
local len = redis.call('STRLEN', KEYS[1])
if len > tonumber(ARGV[1]) then return {'large', tostring(len)} end
return {'string', redis.call('GET', KEYS[1])}
";

/// Writes `ARGV[2]` to the token key only if the lease (when one exists) is ours and the
/// token key still holds what the writer last read (kind `ARGV[5]`; for a string within the
/// cap, the bytes `ARGV[1]`): a compare-and-swap fenced by the lease, so a slow former lease
/// holder can never overwrite a newer token. A key found empty is written whatever was read:
/// it was dropped (an operator invalidated the token) or expired, and holds nothing newer.
/// Whatever was there (a value of another type included) is deleted first. Releases the lease and announces the new token.
const WRITE_SCRIPT: &str = r"
local lease = redis.call('GET', KEYS[2])
if lease and lease ~= ARGV[3] then return 0 end
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'string' and redis.call('STRLEN', KEYS[1]) > tonumber(ARGV[6]) then kind = 'large' end
if kind ~= 'none' then
  if kind ~= ARGV[5] then return 0 end
  if kind == 'string' and redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[4])
if lease then redis.call('DEL', KEYS[2]) end
redis.call('PUBLISH', ARGV[7], KEYS[1])
return 1
";

/// Deletes the lease only if it is still ours (token-fenced release) and wakes the waiters of
/// its token key (`ARGV[3]`).
const RELEASE_SCRIPT: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  redis.call('PUBLISH', ARGV[2], ARGV[3])
  return 1
end
return 0
";

/// Deletes the token key only if it still holds `ARGV[1]` (an operator dropping a token
/// must not drop a newer one another replica just wrote).
const FORGET_SCRIPT: &str = r"
if redis.call('TYPE', KEYS[1])['ok'] == 'string' and redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
";

/// What a token key holds, as [`RedisStore::read`] found it. Also what a compare-and-swap
/// expects to find still there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// No such key.
    Nothing,
    /// A string of at most [`MAX_VALUE`] bytes.
    Value(Vec<u8>),
    /// A string longer than [`MAX_VALUE`]; its length.
    TooLarge(u64),
    /// A value of another type (`list`, `hash`, ...); the type's name.
    OtherType(String),
}

impl Stored {
    /// The kind name the scripts use.
    fn kind(&self) -> &str {
        match self {
            Stored::Nothing => "none",
            Stored::Value(_) => "string",
            Stored::TooLarge(_) => "large",
            Stored::OtherType(kind) => kind,
        }
    }
}

/// One Redis server as the cache sees it.
pub struct RedisStore {
    client: redis::Client,
    conn: ArcSwapOption<ConnectionManager>,
    timeout: Duration,
    channel: String,
    read: Script,
    write: Script,
    release: Script,
    forget: Script,
    /// Who waits for a key to change, woken by the subscriber task.
    waiters: Mutex<HashMap<String, Arc<Notify>>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedisStore")
    }
}

impl RedisStore {
    /// A store for `settings`; connects lazily ([`Self::connect`]).
    pub fn new(settings: &RedisCacheSettings) -> Result<Self, String> {
        let mut info = settings
            .url
            .expose()
            .into_connection_info()
            .map_err(|e| format!("token_cache.url: {}", redis_error(&e)))?;
        if let Some(password) = &settings.password {
            let redis = info
                .redis_settings()
                .clone()
                .set_password(password.expose());
            info = info.set_redis_settings(redis);
        }
        let client = match &settings.ca_file {
            None => redis::Client::open(info),
            Some(path) => {
                let pem = std::fs::read(path).map_err(|e| {
                    format!("token_cache.ca_file: cannot read {}: {e}", path.display())
                })?;
                redis::Client::build_with_tls(
                    info,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
            }
        }
        .map_err(|e| format!("token_cache: {}", redis_error(&e)))?;
        Ok(Self {
            client,
            conn: ArcSwapOption::empty(),
            timeout: settings.timeout,
            channel: format!("{}updates", settings.key_prefix),
            read: Script::new(READ_SCRIPT),
            write: Script::new(WRITE_SCRIPT),
            release: Script::new(RELEASE_SCRIPT),
            forget: Script::new(FORGET_SCRIPT),
            waiters: Mutex::new(HashMap::new()),
        })
    }

    /// Opens the managed connection if there is none yet. After the first success the
    /// manager reconnects by itself.
    pub async fn connect(&self) -> Result<(), StoreError> {
        if self.conn.load().is_some() {
            return Ok(());
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_secs(1));
        let manager =
            self.bounded(async { self.client.get_connection_manager_with_config(config).await });
        let manager = manager.await?;
        self.conn.store(Some(Arc::new(manager)));
        Ok(())
    }

    fn connection(&self) -> Result<ConnectionManager, StoreError> {
        self.conn
            .load()
            .as_deref()
            .cloned()
            .ok_or(StoreError::NotConnected)
    }

    async fn bounded<T>(
        &self,
        op: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.timeout, op).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(redis_error(&e)),
            Err(_) => Err(StoreError::Timeout(self.timeout)),
        }
    }

    /// Checks the connection (and makes the manager reconnect if it lost it).
    pub async fn ping(&self) -> Result<(), StoreError> {
        self.connect().await?;
        let mut conn = self.connection()?;
        self.bounded(async { redis::cmd("PING").query_async::<String>(&mut conn).await })
            .await
            .map(drop)
    }

    /// What `key` holds: a value of at most [`MAX_VALUE`] bytes is read, anything else only
    /// described (see [`Stored`]).
    pub async fn read(&self, key: &str) -> Result<Stored, StoreError> {
        let mut conn = self.connection()?;
        let mut call = self.read.prepare_invoke();
        call.key(key).arg(MAX_VALUE);
        let (kind, payload): (String, Vec<u8>) = self
            .bounded(async { call.invoke_async(&mut conn).await })
            .await?;
        Ok(match kind.as_str() {
            "none" => Stored::Nothing,
            "string" => Stored::Value(payload),
            "large" => Stored::TooLarge(
                std::str::from_utf8(&payload)
                    .ok()
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(u64::MAX),
            ),
            _ => Stored::OtherType(kind),
        })
    }

    /// Takes the lease `key` for `ttl` unless someone holds it (`SET NX PX`).
    pub async fn try_lease(
        &self,
        key: &str,
        fence: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut conn = self.connection()?;
        let ms = millis(ttl);
        let reply: Option<String> = self
            .bounded(async {
                redis::cmd("SET")
                    .arg(key)
                    .arg(fence)
                    .arg("NX")
                    .arg("PX")
                    .arg(ms)
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        Ok(reply.is_some())
    }

    /// Gives the lease back if it is still ours, waking the waiters of `key`.
    pub async fn release(&self, key: &str, lease_key: &str, fence: &str) -> Result<(), StoreError> {
        let mut conn = self.connection()?;
        let mut call = self.release.prepare_invoke();
        call.key(lease_key).arg(fence).arg(&self.channel).arg(key);
        self.bounded(async { call.invoke_async::<i64>(&mut conn).await })
            .await
            .map(drop)
    }

    /// Replaces `expected` under `key` with `new` for `ttl`, if the lease is ours or free;
    /// returns whether it wrote.
    pub async fn compare_and_write(
        &self,
        key: &str,
        lease_key: &str,
        fence: &str,
        expected: &Stored,
        new: &[u8],
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        let mut conn = self.connection()?;
        let ms = millis(ttl);
        let expected_bytes: &[u8] = match expected {
            Stored::Value(bytes) => bytes,
            _ => &[],
        };
        let mut call = self.write.prepare_invoke();
        call.key(key)
            .key(lease_key)
            .arg(expected_bytes)
            .arg(new)
            .arg(fence)
            .arg(ms)
            .arg(expected.kind())
            .arg(MAX_VALUE)
            .arg(&self.channel);
        let wrote: i64 = self
            .bounded(async { call.invoke_async(&mut conn).await })
            .await?;
        Ok(wrote == 1)
    }

    /// Sets `key` to `value` without expiry (a consent record: its refresh token outlives
    /// any access token; written only under the refresh lease).
    pub async fn write_forever(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        let mut conn = self.connection()?;
        self.bounded(async { conn.set::<_, _, ()>(key, value).await })
            .await
    }

    /// Deletes `key` if it still holds `expected`.
    pub async fn forget(&self, key: &str, expected: &[u8]) -> Result<(), StoreError> {
        let mut conn = self.connection()?;
        let mut call = self.forget.prepare_invoke();
        call.key(key).arg(expected);
        self.bounded(async { call.invoke_async::<i64>(&mut conn).await })
            .await
            .map(drop)
    }

    /// Sets `key` to `value` for `ttl` unless it exists; returns what `key` holds afterwards.
    pub async fn set_once(
        &self,
        key: &str,
        value: &[u8],
        ttl: Duration,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let mut conn = self.connection()?;
        let ms = millis(ttl);
        self.bounded(async {
            let _: Option<String> = redis::cmd("SET")
                .arg(key)
                .arg(value)
                .arg("NX")
                .arg("PX")
                .arg(ms)
                .query_async(&mut conn)
                .await?;
            conn.get::<_, Option<Vec<u8>>>(key).await
        })
        .await
    }

    /// Makes `key` live `ttl` from now.
    pub async fn expire(&self, key: &str, ttl: Duration) -> Result<(), StoreError> {
        let mut conn = self.connection()?;
        let ms = i64::try_from(millis(ttl)).unwrap_or(i64::MAX);
        self.bounded(async { conn.pexpire::<_, i64>(key, ms).await })
            .await
            .map(drop)
    }

    /// The wake-up for changes of `key` (a write or a released lease).
    pub fn waiter(&self, key: &str) -> Arc<Notify> {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        Arc::clone(waiters.entry(key.to_string()).or_default())
    }

    /// Listens on the update channel until `stop` and wakes whoever waits for the key named
    /// in each message; resubscribes after any disconnect. Waiters also poll, so a lost
    /// message only delays them.
    pub async fn listen(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            let subscribed = async {
                let mut pubsub = self.client.get_async_pubsub().await?;
                pubsub.subscribe(&self.channel).await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            let pubsub = tokio::select! {
                r = tokio::time::timeout(self.timeout.max(Duration::from_secs(1)), subscribed) => r,
                _ = stop.changed() => return,
            };
            if let Ok(Ok(pubsub)) = pubsub {
                let mut messages = pubsub.into_on_message();
                loop {
                    let message = tokio::select! {
                        m = messages.next() => m,
                        _ = stop.changed() => return,
                    };
                    let Some(message) = message else { break };
                    if let Ok(key) = message.get_payload::<String>() {
                        let waiter = self
                            .waiters
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .get(&key)
                            .cloned();
                        if let Some(w) = waiter {
                            w.notify_waiters();
                        }
                    }
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = stop.changed() => return,
            }
        }
    }
}
