//! What every token source does with a token endpoint: send, classify the answer, pull out
//! fields, read a JWT's expiry. One copy here so that all sources report failures alike.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use serde_json::Value;

use super::CredentialError;

/// A token endpoint's successful answer.
pub struct EndpointAnswer {
    /// The HTTP status (2xx).
    pub status: u16,
    /// The `Content-Type`, lower-cased, without parameters.
    pub content_type: String,
    /// The body.
    pub body: bytes::Bytes,
}

impl EndpointAnswer {
    /// The body as a JSON document; an empty or non-JSON body is a [`CredentialError::BadResponse`].
    pub fn json(&self) -> Result<Value, CredentialError> {
        if self.body.iter().all(u8::is_ascii_whitespace) {
            return Err(CredentialError::BadResponse(format!(
                "empty body with status {}",
                self.status
            )));
        }
        serde_json::from_slice(&self.body)
            .map_err(|e| CredentialError::BadResponse(format!("body is not JSON ({e})")))
    }

    /// The body as trimmed UTF-8 text (for endpoints that answer a raw JWT).
    pub fn text(&self) -> Result<String, CredentialError> {
        let text = std::str::from_utf8(&self.body)
            .map_err(|_| CredentialError::BadResponse("body is not UTF-8".into()))?
            .trim();
        if text.is_empty() {
            return Err(CredentialError::BadResponse(format!(
                "empty body with status {}",
                self.status
            )));
        }
        Ok(text.to_string())
    }
}

/// Sends a request to a token endpoint. Transport failures become `Unreachable` (without the
/// URL, whose query may hold a secret); non-2xx answers become `Rejected` with the vendor's
/// own message.
pub async fn send(request: reqwest::RequestBuilder) -> Result<EndpointAnswer, CredentialError> {
    let response = request
        .send()
        .await
        .map_err(|e| CredentialError::Unreachable(describe_transport(e)))?;
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let body = response
        .bytes()
        .await
        .map_err(|e| CredentialError::Unreachable(describe_transport(e)))?;
    if !(200..300).contains(&status) {
        return Err(classify_error(status, &body));
    }
    Ok(EndpointAnswer {
        status,
        content_type,
        body,
    })
}

/// RFC 6749 §5.2 error codes; only these are ever repeated from a vendor's `error` field
/// (free text there could echo a secret).
const OAUTH_ERROR_CODES: [&str; 6] = [
    "invalid_request",
    "invalid_client",
    "invalid_grant",
    "unauthorized_client",
    "unsupported_grant_type",
    "invalid_scope",
];

/// A token endpoint's error answer: `Refused` (final) when it says the secret or grant is
/// wrong — `invalid_client`, `invalid_grant`, `unauthorized_client`, or status 400/401 —
/// otherwise `Rejected` (transient: 5xx, 429, …).
pub fn classify_error(status: u16, body: &[u8]) -> CredentialError {
    let vendor_error = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|doc| doc.get("error")?.as_str().map(str::to_string))
        .filter(|code| OAUTH_ERROR_CODES.contains(&code.as_str()));
    let refused_code = matches!(
        vendor_error.as_deref(),
        Some("invalid_client" | "invalid_grant" | "unauthorized_client")
    );
    let detail = vendor_message(body);
    if refused_code || matches!(status, 400 | 401) {
        CredentialError::Refused {
            status,
            vendor_error,
            detail,
        }
    } else {
        CredentialError::Rejected { status, detail }
    }
}

/// A transport error's description without its URL.
fn describe_transport(e: reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "broken response body"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(&e);
    let mut chain = Vec::new();
    while let Some(s) = source {
        chain.push(s.to_string());
        source = s.source();
    }
    if chain.is_empty() {
        kind.to_string()
    } else {
        format!("{kind}: {}", chain.join(": "))
    }
}

/// The vendor's error message from an error body: JSON fields `Message`, `ErrorMessage`,
/// `error_description`, `error`, `message`, JSON:API `errors[0].detail|title`, or a short
/// plain-text body. At most 200 characters.
pub fn vendor_message(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let message = match serde_json::from_slice::<Value>(body) {
        Ok(doc) => {
            let fields = [
                "Message",
                "ErrorMessage",
                "error_description",
                "message",
                "error",
            ];
            fields
                .iter()
                .find_map(|f| doc.get(f).and_then(Value::as_str).map(str::to_string))
                .or_else(|| {
                    let first = doc.get("errors")?.get(0)?;
                    first
                        .get("detail")
                        .or_else(|| first.get("title"))
                        .and_then(Value::as_str)
                        .map(str::to_string)
                })
                .unwrap_or_default()
        }
        Err(_) if text.trim_start().starts_with('<') => String::new(),
        Err(_) => text.trim().to_string(),
    };
    let mut clean: String = message
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(200)
        .collect();
    clean.truncate(clean.trim_end().len());
    clean
}

/// A string field at a JSON pointer (`/data/meta/accessToken`), or a `BadResponse` naming it.
pub fn string_at<'a>(doc: &'a Value, pointer: &str) -> Result<&'a str, CredentialError> {
    doc.pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| CredentialError::BadResponse(format!("no string at `{pointer}`")))
}

