//! `type: hmac` — each request signed with a shared key: an HMAC over a string built from a
//! template (`{timestamp}.{method}.{path}.{body_sha256}`), sent in a header whose value is
//! another template (`t={timestamp},v1={signature}`). Templates are parsed while the file is
//! read, so an unknown placeholder is reported with the credential's line and column.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use base64::Engine as _;
use http::{HeaderName, HeaderValue};
use ring::{digest, hmac};

use super::{Fingerprint, 
    CredentialType, NoToken, RequestSigner, SigningRequest, SourceDeps, TokenFormat, TokenSource,
};
use crate::vocab::secret::Secret;
use crate::vocab::validate_ctx::ValidateCtx;

/// `type: hmac`.
pub struct HmacSignature;

/// The section as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HmacSpec {
    key: Option<Secret>,
    key_file: Option<String>,
    #[serde(default)]
    algorithm: Algorithm,
    #[serde(default)]
    encoding: Encoding,
    string_to_sign: SignedTemplate,
    /// The value of the signature header (`header`); default `{signature}`.
    format: Option<ValueTemplate>,
    /// A header that carries `{timestamp}` to the upstream.
    timestamp_header: Option<String>,
    /// A header that carries `{nonce}` to the upstream.
    nonce_header: Option<String>,
}

/// The HMAC's hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    #[default]
    Sha256,
    Sha512,
    /// Only for APIs that still require it.
    Sha1,
}

/// How the signature bytes are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    #[default]
    Hex,
    Base64,
}

/// One piece of a template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Method,
    Path,
    Query,
    Host,
    Timestamp,
    Nonce,
    BodySha256,
    Header(HeaderName),
    Signature,
}

const PLACEHOLDERS: &str = "{method}, {path}, {query}, {host}, {timestamp}, {nonce}, \
                            {body_sha256}, {header:NAME}";

/// Parses `{name}` placeholders (`{{` and `}}` are literal braces).
fn parse_template(field: &str, text: &str, signature_allowed: bool) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut literal = String::new();
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.next_if_eq(&'{').is_some() => literal.push('{'),
            '}' if chars.next_if_eq(&'}').is_some() => literal.push('}'),
            '{' => {
                let name: String = chars.by_ref().take_while(|&d| d != '}').collect();
                let part = match name.as_str() {
                    "method" => Part::Method,
                    "path" => Part::Path,
                    "query" => Part::Query,
                    "host" => Part::Host,
                    "timestamp" => Part::Timestamp,
                    "nonce" => Part::Nonce,
                    "body_sha256" => Part::BodySha256,
                    "signature" if signature_allowed => Part::Signature,
                    other => match other.strip_prefix("header:") {
                        Some(h) => Part::Header(HeaderName::from_bytes(h.as_bytes()).map_err(
                            |_| format!("{field}: {{{other}}} does not name a valid header"),
                        )?),
                        None => {
                            let extra = if signature_allowed { ", {signature}" } else { "" };
                            return Err(format!(
                                "{field}: unknown placeholder {{{other}}} (known: {PLACEHOLDERS}{extra})"
                            ));
                        }
                    },
                };
                if !literal.is_empty() {
                    parts.push(Part::Text(std::mem::take(&mut literal)));
                }
                parts.push(part);
            }
            '}' => return Err(format!("{field}: a lone `}}` (write `}}}}` for a brace)")),
            c => literal.push(c),
        }
    }
    if !literal.is_empty() {
        parts.push(Part::Text(literal));
    }
    Ok(parts)
}

/// `string_to_sign`, checked as it is read.
#[derive(Debug, Clone, PartialEq)]
pub struct SignedTemplate(Vec<Part>);

impl<'de> serde::Deserialize<'de> for SignedTemplate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        parse_template("string_to_sign", &text, false)
            .map(SignedTemplate)
            .map_err(serde::de::Error::custom)
    }
}

/// `format`, checked as it is read: it must place `{signature}`.
#[derive(Debug, Clone, PartialEq)]
pub struct ValueTemplate(Vec<Part>);

impl<'de> serde::Deserialize<'de> for ValueTemplate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let parts = parse_template("format", &text, true).map_err(serde::de::Error::custom)?;
        if !parts.contains(&Part::Signature) {
            return Err(serde::de::Error::custom(
                "format: must contain {signature}",
            ));
        }
        Ok(ValueTemplate(parts))
    }
}

