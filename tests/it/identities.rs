//! Whoever calls, whatever the API wants (issue #23): a credential per calling app
//! (`credential: {by_client, default}`), `type: basic`, and credentials sent in the query
//! string (`query_param`). Every test runs the proxy against in-process token endpoints and
//! origins on 127.0.0.1.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::support::server::{self, Origin, Seen};
use crate::support::{self, Proxy};

/// An OAuth2 client-credentials token endpoint holding several accounts: each `client_id`
/// has its own secret and its own token sequence (`tok-ID-N`). A wrong secret is refused with
/// `invalid_client`, the final refusal that makes a slot re-read its secret.
#[derive(Default)]
pub(crate) struct Accounts {
    secrets: Mutex<HashMap<String, String>>,
    issued: Mutex<HashMap<String, usize>>,
    refused: Mutex<usize>,
}

impl Accounts {
    pub(crate) fn new(accounts: &[(&str, &str)]) -> Arc<Self> {
        let this = Arc::new(Self::default());
        for (id, secret) in accounts {
            this.set_secret(id, secret);
        }
        this
    }

    /// Rotates an account's secret at the vendor.
    pub(crate) fn set_secret(&self, id: &str, secret: &str) {
        self.secrets
            .lock()
            .unwrap()
            .insert(id.to_string(), secret.to_string());
    }

    /// Tokens issued to `id` so far.
    pub(crate) fn issued(&self, id: &str) -> usize {
        self.issued.lock().unwrap().get(id).copied().unwrap_or(0)
    }

    /// Token requests refused for a wrong secret.
    pub(crate) fn refusals(&self) -> usize {
        *self.refused.lock().unwrap()
    }

    fn answer(&self, seen: &Seen) -> http::Response<http_body_util::Full<bytes::Bytes>> {
        let form: HashMap<String, String> =
            serde_urlencoded::from_bytes(&seen.body).unwrap_or_default();
        let id = form.get("client_id").cloned().unwrap_or_default();
        let known = self.secrets.lock().unwrap().get(&id).cloned();
        if known.is_none() || known.as_ref() != form.get("client_secret") {
            *self.refused.lock().unwrap() += 1;
            return server::json(401, serde_json::json!({"error": "invalid_client"}));
        }
        let mut issued = self.issued.lock().unwrap();
        let n = issued.entry(id.clone()).or_default();
        *n += 1;
        server::json(
            200,
            serde_json::json!({
                "access_token": format!("tok-{id}-{n}"),
                "token_type": "bearer",
                "expires_in": 3600,
            }),
        )
    }
}

/// Serves `accounts` at `/token`.
pub(crate) async fn token_endpoint(accounts: &Arc<Accounts>) -> Origin {
    let accounts = Arc::clone(accounts);
    server::serve(move |seen| {
        let answer = accounts.answer(&seen);
        async move { answer }
    })
    .await
}

/// An API that refuses (401) the `Authorization` values in `revoked` and answers 200 with
/// the value it got otherwise.
pub(crate) async fn api(revoked: Arc<Mutex<HashSet<String>>>) -> Origin {
    server::serve(move |seen| {
        let auth = seen.header("authorization");
        let status = if revoked.lock().unwrap().contains(&auth) {
            401
        } else {
            200
        };
        async move { server::respond(status, auth) }
    })
    .await
}

/// A credential section of `type: oauth2_client_credentials` for one account.
pub(crate) fn account_credential(
    name: &str,
    token_server: &Origin,
    id: &str,
    secret_line: &str,
) -> String {
    format!(
        "  {name}:\n    type: oauth2_client_credentials\n    token_url: {}/token\n    client_id: {id}\n    {secret_line}\n",
        token_server.url()
    )
}

const USERS: &str = "clients:\n  users:\n    billing-app:\n      password: pw-billing-3\n    crm-sync:\n      password: pw-crm-3\n    stranger:\n      password: pw-stranger-3\n";

