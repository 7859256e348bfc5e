//! Tokens a person consents to (`type: oauth2_authorization_code`, `oauth2_device_code`),
//! against a real authorization server: oidc-provider (npm), started by each test on a free
//! loopback port from `tests/oidc/provider.mjs`, with PKCE required, the device grant on
//! (polling paced as RFC 8628 says) and refresh tokens rotating on every use (a dead one
//! presented revokes the grant). The tests play the person's browser with plain HTTP
//! requests through its development login and consent pages (and the device grant's code
//! pages), and run `authrelay authorize` / `revoke` as a person would.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::Value;

use crate::support;

const BIN: &str = env!("CARGO_BIN_EXE_authrelay");
/// 32 bytes, base64.
const KEY: &str = "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=";

/// A child process killed (SIGKILL) and reaped when dropped.
struct Owned(Child);

impl Drop for Owned {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// oidc-provider running under Node; killed on drop.
struct AuthServer {
    _process: Owned,
    port: u16,
}

impl AuthServer {
    /// Starts the server, or `None` (with the reason printed) where Node or the package is
    /// not installed (`.ci/run` installs both).
    fn start(redirect_uri: &str, access_token_seconds: u32) -> Option<Self> {
        Self::start_polling(redirect_uri, access_token_seconds, 1)
    }

