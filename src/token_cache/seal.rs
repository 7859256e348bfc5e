//! What a shared token looks like at rest: sealed with AES-256-GCM, bound to one credential's
//! name and definition, so that someone who can read Redis learns nothing, and a changed
//! credential (new password, new key, new URL) can never read a token issued for the old one.
//!
//! One 32-byte key from the config; two keys derived from it with HMAC-SHA256 (one seals,
//! one fingerprints), so neither use weakens the other.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::config::{CredentialConfig, EncryptionKey};
use crate::credentials::Fingerprint;
use crate::credentials::{RefreshGrant, Token};
use crate::vocab::secret::Secret;

/// Version byte in front of every sealed record: a future format can tell old records apart.
/// Format 2 added the generation.
const FORMAT: u8 = 2;

/// Seals and opens records, and fingerprints credential definitions.
pub struct Sealer {
    aead: LessSafeKey,
    /// The key credential fingerprints are made with (derived, never the configured key).
    fingerprint: hmac::Tag,
    rng: SystemRandom,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer(***)")
    }
}

/// A token as another replica stored it (or as this one will store it).
#[derive(Debug)]
pub struct SharedToken {
    /// The token, refresh grant included.
    pub token: Token,
    /// When the vendor issued it (wall clock), so every replica computes the same refresh
    /// time however late it reads the token.
    pub issued_at: SystemTime,
    /// Grows by one with each record written for the credential. Sealed inside the record,
    /// so that nobody without the key can make an old record look new: a replica never
    /// takes a record older than one it has seen.
    pub generation: u64,
}

/// The plaintext of a record. Field names are short: the record is sealed, nobody reads it.
#[derive(Serialize, Deserialize)]
struct Record {
    v: String,
    exp: Option<u64>,
    rt: Option<String>,
    rexp: Option<u64>,
    iat: u64,
    generation: u64,
}

/// Milliseconds since the epoch, as records hold times.
pub fn to_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn from_ms(ms: u64) -> Option<SystemTime> {
    UNIX_EPOCH.checked_add(Duration::from_millis(ms))
}

impl Sealer {
    /// Derives the sealing and fingerprint keys from the configured key.
    pub fn new(key: &EncryptionKey) -> Self {
        let root = hmac::Key::new(hmac::HMAC_SHA256, &key.0);
        let derive = |label: &[u8]| hmac::sign(&root, label);
        let seal_key = derive(b"authrelay token-cache seal v1");
        let fp_key = derive(b"authrelay token-cache fingerprint v1");
        let aead = match UnboundKey::new(&AES_256_GCM, seal_key.as_ref()) {
            Ok(k) => LessSafeKey::new(k),
            // An HMAC-SHA256 output is always 32 bytes, the AES-256 key length.
            Err(_) => unreachable!("HMAC-SHA256 gives a 32-byte AES-256 key"),
        };
        Self {
            aead,
            fingerprint: fp_key,
            rng: SystemRandom::new(),
        }
    }

    /// A keyed hash of what identifies the credential (type, header and every setting of
    /// its type, secrets included; see [`Fingerprint`]), as hex. Replicas with the same
    /// definition and key agree on it; without the key it reveals nothing, not even to a
    /// password guesser.
    pub fn fingerprint(&self, config: &CredentialConfig) -> String {
        let mut fp = Fingerprint::new(self.fingerprint.as_ref(), config.kind.type_name());
        fp.text("header", config.header.as_str());
        config.kind.fingerprint(&mut fp);
        fp.finish()
    }