/// Two accounts at one vendor; route `by-app` (path `/a`) gives each app its own, route
/// `with-default` (path `/b`) gives billing-app its own and everyone else the CRM account.
fn per_client_config(token_server: &Origin, api: &Origin) -> String {
    format!(
        "{USERS}credentials:\n{}{}routes:\n  - name: by-app\n    host: \"{api}\"\n    path_prefix: /a\n    credential:\n      by_client:\n        billing-app: acct_billing\n        crm-sync: acct_crm\n  - name: with-default\n    host: \"{api}\"\n    path_prefix: /b\n    credential: {{by_client: {{billing-app: acct_billing}}, default: acct_crm}}\n",
        account_credential("acct_billing", token_server, "billing", "client_secret: sec-billing-1"),
        account_credential("acct_crm", token_server, "crm", "client_secret: sec-crm-1"),
        api = api.addr,
    )
}

fn client_as(proxy: &Proxy, user: &str, password: &str) -> reqwest::Client {
    authrelay::upstream::install_crypto_provider();
    reqwest::Client::builder()
        .proxy(
            reqwest::Proxy::all(proxy.url())
                .unwrap()
                .basic_auth(user, password),
        )
        .build()
        .unwrap()
}

struct PerClient {
    accounts: Arc<Accounts>,
    revoked: Arc<Mutex<HashSet<String>>>,
    api: Origin,
    /// The config the proxy runs (another replica may start with it).
    yaml: String,
    proxy: Proxy,
}

impl PerClient {
    async fn start() -> Self {
        Self::start_with("", &[]).await
    }

    /// With top-level `settings` (an admin listener, a token cache) before the routes.
    async fn start_with(settings: &str, env: &[(&str, &str)]) -> Self {
        let accounts = Accounts::new(&[("billing", "sec-billing-1"), ("crm", "sec-crm-1")]);
        let token_server = token_endpoint(&accounts).await;
        let revoked = Arc::new(Mutex::new(HashSet::new()));
        let api = api(Arc::clone(&revoked)).await;
        let yaml = format!("{settings}{}", per_client_config(&token_server, &api));
        let proxy = support::proxy_with_env(&yaml, env).await;
        Self {
            accounts,
            revoked,
            api,
            yaml,
            proxy,
        }
    }

    async fn get(&self, user: &str, path: &str) -> (u16, String) {
        self.get_via(&self.proxy, user, path).await
    }

    /// `user`'s request for `path` through `proxy` (this one's, or another replica's).
    async fn get_via(&self, proxy: &Proxy, user: &str, path: &str) -> (u16, String) {
        let password = match user {
            "billing-app" => "pw-billing-3",
            "crm-sync" => "pw-crm-3",
            _ => "pw-stranger-3",
        };
        let response = client_as(proxy, user, password)
            .get(format!("{}{path}", self.api.url()))
            .send()
            .await
            .unwrap();
        (response.status().as_u16(), response.text().await.unwrap())
    }

    fn issued(&self) -> (usize, usize) {
        (self.accounts.issued("billing"), self.accounts.issued("crm"))
    }

    fn revoke(&self, header: &str) {
        self.revoked.lock().unwrap().insert(header.to_string());
    }
}

#[tokio::test]
async fn each_app_carries_its_own_vendor_account() {
    let (logs, _guard) = crate::access::capture_logs();
    let s = PerClient::start().await;
    assert_eq!(
        s.get("billing-app", "/a/invoices").await,
        (200, "Bearer tok-billing-1".into())
    );
    assert_eq!(
        s.get("crm-sync", "/a/contacts").await,
        (200, "Bearer tok-crm-1".into())
    );
    assert_eq!(
        s.get("billing-app", "/a/invoices").await,
        (200, "Bearer tok-billing-1".into()),
        "each account's token is cached in its own slot"
    );
    assert_eq!(
        (s.accounts.issued("billing"), s.accounts.issued("crm")),
        (1, 1)
    );
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let line_of = |user: &str| {
        text.lines()
            .find(|l| {
                l.contains(&format!("user=\"{user}\"")) || l.contains(&format!("user={user}"))
            })
            .unwrap_or_else(|| panic!("no access line for {user}: {text}"))
            .to_string()
    };
    assert!(
        line_of("billing-app").contains("credential=\"acct_billing\"")
            || line_of("billing-app").contains("credential=acct_billing"),
        "{text}"
    );
    assert!(line_of("crm-sync").contains("acct_crm"), "{text}");
    assert!(
        !text.contains("tok-billing-1") && !text.contains("sec-billing-1"),
        "{text}"
    );
}