    /// [`Self::start`], the device grant stating `poll_seconds` as its interval.
    fn start_polling(
        redirect_uri: &str,
        access_token_seconds: u32,
        poll_seconds: u32,
    ) -> Option<Self> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let modules = root.join("target/oidc/node_modules");
        if !modules.join("oidc-provider").is_dir() {
            eprintln!(
                "consent: oidc-provider not in {}; skipping (.ci/run installs it)",
                modules.display()
            );
            return None;
        }
        let mut child = match Command::new("node")
            .arg(root.join("tests/oidc/provider.mjs"))
            .arg(&modules)
            .arg(redirect_uri)
            .arg(access_token_seconds.to_string())
            .arg(poll_seconds.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
        {
            Ok(c) => Owned(c),
            Err(e) => {
                eprintln!("consent: cannot run node ({e}); skipping");
                return None;
            }
        };
        let mut line = String::new();
        BufReader::new(child.0.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("oidc-provider did not start: {line:?}"))
            .trim()
            .parse()
            .unwrap();
        Some(Self {
            _process: child,
            port,
        })
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    async fn stats(&self) -> Value {
        support::direct_client()
            .get(format!("{}/__test/stats", self.url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Waits until no token request is being answered (one whose caller was killed
    /// included), so that the counts are final.
    async fn settled(&self) {
        for _ in 0..500 {
            if self.stats().await["in_flight"] == 0 {
                return;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("a token request never finished");
    }

    /// The next device poll is answered `slow_down` (a vendor under load).
    async fn slow_down_next_poll(&self) {
        let r = support::direct_client()
            .post(format!("{}/__test/slow-down", self.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }

    async fn revoke_grants(&self) {
        let r = support::direct_client()
            .post(format!("{}/__test/revoke-grants", self.url()))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
}

/// A loopback port nothing listens on right now, for the redirect_uri.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One test's world: the authorization server, and a config file using it with a file
/// token store in a folder of its own.
struct World {
    server: AuthServer,
    dir: tempfile::TempDir,
    yaml: String,
    config: PathBuf,
    /// The credential the route uses: `idp` (code grant) or `tv` (device grant).
    name: &'static str,
}

/// How the person consents in a test.
#[derive(Clone, Copy, PartialEq)]
enum Person {
    Consents,
    Declines,
}

impl World {
    fn new(access_token_seconds: u32) -> Option<Self> {
        let redirect = format!("http://127.0.0.1:{}/callback", free_port());
        let server = AuthServer::start(&redirect, access_token_seconds)?;
        Some(Self::around(server, &redirect, "idp"))
    }

    /// A world whose route uses the device grant credential `tv`.
    fn device(access_token_seconds: u32) -> Option<Self> {
        let redirect = format!("http://127.0.0.1:{}/callback", free_port());
        let server = AuthServer::start(&redirect, access_token_seconds)?;
        Some(Self::around(server, &redirect, "tv"))
    }

    fn around(server: AuthServer, redirect: &str, name: &'static str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("tokens.json");
        let yaml = format!(
            "admin: 127.0.0.1:0
tokens:
  backoff_initial: 50ms
  backoff_max: 200ms
token_cache:
  type: file
  path: {store}
  encryption_key: {KEY}
credentials:
  idp:
    type: oauth2_authorization_code
    authorize_url: {url}/auth
    token_url: {url}/token
    revocation_url: {url}/token/revocation
    client_id: app
    client_secret: app-secret-value
    scopes: [openid]
    redirect_uri: {redirect}
  tv:
    type: oauth2_device_code
    device_authorization_url: {url}/device/auth
    token_url: {url}/token
    revocation_url: {url}/token/revocation
    client_id: app
    client_secret: app-secret-value
    scopes: [openid]
routes:
  - name: api
    host: \"127.0.0.1:{port}\"
    credential: {name}
",
            store = store.display(),
            url = server.url(),
            port = server.port,
        );
        let config = dir.path().join("routes.yaml");
        std::fs::write(&config, format!("listen: 127.0.0.1:0\n{yaml}")).unwrap();
        Self {
            server,
            dir,
            yaml,
            config,
            name,
        }
    }

    /// The same world with `from` replaced by `to` in its config.
    fn changed(mut self, from: &str, to: &str) -> Self {
        assert!(self.yaml.contains(from), "{from}");
        self.yaml = self.yaml.replace(from, to);
        std::fs::write(&self.config, format!("listen: 127.0.0.1:0\n{}", self.yaml)).unwrap();
        self
    }

    /// The world's `token_cache` section (its file), and one for `redis` instead.
    fn token_caches(&self, redis: &support::redis::RedisServer) -> (String, String) {
        let file = format!(
            "token_cache:\n  type: file\n  path: {}\n  encryption_key: {KEY}\n",
            self.dir.path().join("tokens.json").display()
        );
        let redis = format!(
            "token_cache:\n  type: redis\n  url: {}\n  encryption_key: {KEY}\n",
            redis.url()
        );
        (file, redis)
    }

    /// `authrelay authorize NAME --json`, with the person's browser played in between.
    async fn authorize(&self) {
        let (success, last) = self.authorize_as(Person::Consents).await;
        assert!(success, "authorize failed: {last}");
        let done: Value = serde_json::from_str(last.lines().next().unwrap_or_default())
            .unwrap_or_else(|_| panic!("authorize printed {last:?}"));
        assert_eq!(done, serde_json::json!({"authorized": self.name}));
    }

    /// `authrelay authorize NAME --json` with the person acting as `person`: whether it
    /// exited 0, and what it printed after the first line (and on stderr).
    async fn authorize_as(&self, person: Person) -> (bool, String) {
        let mut cli = Command::new(BIN)
            .args(["authorize", self.name, "--json", "--config"])
            .arg(&self.config)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(cli.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let first: Value =
            serde_json::from_str(&line).unwrap_or_else(|_| panic!("authorize printed {line:?}"));
        let url = match first["open"].as_str() {
            Some(url) => url.to_string(),
            None => {
                let user_code = first["user_code"].as_str().expect("a user code");
                assert!(first["verification_uri"]
                    .as_str()
                    .is_some_and(|u| u.starts_with(&self.server.url())));
                let complete = first["verification_uri_complete"].as_str().unwrap();
                assert!(complete.contains("user_code="), "{first}");
                format!(
                    "{}?user_code={}",
                    first["verification_uri"].as_str().unwrap(),
                    user_code
                )
            }
        };
        let landed = play_browser(&url, person).await;
        if person == Person::Consents {
            assert_eq!(landed, 200, "the browser reached the end of the consent");
        }
        let mut stderr = cli.stderr.take().unwrap();
        let (status, rest) = tokio::task::spawn_blocking(move || {
            let mut rest = String::new();
            std::io::Read::read_to_string(&mut out, &mut rest).unwrap();
            std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
            (cli.wait().unwrap(), rest)
        })
        .await
        .unwrap();
        (status.success(), rest)
    }

    async fn proxy(&self) -> support::Proxy {
        support::proxy(&self.yaml).await
    }

    fn api(&self) -> String {
        format!("{}/api/whoami", self.server.url())
    }
}

/// `POST /credentials/NAME/authorize` on `proxy`'s admin listener, with `token` as the
/// admin token and `origin` as a browser's `Origin` header: the status and the answer.
async fn admin_authorize(
    proxy: &support::Proxy,
    name: &str,
    token: Option<&str>,
    origin: Option<&str>,
) -> (u16, Value) {
    let admin = proxy.running.as_ref().unwrap().admin_addr.unwrap();
    let mut request =
        support::direct_client().post(format!("http://{admin}/credentials/{name}/authorize"));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    if let Some(origin) = origin {
        request = request.header("origin", origin);
    }
    let r = request.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Requests through every client at once, round after round, each answered 200 for the
/// person who consented, until the vendor has rotated the refresh token `rotations` times;
/// the vendor never saw a refresh token twice.
async fn steady_traffic(world: &World, clients: &[reqwest::Client], rotations: u64) {
    let mut round = 0;
    while world.server.stats().await["refreshes"].as_u64().unwrap() < rotations {
        let answers =
            futures_util::future::join_all(clients.iter().map(|c| c.get(world.api()).send())).await;
        for answer in answers {
            let answer = answer.unwrap();
            let status = answer.status().as_u16();
            let body: Value = answer.json().await.unwrap_or(Value::Null);
            assert_eq!(
                (status, &body["sub"]),
                (200, &Value::from("alice")),
                "round {round}: {body}"
            );
        }
        round += 1;
        assert!(round < 2000, "the access tokens never ran out");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let stats = world.server.stats().await;
    assert_eq!(
        stats["invalid_grants"], 0,
        "no refresh token was sent twice: {stats}"
    );
}

/// `authrelay revoke NAME`: whether it exited 0, and what it printed.
fn revoke(world: &World) -> (bool, String) {
    let out = Command::new(BIN)
        .args(["revoke", world.name, "--config"])
        .arg(&world.config)
        .output()
        .unwrap();
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), printed)
}

/// A fresh proxy answers the credential's requests 502 consent_required.
async fn assert_consent_required(world: &World) {
    let proxy = world.proxy().await;
    assert_answers_consent_required(get(&proxy, &world.api()).await);
    proxy.stop().await;
}

/// An answer (status, body) is 502 consent_required.
fn assert_answers_consent_required((status, body): (u16, Value)) {
    assert_eq!(
        (status, body["error"].as_str()),
        (502, Some("consent_required")),
        "{body}"
    );
}

/// Sends requests until one is answered 200 (the running proxy took up new tokens).
async fn until_served(proxy: &support::Proxy, url: &str) -> u16 {
    let mut status = 0;
    for _ in 0..200 {
        status = get(proxy, url).await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    status
}

/// Follows the authorization URL (or the device grant's verification URL with its code) as
/// a browser would: redirects with cookies, every form with its hidden fields — the device
/// code confirmation (or its Abort button when the person declines), the login form (any
/// login and password), the consent form — up to the redirect to the `redirect_uri` or the
/// device grant's success page, whose status is returned.
async fn play_browser(start: &str, person: Person) -> u16 {
    authrelay::upstream::install_crypto_provider();
    let http = reqwest::Client::builder()
        .no_proxy()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let mut cookies: HashMap<String, String> = HashMap::new();
    let mut url = reqwest::Url::parse(start).unwrap();
    let mut form: Option<Vec<(String, String)>> = None;
    for _ in 0..20 {
        let jar = cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let request = match form.take() {
            Some(fields) => http.post(url.clone()).form(&fields),
            None => http.get(url.clone()),
        };
        let response = request.header("cookie", jar).send().await.unwrap();
        for c in response.headers().get_all("set-cookie") {
            let pair = c.to_str().unwrap().split(';').next().unwrap();
            if let Some((k, v)) = pair.split_once('=') {
                cookies.insert(k.to_string(), v.to_string());
            }
        }
        let status = response.status().as_u16();
        if response.status().is_redirection() {
            let location = response.headers()["location"].to_str().unwrap().to_string();
            url = url.join(&location).unwrap();
            continue;
        }
        if url.path() == "/callback" {
            return status;
        }
        let page = response.text().await.unwrap();
        if page.contains("Sign-in Success") || page.contains("interrupted") {
            return status;
        }
        assert_eq!(status, 200, "{url}: {page}");
        let action = between(&page, "action=\"", "\"").expect("a form");
        let mut fields = hidden_fields(&page);
        let confirming = fields.iter().any(|(k, _)| k == "confirm");
        if confirming && person == Person::Declines {
            fields.retain(|(k, _)| k != "confirm");
            fields.push(("abort".into(), "yes".into()));
        }
        if fields.iter().any(|(k, v)| k == "prompt" && v == "login") {
            fields.push(("login".into(), "alice".into()));
            fields.push(("password".into(), "any".into()));
        }
        url = url.join(action).unwrap();
        form = Some(fields);
    }
    panic!("the browser never reached the redirect_uri");
}

/// The `<input type="hidden">` fields of a page, in order.
fn hidden_fields(page: &str) -> Vec<(String, String)> {
    page.split("<input type=\"hidden\" ")
        .skip(1)
        .filter_map(|rest| {
            let name = between(rest, "name=\"", "\"")?;
            let value = between(rest, "value=\"", "\"")?;
            Some((name.to_string(), value.to_string()))
        })
        .collect()
}

fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = text.find(start)? + start.len();
    let len = text[from..].find(end)?;
    Some(&text[from..from + len])
}

async fn get(proxy: &support::Proxy, url: &str) -> (u16, Value) {
    let r = proxy.client().get(url).send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Consent by code, then refresh tokens rotating under traffic: each rotation is stored
/// before use, so a restarted proxy carries on without the person and the server never
/// sees a dead refresh token.
#[tokio::test]
async fn consent_by_code_survives_rotations_and_restarts() {
    let Some(world) = World::new(3600) else {
        return;
    };
    world.authorize().await;
    assert_eq!(world.server.stats().await["codes"], 1);

    let proxy = world.proxy().await;
    let (status, body) = get(&proxy, &world.api()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["sub"], "alice");
    let slot = proxy.state().snapshot().slots["idp"].clone();
    for round in 1..=5 {
        slot.refresh_now().await.unwrap();
        let (status, body) = get(&proxy, &world.api()).await;
        assert_eq!(status, 200, "rotation {round}: {body}");
    }
    proxy.stop().await;

    // A new process: the stored (rotated) tokens, no person.
    let proxy = world.proxy().await;
    let (status, _) = get(&proxy, &world.api()).await;
    assert_eq!(status, 200);
    let slot = proxy.state().snapshot().slots["idp"].clone();
    slot.refresh_now().await.unwrap();
    let (status, _) = get(&proxy, &world.api()).await;
    assert_eq!(status, 200);
    let stats = world.server.stats().await;
    assert_eq!(stats["refreshes"], 6, "{stats}");
    assert_eq!(
        stats["invalid_grants"], 0,
        "no dead refresh token was ever sent: {stats}"
    );
    proxy.stop().await;
    let raw = std::fs::read_to_string(world.dir.path().join("tokens.json")).unwrap();
    assert!(
        !raw.contains("app-secret-value") && raw.contains("\"idp\""),
        "{raw}"
    );
}

/// Without consent the credential answers 502 consent_required, naming it, and calls no
/// token endpoint; `authorize` cures it without a restart.
#[tokio::test]
async fn missing_consent_is_answered_without_calling_the_vendor_and_cured_by_authorize() {
    let Some(world) = World::new(3600) else {
        return;
    };
    let proxy = world.proxy().await;
    for _ in 0..3 {
        let (status, body) = get(&proxy, &world.api()).await;
        assert_eq!(status, 502, "{body}");
        assert_eq!(body["error"], "consent_required");
        assert_eq!(body["credential"], "idp");
        assert!(
            body["detail"]
                .as_str()
                .unwrap()
                .contains("authrelay authorize idp"),
            "{body}"
        );
    }
    assert_eq!(world.server.stats().await["token_calls"], 0);
    let admin = format!(
        "http://{}",
        proxy.running.as_ref().unwrap().admin_addr.unwrap()
    );
    let metrics = support::direct_client()
        .get(format!("{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = "authrelay_credential_needs_consent{credential=\"idp\"}";
    assert_eq!(support::metric(&metrics, series), 1.0, "{metrics}");
    let listed: Value = support::direct_client()
        .get(format!("{admin}/credentials"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed[0]["state"], "needs_consent", "{listed}");

    world.authorize().await;
    assert_eq!(
        until_served(&proxy, &world.api()).await,
        200,
        "the running proxy picked up the stored tokens"
    );
    proxy.stop().await;
}

/// A person withdrawing consent at the vendor: the refresh is refused (invalid_grant), the
/// credential needs consent (no retry storm), and `authorize` brings it back.
#[tokio::test]
async fn consent_withdrawn_at_the_vendor_needs_consent_again() {
    let Some(world) = World::new(3600) else {
        return;
    };
    world.authorize().await;
    let proxy = world.proxy().await;
    assert_eq!(get(&proxy, &world.api()).await.0, 200);
    world.server.revoke_grants().await;
    let slot = proxy.state().snapshot().slots["idp"].clone();
    let e = slot.refresh_now().await.unwrap_err();
    assert!(e.source.needs_consent(), "{e}");
    let calls = world.server.stats().await["token_calls"].clone();
    for _ in 0..3 {
        let (status, body) = get(&proxy, &world.api()).await;
        if status == 502 {
            assert_eq!(body["error"], "consent_required", "{body}");
        }
    }
    let stats = world.server.stats().await;
    assert!(
        stats["token_calls"].as_u64().unwrap() <= calls.as_u64().unwrap() + 1,
        "no retry storm: {stats}"
    );
    world.authorize().await;
    assert_eq!(until_served(&proxy, &world.api()).await, 200);
    proxy.stop().await;
}

/// `authrelay revoke` revokes the refresh token at the vendor (RFC 7009) and deletes the
/// stored tokens.
#[tokio::test]
async fn revoke_revokes_at_the_vendor_and_forgets() {
    let Some(world) = World::new(3600) else {
        return;
    };
    world.authorize().await;
    let (success, text) = revoke(&world);
    assert!(success, "{text}");
    assert!(
        text.contains("revoked at the vendor") && text.contains("deleted"),
        "{text}"
    );
    assert_consent_required(&world).await;
}

/// Consent by device code (the person enters the code shown on another device), then
/// steady traffic while two-second access tokens run out again and again: every rotated
/// refresh token is adopted and stored before use, no request of the app sees a 401, and
/// a restarted proxy carries on without the person.
#[tokio::test]
async fn consent_by_device_code_and_steady_traffic_across_rotations() {
    let Some(world) = World::device(2) else {
        return;
    };
    world.authorize().await;
    let stats = world.server.stats().await;
    assert_eq!(stats["devices"], 1, "{stats}");
    assert_eq!(
        stats["too_fast"], 0,
        "polled at the stated interval: {stats}"
    );

    let proxy = world.proxy().await;
    steady_traffic(&world, &[proxy.client()], 5).await;
    proxy.stop().await;

    let proxy = world.proxy().await;
    for _ in 0..3 {
        let (status, body) = get(&proxy, &world.api()).await;
        assert_eq!(status, 200, "after a restart: {body}");
    }
    proxy.stop().await;
    let stats = world.server.stats().await;
    assert_eq!(
        stats["invalid_grants"], 0,
        "no dead refresh token was sent: {stats}"
    );
}

/// RFC 8628 polling: a `slow_down` adds five seconds to the interval (the server answers
/// `slow_down` again to any poll sooner than that), and a person who declines ends
/// `authorize` with `access_denied` and nothing stored.
#[tokio::test]
async fn device_polling_honours_slow_down_and_a_refusal() {
    let Some(world) = World::device(3600) else {
        return;
    };
    world.server.slow_down_next_poll().await;
    world.authorize().await;
    let stats = world.server.stats().await;
    assert_eq!(stats["slow_downs"], 1, "only the one asked for: {stats}");
    assert_eq!(stats["too_fast"], 0, "{stats}");

    let (success, text) = revoke(&world);
    assert!(success, "{text}");
    let (success, printed) = world.authorize_as(Person::Declines).await;
    assert!(!success, "{printed}");
    assert!(printed.contains("access_denied"), "{printed}");
    assert_consent_required(&world).await;
}

/// An idle credential is still refreshed every `keepalive_refresh` (vendors expire refresh
/// tokens left unused): no request is made, yet the refresh token rotates, each rotation
/// stored, and the first request after the idle spell is served.
#[tokio::test]
async fn an_idle_credential_is_refreshed_every_keepalive_period() {
    let Some(world) = World::device(3600) else {
        return;
    };
    let world = world.changed(
        "    scopes: [openid]\nroutes:",
        "    scopes: [openid]\n    keepalive_refresh: 1s\nroutes:",
    );
    world.authorize().await;
    let proxy = world.proxy().await;
    let mut refreshes = 0;
    for _ in 0..200 {
        refreshes = world.server.stats().await["refreshes"].as_u64().unwrap();
        if refreshes >= 3 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(refreshes >= 3, "idle, yet refreshed: {refreshes}");
    let (status, body) = get(&proxy, &world.api()).await;
    assert_eq!(status, 200, "{body}");
    proxy.stop().await;
    let stats = world.server.stats().await;
    assert_eq!(stats["invalid_grants"], 0, "{stats}");
}

/// Consent through the running proxy's admin listener, behind its admin token and refused
/// to web pages: the answer is the URL (code grant, whose callback the proxy serves on the
/// loopback `redirect_uri`) or the user code (device grant), and the proxy serves with the
/// new tokens without a restart.
#[tokio::test]
async fn the_admin_listener_starts_consent_and_the_running_proxy_takes_the_tokens() {
    let Some(world) = World::new(3600) else {
        return;
    };
    let world = world.changed(
        "admin: 127.0.0.1:0\n",
        "admin: 127.0.0.1:0\nadmin_token: adm-9f3\n",
    );
    let proxy = world.proxy().await;
    assert_eq!(get(&proxy, &world.api()).await.0, 502);

    let (status, body) = admin_authorize(&proxy, "idp", None, None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("admin_token_required"))
    );
    let (status, body) =
        admin_authorize(&proxy, "idp", Some("adm-9f3"), Some("https://evil.test")).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("cross_origin_refused"))
    );
    let (status, body) = admin_authorize(&proxy, "nope", Some("adm-9f3"), None).await;
    assert_eq!(status, 404, "{body}");

    let (status, body) = admin_authorize(&proxy, "idp", Some("adm-9f3"), None).await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["credential"], "idp");
    let url = body["open"].as_str().expect("the URL to open").to_string();
    assert_eq!(play_browser(&url, Person::Consents).await, 200);
    assert_eq!(until_served(&proxy, &world.api()).await, 200);
    proxy.stop().await;
}

/// The device grant through the admin listener: the answer carries the user code.
#[tokio::test]
async fn the_admin_listener_answers_the_device_user_code() {
    let Some(world) = World::device(3600) else {
        return;
    };
    let proxy = world.proxy().await;
    let (status, body) = admin_authorize(&proxy, "tv", None, None).await;
    assert_eq!(status, 202, "{body}");
    let code = body["user_code"].as_str().expect("a user code");
    let url = format!(
        "{}?user_code={code}",
        body["verification_uri"].as_str().unwrap()
    );
    assert_eq!(play_browser(&url, Person::Consents).await, 200);
    assert_eq!(until_served(&proxy, &world.api()).await, 200);
    let stats = world.server.stats().await;
    assert_eq!(stats["too_fast"], 0, "{stats}");
    proxy.stop().await;
}

/// The proxy binary on a fixed loopback port, killed with SIGKILL when dropped.
struct ProxyProcess {
    _process: Owned,
    port: u16,
}

impl ProxyProcess {
    /// Starts `authrelay --config` on `world`'s config listening on a free port, and waits
    /// until it accepts connections.
    async fn start(world: &World) -> Self {
        let port = free_port();
        let config = world.dir.path().join(format!("process-{port}.yaml"));
        let yaml = world.yaml.replace("admin: 127.0.0.1:0\n", "");
        std::fs::write(&config, format!("listen: 127.0.0.1:{port}\n{yaml}")).unwrap();
        let process = Self {
            _process: Owned(
                Command::new(BIN)
                    .arg("--config")
                    .arg(&config)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap(),
            ),
            port,
        };
        for _ in 0..500 {
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
            {
                return process;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        panic!("the proxy did not start");
    }

    fn client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .proxy(reqwest::Proxy::http(format!("http://127.0.0.1:{}", self.port)).unwrap())
            .build()
            .unwrap()
    }
}

/// SIGKILL at random moments while refresh tokens rotate (access tokens live one second,
/// so every process start refreshes, twice per round): consent is lost exactly when the
/// kill lands between the vendor's answer and the write of the rotated refresh token — the
/// vendor rotated (its count went up) but the sealed file did not change — and never
/// otherwise. Losses are cured by `authorize`, and counted.
#[tokio::test]
async fn sigkill_through_rotations_loses_consent_only_inside_the_window() {
    let Some(world) = World::device(1) else {
        return;
    };
    world.authorize().await;
    let store = world.dir.path().join("tokens.json");
    let (mut rounds, mut losses) = (0, 0);
    while world.server.stats().await["refreshes"].as_u64().unwrap() < 50 {
        rounds += 1;
        assert!(rounds < 200, "rotations stalled");
        let before = (
            world.server.stats().await["refreshes"].clone(),
            std::fs::read(&store).unwrap(),
        );
        let doomed = ProxyProcess::start(&world).await;
        let request = tokio::spawn(doomed.client().get(world.api()).send());
        let delay = rand::random_range(0..60);
        tokio::time::sleep(std::time::Duration::from_millis(delay)).await;
        drop(doomed);
        let _ = request.await;
        world.server.settled().await;
        let rotated = world.server.stats().await["refreshes"] != before.0;
        let in_window = rotated && std::fs::read(&store).unwrap() == before.1;

        let next = ProxyProcess::start(&world).await;
        let r = next.client().get(world.api()).send().await.unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap_or(Value::Null);
        drop(next);
        let lost = status == 502 && body["error"] == "consent_required";
        assert!(lost || status == 200, "round {rounds}: {status} {body}");
        assert_eq!(
            lost, in_window,
            "round {rounds}: consent lost only (and always) when the kill landed between \
             the vendor's answer and the store write"
        );
        if lost {
            losses += 1;
            world.authorize().await;
        }
    }
    eprintln!("sigkill: {rounds} rounds, {losses} consent losses (kills inside the window)");
}

/// An access token the vendor revokes early: the API answers 401, the proxy refreshes
/// (rotating the refresh token, stored first) and replays, and the app sees only the 200.
#[tokio::test]
async fn a_401_refreshes_and_replays_without_the_app_noticing() {
    let Some(world) = World::new(3600) else {
        return;
    };
    world.authorize().await;
    let proxy = world.proxy().await;
    assert_eq!(get(&proxy, &world.api()).await.0, 200);
    let out = Command::new(BIN)
        .args(["token", "idp", "--reveal", "--config"])
        .arg(&world.config)
        .output()
        .unwrap();
    let printed = String::from_utf8_lossy(&out.stdout);
    let access_token = printed
        .trim()
        .rsplit(' ')
        .next()
        .expect("the header value")
        .to_string();
    let revoked = support::direct_client()
        .post(format!("{}/token/revocation", world.server.url()))
        .form(&[
            ("token", access_token.as_str()),
            ("client_id", "app"),
            ("client_secret", "app-secret-value"),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), 200);
    let (status, body) = get(&proxy, &world.api()).await;
    assert_eq!(status, 200, "{body}");
    let stats = world.server.stats().await;
    assert_eq!(stats["refreshes"], 1, "{stats}");
    assert_eq!(stats["invalid_grants"], 0, "{stats}");
    proxy.stop().await;
}

/// Two proxies sharing one token file (replicas on one machine), steady traffic through
/// both while one-second access tokens run out: refreshes are serialized across the
/// processes, each reads the refresh token the other left, and the vendor never sees one
/// twice (a strict rotating vendor would revoke the grant).
#[tokio::test]
async fn two_processes_sharing_the_store_never_spend_a_refresh_token_twice() {
    let Some(world) = World::device(1) else {
        return;
    };
    world.authorize().await;
    let replicas = [
        ProxyProcess::start(&world).await,
        ProxyProcess::start(&world).await,
    ];
    let clients: Vec<reqwest::Client> = replicas.iter().map(ProxyProcess::client).collect();
    steady_traffic(&world, &clients, 10).await;
}

/// Three replicas on one Redis (`token_cache: type: redis`) sharing one rotating refresh
/// token, steady traffic through all three while one-second access tokens run out: the
/// replica holding the refresh lease refreshes, the others read what it wrote, the vendor
/// never sees a refresh token twice (no `invalid_grant`), and no request fails. Consent
/// itself was written into Redis by `authrelay authorize`.
#[tokio::test]
async fn three_replicas_on_redis_share_one_rotating_refresh_token() {
    let Some(world) = World::device(1) else {
        return;
    };
    let redis = support::redis::RedisServer::start();
    let (file_cache, redis_cache) = world.token_caches(&redis);
    let world = world.changed(&file_cache, &redis_cache);
    world.authorize().await;
    assert!(
        !world.dir.path().join("tokens.json").exists(),
        "the tokens went to Redis"
    );
    let replicas = [
        world.proxy().await,
        world.proxy().await,
        world.proxy().await,
    ];
    let clients: Vec<reqwest::Client> = replicas.iter().map(support::Proxy::client).collect();
    steady_traffic(&world, &clients, 10).await;
    for proxy in replicas {
        proxy.stop().await;
    }
}

/// A reload that moves `token_cache` (file to Redis, back, then a new key) moves the consent
/// credential's store with it. The grant is not carried over: the credential answers
/// consent_required instead of going on from the old store unseen, consent given into the
/// new store is taken up by the running proxy, back on the file its grant there is used
/// again, and under a rotated key the file's grant no longer opens.
#[tokio::test]
async fn a_reload_that_moves_token_cache_moves_the_consent_store() {
    let Some(world) = World::new(3600) else {
        return;
    };
    world.authorize().await;
    let proxy = world.proxy().await;
    assert_eq!(get(&proxy, &world.api()).await.0, 200);
    let reload = |world: &World| {
        proxy.write_config(&support::with_test_listen(&world.yaml));
        proxy.state().reload().unwrap();
    };

    let redis = support::redis::RedisServer::start();
    let (file_cache, redis_cache) = world.token_caches(&redis);
    let world = world.changed(&file_cache, &redis_cache);
    reload(&world);
    assert_answers_consent_required(get(&proxy, &world.api()).await);
    world.authorize().await;
    assert_eq!(until_served(&proxy, &world.api()).await, 200);

    let world = world.changed(&redis_cache, &file_cache);
    reload(&world);
    assert_eq!(get(&proxy, &world.api()).await.0, 200, "the file's grant");

    let rotated = file_cache.replace(KEY, "ZmVkY2JhOTg3NjU0MzIxMGZlZGNiYTk4NzY1NDMyMTA=");
    let world = world.changed(&file_cache, &rotated);
    reload(&world);
    assert_answers_consent_required(get(&proxy, &world.api()).await);
    proxy.stop().await;
}
