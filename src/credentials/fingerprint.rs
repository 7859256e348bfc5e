//! What identifies a credential definition across replicas: a keyed hash of an explicit,
//! versioned encoding, built field by field by each credential type.
//!
//! Replicas sharing tokens through Redis must agree that two definitions are the same (same
//! vendor account, same secret, same header) without ever comparing or storing the secrets.
//! The encoding is written here, not derived from `Debug` (which must never print a secret
//! and whose layout is no stable format): a version tag, the type name, then each field as a
//! length-prefixed name and value. Secrets enter only as an HMAC of their bytes under the
//! fingerprint key, so no intermediate buffer ever holds them in clear.
//!
//! Changing the encoding (a field added, renamed or encoded differently) changes every
//! fingerprint: bump [`VERSION`] then, and say in the release notes that replicas on the old
//! and new build will not share tokens during the upgrade.

use ring::hmac;

use crate::vocab::secret::Secret;

/// The encoding's version, hashed first. `v1` was the keyed hash of the `Debug` output.
pub const VERSION: &str = "authrelay-credential-fp/v2";

/// What kind of value a field holds, written before it so that, say, an absent field and
/// an empty text never encode alike.
#[derive(Clone, Copy)]
#[repr(u8)]
enum Kind {
    Absent = 0,
    Text = 1,
    SecretDigest = 2,
    Number = 3,
    Duration = 4,
}

/// A credential definition being fingerprinted. Every credential type writes the fields
/// that decide which token it gets (endpoints, identities, secrets, scopes, the header
/// format), and none that only decide when (timing).
pub struct Fingerprint {
    key: hmac::Key,
    mac: hmac::Context,
}

impl std::fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fingerprint(***)")
    }
}

impl Fingerprint {
    /// Starts the fingerprint of a credential of type `type_name` under `key` (a key of its
    /// own, derived from the cache's encryption key).
    pub fn new(key: &[u8], type_name: &str) -> Self {
        let key = hmac::Key::new(hmac::HMAC_SHA256, key);
        let mut fp = Self {
            mac: hmac::Context::with_key(&key),
            key,
        };
        fp.frame(VERSION.as_bytes());
        fp.frame(type_name.as_bytes());
        fp
    }

    /// Writes one length-prefixed piece.
    fn frame(&mut self, bytes: &[u8]) {
        let len = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
        self.mac.update(&len.to_be_bytes());
        self.mac.update(bytes);
    }

    fn field(&mut self, name: &str, kind: Kind, value: &[u8]) {
        self.frame(name.as_bytes());
        self.mac.update(&[kind as u8]);
        self.frame(value);
    }

    /// A plain (non-secret) text field: a URL, a user name, a scope.
    pub fn text(&mut self, name: &str, value: &str) {
        self.field(name, Kind::Text, value.as_bytes());
    }

    /// An optional text field; absent encodes differently from empty.
    pub fn optional_text(&mut self, name: &str, value: Option<&str>) {
        match value {
            Some(v) => self.text(name, v),
            None => self.field(name, Kind::Absent, &[]),
        }
    }

    /// A number (an account id).
    pub fn number(&mut self, name: &str, value: i64) {
        self.field(name, Kind::Number, &value.to_be_bytes());
    }

    /// A duration that changes the token (a requested lifetime), in milliseconds.
    pub fn duration(&mut self, name: &str, value: std::time::Duration) {
        self.field(name, Kind::Duration, &value.as_millis().to_be_bytes());
    }

    /// A secret field: only its keyed hash is written.
    pub fn secret(&mut self, name: &str, value: &Secret) {
        self.secret_bytes(name, value.expose().as_bytes());
    }

    /// Secret bytes (a private key): only their keyed hash is written.
    pub fn secret_bytes(&mut self, name: &str, value: &[u8]) {
        let digest = hmac::sign(&self.key, value);
        self.field(name, Kind::SecretDigest, digest.as_ref());
    }

    /// The fingerprint: 128 bits as lower-case hex (it names Redis keys).
    pub fn finish(self) -> String {
        hex(&self.mac.sign().as_ref()[..16])
    }
}

