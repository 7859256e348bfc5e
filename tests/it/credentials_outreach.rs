//! `type: outreach_s2s` and `type: jwt`: every lifecycle scenario against an Outreach
//! look-alike that verifies the app token's signature with the public key, the exact requests
//! it sees, and key files that are config errors naming the file, never its content.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;

use crate::support;
use crate::support::lifecycle::{self, Setup, TEST_TOKENS_YAML};
use crate::support::server::Origin;
use crate::support::vendor::{protected_api, TokenBook};
use crate::support::vendors::outreach::{self as vendor, APP_KEY, INSTALL_ID, OTHER_KEY, S2S_GUID};
use crate::support::vendors::{fixture, fixture_bytes};

const LIFETIME: Duration = Duration::from_secs(2);
/// `type: jwt` lifetime: `iat`/`exp` are whole seconds, so a token signed late in a second
/// loses up to 1 s; 3 s leaves 2–3 s, like the 2 s tokens of the other vendors, and a margin
/// for slow RSA signing in a debug build on a busy machine.
const JWT_LIFETIME: Duration = Duration::from_secs(3);

struct Outreach {
    setup: Setup,
    token_server: Origin,
}

/// A token lifetime long enough that no proactive refresh falls inside a 500-request burst
/// (which takes over a second on a busy 2-core machine in a debug build).
const BURST_LIFETIME: Duration = Duration::from_secs(30);

async fn outreach_with_key(key: &str) -> Outreach {
    outreach_with(key, LIFETIME).await
}

async fn outreach_with(key: &str, lifetime: Duration) -> Outreach {
    let book = TokenBook::new();
    let token_server = vendor::start(Arc::clone(&book), lifetime).await;
    let api = protected_api(Arc::clone(&book), "authorization", "Bearer", 401).await;
    let yaml = format!(
        "{TEST_TOKENS_YAML}credentials:
  outreach:
    type: outreach_s2s
    s2s_guid: \"{S2S_GUID}\"
    private_key_file: \"{}\"
    install_id: \"{INSTALL_ID}\"
    base_url: {}
routes:
  - name: outreach-api
    host: \"{}\"
    credential: outreach
",
        fixture(key).display(),
        token_server.url(),
        api.addr
    );
    let proxy = support::proxy(&yaml).await;
    let url = format!("{}/api/v2/prospects", api.url());
    Outreach {
        setup: Setup {
            proxy,
            book,
            api,
            url,
            credential: "outreach".into(),
            calls_per_token: 1,
        },
        token_server,
    }
}

async fn outreach() -> Setup {
    outreach_with_key(APP_KEY).await.setup
}

/// `type: jwt` against an API that verifies the self-signed token itself. The API counts
/// each distinct token as a "token call", so the scenarios count signatures.
async fn self_signed() -> Setup {
    self_signed_with(JWT_LIFETIME).await
}

async fn self_signed_with(lifetime: Duration) -> Setup {
    let book = TokenBook::new();
    let api = vendor::app_token_api(Arc::clone(&book)).await;
    let yaml = format!(
        "{TEST_TOKENS_YAML}credentials:
  app:
    type: jwt
    issuer: \"{S2S_GUID}\"
    private_key_file: \"{}\"
    lifetime: {}s
    claims:
      purpose: setup
routes:
  - name: outreach-app
    host: \"{}\"
    credential: app
",
        fixture(APP_KEY).display(),
        lifetime.as_secs(),
        api.addr
    );
    let proxy = support::proxy(&yaml).await;
    let url = format!("{}/api/app/installs/setup-1/actions/setupToken", api.url());
    Setup {
        proxy,
        book,
        api,
        url,
        credential: "app".into(),
        calls_per_token: 1,
    }
}

mod outreach_s2s {
    use super::*;

    #[tokio::test]
    async fn first_request_gets_token() {
        lifecycle::first_request_gets_token(&outreach().await).await;
    }