#[tokio::test]
async fn a_client_without_an_entry_is_refused_before_any_token_is_fetched() {
    let s = PerClient::start().await;
    let (status, body) = s.get("stranger", "/a/invoices").await;
    assert_eq!(status, 403, "{body}");
    let body: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "client_not_allowed", "{body}");
    assert_eq!(body["route"], "by-app", "{body}");
    assert_eq!(s.api.count(), 0, "nothing reached the upstream");
    assert_eq!(
        (s.accounts.issued("billing"), s.accounts.issued("crm")),
        (0, 0)
    );
    assert_eq!(
        s.get("stranger", "/b/anything").await,
        (200, "Bearer tok-crm-1".into()),
        "the default serves clients without an entry"
    );
    assert_eq!(
        s.get("billing-app", "/b/anything").await,
        (200, "Bearer tok-billing-1".into())
    );
}

#[tokio::test]
async fn a_refused_token_refreshes_only_that_apps_credential() {
    let s = PerClient::start().await;
    assert_eq!(s.get("billing-app", "/a/x").await.1, "Bearer tok-billing-1");
    assert_eq!(s.get("crm-sync", "/a/x").await.1, "Bearer tok-crm-1");
    s.revoked
        .lock()
        .unwrap()
        .insert("Bearer tok-billing-1".into());
    assert_eq!(
        s.get("billing-app", "/a/x").await,
        (200, "Bearer tok-billing-2".into()),
        "refreshed and replayed"
    );
    assert_eq!(s.get("crm-sync", "/a/x").await.1, "Bearer tok-crm-1");
    assert_eq!(
        (s.accounts.issued("billing"), s.accounts.issued("crm")),
        (2, 1)
    );
}