/// A number of seconds at a JSON pointer, accepting integers, floats and numeric strings.
pub fn seconds_at(doc: &Value, pointer: &str) -> Option<Duration> {
    let v = doc.pointer(pointer)?;
    let secs = v
        .as_f64()
        .or_else(|| v.as_str().and_then(|s| s.trim().parse().ok()))?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs))
}

/// The `exp` claim of a JWT, read without verifying the signature (we are the bearer, not
/// the audience: the vendor verifies it). `None` when the token is not a JWT or has no `exp`.
pub fn jwt_expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    let exp = claims.get("exp")?.as_f64()?;
    (exp.is_finite() && exp > 0.0).then(|| UNIX_EPOCH + Duration::from_secs_f64(exp))
}

/// The expiry of a token: the JWT's `exp` when readable, else `now + expires_in`.
pub fn token_expiry(token: &str, expires_in: Option<Duration>) -> Option<SystemTime> {
    jwt_expiry(token).or_else(|| expires_in.map(|d| SystemTime::now() + d))
}

/// Parses an ISO 8601 timestamp as vendors put in `tokenExpiration`:
/// `2026-11-23T10:00:00Z`, with optional fraction and `Z` or `±HH:MM` offset (no offset = UTC).
pub fn parse_timestamp(text: &str) -> Option<SystemTime> {
    let t = text.trim();
    let num = |s: &str| -> Option<i64> {
        (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok())?
    };
    let (date, time) = t.split_once(['T', 't', ' '])?;
    let mut d = date.splitn(3, '-');
    let (year, month, day) = (num(d.next()?)?, num(d.next()?)?, num(d.next()?)?);
    let (clock, offset_secs) = if let Some(c) = time.strip_suffix(['Z', 'z']) {
        (c, 0)
    } else if let Some(pos) = time.rfind(['+', '-']) {
        let (h, m) = time[pos + 1..]
            .split_once(':')
            .unwrap_or((&time[pos + 1..], "0"));
        let sign = if time.as_bytes()[pos] == b'-' { -1 } else { 1 };
        (&time[..pos], sign * (num(h)? * 3600 + num(m)? * 60))
    } else {
        (time, 0)
    };
    let (whole, fraction) = clock.split_once('.').unwrap_or((clock, ""));
    let mut c = whole.splitn(3, ':');
    let (hour, minute, second) = (
        num(c.next()?)?,
        num(c.next()?)?,
        num(c.next().unwrap_or("0"))?,
    );
    if !(1..=12).contains(&month)
        || !(1..=31).contains(&day)
        || hour > 23
        || minute > 59
        || second > 60
    {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    let nanos = if fraction.is_empty() {
        0
    } else {
        let digits: String = fraction.chars().take(9).collect();
        num(&digits)? * 10_i64.pow(9 - digits.len() as u32)
    };
    let secs = u64::try_from(secs).ok()?;
    Some(UNIX_EPOCH + Duration::new(secs, u32::try_from(nanos).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_jwt_expiry_without_verifying() {
        let payload =
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(r#"{"exp":2000000000}"#);
        let jwt = format!("eyJhbGciOiJSUzI1NiJ9.{payload}.sig");
        assert_eq!(
            jwt_expiry(&jwt),
            Some(UNIX_EPOCH + Duration::from_secs(2_000_000_000))
        );
        assert_eq!(jwt_expiry("opaque-token"), None);
    }

    #[test]
    fn vendor_messages_are_extracted() {
        assert_eq!(vendor_message(br#"{"Message":"Bad creds"}"#), "Bad creds");
        assert_eq!(
            vendor_message(br#"{"errors":[{"title":"Locked"}]}"#),
            "Locked"
        );
        assert_eq!(vendor_message(b"invalid client\n"), "invalid client");
        assert_eq!(vendor_message(b"<html>oops</html>"), "");
    }

    #[test]
    fn refusals_of_the_secret_are_final_and_outages_are_not() {
        let e = classify_error(401, br#"{"error":"invalid_client"}"#);
        assert!(e.is_final());
        assert_eq!(e.vendor_error(), Some("invalid_client"));
        let e = classify_error(403, br#"{"error":"invalid_grant"}"#);
        assert_eq!(e.vendor_error(), Some("invalid_grant"));
        let e = classify_error(400, b"invalid client credentials");
        assert!(e.is_final() && e.vendor_error().is_none());
        assert!(classify_error(400, br#"{"error":"s3cret-echo"}"#)
            .vendor_error()
            .is_none());
        assert!(!classify_error(503, br#"{"error":"invalid_client_temporarily"}"#).is_final());
        assert!(!classify_error(500, b"oops").is_final());
        assert!(!classify_error(429, b"slow down").is_final());
    }

    #[test]
    fn timestamps_parse() {
        let t = parse_timestamp("2030-01-01T00:00:00Z").unwrap();
        assert_eq!(t, UNIX_EPOCH + Duration::from_secs(1_893_456_000));
        assert_eq!(
            parse_timestamp("2030-01-01T00:00:00.5Z").map(|t| t > UNIX_EPOCH),
            Some(true)
        );
        assert_eq!(parse_timestamp("2030-01-01T01:00:00+01:00"), Some(t));
        assert!(parse_timestamp("yesterday").is_none());
    }
}