    #[tokio::test]
    async fn refreshes_before_expiry() {
        lifecycle::refreshes_before_expiry(&outreach().await, LIFETIME).await;
    }

    #[tokio::test]
    async fn revoked_token_is_refreshed_and_body_replayed() {
        lifecycle::revoked_token_is_refreshed_and_body_replayed(&outreach().await).await;
    }

    #[tokio::test]
    async fn burst_causes_one_fetch() {
        let s = outreach_with(APP_KEY, BURST_LIFETIME).await.setup;
        lifecycle::burst_causes_one_fetch(&s, 500).await;
    }

    #[tokio::test]
    async fn failing_endpoint_backs_off_then_recovers() {
        lifecycle::failing_endpoint_backs_off_then_recovers(&outreach().await, 3).await;
    }
}

/// `type: jwt` has no token endpoint: `failing_endpoint_backs_off_then_recovers` does not
/// apply (signing cannot fail once the key passed validation). Single flight still does (one
/// signature for a burst), and `each_token_is_freshly_signed_and_accepted` checks signing.
mod jwt {
    use super::*;

    #[tokio::test]
    async fn first_request_gets_token() {
        lifecycle::first_request_gets_token(&self_signed().await).await;
    }

    #[tokio::test]
    async fn refreshes_before_expiry() {
        lifecycle::refreshes_before_expiry(&self_signed().await, JWT_LIFETIME).await;
    }

    #[tokio::test]
    async fn revoked_token_is_refreshed_and_body_replayed() {
        lifecycle::revoked_token_is_refreshed_and_body_replayed(&self_signed().await).await;
    }

    #[tokio::test]
    async fn burst_causes_one_fetch() {
        lifecycle::burst_causes_one_fetch(&self_signed_with(BURST_LIFETIME).await, 500).await;
    }

    #[tokio::test]
    async fn each_token_is_freshly_signed_and_accepted() {
        let s = self_signed().await;
        let client = s.proxy.client();
        let mut tokens = Vec::new();
        for _ in 0..3 {
            assert_eq!(client.get(&s.url).send().await.unwrap().status(), 200);
            tokens.push(s.api.last().header("authorization"));
            // Revoking forces the next request through refresh-and-retry: a new signature.
            tokio::time::sleep(Duration::from_millis(150)).await;
            s.book.revoke_all();
        }
        tokens.dedup();
        assert_eq!(tokens.len(), 3, "every refresh signs a new token");
        for presented in &tokens {
            let jwt = presented.strip_prefix("Bearer ").expect("`Bearer <jwt>`");
            let c = claims(jwt);
            assert_eq!(c["iss"], S2S_GUID);
            assert_eq!(c["purpose"], "setup");
            assert_eq!(
                c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(),
                JWT_LIFETIME.as_secs()
            );
            assert!(c["jti"].as_str().is_some_and(|j| j.len() == 32));
        }
        assert_eq!(
            s.book.api_stats().1,
            2,
            "only the revoked tokens were refused"
        );
    }
}

