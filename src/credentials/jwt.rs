//! `type: jwt` — a self-signed RS256 app token injected as is (Outreach calls such as
//! `.../actions/setupToken` take the app token itself). The signing lives here once and is
//! shared with `type: outreach_s2s`, which signs the same kind of token to get an access token.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Deserialize;
use serde_json::Value;

use super::{CredentialError, CredentialType, Fingerprint, FetchFuture, SourceDeps, Token, TokenFormat, TokenSource};
use crate::vocab::validate_ctx::ValidateCtx;
use crate::vocab::values::ConfigDuration;

/// Claims authrelay sets itself; `claims:` may not override them.
const RESERVED_CLAIMS: [&str; 4] = ["iat", "exp", "iss", "jti"];

/// The default app token lifetime (Outreach documents `exp: iat + 3600`).
pub const DEFAULT_APP_TOKEN_LIFETIME: Duration = Duration::from_secs(3600);

/// An RSA private key read from a PEM file when the config is validated, so that a missing
/// or malformed key is a config error naming the file. `Debug` shows the path only.
#[derive(Clone)]
pub struct RsaSigningKey {
    path: PathBuf,
    key: Arc<EncodingKey>,
}

impl fmt::Debug for RsaSigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RsaSigningKey")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// Equal when the same file holds the same key: a reload after the key file was replaced
/// gets a new source (and a new token).
impl PartialEq for RsaSigningKey {
    fn eq(&self, other: &Self) -> bool {
        self.path == other.path && self.key.inner() == other.key.inner()
    }
}

impl RsaSigningKey {
    /// Writes the key into a fingerprint: the key itself decides, not where the file is.
    pub(crate) fn fingerprint(&self, fp: &mut Fingerprint) {
        fp.secret_bytes("private_key", self.key.inner());
    }

    /// Reads the key at `raw` (relative to the config file's folder). Problems name the
    /// file, never its content.
    pub fn load(ctx: &mut ValidateCtx<'_>, field: &str, raw: &str) -> Option<Self> {
        let path = ctx.existing_file(field, raw)?;
        let pem = match std::fs::read(&path) {
            Ok(p) => p,
            Err(e) => {
                ctx.problem(field, format!("cannot read {}: {e}", path.display()));
                return None;
            }
        };
        let not_a_key = format!(
            "{} does not hold a PEM RSA private key (`BEGIN RSA PRIVATE KEY` or `BEGIN PRIVATE KEY`)",
            path.display()
        );
        let Ok(key) = EncodingKey::from_rsa_pem(&pem) else {
            ctx.problem(field, not_a_key);
            return None;
        };
        let key = Self {
            path,
            key: Arc::new(key),
        };
        // `from_rsa_pem` checks the PEM framing only; one signature proves the key works.
        if sign_app_token(
            &key,
            "authrelay-config-check",
            Duration::from_secs(60),
            None,
        )
        .is_err()
        {
            ctx.problem(field, not_a_key);
            return None;
        }
        Some(key)
    }
}

/// A signed app token and when it expires.
pub struct SignedToken {
    /// The compact JWT.
    pub token: String,
    /// Its `exp`.
    pub expires_at: SystemTime,
}

/// Signs an RS256 JWT `{iat, exp: iat + lifetime, iss: issuer}` plus `extra` claims — the
/// Outreach app token. The one signing function for `jwt` and `outreach_s2s`.
pub fn sign_app_token(
    key: &RsaSigningKey,
    issuer: &str,
    lifetime: Duration,
    extra: Option<&BTreeMap<String, Value>>,
) -> Result<SignedToken, CredentialError> {
    let iat = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|_| CredentialError::Other("system clock is before 1970".into()))?
        .as_secs();
    let exp = iat.saturating_add(crate::expiry::clamp_configured(lifetime).as_secs());
    let mut claims = serde_json::Map::new();
    for (name, value) in extra.into_iter().flatten() {
        claims.insert(name.clone(), value.clone());
    }
    claims.insert("iat".into(), iat.into());
    claims.insert("exp".into(), exp.into());
    claims.insert("iss".into(), issuer.into());
    let token =
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &claims, &key.key).map_err(|_| {
            CredentialError::Other(format!(
                "cannot sign the app token with the key from {}",
                key.path.display()
            ))
        })?;
    Ok(SignedToken {
        token,
        expires_at: UNIX_EPOCH + Duration::from_secs(exp),
    })
}

