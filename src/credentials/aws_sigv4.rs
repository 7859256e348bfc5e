//! `type: aws_sigv4` — AWS Signature Version 4: each request is signed with the access key's
//! secret over its method, canonical path and query, `host`, `content-type`, `content-md5`
//! and every `x-amz-*` header, and the SHA-256 of its body (or `UNSIGNED-PAYLOAD`). The
//! scheme is AWS's "Create a signed AWS API request" guide; the unit tests hold it to cases of
//! AWS's published SigV4 test suite.

use std::fmt::Write as _;
use std::sync::Arc;

use http::{HeaderName, HeaderValue};
use ring::hmac;

use super::hmac::{hex, sha256_hex};
use super::{Fingerprint, 
    CredentialType, NoToken, RequestSigner, SigningRequest, SourceDeps, TokenFormat, TokenSource,
};
use crate::vocab::secret::Secret;
use crate::vocab::validate_ctx::ValidateCtx;

/// `type: aws_sigv4`.
pub struct AwsSigV4;

/// The section as written.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsSigV4Spec {
    access_key_id: Option<String>,
    secret_access_key: Option<Secret>,
    secret_access_key_file: Option<String>,
    session_token: Option<Secret>,
    session_token_file: Option<String>,
    region: Option<String>,
    service: Option<String>,
    /// Send `UNSIGNED-PAYLOAD` instead of the body's hash, so that bodies stream (S3 only).
    #[serde(default)]
    unsigned_payload: bool,
}

/// Validated settings. `Debug` shows neither the secret key nor the session token.
#[derive(Debug, Clone, PartialEq)]
pub struct AwsSigV4Settings {
    access_key_id: String,
    secret_access_key: Secret,
    session_token: Option<Secret>,
    region: String,
    service: String,
    unsigned_payload: bool,
}

impl CredentialType for AwsSigV4 {
    const NAME: &'static str = "aws_sigv4";
    const PREFETCH: bool = false;
    type Spec = AwsSigV4Spec;
    type Settings = AwsSigV4Settings;

    /// A signing type has no token to share between replicas; its fingerprint still names
    /// what it signs with.
    fn fingerprint(settings: &AwsSigV4Settings, fp: &mut Fingerprint) {
        fp.text("access_key_id", &settings.access_key_id);
        fp.secret("secret_access_key", &settings.secret_access_key);
        fp.text("region", &settings.region);
        fp.text("service", &settings.service);
    }

    fn default_scheme(_: &AwsSigV4Spec) -> Option<&'static str> {
        None
    }

    fn validate(
        spec: AwsSigV4Spec,
        _format: TokenFormat,
        ctx: &mut ValidateCtx<'_>,
    ) -> Option<AwsSigV4Settings> {
        let access_key_id = ctx.required_text("access_key_id", spec.access_key_id.as_deref());
        let secret_access_key = ctx.required_secret(
            "secret_access_key",
            spec.secret_access_key.as_ref().map(Secret::expose),
            spec.secret_access_key_file.as_deref(),
        );
        let session_token = ctx.optional_secret(
            "session_token",
            spec.session_token.as_ref().map(Secret::expose),
            spec.session_token_file.as_deref(),
        );
        let mut word = |field: &str, raw: Option<&str>| {
            let text = ctx.required_text(field, raw)?;
            if text.is_empty() || !text.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                ctx.problem(field, format!("`{text}` must be a name like `us-east-1` or `s3`"));
                return None;
            }
            Some(text)
        };
        let region = word("region", spec.region.as_deref());
        let service = word("service", spec.service.as_deref());
        if spec.unsigned_payload && service.as_deref().is_some_and(|s| s != "s3") {
            ctx.problem("unsigned_payload", "only S3 (`service: s3`) accepts an unsigned payload");
        }
        Some(AwsSigV4Settings {
            access_key_id: access_key_id?,
            secret_access_key: secret_access_key?,
            session_token,
            region: region?,
            service: service?,
            unsigned_payload: spec.unsigned_payload,
        })
    }

    fn source(_settings: &AwsSigV4Settings, _deps: &SourceDeps) -> Arc<dyn TokenSource> {
        Arc::new(NoToken(Self::NAME))
    }

    fn signer(settings: &AwsSigV4Settings) -> Option<&dyn RequestSigner> {
        Some(settings)
    }
}