    /// Seals `shared` for the credential named `aad` (its name and fingerprint).
    pub fn seal(&self, aad: &str, shared: &SharedToken) -> Option<Vec<u8>> {
        let token = &shared.token;
        let record = Record {
            v: token.value.expose().to_string(),
            exp: token.expires_at.map(to_ms),
            rt: token.refresh.as_ref().map(|g| g.token.expose().to_string()),
            rexp: token.refresh.as_ref().and_then(|g| g.expires_at).map(to_ms),
            iat: to_ms(shared.issued_at),
            generation: shared.generation,
        };
        let mut body = serde_json::to_vec(&record).ok()?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        self.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut body,
            )
            .ok()?;
        let mut sealed = Vec::with_capacity(1 + NONCE_LEN + body.len());
        sealed.push(FORMAT);
        sealed.extend_from_slice(&nonce);
        sealed.extend_from_slice(&body);
        Some(sealed)
    }

    /// Opens a record sealed for `aad`; `None` if it was sealed for another credential or
    /// definition, with another key, or was tampered with.
    pub fn open(&self, aad: &str, sealed: &[u8]) -> Option<SharedToken> {
        let (&format, rest) = sealed.split_first()?;
        if format != FORMAT || rest.len() < NONCE_LEN {
            return None;
        }
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = self
            .aead
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut body)
            .ok()?;
        let record: Record = serde_json::from_slice(plain).ok()?;
        Some(SharedToken {
            token: Token {
                value: Secret::new(record.v),
                expires_at: record.exp.and_then(from_ms),
                refresh: record.rt.map(|rt| RefreshGrant {
                    token: Secret::new(rt),
                    expires_at: record.rexp.and_then(from_ms),
                }),
            },
            issued_at: from_ms(record.iat).unwrap_or(UNIX_EPOCH),
            generation: record.generation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared() -> SharedToken {
        SharedToken {
            token: Token {
                value: Secret::new("Bearer access-123"),
                expires_at: Some(SystemTime::now() + Duration::from_secs(60)),
                refresh: Some(RefreshGrant {
                    token: Secret::new("refresh-456"),
                    expires_at: None,
                }),
            },
            issued_at: SystemTime::now(),
            generation: 7,
        }
    }

    #[test]
    fn a_record_opens_only_for_its_own_credential_and_key() {
        let sealer = Sealer::new(&EncryptionKey([7; 32]));
        let sealed = sealer.seal("login\0abc", &shared()).unwrap();
        let text = String::from_utf8_lossy(&sealed);
        assert!(!text.contains("access-123") && !text.contains("refresh-456"));
        let opened = sealer.open("login\0abc", &sealed).unwrap();
        assert_eq!(opened.token.value.expose(), "Bearer access-123");
        assert_eq!(
            opened.generation, 7,
            "the generation is sealed with the token"
        );
        assert_eq!(opened.token.refresh.unwrap().token.expose(), "refresh-456");
        assert!(sealer.open("login\0abd", &sealed).is_none());
        assert!(sealer.open("other\0abc", &sealed).is_none());
        let other_key = Sealer::new(&EncryptionKey([8; 32]));
        assert!(other_key.open("login\0abc", &sealed).is_none());
        let mut tampered = sealed.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert!(sealer.open("login\0abc", &tampered).is_none());
        assert!(sealer.open("login\0abc", &[]).is_none());
        assert!(sealer.open("login\0abc", &[FORMAT, 1, 2]).is_none());
    }

    /// Pins the fingerprint encoding (`authrelay-credential-fp/v2`): replicas on two builds
    /// share tokens only while this holds. A change here is a deliberate version bump.
    #[test]
    fn fingerprints_are_pinned_to_the_v2_encoding() {
        let yaml = "credentials:\n  fixed:\n    type: static\n    value: k-123\n    header: X-Api-Key\n  \
            client:\n    type: oauth2_client_credentials\n    token_url: https://id.test/token\n    \
            client_id: c-1\n    client_secret: s-456\n    scope: read write\n  \
            tt:\n    type: login\n    login_url: https://tt.test/auth/login\n    \
            username: dispatch\n    password: pw-789\n    account_id: 42\nroutes: []\n";
        let config = crate::config::Config::from_yaml(
            yaml,
            std::path::Path::new("/etc/authrelay/routes.yaml"),
            &std::collections::HashMap::new(),
        )
        .unwrap();
        let sealer = Sealer::new(&EncryptionKey([1; 32]));
        let fp = |name: &str| sealer.fingerprint(&config.credentials[name]);
        assert_eq!(fp("fixed"), "184ee5855b093f40a4e280b5ac0a7807");
        assert_eq!(fp("client"), "ff177a9363b4534e02e56a5ff86fe96e");
        assert_eq!(fp("tt"), "7a0691f1085a759829a052f45e2ad7e8");
    }

    #[test]
    fn two_seals_of_one_token_differ() {
        let sealer = Sealer::new(&EncryptionKey([7; 32]));
        let t = shared();
        assert_ne!(sealer.seal("a", &t), sealer.seal("a", &t));
    }
}
