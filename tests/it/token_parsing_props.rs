//! Property tests for token-response parsing: no input from a token endpoint — body, number,
//! timestamp or JWT — panics, every lifetime lands inside the expiry policy's bounds, and no
//! error detail shows a configured secret.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use authrelay::credentials::exchange::{self, EndpointAnswer};
use authrelay::expiry::{self, Stated, MAX_LIFETIME};
use authrelay::vocab::redact::{Redactor, DETAIL_MAX_CHARS};
use base64::Engine;
use proptest::prelude::*;

/// Any number a vendor could send, biased towards the absurd.
fn vendor_number() -> impl Strategy<Value = f64> {
    prop_oneof![
        any::<f64>(),
        Just(f64::NAN),
        Just(f64::INFINITY),
        Just(f64::NEG_INFINITY),
        Just(1e20),
        Just(1.8e19),
        Just(-1.0),
        -1e6f64..1e6,
    ]
}

fn latest_allowed() -> SystemTime {
    SystemTime::now() + MAX_LIFETIME + Duration::from_secs(1)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn any_stated_lifetime_stays_within_the_policy(secs in vendor_number(), token in ".{0,40}") {
        let before = SystemTime::now();
        let at = expiry::expires_at(&token, [Some(Stated::Seconds(secs))]);
        prop_assert!(at >= before + expiry::MIN_LIFETIME);
        prop_assert!(at <= latest_allowed());
    }

    #[test]
    fn any_jwt_exp_is_read_without_panic(exp in vendor_number(), claims in "[ -~]{0,30}") {
        let enc = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let number = serde_json::Number::from_f64(exp)
            .map(|n| n.to_string())
            .unwrap_or_else(|| "null".into());
        for payload in [format!(r#"{{"exp":{number}}}"#), claims.clone()] {
            let jwt = format!("{}.{}.sig", enc(r#"{"alg":"RS256"}"#), enc(&payload));
            let at = expiry::expires_at(&jwt, [None]);
            prop_assert!(at <= latest_allowed());
        }
    }

    #[test]
    fn any_timestamp_text_parses_or_not_without_panic(text in "\\PC{0,40}", digits in "[0-9]{1,25}") {
        let _ = exchange::parse_timestamp(&text);
        for candidate in [
            format!("{digits}-01-01T00:00:00Z"),
            format!("2030-{digits}-01T00:00:00Z"),
            format!("2030-01-01T{digits}:00:00Z"),
            format!("2030-01-01T00:00:00.{digits}Z"),
            format!("2030-01-01T00:00:00+{digits}:00"),
        ] {
            if let Some(at) = exchange::parse_timestamp(&candidate) {
                prop_assert!(at >= UNIX_EPOCH);
            }
            if let Some(at) = exchange::parse_timestamp(&candidate).map(Stated::At) {
                prop_assert!(expiry::expires_at("t", [Some(at)]) <= latest_allowed());
            }
        }
    }

    #[test]
    fn any_body_is_parsed_or_refused_without_panic(body in proptest::collection::vec(any::<u8>(), 0..512)) {
        let answer = EndpointAnswer {
            status: 200,
            content_type: "application/json".into(),
            body: bytes::Bytes::from(body),
        };
        if let Ok(doc) = answer.json() {
            let _ = exchange::string_at(&doc, "/access_token");
            let _ = Stated::seconds_at(&doc, "/expires_in");
        }
        let _ = answer.text();
    }

    #[test]
    fn error_details_never_show_a_secret(
        secret in "[A-Za-z0-9]{8,24}",
        before in "\\PC{0,300}",
        after in "\\PC{0,300}",
        wrap in 0..4usize,
    ) {
        let redactor = Redactor::new([secret.as_str()]);
        let echoed = format!("{before}{secret}{after}");
        let body = match wrap {
            0 => echoed,
            1 => serde_json::json!({"error_description": echoed}).to_string(),
            2 => serde_json::json!({"errors": [{"detail": echoed}]}).to_string(),
            _ => format!("client_secret={}", serde_urlencoded::to_string([("x", echoed.as_str())]).unwrap()),
        };
        let detail = exchange::vendor_detail(body.as_bytes(), &redactor);
        prop_assert!(!detail.contains(&secret), "{detail}");
        prop_assert!(detail.chars().count() <= DETAIL_MAX_CHARS);
    }
}