/// Validated settings. `Debug` shows no key.
#[derive(Debug, Clone, PartialEq)]
pub struct HmacSettings {
    key: Secret,
    algorithm: Algorithm,
    encoding: Encoding,
    string_to_sign: Vec<Part>,
    format: Vec<Part>,
    timestamp_header: Option<HeaderName>,
    nonce_header: Option<HeaderName>,
    signs_body: bool,
}

impl CredentialType for HmacSignature {
    const NAME: &'static str = "hmac";
    const PREFETCH: bool = false;
    type Spec = HmacSpec;
    type Settings = HmacSettings;

    /// A signing type has no token to share between replicas; its fingerprint still names
    /// what it signs with.
    fn fingerprint(settings: &HmacSettings, fp: &mut Fingerprint) {
        fp.secret("key", &settings.key);
        let algorithm = match settings.algorithm {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
            Algorithm::Sha1 => "sha1",
        };
        fp.text("algorithm", algorithm);
        let encoding = match settings.encoding {
            Encoding::Hex => "hex",
            Encoding::Base64 => "base64",
        };
        fp.text("encoding", encoding);
    }

    fn default_scheme(_: &HmacSpec) -> Option<&'static str> {
        None
    }

    fn validate(
        spec: HmacSpec,
        _format: TokenFormat,
        ctx: &mut ValidateCtx<'_>,
    ) -> Option<HmacSettings> {
        let key = ctx.required_secret(
            "key",
            spec.key.as_ref().map(Secret::expose),
            spec.key_file.as_deref(),
        );
        if key.as_ref().is_some_and(Secret::is_empty) {
            ctx.problem("key", "must not be empty");
        }
        let timestamp_header = spec
            .timestamp_header
            .as_deref()
            .map(|h| ctx.header_name("timestamp_header", Some(h)));
        let nonce_header = spec
            .nonce_header
            .as_deref()
            .map(|h| ctx.header_name("nonce_header", Some(h)));
        let format = spec.format.map_or_else(|| vec![Part::Signature], |f| f.0);
        let string_to_sign = spec.string_to_sign.0;
        let signs_body = string_to_sign.contains(&Part::BodySha256);
        Some(HmacSettings {
            key: key.filter(|k| !k.is_empty())?,
            algorithm: spec.algorithm,
            encoding: spec.encoding,
            string_to_sign,
            format,
            timestamp_header: timestamp_header.map_or(Some(None), |h| h.map(Some))?,
            nonce_header: nonce_header.map_or(Some(None), |h| h.map(Some))?,
            signs_body,
        })
    }

    fn source(_settings: &HmacSettings, _deps: &SourceDeps) -> Arc<dyn TokenSource> {
        Arc::new(NoToken(Self::NAME))
    }

    fn signer(settings: &HmacSettings) -> Option<&dyn RequestSigner> {
        Some(settings)
    }
}

/// What one signing fills the templates with.
struct Values<'a, 'r> {
    request: &'a SigningRequest<'r>,
    timestamp: String,
    nonce: String,
    body_sha256: Option<String>,
}

impl Values<'_, '_> {
    fn render(&self, parts: &[Part], signature: &str) -> Result<String, String> {
        let r = self.request;
        let mut out = String::new();
        for part in parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Method => out.push_str(r.method.as_str()),
                Part::Path => out.push_str(r.path),
                Part::Query => out.push_str(r.query),
                Part::Host => out.push_str(r.host),
                Part::Timestamp => out.push_str(&self.timestamp),
                Part::Nonce => out.push_str(&self.nonce),
                Part::BodySha256 => out.push_str(self.body_sha256.as_deref().unwrap_or_default()),
                Part::Signature => out.push_str(signature),
                Part::Header(name) => {
                    let value = r
                        .headers
                        .get(name)
                        .ok_or_else(|| format!("the request has no `{name}` header, which the signature covers"))?;
                    let value = value
                        .to_str()
                        .map_err(|_| format!("the `{name}` header, which the signature covers, is not text"))?;
                    out.push_str(value);
                }
            }
        }
        Ok(out)
    }
}

impl RequestSigner for HmacSettings {
    fn signs_body(&self) -> bool {
        self.signs_body
    }

