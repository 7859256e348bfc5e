//! `type: basic` — HTTP Basic authentication (RFC 7617): `Authorization: Basic
//! base64(username:password)`, for APIs that take an account and password or an API key as
//! the user name. Never expires and cannot be refreshed.

use std::sync::Arc;

use base64::Engine;
use serde::Deserialize;

use super::static_header::{StaticHeader, StaticSettings, StaticSource};
use super::{CredentialType, Fingerprint, SourceDeps, TokenFormat, TokenSource};
use crate::vocab::secret::Secret;
use crate::vocab::validate_ctx::ValidateCtx;

/// The config section as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BasicSpec {
    pub username: Option<Secret>,
    pub username_file: Option<String>,
    pub password: Option<Secret>,
    pub password_file: Option<String>,
}

/// `type: basic`.
pub struct Basic;

impl CredentialType for Basic {
    const NAME: &'static str = "basic";
    const PREFETCH: bool = false;
    type Spec = BasicSpec;
    type Settings = StaticSettings;

    /// The header value is whole (`Basic …`): a `scheme` would only break it.
    fn default_scheme(_: &BasicSpec) -> Option<&'static str> {
        None
    }

    fn validate(
        spec: BasicSpec,
        _format: TokenFormat,
        ctx: &mut ValidateCtx<'_>,
    ) -> Option<StaticSettings> {
        let username = ctx.required_secret(
            "username",
            spec.username.as_ref().map(Secret::expose),
            spec.username_file.as_deref(),
        );
        let password = ctx.required_secret(
            "password",
            spec.password.as_ref().map(Secret::expose),
            spec.password_file.as_deref(),
        );
        let username = username.filter(|u| {
            // RFC 7617 §2: the user-id cannot contain a colon (the first one ends it).
            let ok = !u.is_empty() && !u.expose().contains(':');
            if !ok {
                ctx.problem("username", "must be non-empty and without `:`");
            }
            ok
        })?;
        let password = password?;
        let encoded = base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", username.expose(), password.expose()));
        Some(StaticSettings::new(Secret::new(format!("Basic {encoded}"))))
    }

    /// The encoded `user:password` decides the header, so both secrets count (as keyed
    /// hashes); the type name, written first, keeps it apart from an equal `static` value.
    fn fingerprint(settings: &StaticSettings, fp: &mut Fingerprint) {
        StaticHeader::fingerprint(settings, fp);
    }

    fn source(settings: &StaticSettings, _deps: &SourceDeps) -> Arc<dyn TokenSource> {
        Arc::new(StaticSource::new(settings.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::validate_for_test;

    #[tokio::test]
    async fn encodes_user_and_password_and_hides_them() {
        let settings =
            validate_for_test::<Basic>("username: ${U}\npassword: ${P}\n", &[("U", "Aladdin"), ("P", "open sesame")])
                .unwrap();
        let debug = format!("{settings:?}");
        assert!(!debug.contains("QWxhZGRpbjpvcGVuIHNlc2FtZQ=="), "{debug}");
        let token = StaticSource::new(settings).fetch(None).await.unwrap();
        assert_eq!(token.value.expose(), "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ==");
    }

    #[test]
    fn refuses_a_colon_in_the_user_and_missing_fields() {
        let e = validate_for_test::<Basic>("username: a:b\npassword: p\n", &[]).unwrap_err();
        assert!(e.iter().any(|p| p.contains("username") && p.contains("`:`")), "{e:?}");
        let e = validate_for_test::<Basic>("username: a\n", &[]).unwrap_err();
        assert!(e.iter().any(|p| p.contains("password: is required")), "{e:?}");
        let e = validate_for_test::<Basic>("username: a\npassword: p\nscheme: Basic\n", &[]).unwrap_err();
        assert!(e.iter().any(|p| p.contains("scheme")), "{e:?}");
    }
}