#[tokio::test]
async fn check_lists_which_client_gets_which_credential() {
    let accounts = Accounts::new(&[]);
    let token_server = token_endpoint(&accounts).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.yaml");
    std::fs::write(&path, per_client_config(&token_server, &token_server)).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_authrelay"))
        .args(["--config", path.to_str().unwrap(), "check"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("route by-app: billing-app -> acct_billing, crm-sync -> acct_crm, any other client: refused (client_not_allowed)"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "route with-default: billing-app -> acct_billing, any other client -> acct_crm"
        ),
        "{stdout}"
    );
}

fn config_error(yaml: &str) -> String {
    let env = HashMap::<String, String>::new();
    authrelay::Config::from_yaml(yaml, Path::new("routes.yaml"), &env)
        .unwrap_err()
        .to_string()
}

#[test]
fn per_client_credentials_name_defined_users_and_credentials() {
    let base = format!(
        "{USERS}credentials:\n  a:\n    type: static\n    value: x\nroutes:\n  - name: r\n    host: api.example.com\n"
    );
    let e = config_error(&format!(
        "{base}    credential: {{by_client: {{billing-app: a, nobody: a}}}}\n"
    ));
    assert!(
        e.contains("`nobody` is not defined under `clients.users`"),
        "{e}"
    );
    assert!(e.contains("line 16 column"), "{e}");
    let e = config_error(&format!(
        "{base}    credential: {{by_client: {{billing-app: missing}}, default: gone}}\n"
    ));
    assert!(
        e.contains("routes[0] (r).credential: `missing` is not defined under `credentials`")
            && e.contains("`gone` is not defined"),
        "{e}"
    );
    let e = config_error(&format!("{base}    credential: {{by_client: {{}}}}\n"));
    assert!(e.contains("must name at least one client"), "{e}");
    let e = config_error(&format!("{base}    credential: {{by_clients: {{}}}}\n"));
    assert!(e.contains("line 16 column"), "{e}");
}

#[tokio::test]
async fn basic_credentials_reach_an_origin_that_checks_them() {
    use base64::Engine;
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("acct-7:pa ss:w0rd")
    );
    let wanted = expected.clone();
    let origin = server::serve(move |seen| {
        let status = if seen.header("authorization") == wanted {
            200
        } else {
            401
        };
        async move { server::respond(status, "") }
    })
    .await;
    let yaml = format!(
        "credentials:\n  legacy:\n    type: basic\n    username: acct-7\n    password: ${{LEGACY_PW}}\nroutes:\n  - name: legacy\n    host: \"{}\"\n    credential: legacy\n",
        origin.addr
    );
    let proxy = support::proxy_with_env(&yaml, &[("LEGACY_PW", "pa ss:w0rd")]).await;
    let response = proxy
        .client()
        .get(format!("{}/report", origin.url()))
        .header("authorization", "Basic bWluZTptaW5l")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(origin.last().header("authorization"), expected);
    assert_eq!(
        origin
            .last()
            .headers
            .get_all("authorization")
            .iter()
            .count(),
        1
    );
    let status = crate::support::direct_client()
        .get(format!("{}/report", origin.url()))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 401, "the origin really checks");
}

/// The query's `api_key` values as the origin received them.
fn api_keys(seen: &Seen) -> Vec<String> {
    let query = seen.target.split_once('?').map_or("", |(_, q)| q);
    serde_urlencoded::from_str::<Vec<(String, String)>>(query)
        .unwrap()
        .into_iter()
        .filter(|(k, _)| k == "api_key")
        .map(|(_, v)| v)
        .collect()
}

#[tokio::test]
async fn a_query_credential_replaces_the_clients_and_is_renewed_on_replay() {
    let (logs, _guard) = crate::access::capture_logs();
    let accounts = Accounts::new(&[("q app", "sec q&=1")]);
    let token_server = token_endpoint(&accounts).await;
    let revoked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let refused = Arc::clone(&revoked);
    let origin = server::serve(move |seen| {
        let keys = api_keys(&seen);
        let status = match keys.as_slice() {
            [key] if !refused.lock().unwrap().contains(key) => 200,
            _ => 401,
        };
        async move { server::respond(status, "") }
    })
    .await;
    let yaml = format!(
        "credentials:\n  q:\n    type: oauth2_client_credentials\n    token_url: {}/token\n    client_id: q app\n    client_secret: \"sec q&=1\"\n    query_param: api_key\nroutes:\n  - name: keyed\n    host: \"{}\"\n    credential: q\n",
        token_server.url(),
        origin.addr
    );
    let proxy = support::proxy(&yaml).await;
    let url = format!("{}/v1/items?api_key=mine&x=1&api%5Fkey=again", origin.url());
    let response = proxy.client().get(&url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let seen = origin.last();
    assert_eq!(api_keys(&seen), ["tok-q app-1"]);
    assert_eq!(seen.target, "/v1/items?x=1&api_key=tok-q%20app-1");
    assert_eq!(
        seen.header("authorization"),
        "",
        "no header besides the query"
    );

    revoked.lock().unwrap().insert("tok-q app-1".into());
    let response = proxy.client().get(&url).send().await.unwrap();
    assert_eq!(response.status(), 200);
    let requests = origin.requests();
    assert_eq!(requests.len(), 3, "refused once, replayed once");
    assert_eq!(api_keys(&requests[2]), ["tok-q app-2"]);
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        text.contains("route=\"keyed\"") || text.contains("route=keyed"),
        "{text}"
    );
    for secret in ["tok-q", "mine", "api_key", "sec q"] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
}