const X_AMZ_DATE: HeaderName = HeaderName::from_static("x-amz-date");
const X_AMZ_CONTENT_SHA256: HeaderName = HeaderName::from_static("x-amz-content-sha256");
const X_AMZ_SECURITY_TOKEN: HeaderName = HeaderName::from_static("x-amz-security-token");

impl RequestSigner for AwsSigV4Settings {
    fn signs_body(&self) -> bool {
        !self.unsigned_payload
    }

    fn sign(&self, header: &HeaderName, request: SigningRequest<'_>) -> Result<(), String> {
        let now = time::OffsetDateTime::from(request.now);
        let amz_date = format!(
            "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
            now.year(),
            u8::from(now.month()),
            now.day(),
            now.hour(),
            now.minute(),
            now.second()
        );
        let payload_hash = match request.body {
            Some(body) if !self.unsigned_payload => sha256_hex(body),
            _ => "UNSIGNED-PAYLOAD".to_string(),
        };
        let headers = request.headers;
        // What the client sent under these names belongs to its own (absent) signature.
        for name in [&X_AMZ_DATE, &X_AMZ_CONTENT_SHA256, &X_AMZ_SECURITY_TOKEN, header] {
            headers.remove(name);
        }
        headers.insert(X_AMZ_DATE, header_value(&amz_date)?);
        if self.service == "s3" || self.unsigned_payload {
            headers.insert(X_AMZ_CONTENT_SHA256, header_value(&payload_hash)?);
        }
        if let Some(token) = &self.session_token {
            let mut value = header_value(token.expose())?;
            value.set_sensitive(true);
            headers.insert(X_AMZ_SECURITY_TOKEN, value);
        }
        let mut signed: Vec<(String, String)> = vec![("host".into(), request.host.into())];
        for name in headers.keys() {
            let n = name.as_str();
            if n == "content-type" || n == "content-md5" || n.starts_with("x-amz-") {
                let values: Vec<&str> = headers
                    .get_all(name)
                    .iter()
                    .map(|v| v.to_str().map_err(|_| format!("the `{n}` header is not text")))
                    .collect::<Result<_, _>>()?;
                signed.push((n.to_string(), values.join(",")));
            }
        }
        let canonical_uri = match self.service.as_str() {
            "s3" => uri_encode(&percent_decode(request.path), false),
            _ => uri_encode_text(&uri_encode(&percent_decode(request.path), false)),
        };
        let scope = Scope {
            date: &amz_date[..8],
            region: &self.region,
            service: &self.service,
        };
        let canonical = canonical_request(
            request.method.as_str(),
            &canonical_uri,
            &canonical_query(request.query),
            &mut signed,
            &payload_hash,
        );
        let to_sign = string_to_sign(&amz_date, &scope, &canonical.text);
        let signature = signature(self.secret_access_key.expose(), &scope, &to_sign);
        let authorization = format!(
            "AWS4-HMAC-SHA256 Credential={}/{}, SignedHeaders={}, Signature={signature}",
            self.access_key_id,
            scope.text(),
            canonical.signed_headers
        );
        let mut value = header_value(&authorization)?;
        value.set_sensitive(true);
        headers.insert(header.clone(), value);
        Ok(())
    }
}

fn header_value(text: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(text).map_err(|_| "a signing value is not a valid header".to_string())
}

/// The credential scope: `date/region/service/aws4_request`.
struct Scope<'a> {
    date: &'a str,
    region: &'a str,
    service: &'a str,
}

impl Scope<'_> {
    fn text(&self) -> String {
        format!("{}/{}/{}/aws4_request", self.date, self.region, self.service)
    }
}

struct CanonicalRequest {
    text: String,
    signed_headers: String,
}

