//! What every token source does with a token endpoint: send, classify the answer, pull out
//! fields, read a JWT's expiry. One copy here so that all sources report failures alike.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use super::CredentialError;
use crate::vocab::redact::Redactor;

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

/// The largest token-endpoint answer read; a longer one is a [`CredentialError::BadResponse`]
/// (and so a 502), never a reason to hold megabytes.
pub const MAX_ANSWER_BYTES: usize = 1 << 20;

/// Sends a request to a token endpoint. Transport failures become `Unreachable` (without the
/// URL, whose query may hold a secret); non-2xx answers become `Rejected` with the vendor's
/// own message. Every text in an error has passed through `redactor`; the body is read up to
/// [`MAX_ANSWER_BYTES`].
pub async fn send(
    request: reqwest::RequestBuilder,
    redactor: &Redactor,
) -> Result<EndpointAnswer, CredentialError> {
    receive(request, redactor)
        .await
        .map_err(|e| e.redacted(redactor))
}

async fn receive(
    request: reqwest::RequestBuilder,
    redactor: &Redactor,
) -> Result<EndpointAnswer, CredentialError> {
    let mut response = request
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
    let too_large = || {
        CredentialError::BadResponse(format!(
            "answer larger than {} KiB (status {status})",
            MAX_ANSWER_BYTES >> 10
        ))
    };
    if response
        .content_length()
        .is_some_and(|n| n > MAX_ANSWER_BYTES as u64)
    {
        return Err(too_large());
    }
    let mut body = bytes::BytesMut::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| CredentialError::Unreachable(describe_transport(e)))?
    {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    let body = body.freeze();
    if !(200..300).contains(&status) {
        return Err(classify_error(status, &body, redactor));
    }
    Ok(EndpointAnswer {
        status,
        content_type,
        body,
    })
}

/// RFC 6749 §5.2 and RFC 8628 §3.5 (device grant) error codes; only these are ever
/// repeated from a vendor's `error` field (free text there could echo a secret).
const OAUTH_ERROR_CODES: [&str; 10] = [
    "authorization_pending",
    "slow_down",
    "access_denied",
    "expired_token",
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
pub fn classify_error(status: u16, body: &[u8], redactor: &Redactor) -> CredentialError {
    let vendor_error = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|doc| doc.get("error")?.as_str().map(str::to_string))
        .filter(|code| OAUTH_ERROR_CODES.contains(&code.as_str()));
    let refused_code = matches!(
        vendor_error.as_deref(),
        Some("invalid_client" | "invalid_grant" | "unauthorized_client")
    );
    let detail = vendor_detail(body, redactor);
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

/// The vendor's error message from an answer body, fit to show: JSON fields `Message`,
/// `ErrorMessage`, `error_description`, `message`, `error`, JSON:API `errors[0].detail|title`,
/// or an excerpt of a plain-text body — redacted (with any token or secret the answer itself
/// carries) and cut to [`crate::vocab::redact::DETAIL_MAX_CHARS`]. The one place a vendor's words
/// become an error detail.
pub fn vendor_detail(body: &[u8], redactor: &Redactor) -> String {
    match serde_json::from_slice::<Value>(body) {
        Ok(doc) => redactor
            .with_answer_secrets(&doc)
            .detail(&json_message(&doc)),
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            if text.trim_start().starts_with('<') {
                String::new()
            } else {
                redactor.detail(text.trim())
            }
        }
    }
}

fn json_message(doc: &Value) -> String {
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

/// A string field at a JSON pointer (`/data/meta/accessToken`), or a `BadResponse` naming it.
pub fn string_at<'a>(doc: &'a Value, pointer: &str) -> Result<&'a str, CredentialError> {
    doc.pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| CredentialError::BadResponse(format!("no string at `{pointer}`")))
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
    // Years beyond 9999 are absurd; refusing them keeps the arithmetic below in range.
    if !(1970..=9999).contains(&year) {
        return None;
    }
    let (clock, offset_secs) = if let Some(c) = time.strip_suffix(['Z', 'z']) {
        (c, 0)
    } else if let Some(pos) = time.rfind(['+', '-']) {
        let (h, m) = time[pos + 1..]
            .split_once(':')
            .unwrap_or((&time[pos + 1..], "0"));
        let sign = if time.as_bytes()[pos] == b'-' { -1 } else { 1 };
        let (h, m) = (num(h)?, num(m)?);
        if h > 23 || m > 59 {
            return None;
        }
        (&time[..pos], sign * (h * 3600 + m * 60))
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
    UNIX_EPOCH.checked_add(Duration::new(secs, u32::try_from(nanos).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vendor_messages_are_extracted_and_redacted() {
        let r = Redactor::new(["pw-1"]);
        assert_eq!(
            vendor_detail(br#"{"Message":"Bad creds"}"#, &r),
            "Bad creds"
        );
        assert_eq!(
            vendor_detail(br#"{"errors":[{"title":"Locked"}]}"#, &r),
            "Locked"
        );
        assert_eq!(vendor_detail(b"invalid client\n", &r), "invalid client");
        assert_eq!(vendor_detail(b"<html>oops</html>", &r), "");
        assert_eq!(
            vendor_detail(b"rejected: password=pw-1&x=1", &r),
            "rejected: password=***&x=1"
        );
        assert_eq!(
            vendor_detail(br#"{"token":"tok-9","message":"tok-9 is bad"}"#, &r),
            "*** is bad"
        );
    }

    #[test]
    fn refusals_of_the_secret_are_final_and_outages_are_not() {
        let e = classify_error(401, br#"{"error":"invalid_client"}"#, &Redactor::default());
        assert!(e.is_final());
        assert_eq!(e.vendor_error(), Some("invalid_client"));
        let e = classify_error(403, br#"{"error":"invalid_grant"}"#, &Redactor::default());
        assert_eq!(e.vendor_error(), Some("invalid_grant"));
        let e = classify_error(400, b"invalid client credentials", &Redactor::default());
        assert!(e.is_final() && e.vendor_error().is_none());
        assert!(
            classify_error(400, br#"{"error":"s3cret-echo"}"#, &Redactor::default())
                .vendor_error()
                .is_none()
        );
        assert!(!classify_error(
            503,
            br#"{"error":"invalid_client_temporarily"}"#,
            &Redactor::default()
        )
        .is_final());
        assert!(!classify_error(500, b"oops", &Redactor::default()).is_final());
        assert!(!classify_error(429, b"slow down", &Redactor::default()).is_final());
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
        assert!(parse_timestamp("99999999999-01-01T00:00:00Z").is_none());
        assert!(parse_timestamp("2030-01-01T99999999999999:00:00Z").is_none());
        assert!(parse_timestamp("2030-01-01T00:00:00+99999999999:00").is_none());
    }
}