#[test]
fn query_param_is_a_plain_name_and_excludes_header() {
    let base = "credentials:\n  a:\n    type: static\n    value: x\n";
    let e = config_error(&format!("{base}    query_param: \"api key\"\nroutes: []\n"));
    assert!(
        e.contains("credentials.a.query_param: must be a parameter name"),
        "{e}"
    );
    let e = config_error(&format!(
        "{base}    query_param: key\n    header: X-Key\nroutes: []\n"
    ));
    assert!(
        e.contains("credentials.a.header: does not apply with `query_param`"),
        "{e}"
    );
}

/// `HMAC-SHA256(key, "{method} {path}")` as hex, what [`two_key_origin`] recomputes.
fn signature(key: &str, method: &str, path: &str) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_bytes());
    let tag = ring::hmac::sign(&key, format!("{method} {path}").as_bytes());
    tag.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// An origin holding two signing keys: it answers with the name of the key whose signature
/// `X-Signature` carries, and 401 when neither matches.
async fn two_key_origin() -> Origin {
    server::serve(|seen| async move {
        let path = seen
            .target
            .split('?')
            .next()
            .unwrap_or_default()
            .to_string();
        let sent = seen.header("x-signature");
        let key = [("billing", "key-billing-5"), ("crm", "key-crm-5")]
            .into_iter()
            .find(|(_, key)| signature(key, seen.method.as_str(), &path) == sent);
        match key {
            Some((name, _)) => server::respond(200, name),
            None => server::respond(401, "bad signature"),
        }
    })
    .await
}

#[tokio::test]
async fn each_app_signs_with_its_own_hmac_key() {
    let origin = two_key_origin().await;
    let signer = |name: &str, key: &str| {
        format!(
            "  {name}:\n    type: hmac\n    key: {key}\n    header: X-Signature\n    string_to_sign: \"{{method}} {{path}}\"\n"
        )
    };
    let yaml = format!(
        "{USERS}credentials:\n{}{}routes:\n  - name: signed\n    host: \"{}\"\n    credential: {{by_client: {{billing-app: sign_billing, crm-sync: sign_crm}}}}\n",
        signer("sign_billing", "key-billing-5"),
        signer("sign_crm", "key-crm-5"),
        origin.addr
    );
    let proxy = support::proxy(&yaml).await;
    let get = |user: &'static str, password: &'static str| {
        let client = client_as(&proxy, user, password);
        let url = format!("{}/v1/ledger?page=2", origin.url());
        async move {
            let r = client.get(url).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        }
    };
    assert_eq!(
        get("billing-app", "pw-billing-3").await,
        (200, "billing".into())
    );
    assert_eq!(get("crm-sync", "pw-crm-3").await, (200, "crm".into()));
    let (status, body) = get("stranger", "pw-stranger-3").await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("client_not_allowed"), "{body}");
    assert_eq!(origin.count(), 2, "the stranger reached nothing");
    let unsigned = crate::support::direct_client()
        .get(format!("{}/v1/ledger", origin.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(unsigned.status(), 401, "the origin really checks");
}

#[test]
fn query_param_does_not_apply_to_signing_types() {
    let e = config_error(
        "credentials:\n  s:\n    type: hmac\n    key: k\n    string_to_sign: \"{method}\"\n    query_param: sig\nroutes: []\n",
    );
    assert!(
        e.contains("credentials.s.query_param: does not apply to `type: hmac`"),
        "{e}"
    );
}

#[tokio::test]
async fn the_chosen_credentials_have_their_own_metrics_and_admin_entries() {
    let s = PerClient::start_with("admin: 127.0.0.1:0\n", &[]).await;
    let ok = |token: &str| (200, format!("Bearer {token}"));
    assert_eq!(s.get("billing-app", "/a/x").await, ok("tok-billing-1"));
    s.revoke("Bearer tok-billing-1");
    assert_eq!(s.get("billing-app", "/a/x").await, ok("tok-billing-2"));
    assert_eq!(s.get("crm-sync", "/a/x").await, ok("tok-crm-1"));
    let proxy = &s.proxy;

    let admin = format!(
        "http://{}",
        proxy.running.as_ref().unwrap().admin_addr.unwrap()
    );
    let text = |path: &'static str| {
        let url = format!("{admin}{path}");
        async move {
            let r = crate::support::direct_client()
                .get(url)
                .send()
                .await
                .unwrap();
            r.text().await.unwrap()
        }
    };
    let metrics = text("/metrics").await;
    let fetches = |credential: &str| {
        support::metric(
            &metrics,
            &format!(
                "authrelay_token_fetches_total{{credential=\"{credential}\",outcome=\"success\"}}"
            ),
        )
    };
    assert_eq!(
        (fetches("acct_billing"), fetches("acct_crm")),
        (2.0, 1.0),
        "{metrics}"
    );
    let replays = |credential: &str| {
        support::metric(
            &metrics,
            &format!(
                "authrelay_unauthorized_retries_total{{route=\"by-app\",credential=\"{credential}\",outcome=\"success\"}}"
            ),
        )
    };
    assert_eq!(
        (replays("acct_billing"), replays("acct_crm")),
        (1.0, 0.0),
        "{metrics}"
    );
    for credential in ["acct_billing", "acct_crm"] {
        let usable = format!("authrelay_credential_token_usable{{credential=\"{credential}\"}}");
        assert_eq!(support::metric(&metrics, &usable), 1.0, "{metrics}");
    }
    let list: serde_json::Value = serde_json::from_str(&text("/credentials").await).unwrap();
    let entries = list.as_array().unwrap();
    let names: Vec<&str> = entries.iter().filter_map(|e| e["name"].as_str()).collect();
    assert!(
        names.contains(&"acct_billing") && names.contains(&"acct_crm"),
        "{list}"
    );
    let listed = list.to_string() + &metrics;
    assert!(
        !listed.contains("tok-billing") && !listed.contains("sec-"),
        "{listed}"
    );
}

