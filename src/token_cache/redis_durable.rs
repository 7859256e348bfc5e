//! Consent credentials' tokens on the shared Redis (`token_cache: type: redis`): replicas
//! share one rotating refresh token. The record is sealed as every Redis record is
//! (`seal.rs`), bound to the credential's name and definition, and kept without expiry (a
//! refresh token outlives any access token). A refresh happens only under the store's
//! refresh lease, which one replica holds at a time: it reads the refresh token, spends it
//! and writes its successor before letting go, and the others then read what it wrote — a
//! single-use refresh token is never sent twice. When Redis cannot be reached, nothing is
//! refreshed (the request gets a 502 and the next one tries again): refreshing alone could
//! spend a token another replica already spent.
//!
//! [`DurableTokens`] is a blocking interface (the file store does file I/O and fsync), run
//! off the runtime by its callers; this store drives its async Redis calls from there with
//! the runtime's handle.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::redis_store::{RedisStore, StoreError, Stored};
use super::seal::{Sealer, SharedToken};
use crate::credentials::{DurableTokens, RefreshLock, Token};

/// How often a replica waiting for the refresh lease looks again.
const LEASE_POLL: Duration = Duration::from_millis(25);

/// The consent records of one Redis token cache.
pub(crate) struct RedisDurable {
    store: Arc<RedisStore>,
    sealer: Sealer,
    prefix: String,
    /// A lease outlives any refresh its holder can still be making.
    lease_ttl: Duration,
    runtime: tokio::runtime::Handle,
}

impl RedisDurable {
    pub(crate) fn new(
        store: Arc<RedisStore>,
        sealer: Sealer,
        prefix: &str,
        lease_ttl: Duration,
    ) -> Self {
        Self {
            store,
            sealer,
            prefix: prefix.to_string(),
            lease_ttl,
            runtime: tokio::runtime::Handle::current(),
        }
    }

    fn key(&self, credential: &str) -> String {
        format!("{}consent:{credential}", self.prefix)
    }

    fn aad(credential: &str, identity: &str) -> String {
        format!("redis-consent\n{credential}\n{identity}")
    }

    fn lease_key(&self) -> String {
        format!("{}consent-refresh-lease", self.prefix)
    }

    /// Runs one Redis call to its end from a blocking thread.
    fn call<T>(
        &self,
        op: impl std::future::Future<Output = Result<T, StoreError>>,
    ) -> Result<T, String> {
        self.runtime
            .block_on(async {
                self.store.connect().await?;
                op.await
            })
            .map_err(|e| format!("redis: {e}"))
    }
}

impl DurableTokens for RedisDurable {
    fn load(&self, credential: &str, identity: &str) -> Result<Option<Token>, String> {
        let key = self.key(credential);
        match self.call(self.store.read(&key))? {
            Stored::Value(sealed) => Ok(self
                .sealer
                .open(&Self::aad(credential, identity), &sealed)
                .map(|shared| shared.token)),
            _ => Ok(None),
        }
    }

    fn save(&self, credential: &str, identity: &str, token: &Token) -> Result<(), String> {
        let shared = SharedToken {
            token: token.clone(),
            issued_at: std::time::SystemTime::now(),
            // Written only under the refresh lease (or by `authorize`): nothing to order.
            generation: 0,
        };
        let sealed = self
            .sealer
            .seal(&Self::aad(credential, identity), &shared)
            .ok_or_else(|| "cannot seal the token".to_string())?;
        let key = self.key(credential);
        self.call(self.store.write_forever(&key, &sealed))
    }

    fn delete(&self, credential: &str) -> Result<bool, String> {
        let key = self.key(credential);
        match self.call(self.store.read(&key))? {
            Stored::Value(held) => {
                self.call(self.store.forget(&key, &held))?;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    fn lock_refresh(&self) -> Result<RefreshLock, String> {
        let lease_key = self.lease_key();
        let fence = super::fence();
        let give_up = Instant::now() + self.lease_ttl;
        while !self.call(self.store.try_lease(&lease_key, &fence, self.lease_ttl))? {
            if Instant::now() >= give_up {
                return Err("another replica has held the refresh lease too long".into());
            }
            std::thread::sleep(LEASE_POLL);
        }
        Ok(RefreshLock(Box::new(Lease {
            store: Arc::clone(&self.store),
            lease_key,
            fence,
            runtime: self.runtime.clone(),
        })))
    }
}

/// The refresh lease, given back when dropped (it also expires by itself).
struct Lease {
    store: Arc<RedisStore>,
    lease_key: String,
    fence: String,
    runtime: tokio::runtime::Handle,
}

impl Drop for Lease {
    fn drop(&mut self) {
        let (store, key, fence) = (
            Arc::clone(&self.store),
            std::mem::take(&mut self.lease_key),
            std::mem::take(&mut self.fence),
        );
        self.runtime.spawn(async move {
            let _ = store.release(&key, &key, &fence).await;
        });
    }
}
