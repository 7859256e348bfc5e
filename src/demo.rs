//! `authrelay demo`: the proxy in front of a built-in mock vendor on 127.0.0.1, so that a
//! new user sees injection, expiry and refresh-and-retry live, offline, in one minute.
//!
//! The mock vendor speaks OAuth2 client credentials (RFC 6749 §4.4): `POST /oauth/token`
//! issues short-lived bearer tokens, `/v1/…` answers 401 to unknown or expired tokens, and
//! `POST /demo/revoke` revokes every token issued so far.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::state::StartError;
use crate::{Config, Running, StartOptions};

/// The demo vendor's OAuth client.
const CLIENT_ID: &str = "demo-client";

/// Where the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// The proxy listener (`127.0.0.1:8080` by default; port 0 picks a free one).
    pub listen: SocketAddr,
    /// The admin listener.
    pub admin: SocketAddr,
    /// How long the mock vendor's tokens live.
    pub token_lifetime: Duration,
}

/// A running demo: the proxy, the mock vendor, and what to try.
pub struct Demo {
    /// The proxy (shut it down to end the demo).
    pub running: Running,
    /// `http://127.0.0.1:PORT` of the mock vendor.
    pub vendor_url: String,
    token_lifetime: Duration,
}

/// Starts the mock vendor and the proxy in front of it.
pub async fn start(options: DemoOptions) -> Result<Demo, StartError> {
    let client_secret = format!("demo-secret-{:016x}", rand::random::<u64>());
    let vendor = Vendor::start(client_secret.clone(), options.token_lifetime).await?;
    let vendor_url = format!("http://{}", vendor.addr);
    let yaml = demo_yaml(&options, &vendor_url);
    let env: HashMap<String, String> =
        HashMap::from([("DEMO_CLIENT_SECRET".to_string(), client_secret.clone())]);
    let config = Config::from_yaml(&yaml, Path::new("<demo config>"), &env)?;
    let running = crate::start(
        config,
        StartOptions {
            config_path: None,
            env: Arc::new(env),
            watch: false,
        },
    )
    .await?;
    Ok(Demo {
        running,
        vendor_url,
        token_lifetime: options.token_lifetime,
    })
}

/// A demo listening beyond loopback (in a container) admits the private networks its
/// clients arrive from: it holds only the mock vendor's credential.
fn demo_clients(listen: std::net::SocketAddr) -> &'static str {
    if listen.ip().is_loopback() {
        ""
    } else {
        "clients:\n  allow_from: [127.0.0.0/8, \"::1\", 10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16, \"fc00::/7\"]\n"
    }
}

/// The config the demo runs, as a user would write it.
fn demo_yaml(options: &DemoOptions, vendor_url: &str) -> String {
    let credential = format!(
        "    type: oauth2_client_credentials\n    token_url: {vendor_url}/oauth/token\n    client_id: {CLIENT_ID}\n    client_secret: \"${{DEMO_CLIENT_SECRET}}\"\n    prefetch: true\n"
    );
    format!(
        "listen: {listen}\nadmin: {admin}\n{clients}unmatched: deny\ncredentials:\n  demo_api:\n{credential}routes:\n  - name: demo-forward\n    host: \"{vendor_host}\"\n    path_prefix: /v1/\n    credential: demo_api\n  - name: demo-mount\n    mount: /demo-api\n    upstream: {vendor_url}\n    credential: demo_api\n",
        listen = options.listen,
        admin = options.admin,
        clients = demo_clients(options.listen),
        vendor_host = vendor_url.trim_start_matches("http://"),
    )
}

impl Demo {
    /// What to type to watch the proxy work, with this demo's addresses.
    pub fn instructions(&self) -> String {
        let proxy = format!("http://{}", self.running.proxy_addr);
        let admin = self
            .running
            .admin_addr
            .map(|a| format!("http://{a}"))
            .unwrap_or_default();
        let vendor = &self.vendor_url;
        format!(
            "authrelay demo: proxy listening on {proxy}, mock vendor at {vendor}, admin at {admin}

The mock vendor issues bearer tokens that live {lifetime}s and answers 401 without one.
Try, in another terminal:

  # 1. The API refuses a request without a token:
  curl -i {vendor}/v1/hello

  # 2. Through the proxy (as HTTP_PROXY), the token is added for you:
  curl -x {proxy} {vendor}/v1/hello

  # 3. Or by base URL (mount mode), no proxy settings at all:
  curl {proxy}/demo-api/v1/hello

  # 4. Watch the credential: expiry, last refresh, fetch count (never the token):
  curl {admin}/credentials

  # 5. Revoke every token at the vendor; the next call gets a 401, which the proxy
  #    answers by fetching a new token and replaying the request — you still see 200:
  curl -X POST {vendor}/demo/revoke
  curl {proxy}/demo-api/v1/hello

  # 6. Wait {lifetime}s: tokens are replaced before they expire (token_number grows):
  sleep {lifetime}; curl {proxy}/demo-api/v1/hello

  # 7. Metrics (requests, token fetches, retries after 401):
  curl -s {admin}/metrics | grep -E 'requests|token_fetches|retries'

Press Ctrl-C to stop.",
            lifetime = self.lifetime_secs(),
        )
    }