/// The canonical request; `headers` (lower-case names) are sorted here and their values
/// trimmed, inner runs of spaces made one.
fn canonical_request(
    method: &str,
    canonical_uri: &str,
    canonical_query: &str,
    headers: &mut [(String, String)],
    payload_hash: &str,
) -> CanonicalRequest {
    headers.sort();
    let mut text = format!("{method}\n{canonical_uri}\n{canonical_query}\n");
    for (name, value) in headers.iter() {
        let value = value.split_whitespace().collect::<Vec<_>>().join(" ");
        let _ = writeln!(text, "{name}:{value}");
    }
    let signed_headers = headers
        .iter()
        .map(|(n, _)| n.as_str())
        .collect::<Vec<_>>()
        .join(";");
    let _ = write!(text, "\n{signed_headers}\n{payload_hash}");
    CanonicalRequest {
        text,
        signed_headers,
    }
}

fn string_to_sign(amz_date: &str, scope: &Scope<'_>, canonical_request: &str) -> String {
    format!(
        "AWS4-HMAC-SHA256\n{amz_date}\n{}\n{}",
        scope.text(),
        sha256_hex(canonical_request.as_bytes())
    )
}

fn signature(secret: &str, scope: &Scope<'_>, string_to_sign: &str) -> String {
    let step = |key: &[u8], data: &str| {
        hmac::sign(&hmac::Key::new(hmac::HMAC_SHA256, key), data.as_bytes())
    };
    let date = step(format!("AWS4{secret}").as_bytes(), scope.date);
    let region = step(date.as_ref(), scope.region);
    let service = step(region.as_ref(), scope.service);
    let signing = step(service.as_ref(), "aws4_request");
    hex(step(signing.as_ref(), string_to_sign).as_ref())
}