    fn sign(&self, header: &HeaderName, request: SigningRequest<'_>) -> Result<(), String> {
        let timestamp = request
            .now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs()
            .to_string();
        let values = Values {
            nonce: hex(&rand::random::<[u8; 16]>()),
            body_sha256: request.body.map(sha256_hex),
            timestamp,
            request: &request,
        };
        let text = values.render(&self.string_to_sign, "")?;
        let algorithm = match self.algorithm {
            Algorithm::Sha256 => hmac::HMAC_SHA256,
            Algorithm::Sha512 => hmac::HMAC_SHA512,
            Algorithm::Sha1 => hmac::HMAC_SHA1_FOR_LEGACY_USE_ONLY,
        };
        let key = hmac::Key::new(algorithm, self.key.expose().as_bytes());
        let tag = hmac::sign(&key, text.as_bytes());
        let signature = match self.encoding {
            Encoding::Hex => hex(tag.as_ref()),
            Encoding::Base64 => base64::engine::general_purpose::STANDARD.encode(tag.as_ref()),
        };
        let value = values.render(&self.format, &signature)?;
        let (timestamp, nonce) = (values.timestamp, values.nonce);
        let headers = request.headers;
        let mut value = HeaderValue::from_str(&value)
            .map_err(|_| format!("the `{header}` value the format makes is not a valid header"))?;
        value.set_sensitive(true);
        headers.insert(header.clone(), value);
        for (name, text) in [
            (&self.timestamp_header, timestamp),
            (&self.nonce_header, nonce),
        ] {
            if let (Some(name), Ok(v)) = (name, HeaderValue::from_str(&text)) {
                headers.insert(name.clone(), v);
            }
        }
        Ok(())
    }
}

/// Lower-case hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// The SHA-256 of `bytes` in lower-case hex.
pub(crate) fn sha256_hex(bytes: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, bytes).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::credentials::validate_for_test;
    use http::{HeaderMap, Method};

    fn sign(settings: &HmacSettings, body: Option<&[u8]>, headers: &mut HeaderMap) -> Result<(), String> {
        let request = SigningRequest {
            method: &Method::POST,
            host: "api.test",
            path: "/v1/charges",
            query: "a=1",
            headers,
            body,
            now: UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000),
        };
        settings.sign(&HeaderName::from_static("x-signature"), request)
    }

    #[test]
    fn signs_the_rendered_string_with_the_key() {
        let settings = validate_for_test::<HmacSignature>(
            "key: k3y\nstring_to_sign: \"{timestamp}.{method}.{path}?{query}.{host}.{header:x-id}.{body_sha256}\"\n\
             format: \"t={timestamp},v1={signature}\"\ntimestamp_header: X-Timestamp\n",
            &[],
        )
        .unwrap();
        assert!(settings.signs_body());
        let mut headers = HeaderMap::new();
        headers.insert("x-id", HeaderValue::from_static("r-1"));
        sign(&settings, Some(b"{}"), &mut headers).unwrap();
        let text = format!(
            "1700000000.POST./v1/charges?a=1.api.test.r-1.{}",
            sha256_hex(b"{}")
        );
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"k3y");
        let expected = hex(hmac::sign(&key, text.as_bytes()).as_ref());
        assert_eq!(headers["x-signature"], format!("t=1700000000,v1={expected}").as_str());
        assert!(headers["x-signature"].is_sensitive());
        assert_eq!(headers["x-timestamp"], "1700000000");
        let debug = format!("{settings:?}");
        assert!(!debug.contains("k3y"), "{debug}");
    }

    #[test]
    fn a_missing_covered_header_is_named() {
        let settings =
            validate_for_test::<HmacSignature>("key: k\nstring_to_sign: \"{header:x-id}\"\n", &[])
                .unwrap();
        assert!(!settings.signs_body());
        let e = sign(&settings, None, &mut HeaderMap::new()).unwrap_err();
        assert!(e.contains("x-id"), "{e}");
    }

    #[test]
    fn templates_are_checked_as_the_file_is_read() {
        let e = validate_for_test::<HmacSignature>("key: k\nstring_to_sign: \"{method}.{bogus}\"\n", &[])
            .unwrap_err()
            .join("; ");
        assert!(e.contains("unknown placeholder {bogus}"), "{e}");
        let e = validate_for_test::<HmacSignature>(
            "key: k\nstring_to_sign: \"{method}\"\nformat: \"v1\"\n",
            &[],
        )
        .unwrap_err()
        .join("; ");
        assert!(e.contains("{signature}"), "{e}");
        let e = validate_for_test::<HmacSignature>("key: k\nstring_to_sign: \"{signature}\"\n", &[])
            .unwrap_err()
            .join("; ");
        assert!(e.contains("unknown placeholder {signature}"), "{e}");
        assert_eq!(
            parse_template("f", "{{x}}", false).unwrap(),
            vec![Part::Text("{x}".into())]
        );
    }
}