#[tokio::test]
async fn a_query_credential_shows_in_no_log_error_or_echoed_header() {
    let (logs, _guard) = crate::access::capture_logs();
    // An upstream that echoes the URL it was asked for, as redirects and pagination do.
    let echo = server::serve(|seen| async move {
        let mut response = server::respond(302, "");
        let here = format!("http://{}{}", seen.header("host"), seen.target);
        let headers = response.headers_mut();
        headers.insert("location", here.parse().unwrap());
        headers.insert(
            "link",
            format!("<{here}&page=2>; rel=\"next\"").parse().unwrap(),
        );
        response
    })
    .await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let closed_port = closed.local_addr().unwrap().port();
    drop(closed);
    let yaml = format!(
        "credentials:\n  k:\n    type: static\n    value: ${{KEY}}\n    query_param: api_key\nroutes:\n  - name: echo\n    mount: /echo\n    upstream: {}\n    credential: k\n  - name: down\n    mount: /down\n    upstream: http://127.0.0.1:{closed_port}\n    credential: k\n",
        echo.url()
    );
    const KEY: &str = "qk-8f3 a/b+c";
    let proxy = support::proxy_with_env(&yaml, &[("KEY", KEY)]).await;
    let client = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let response = client
        .get(format!("{}/echo/v1/items?x=1", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 302);
    assert_eq!(api_keys(&echo.last()), [KEY], "the upstream got the key");
    let mut shown = format!("{:?}", response.headers());
    let location = response.headers()["location"].to_str().unwrap().to_string();
    assert!(location.contains("api_key=***"), "{location}");
    let response = client
        .get(format!("{}/down/v1/items?api_key=mine", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    shown += &response.text().await.unwrap();
    shown += &String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(
        shown.contains("route=\"down\"") || shown.contains("route=down"),
        "{shown}"
    );
    for form in [KEY, "qk-8f3%20a%2Fb%2Bc", "qk-8f3+a%2Fb%2Bc", "qk-8f3"] {
        assert!(!shown.contains(form), "{form} in {shown}");
    }

    // Following the masked link goes through the proxy again, with the real key.
    let next = location.split_once("/v1/").unwrap().1;
    let response = client
        .get(format!("{}/echo/v1/{next}", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 302);
    assert_eq!(api_keys(&echo.last()), [KEY]);
}

/// Two replicas sharing tokens through a real Redis, each app on its own vendor account:
/// each account's token is fetched once for both replicas, and a token refused for one app
/// is refreshed once, for that app only, the other replica taking the new one from Redis.
#[tokio::test]
async fn replicas_share_each_chosen_credential_apart_through_redis() {
    let redis = crate::support::redis::RedisServer::start();
    let cache = format!(
        "token_cache:\n  type: redis\n  url: {}\n  encryption_key: ${{CACHE_KEY}}\n",
        redis.url()
    );
    let env = [("CACHE_KEY", "q1n0yF7l3bqk2JXk1pXkq0m8mB7c2fQkA6yO0u1ZxWg=")];
    let s = PerClient::start_with(&cache, &env).await;
    let one = &s.proxy;
    let two = support::proxy_with_env(&s.yaml, &env).await;
    let ok = |token: &str| (200, format!("Bearer {token}"));
    assert_eq!(
        s.get_via(one, "billing-app", "/a/x").await,
        ok("tok-billing-1")
    );
    assert_eq!(
        s.get_via(&two, "billing-app", "/a/x").await,
        ok("tok-billing-1")
    );
    assert_eq!(s.get_via(&two, "crm-sync", "/a/x").await, ok("tok-crm-1"));
    assert_eq!(s.get_via(one, "crm-sync", "/a/x").await, ok("tok-crm-1"));
    assert_eq!(s.issued(), (1, 1));

    s.revoke("Bearer tok-billing-1");
    assert_eq!(
        s.get_via(one, "billing-app", "/a/x").await,
        ok("tok-billing-2")
    );
    assert_eq!(
        s.get_via(&two, "billing-app", "/a/x").await,
        ok("tok-billing-2"),
        "the refused token's successor comes from Redis"
    );
    assert_eq!(s.get_via(&two, "crm-sync", "/a/x").await, ok("tok-crm-1"));
    assert_eq!(s.issued(), (2, 1));

    let keys: Vec<String> = redis
        .dump()
        .await
        .into_iter()
        .map(|(k, _)| String::from_utf8_lossy(&k).to_string())
        .filter(|k| k.starts_with("authrelay:token:"))
        .collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    for credential in ["acct_billing", "acct_crm"] {
        let prefix = format!("authrelay:token:{credential}:");
        assert!(keys.iter().any(|k| k.starts_with(&prefix)), "{keys:?}");
    }
}

#[tokio::test]
async fn a_reload_that_takes_a_credential_off_a_route_drops_its_replay_series() {
    let s = PerClient::start().await;
    let series = |credential: &str| {
        format!("authrelay_unauthorized_retries_total{{route=\"by-app\",credential=\"{credential}\",outcome=\"success\"}}")
    };
    let text = s.proxy.state().metrics.encode();
    assert!(
        text.contains(&series("acct_billing")) && text.contains(&series("acct_crm")),
        "{text}"
    );
    s.proxy
        .write_config(&s.yaml.replace("        crm-sync: acct_crm\n", ""));
    s.proxy.state().reload().unwrap();
    let text = s.proxy.state().metrics.encode();
    assert!(text.contains(&series("acct_billing")), "{text}");
    assert!(!text.contains(&series("acct_crm")), "{text}");
    assert_eq!(
        s.get("crm-sync", "/a/x").await.0,
        403,
        "crm-sync has no entry now"
    );
}