/// The query's parameters decoded, encoded the AWS way and sorted by name, then value.
fn canonical_query(query: &str) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (
                uri_encode(&percent_decode(k), true),
                uri_encode(&percent_decode(v), true),
            )
        })
        .collect();
    pairs.sort();
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-decodes `text` (bytes; a malformed escape is kept as written).
fn percent_decode(text: &str) -> Vec<u8> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let escape = (bytes[i] == b'%')
            .then(|| bytes.get(i + 1..i + 3))
            .flatten()
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match escape {
            Some(b) => {
                out.push(b);
                i += 3;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    out
}

/// AWS's `UriEncode`: unreserved characters as they are, every other byte `%XX`
/// (upper-case); `/` kept unless `encode_slash`.
fn uri_encode(bytes: &[u8], encode_slash: bool) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) || (b == b'/' && !encode_slash) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `uri_encode` of text (for the non-S3 second pass).
fn uri_encode_text(text: &str) -> String {
    uri_encode(text.as_bytes(), false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const DATE: &str = "20150830T123600Z";
    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    /// One case of AWS's SigV4 test suite (`aws-sig-v4-test-suite`): access key
    /// `AKIDEXAMPLE`, region `us-east-1`, service `service`, 2015-08-30T12:36:00Z.
    fn suite_case(
        method: &str,
        query: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        canonical: &str,
        to_sign: &str,
        signature_expected: &str,
    ) {
        let scope = Scope {
            date: "20150830",
            region: "us-east-1",
            service: "service",
        };
        let mut headers: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        let request = canonical_request(
            method,
            "/",
            &canonical_query(query),
            &mut headers,
            &sha256_hex(body),
        );
        assert_eq!(request.text, canonical);
        let text = string_to_sign(DATE, &scope, &request.text);
        assert_eq!(text, to_sign);
        assert_eq!(signature(SECRET, &scope, &text), signature_expected);
    }

    #[test]
    fn get_vanilla_and_get_vanilla_query() {
        // get-vanilla-query is get-vanilla: its request has no query either.
        suite_case(
            "GET",
            "",
            &[("host", "example.amazonaws.com"), ("x-amz-date", DATE)],
            b"",
            &format!("GET\n/\n\nhost:example.amazonaws.com\nx-amz-date:{DATE}\n\nhost;x-amz-date\n{EMPTY}"),
            "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\nbb579772317eb040ac9ed261061d46c1f17a8133879d6129b6e1c25292927e63",
            "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31",
        );
    }

    #[test]
    fn get_vanilla_empty_query_key() {
        suite_case(
            "GET",
            "Param1=value1",
            &[("host", "example.amazonaws.com"), ("x-amz-date", DATE)],
            b"",
            &format!("GET\n/\nParam1=value1\nhost:example.amazonaws.com\nx-amz-date:{DATE}\n\nhost;x-amz-date\n{EMPTY}"),
            "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n1e24db194ed7d0eec2de28d7369675a243488e08526e8c1c73571282f7c517ab",
            "a67d582fa61cc504c4bae71f336f98b97f1ea3c7a6bfe1b6e45aec72011b9aeb",
        );
    }

    #[test]
    fn post_x_www_form_urlencoded() {
        suite_case(
            "POST",
            "",
            &[
                ("content-type", "application/x-www-form-urlencoded"),
                ("host", "example.amazonaws.com"),
                ("x-amz-date", DATE),
            ],
            b"Param1=value1",
            &format!("POST\n/\n\ncontent-type:application/x-www-form-urlencoded\nhost:example.amazonaws.com\nx-amz-date:{DATE}\n\ncontent-type;host;x-amz-date\n9095672bbd1f56dfc5b65f3e153adc8731a4a654192329106275f4c7b24d0b6e"),
            "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\n42a5e5bb34198acb3e84da4f085bb7927f2bc277ca766e6d19c73c2154021281",
            "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a",
        );
    }

    #[test]
    fn get_header_value_trim() {
        suite_case(
            "GET",
            "",
            &[
                ("host", "example.amazonaws.com"),
                ("my-header1", " value1"),
                ("my-header2", " \"a   b   c\""),
                ("x-amz-date", DATE),
            ],
            b"",
            &format!("GET\n/\n\nhost:example.amazonaws.com\nmy-header1:value1\nmy-header2:\"a b c\"\nx-amz-date:{DATE}\n\nhost;my-header1;my-header2;x-amz-date\n{EMPTY}"),
            "AWS4-HMAC-SHA256\n20150830T123600Z\n20150830/us-east-1/service/aws4_request\na726db9b0df21c14f559d0a978e563112acb1b9e05476f0a6a1c7d68f28605c7",
            "acc3ed3afb60bb290fc8d2dd0098b9911fcaa05412b367055dee359757a9c736",
        );
    }

    #[test]
    fn the_signer_writes_the_suite_authorization() {
        let settings = crate::credentials::validate_for_test::<AwsSigV4>(
            &format!("access_key_id: AKIDEXAMPLE\nsecret_access_key: {SECRET}\nregion: us-east-1\nservice: service\n"),
            &[],
        )
        .unwrap();
        let mut headers = HeaderMap::new();
        let request = SigningRequest {
            method: &http::Method::GET,
            host: "example.amazonaws.com",
            path: "/",
            query: "Param1=value1",
            headers: &mut headers,
            body: Some(b""),
            now: std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_440_938_160),
        };
        settings
            .sign(&http::header::AUTHORIZATION, request)
            .unwrap();
        assert_eq!(
            headers["authorization"],
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, SignedHeaders=host;x-amz-date, Signature=a67d582fa61cc504c4bae71f336f98b97f1ea3c7a6bfe1b6e45aec72011b9aeb"
        );
        assert!(!format!("{settings:?}").contains("EXAMPLEKEY"));
    }

    #[test]
    fn paths_and_queries_are_encoded_the_aws_way() {
        assert_eq!(canonical_query("b=2&a=%7e x&a=1&c"), "a=1&a=~%20x&b=2&c=");
        assert_eq!(uri_encode(&percent_decode("/a%20b/c~"), false), "/a%20b/c~");
        assert_eq!(uri_encode_text("/a%20b"), "/a%2520b");
    }
}