/// Lower-case hex, for key names and lease fences.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::{
        basic, jwt, login, oauth2, oauth2_code, oauth2_device, outreach, outseta, static_header,
        validate_for_test, CredentialType,
    };

    /// A secret for every secret field below: none may show in any `Debug` output.
    const SECRETS: [&str; 4] = [
        "secret-value-7f1",
        "secret-client-9d2",
        "secret-password-4c3",
        "secret-api-8b5",
    ];

    fn fixture(name: &str) -> String {
        format!("{}/tests/it/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
    }

    /// The fingerprint of one section of type `T` (with `SECRETS` as `${S0}`..`${S3}`),
    /// after checking that the settings' `Debug` shows none of the secrets.
    fn of<T: CredentialType>(yaml: &str) -> String {
        let env: Vec<(String, &str)> = SECRETS
            .iter()
            .enumerate()
            .map(|(i, s)| (format!("S{i}"), *s))
            .collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        let settings = validate_for_test::<T>(yaml, &env)
            .unwrap_or_else(|problems| panic!("{yaml}: {problems:?}"));
        let debug = format!("{settings:?}");
        for secret in SECRETS {
            assert!(
                !debug.contains(secret),
                "{} Debug shows a secret: {debug}",
                T::NAME
            );
        }
        let mut fp = Fingerprint::new(&[5u8; 32], T::NAME);
        T::fingerprint(&settings, &mut fp);
        fp.finish()
    }

    /// `base`, then `base` with each one change: every fingerprint differs from every other.
    fn each_field_counts<T: CredentialType>(base: &str, changes: &[(&str, &str)]) {
        let mut seen = vec![(String::from("base"), of::<T>(base))];
        for (from, to) in changes {
            assert!(base.contains(from), "{from} not in {base}");
            let changed = base.replace(from, to);
            let fp = of::<T>(&changed);
            if let Some((same, _)) = seen.iter().find(|(_, other)| *other == fp) {
                panic!(
                    "{}: `{from}` -> `{to}` gives the fingerprint of {same}",
                    T::NAME
                );
            }
            seen.push((format!("`{to}`"), fp));
        }
        assert_eq!(of::<T>(base), seen[0].1, "{}: stable", T::NAME);
    }

    #[test]
    fn every_field_of_every_type_changes_the_fingerprint_and_no_debug_shows_a_secret() {
        each_field_counts::<static_header::StaticHeader>("value: ${S0}\n", &[("${S0}", "${S1}")]);
        each_field_counts::<basic::Basic>(
            "username: u\npassword: ${S2}\n",
            &[("username: u", "username: v"), ("${S2}", "${S3}")],
        );
        each_field_counts::<oauth2::OAuth2ClientCredentials>(
            "token_url: https://a.test/t\nclient_id: c\nclient_secret: ${S1}\nscope: a\n",
            &[
                ("https://a.test/t", "https://b.test/t"),
                ("client_id: c", "client_id: d"),
                ("${S1}", "${S2}"),
                ("scope: a", "scope: b"),
                ("scope: a", "scope: a\nauth: basic"),
                ("scope: a", "scope: a\nscheme: Token"),
                (
                    "scope: a",
                    "scope: a\njwt_exchange:\n  url: https://j.test/jwt",
                ),
                (
                    "scope: a",
                    "scope: a\njwt_exchange:\n  url: https://j.test/jwt\n  aud: x",
                ),
                (
                    "scope: a",
                    "scope: a\njwt_exchange:\n  url: https://j.test/jwt\n  validity: 10m",
                ),
            ],
        );
        let key = fixture("outreach_app_key.pem");
        let other_key = fixture("other_rsa_key.pem");
        each_field_counts::<outreach::OutreachS2s>(
            &format!("s2s_guid: g\nprivate_key_file: {key}\ninstall_id: i\n"),
            &[
                ("s2s_guid: g", "s2s_guid: h"),
                (key.as_str(), other_key.as_str()),
                ("install_id: i", "install_id: j"),
                ("install_id: i", "install_id: i\nbase_url: https://o.test"),
                ("install_id: i", "install_id: i\nscheme: Token"),
            ],
        );
        each_field_counts::<jwt::AppJwt>(
            &format!("issuer: app\nprivate_key_file: {key}\n"),
            &[
                ("issuer: app", "issuer: other"),
                (key.as_str(), other_key.as_str()),
                ("issuer: app", "issuer: app\nlifetime: 10m"),
                ("issuer: app", "issuer: app\nclaims:\n  aud: x"),
                ("issuer: app", "issuer: app\nscheme: Token"),
            ],
        );
        each_field_counts::<outseta::Outseta>(
            "base_url: https://a.outseta.test\nusername: u\npassword: ${S2}\n",
            &[
                ("https://a.outseta.test", "https://b.outseta.test"),
                ("username: u", "username: v"),
                ("${S2}", "${S0}"),
                ("password: ${S2}", "api_key: k\napi_secret: ${S3}"),
                ("username: u", "username: u\nsubscription_uid: s1"),
                ("username: u", "username: u\naccount_uid: a1"),
                ("username: u", "username: u\nscheme: Token"),
            ],
        );
        each_field_counts::<oauth2_code::OAuth2AuthorizationCode>(
            "authorize_url: https://a.test/auth\ntoken_url: https://a.test/t\nclient_id: c\n\
             client_secret: ${S1}\nredirect_uri: http://127.0.0.1:8765/cb\n",
            &[
                ("https://a.test/auth", "https://b.test/auth"),
                ("https://a.test/t", "https://b.test/t"),
                ("client_id: c", "client_id: d"),
                ("${S1}", "${S2}"),
                ("client_secret: ${S1}\n", ""),
                ("8765/cb", "8766/cb"),
                ("client_id: c", "client_id: c\nscopes: [a]"),
                ("client_id: c", "client_id: c\naudience: x"),
                ("client_id: c", "client_id: c\nresource: https://r.test/"),
                (
                    "client_id: c",
                    "client_id: c\nauthorize_params: {prompt: consent}",
                ),
                ("client_id: c", "client_id: c\nauth: basic"),
                (
                    "client_id: c",
                    "client_id: c\nrevocation_url: https://a.test/r",
                ),
                ("client_id: c", "client_id: c\nscheme: Token"),
            ],
        );
        each_field_counts::<oauth2_device::OAuth2DeviceCode>(
            "device_authorization_url: https://a.test/d\ntoken_url: https://a.test/t\n\
             client_id: c\nclient_secret: ${S1}\n",
            &[
                ("https://a.test/d", "https://b.test/d"),
                ("https://a.test/t", "https://b.test/t"),
                ("client_id: c", "client_id: d"),
                ("${S1}", "${S2}"),
                ("client_secret: ${S1}\n", ""),
                ("client_id: c", "client_id: c\nscopes: [a]"),
                ("client_id: c", "client_id: c\nresource: https://r.test/"),
                ("client_id: c", "client_id: c\nauth: basic"),
                (
                    "client_id: c",
                    "client_id: c\nrevocation_url: https://a.test/r",
                ),
                ("client_id: c", "client_id: c\nscheme: Token"),
            ],
        );
        each_field_counts::<login::Login>(
            "login_url: https://l.test/login\nusername: u\npassword: ${S2}\n",
            &[
                ("https://l.test/login", "https://m.test/login"),
                ("username: u", "username: v"),
                ("${S2}", "${S3}"),
                (
                    "username: u",
                    "username: u\nrefresh_url: https://l.test/refresh",
                ),
                ("username: u", "username: u\naccount_id: 7"),
                ("username: u", "username: u\nbody: form"),
                (
                    "username: u",
                    "username: u\nfields:\n  request:\n    username: login",
                ),
                (
                    "username: u",
                    "username: u\nfields:\n  response:\n    token: /jwt",
                ),
                ("username: u", "username: u\nscheme: Token"),
            ],
        );
    }

    /// A secret printed by a command counts as the same secret written inline or in a file:
    /// a command that prints a rotated secret changes the fingerprint, one that prints the
    /// same secret keeps it (replicas reading one vault agree).
    #[test]
    fn a_secret_from_a_command_fingerprints_like_the_secret_itself() {
        let inline = of::<basic::Basic>("username: u\npassword: ${S2}\n");
        let printed = |secret: &str| {
            of::<basic::Basic>(&format!(
                "username: u\npassword_command: [printf, '%s', {secret}]\n"
            ))
        };
        assert_eq!(printed(SECRETS[2]), inline);
        assert_ne!(printed(SECRETS[3]), inline, "a rotated secret");
        let from_login = |line: &str| {
            of::<login::Login>(&format!(
                "login_url: https://l.test/login\nusername: u\n{line}\n"
            ))
        };
        assert_eq!(
            from_login(&format!("password_command: [printf, '%s', {}]", SECRETS[1])),
            from_login("password: ${S1}")
        );
    }

    #[test]
    fn fields_are_framed_so_that_no_two_encodings_collide() {
        let key = [9u8; 32];
        let fp = |f: &dyn Fn(&mut Fingerprint)| {
            let mut fp = Fingerprint::new(&key, "t");
            f(&mut fp);
            fp.finish()
        };
        let ab_c = fp(&|fp| fp.text("a", "bc"));
        let a_bc = fp(&|fp| fp.text("ab", "c"));
        assert_ne!(ab_c, a_bc, "names and values are length-prefixed");
        let empty = fp(&|fp| fp.optional_text("a", Some("")));
        let absent = fp(&|fp| fp.optional_text("a", None));
        assert_ne!(empty, absent);
        let as_text = fp(&|fp| fp.text("a", "s"));
        let as_secret = fp(&|fp| fp.secret("a", &Secret::new("s")));
        assert_ne!(as_text, as_secret);
        assert_ne!(
            fp(&|fp| fp.text("a", "s")),
            Fingerprint::new(&key, "u").finish(),
            "the type name counts"
        );
        let other_key = {
            let mut fp = Fingerprint::new(&[8u8; 32], "t");
            fp.text("a", "bc");
            fp.finish()
        };
        assert_ne!(ab_c, other_key, "keyed");
        assert_eq!(ab_c.len(), 32);
    }
}