/// The config section as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSpec {
    /// The `iss` claim (Outreach: the app's S2S GUID).
    pub issuer: Option<String>,
    /// Outreach's name for the issuer; same as `issuer`.
    pub s2s_guid: Option<String>,
    /// PEM RSA private key (PKCS#1 or PKCS#8).
    pub private_key_file: Option<String>,
    /// Token lifetime (default 1h).
    pub lifetime: Option<ConfigDuration>,
    /// Extra claims added to every token.
    #[serde(default)]
    pub claims: BTreeMap<String, Value>,
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtSettings {
    issuer: String,
    key: RsaSigningKey,
    lifetime: Duration,
    claims: BTreeMap<String, Value>,
    format: TokenFormat,
}

/// `type: jwt`.
pub struct AppJwt;

impl CredentialType for AppJwt {
    const NAME: &'static str = "jwt";
    type Spec = JwtSpec;
    type Settings = JwtSettings;

    fn default_scheme(_: &JwtSpec) -> Option<&'static str> {
        Some("Bearer")
    }

    fn validate(
        spec: JwtSpec,
        format: TokenFormat,
        ctx: &mut ValidateCtx<'_>,
    ) -> Option<JwtSettings> {
                let issuer = match (spec.issuer.as_deref(), spec.s2s_guid.as_deref()) {
            (Some(_), Some(_)) => {
                ctx.problem("issuer", "set either `issuer` or `s2s_guid`, not both");
                None
            }
            (Some(raw), None) => ctx.text("issuer", raw),
            (None, Some(raw)) => ctx.text("s2s_guid", raw),
            (None, None) => {
                ctx.problem("issuer", "is required (or `s2s_guid`)");
                None
            }
        };
        let key = match spec.private_key_file.as_deref() {
            Some(raw) => RsaSigningKey::load(ctx, "private_key_file", raw),
            None => {
                ctx.problem("private_key_file", "is required");
                None
            }
        };
        let lifetime = spec.lifetime.map_or(DEFAULT_APP_TOKEN_LIFETIME, |d| d.0);
        let mut ok = true;
        if lifetime < Duration::from_secs(1) {
            ctx.problem("lifetime", "must be at least 1s");
            ok = false;
        }
        if lifetime > crate::expiry::MAX_LIFETIME {
            ctx.problem(
                "lifetime",
                "must be at most 30 days (the longest token lifetime)",
            );
            ok = false;
        }
        for name in RESERVED_CLAIMS {
            if spec.claims.contains_key(name) {
                ctx.problem("claims", format!("`{name}` is set by authrelay"));
                ok = false;
            }
        }
        let settings = JwtSettings {
            issuer: issuer?,
            key: key?,
            lifetime,
            claims: spec.claims,
            format,
        };
        ok.then_some(settings)
    }

    fn fingerprint(settings: &JwtSettings, fp: &mut Fingerprint) {
        fp.text("issuer", &settings.issuer);
        settings.key.fingerprint(fp);
        fp.duration("lifetime", settings.lifetime);
        // A `BTreeMap` of `Value`s serializes in one order: keys sorted, nested maps too.
        fp.text("claims", &Value::from_iter(settings.claims.clone()).to_string());
        settings.format.fingerprint(fp);
    }

    fn source(settings: &JwtSettings, _deps: &SourceDeps) -> Arc<dyn TokenSource> {
        Arc::new(JwtSource::new(settings.clone()))
    }
}

/// The runtime source: signs a fresh token on every fetch.
pub struct JwtSource {
    settings: JwtSettings,
}

impl JwtSource {
    /// Wraps validated settings.
    pub fn new(settings: JwtSettings) -> Self {
        Self { settings }
    }
}

impl TokenSource for JwtSource {
    fn fetch<'a>(&'a self, _previous: Option<&'a Token>) -> FetchFuture<'a> {
        let s = &self.settings;
        // A random `jti` makes every token distinct: two signed within the same second would
        // otherwise be identical, and a token the API just refused would be sent again.
        let mut claims = s.claims.clone();
        claims.insert(
            "jti".into(),
            format!("{:032x}", rand::random::<u128>()).into(),
        );
        let token = sign_app_token(&s.key, &s.issuer, s.lifetime, Some(&claims)).map(|t| Token {
            value: s.format.header_value(&t.token),
            expires_at: Some(t.expires_at),
            refresh: None,
        });
        Box::pin(async move { token })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lifetimes_beyond_the_policy_maximum_are_refused() {
        let problems = crate::credentials::validate_for_test::<AppJwt>(
            "issuer: app\nprivate_key_file: missing.pem\nlifetime: 100000h\n",
            &[],
        )
        .unwrap_err();
        assert!(
            problems
                .iter()
                .any(|p| p.contains("lifetime: must be at most 30 days")),
            "{problems:?}"
        );
    }
}