fn claims(jwt: &str) -> serde_json::Value {
    let payload = jwt.split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

#[tokio::test]
async fn vendor_sees_a_documented_app_token_and_api_a_bearer_token() {
    let o = outreach_with_key(APP_KEY).await;
    let res = o.setup.get().await;
    assert_eq!(res.status(), 200);
    let call = o.token_server.last();
    assert_eq!(call.method, "POST");
    assert_eq!(
        call.target,
        format!("/api/app/installs/{INSTALL_ID}/actions/accessToken")
    );
    let presented = call.header("authorization");
    let app_token = presented
        .strip_prefix("Bearer ")
        .expect("`Bearer <app token>`");
    let header = jsonwebtoken::decode_header(app_token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::RS256);
    let c = claims(app_token);
    let mut names: Vec<&String> = c.as_object().unwrap().keys().collect();
    names.sort();
    assert_eq!(
        names,
        ["exp", "iat", "iss"],
        "exactly the documented claims"
    );
    assert_eq!(c["iss"], S2S_GUID);
    assert_eq!(
        c["exp"].as_u64().unwrap() - c["iat"].as_u64().unwrap(),
        3600
    );
    let api_header = o.setup.api.last().header("authorization");
    assert!(
        api_header.starts_with("Bearer outreach-s2s-"),
        "{api_header}"
    );
}

#[tokio::test]
async fn unknown_key_gets_json_api_error_as_502_without_key_material() {
    let o = outreach_with_key(OTHER_KEY).await;
    let res = o.setup.get().await;
    assert_eq!(res.status(), 502);
    let body: serde_json::Value = res.json().await.unwrap();
    assert_eq!(body["error"], "credential_unavailable");
    assert_eq!(body["credential"], "outreach");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("401"), "{detail}");
    assert!(
        detail.contains("invalid app token"),
        "the JSON:API detail: {detail}"
    );
    assert!(
        !detail.contains("PRIVATE") && !detail.contains("eyJ"),
        "{detail}"
    );
    assert_eq!(o.setup.api.count(), 0);
}

fn load(yaml: &str, files: &[(&str, &[u8])]) -> Result<authrelay::Config, String> {
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content).unwrap();
    }
    let path = dir.path().join("routes.yaml");
    std::fs::write(&path, yaml).unwrap();
    let env = std::collections::HashMap::<String, String>::new();
    authrelay::Config::load(&path, &env).map_err(|e| e.to_string())
}

const OUTREACH_WITH_KEY_FILE: &str = "credentials:
  outreach:
    type: outreach_s2s
    s2s_guid: guid
    private_key_file: app.pem
    install_id: install-1
  app:
    type: jwt
    s2s_guid: guid
    private_key_file: app.pem
routes: []
";

#[tokio::test]
async fn a_bad_private_key_is_a_config_error_naming_the_file() {
    let garbage =
        b"-----BEGIN RSA PRIVATE KEY-----\nTk9UQUtFWW5vdGFrZXk=\n-----END RSA PRIVATE KEY-----\n";
    let ec_key = fixture_bytes("itsyou_es384_key.pem");
    for content in [&garbage[..], b"not pem at all", &ec_key] {
        let err = load(OUTREACH_WITH_KEY_FILE, &[("app.pem", content)]).unwrap_err();
        assert!(
            err.contains("credentials.outreach.private_key_file"),
            "{err}"
        );
        assert!(err.contains("credentials.app.private_key_file"), "{err}");
        assert!(err.contains("app.pem"), "names the file: {err}");
        assert!(err.contains("PEM RSA private key"), "{err}");
        assert!(
            !err.contains("Tk9UQUtF") && !err.contains("not pem at all") && !err.contains("MIG"),
            "no key content: {err}"
        );
    }
    let err = load(OUTREACH_WITH_KEY_FILE, &[]).unwrap_err();
    assert!(
        err.contains("app.pem") && err.contains("does not exist"),
        "{err}"
    );
}

#[tokio::test]
async fn both_pem_forms_load_and_debug_shows_no_key() {
    for key in [APP_KEY, OTHER_KEY] {
        let pem = fixture_bytes(key);
        let config = load(OUTREACH_WITH_KEY_FILE, &[("app.pem", &pem)]).unwrap();
        let debug = format!("{config:?}");
        assert!(debug.contains("app.pem"), "{debug}");
        assert!(
            !debug.contains("BEGIN") && !debug.contains("MII"),
            "{debug}"
        );
    }
}

#[tokio::test]
async fn jwt_config_rejects_reserved_claims_and_missing_issuer() {
    let yaml = "credentials:
  app:
    type: jwt
    private_key_file: app.pem
    claims:
      exp: 1
routes: []
";
    let err = load(yaml, &[("app.pem", &fixture_bytes(APP_KEY))]).unwrap_err();
    assert!(err.contains("credentials.app.issuer"), "{err}");
    assert!(err.contains("`exp` is set by authrelay"), "{err}");
}