    fn lifetime_secs(&self) -> u64 {
        self.token_lifetime.as_secs()
    }
}

/// The mock vendor's book of tokens.
struct Vendor {
    addr: SocketAddr,
}

#[derive(Default)]
struct Book {
    tokens: HashMap<String, (u64, Instant)>,
    issued: u64,
}

struct VendorState {
    client_secret: String,
    lifetime: Duration,
    book: Mutex<Book>,
}

impl Vendor {
    /// Always on loopback, whatever the proxy listens on: only the proxy needs to reach it.
    async fn start(client_secret: String, lifetime: Duration) -> Result<Self, StartError> {
        let bind_at = SocketAddr::from(([127, 0, 0, 1], 0));
        let bind_error = |source| StartError::Bind {
            addr: bind_at,
            source,
        };
        let listener = TcpListener::bind(bind_at).await.map_err(bind_error)?;
        let addr = listener.local_addr().map_err(bind_error)?;
        let state = Arc::new(VendorState {
            client_secret,
            lifetime,
            book: Mutex::new(Book::default()),
        });
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let state = Arc::clone(&state);
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let state = Arc::clone(&state);
                        async move { Ok::<_, Infallible>(state.answer(request).await) }
                    });
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { addr })
    }
}

impl VendorState {
    fn book(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|p| p.into_inner())
    }

    async fn answer(&self, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = request.into_parts();
        let body = body
            .collect()
            .await
            .map(|c| c.to_bytes())
            .unwrap_or_default();
        let path = parts.uri.path();
        match (&parts.method, path) {
            (&Method::POST, "/oauth/token") => self.token(&body),
            (&Method::POST, "/demo/revoke") => {
                let mut book = self.book();
                let revoked = book.tokens.len();
                book.tokens.clear();
                json(
                    StatusCode::OK,
                    serde_json::json!({ "revoked": revoked, "note": "every token issued so far is now refused" }),
                )
            }
            (_, p) if p.starts_with("/v1/") => self.api(&parts.headers, p),
            _ => json(
                StatusCode::NOT_FOUND,
                serde_json::json!({"error": "not found"}),
            ),
        }
    }

    fn token(&self, body: &[u8]) -> Response<Full<Bytes>> {
        let form: HashMap<String, String> = serde_urlencoded::from_bytes(body).unwrap_or_default();
        let field = |k: &str| form.get(k).map(String::as_str).unwrap_or_default();
        if field("grant_type") != "client_credentials" {
            return json(
                StatusCode::BAD_REQUEST,
                serde_json::json!({"error": "unsupported_grant_type"}),
            );
        }
        if field("client_id") != CLIENT_ID || field("client_secret") != self.client_secret {
            return json(
                StatusCode::UNAUTHORIZED,
                serde_json::json!({"error": "invalid_client"}),
            );
        }
        let mut book = self.book();
        book.issued += 1;
        let number = book.issued;
        let token = format!("demo{number}-{:032x}", rand::random::<u128>());
        book.tokens
            .insert(token.clone(), (number, Instant::now() + self.lifetime));
        json(
            StatusCode::OK,
            serde_json::json!({
                "access_token": token,
                "token_type": "bearer",
                "expires_in": self.lifetime.as_secs(),
            }),
        )
    }

    fn api(&self, headers: &http::HeaderMap, path: &str) -> Response<Full<Bytes>> {
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.to_string());
        let book = self.book();
        let now = Instant::now();
        let valid = presented
            .as_ref()
            .and_then(|t| book.tokens.get(t))
            .filter(|(_, expires)| now < *expires);
        match valid {
            Some((number, expires)) => json(
                StatusCode::OK,
                serde_json::json!({
                    "message": "hello from the demo API",
                    "path": path,
                    "token_number": number,
                    "token_expires_in_s": expires.saturating_duration_since(now).as_secs(),
                    "served_at": humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                }),
            ),
            None => {
                let error = if presented.is_some() {
                    "invalid or expired token"
                } else {
                    "missing bearer token"
                };
                json(
                    StatusCode::UNAUTHORIZED,
                    serde_json::json!({ "error": error }),
                )
            }
        }
    }
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(format!("{value}\n"))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
