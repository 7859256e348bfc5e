//! The one redaction step: every text derived from a vendor answer passes through a
//! [`Redactor`] before it can become a [`CredentialError`], so the 502 detail, `/credentials`'
//! `last_error`, log lines and CLI output are clean by construction. Real token endpoints
//! echo requests (a form body with `client_secret=…`, a password in `error_description`),
//! so the secrets are hidden in the forms an echo shows them in too.

use std::sync::Arc;

use serde_json::Value;

/// What replaces a secret.
pub const MASK: &str = "***";

/// The longest detail (in characters) kept from a vendor's answer, after redaction.
pub const DETAIL_MAX_CHARS: usize = 200;

/// Hides one credential's secrets: its configured secret values (after `${VAR}` and `*_file`
/// resolution) and the tokens it issued or holds. Cheap to clone.
#[derive(Clone, Default)]
pub struct Redactor {
    /// Every form of every secret, longest first so that a longer secret containing a shorter
    /// one is hidden whole.
    needles: Arc<Vec<String>>,
}

impl std::fmt::Debug for Redactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Redactor({} forms)", self.needles.len())
    }
}

impl Redactor {
    /// A redactor for `secrets` (empty values are ignored).
    pub fn new<'a>(secrets: impl IntoIterator<Item = &'a str>) -> Self {
        Self::default().with(secrets)
    }

    /// This redactor plus `more` secrets.
    pub fn with<'a>(&self, more: impl IntoIterator<Item = &'a str>) -> Self {
        let mut needles: Vec<String> = self.needles.as_ref().clone();
        for secret in more.into_iter().filter(|s| !s.is_empty()) {
            let forms = [
                secret.to_string(),
                form_urlencode(secret),
                form_urlencode(secret).replace('+', "%20"),
                json_escaped(secret),
            ];
            for form in forms {
                if !needles.contains(&form) {
                    needles.push(form);
                }
            }
        }
        needles.sort_by_key(|n| std::cmp::Reverse(n.len()));
        Self {
            needles: Arc::new(needles),
        }
    }

    /// This redactor plus every string in `doc` under a key that names a token or secret
    /// (`access_token`, `refreshToken`, `jwt`, `client_secret`, …): a vendor answer that
    /// carries a token beside an error message must not show it through the message.
    pub fn with_answer_secrets(&self, doc: &Value) -> Self {
        let mut found = Vec::new();
        collect_secret_fields(doc, 0, &mut found);
        self.with(found.iter().map(String::as_str))
    }

    /// Whether `bytes` (text or not) show any form of a secret.
    pub fn reveals(&self, bytes: &[u8]) -> bool {
        self.needles
            .iter()
            .any(|needle| bytes.windows(needle.len()).any(|w| w == needle.as_bytes()))
    }

    /// `text` with every secret replaced by `***`.
    pub fn redact(&self, text: &str) -> String {
        let mut out = text.to_string();
        for needle in self.needles.iter() {
            if out.contains(needle.as_str()) {
                out = out.replace(needle.as_str(), MASK);
            }
        }
        out
    }

    /// A detail fit to show: redacted first, then control characters turned into spaces and
    /// cut to [`DETAIL_MAX_CHARS`] (cutting after redaction never leaves half a secret).
    pub fn detail(&self, text: &str) -> String {
        let redacted = self.redact(text);
        let mut clean: String = redacted
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .take(DETAIL_MAX_CHARS)
            .collect();
        clean.truncate(clean.trim_end().len());
        clean
    }
}

fn collect_secret_fields(doc: &Value, depth: usize, found: &mut Vec<String>) {
    if depth > 8 {
        return;
    }
    match doc {
        Value::Object(map) => {
            for (key, value) in map {
                let key = key.to_ascii_lowercase();
                let secret_key = ["token", "jwt", "secret", "password"]
                    .iter()
                    .any(|k| key.contains(k));
                match value {
                    Value::String(s) if secret_key && s.len() >= 4 => found.push(s.clone()),
                    _ => collect_secret_fields(value, depth + 1, found),
                }
            }
        }
        Value::Array(items) => {
            for item in items.iter().take(64) {
                collect_secret_fields(item, depth + 1, found);
            }
        }
        _ => {}
    }
}

/// A string as it appears inside a JSON string literal (without the quotes).
fn json_escaped(value: &str) -> String {
    let quoted = Value::from(value).to_string();
    quoted[1..quoted.len() - 1].to_string()
}

/// `application/x-www-form-urlencoded` encoding of one value (RFC 6749 §2.3.1 uses it for
/// HTTP Basic client credentials; echoed form bodies show secrets this way).
pub fn form_urlencode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'*' | b'-' | b'.' | b'_' => {
                out.push(char::from(b));
            }
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hides_raw_form_and_json_forms() {
        let r = Redactor::new(["s3cr3t:+/ \"x\"", "tok-123"]);
        let echoed = format!(
            "grant_type=client_credentials&client_secret={}&t=tok-123 / {} / {}",
            form_urlencode("s3cr3t:+/ \"x\""),
            json_escaped("s3cr3t:+/ \"x\""),
            "s3cr3t:+/ \"x\""
        );
        let out = r.redact(&echoed);
        assert!(!out.contains("s3cr3t") && !out.contains("tok-123"), "{out}");
        assert_eq!(out.matches(MASK).count(), 4, "{out}");
    }

    #[test]
    fn details_are_cut_after_redaction() {
        let secret = "abcdefghij".repeat(3);
        let r = Redactor::new([secret.as_str()]);
        let text = format!("{}{secret}", "x".repeat(190));
        let d = r.detail(&text);
        assert!(!d.contains("abcdefghij"), "{d}");
        assert!(d.ends_with(MASK), "{d}");
        assert_eq!(r.detail("a\r\nb"), "a  b");
        assert!(r.detail(&"y".repeat(1000)).chars().count() <= DETAIL_MAX_CHARS);
    }

    #[test]
    fn tokens_in_answers_and_errors_are_hidden() {
        let doc = serde_json::json!({"data": {"accessToken": "at-secret-1"}, "message": "x"});
        let r = Redactor::default().with_answer_secrets(&doc);
        assert_eq!(r.redact("bad at-secret-1"), "bad ***");
    }
}
