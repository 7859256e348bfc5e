//! The admin listener (`admin: 127.0.0.1:9901`, off when absent): health, readiness,
//! Prometheus metrics and the state of every credential — never a token or secret — plus
//! three operator actions (refresh a credential now, drop its cached token, start a person's
//! consent). Actions are refused to web pages (a browser's cross-site request reaches
//! loopback too), need `admin_token` when it is set, never re-send a refused secret during
//! its backoff, and come at most once per [`ACTION_INTERVAL`] per credential. A plain hyper
//! HTTP/1 server and one route table: seven endpoints do not need a framework.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, ORIGIN, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::AbortHandle;

use crate::authorize::ConsentCommandError;
use crate::proxy::activity::Activity;
use crate::proxy::respond::describe_unavailable;
use crate::state::State;
use crate::token_store::{CredentialSlot, SlotStatus};

/// The content type Prometheus scrapers expect for the text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How long a client may take to send a request head, and how long a keep-alive connection
/// may sit idle: a client dribbling bytes cannot hold a connection for minutes.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin connections open at once; at the cap a new one replaces the connection idle the
/// longest, and is closed unanswered only when every connection has a request in flight.
pub const MAX_CONNECTIONS: usize = 32;
/// Each credential takes at most one admin action per this interval (more get 429): a loop
/// of requests cannot turn the admin endpoint into a flood of its token endpoint.
pub const ACTION_INTERVAL: Duration = Duration::from_secs(1);
/// How long a consent started on the admin listener waits for the person (the code grant's
/// loopback listener closes then).
pub const CONSENT_WAIT: Duration = Duration::from_secs(15 * 60);

/// What an admin route does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Health,
    Ready,
    Metrics,
    Credentials,
    Refresh,
    Invalidate,
    Authorize,
}

impl Action {
    /// The `action` label of `authrelay_admin_actions_total`.
    fn name(self) -> &'static str {
        match self {
            Action::Health => "health",
            Action::Ready => "ready",
            Action::Metrics => "metrics",
            Action::Credentials => "credentials",
            Action::Refresh => "refresh",
            Action::Invalidate => "invalidate",
            Action::Authorize => "authorize",
        }
    }
}

/// An action's answer and its `outcome` label in `authrelay_admin_actions_total`.
type Answer = (&'static str, Response<Full<Bytes>>);

/// One admin endpoint: a path (`{name}` matches one segment, a credential's name), its
/// method, and what it does. GET routes answer HEAD too.
struct AdminRoute {
    method: Method,
    path: &'static str,
    action: Action,
}

/// Every admin endpoint, in one table: matching, `405` with `Allow`, and the rules for
/// actions (every non-GET route changes state: no browser, the admin token) all read it.
const ROUTES: [AdminRoute; 7] = [
    AdminRoute {
        method: Method::GET,
        path: "/healthz",
        action: Action::Health,
    },
    AdminRoute {
        method: Method::GET,
        path: "/readyz",
        action: Action::Ready,
    },
    AdminRoute {
        method: Method::GET,
        path: "/metrics",
        action: Action::Metrics,
    },
    AdminRoute {
        method: Method::GET,
        path: "/credentials",
        action: Action::Credentials,
    },
    AdminRoute {
        method: Method::POST,
        path: "/credentials/{name}/refresh",
        action: Action::Refresh,
    },
    AdminRoute {
        method: Method::POST,
        path: "/credentials/{name}/invalidate",
        action: Action::Invalidate,
    },
    AdminRoute {
        method: Method::POST,
        path: "/credentials/{name}/authorize",
        action: Action::Authorize,
    },
];

/// Matches `path` against a route pattern; `Some(name)` carries the `{name}` segment
/// (empty when the pattern has none).
fn match_path<'p>(pattern: &str, path: &'p str) -> Option<&'p str> {
    let mut name = "";
    let mut given = path.split('/');
    for expected in pattern.split('/') {
        let segment = given.next()?;
        if expected == "{name}" {
            if segment.is_empty() {
                return None;
            }
            name = segment;
        } else if expected != segment {
            return None;
        }
    }
    given.next().is_none().then_some(name)
}

fn allows(route: &AdminRoute, method: &Method) -> bool {
    route.method == method || (route.method == Method::GET && method == Method::HEAD)
}

/// Answers one admin request. Separate from [`serve`] so that it can be called directly.
pub async fn handle<B>(state: &State, request: &Request<B>) -> Response<Full<Bytes>> {
    if !host_allowed(request, &state.snapshot().config.admin_hosts) {
        return text(
            StatusCode::FORBIDDEN,
            "text/plain",
            "unknown host; add it to admin_hosts\n".into(),
        );
    }
    let path = request.uri().path();
    let matching: Vec<(&AdminRoute, &str)> = ROUTES
        .iter()
        .filter_map(|r| Some((r, match_path(r.path, path)?)))
        .collect();
    if matching.is_empty() {
        return text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into());
    }
    let Some(&(route, name)) = matching.iter().find(|(r, _)| allows(r, request.method())) else {
        let mut allowed: Vec<&str> = matching.iter().map(|(r, _)| r.method.as_str()).collect();
        if allowed.contains(&"GET") {
            allowed.push("HEAD");
        }
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        );
        if let Ok(value) = HeaderValue::from_str(&allowed.join(", ")) {
            response.headers_mut().insert(ALLOW, value);
        }
        return response;
    };
    if route.method != Method::GET {
        let refusal = refuse_browser(request).or_else(|| refuse_unauthorized(state, request));
        if let Some(answer) = refusal {
            return counted(state, route.action, answer);
        }
    }
    match route.action {
        Action::Health => text(StatusCode::OK, "text/plain", "ok\n".into()),
        Action::Ready => readiness(state),
        Action::Metrics => {
            update_credential_gauges(state);
            text(StatusCode::OK, METRICS_CONTENT_TYPE, state.metrics.encode())
        }
        Action::Credentials => json(StatusCode::OK, &credentials(state)),
        Action::Refresh => counted(state, route.action, refresh(state, name).await),
        Action::Invalidate => counted(state, route.action, invalidate(state, name)),
        Action::Authorize => counted(state, route.action, authorize(state, name).await),
    }
}

/// Counts an action's outcome in `authrelay_admin_actions_total` and answers it.
fn counted(state: &State, action: Action, (outcome, response): Answer) -> Response<Full<Bytes>> {
    state.metrics.admin_action(action.name(), outcome);
    response
}

/// Actions are refused to requests a browser sends for a web page: with the admin on
/// loopback and no `admin_token`, any page the operator visits could otherwise POST to it
/// (a `text/plain` form needs no CORS preflight). Browsers mark such requests with `Origin`
/// (always on a POST) and `Sec-Fetch-Site`; curl, scripts and probes send neither.
fn refuse_browser<B>(request: &Request<B>) -> Option<Answer> {
    let headers = request.headers();
    let from_a_page = headers.contains_key(ORIGIN)
        || headers
            .get("sec-fetch-site")
            .is_some_and(|site| !matches!(site.as_bytes(), b"none" | b"same-origin"));
    from_a_page.then(|| {
        (
            "cross_origin_refused",
            json(
                StatusCode::FORBIDDEN,
                &serde_json::json!({
                    "error": "cross_origin_refused",
                    "detail": "admin actions are not taken for web pages (the request has `Origin` or a cross-site `Sec-Fetch-Site`); send it with curl or a script",
                }),
            ),
        )
    })
}

/// Admin actions that change state need `admin_token` when it is set, and may do without
/// it only when the admin listener is on loopback (reachable from this machine only).
/// Returns the refusal to answer, if any.
fn refuse_unauthorized<B>(state: &State, request: &Request<B>) -> Option<Answer> {
    let config = &state.snapshot().config;
    match &config.admin_token {
        Some(expected) => {
            let presented = request
                .headers()
                .get(AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.split_once(' '))
                .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
                .map(|(_, token)| token.trim());
            if presented.is_some_and(|p| same_secret(p.as_bytes(), expected.expose().as_bytes())) {
                return None;
            }
            let mut response = json(
                StatusCode::UNAUTHORIZED,
                &serde_json::json!({
                    "error": "admin_token_required",
                    "detail": "send `Authorization: Bearer <admin_token>`",
                }),
            );
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"authrelay-admin\""),
            );
            Some(("admin_token_required", response))
        }
        None if config.admin.is_some_and(|a| a.ip().is_loopback()) => None,
        None => Some((
            "admin_token_not_configured",
            json(
                StatusCode::FORBIDDEN,
                &serde_json::json!({
                    "error": "admin_token_not_configured",
                    "detail": "the admin listener is not on loopback: set `admin_token` to allow actions that change state",
                }),
            ),
        )),
    }
}

/// Compares without stopping at the first difference, so that timing does not reveal how
/// much of a guess was right.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unknown_credential(name: &str) -> Response<Full<Bytes>> {
    json(
        StatusCode::NOT_FOUND,
        &serde_json::json!({ "error": "unknown_credential", "credential": name }),
    )
}

/// Why an action on a credential is not taken now.
enum Refusal {
    UnknownCredential,
    /// Its secret was refused and its backoff runs for this long: an action would send it
    /// again, or (invalidate) lift the backoff so that the next request does.
    RefusedBackingOff(Duration),
    /// It took an action less than [`ACTION_INTERVAL`] ago; its next turn is in this long.
    RateLimited(Duration),
}

impl Refusal {
    fn answer(self, name: &str) -> Answer {
        match self {
            Refusal::UnknownCredential => ("unknown_credential", unknown_credential(name)),
            Refusal::RefusedBackingOff(wait) => {
                let body = serde_json::json!({
                    "error": "credential_refused",
                    "credential": name,
                    "detail": "the token endpoint refused this credential's secret; it is not sent again before its backoff ends (fix the secret and reload)",
                });
                (
                    "refused_backing_off",
                    retry_after(json(StatusCode::SERVICE_UNAVAILABLE, &body), wait),
                )
            }
            Refusal::RateLimited(wait) => {
                let body = serde_json::json!({
                    "error": "admin_action_rate_limited",
                    "credential": name,
                    "detail": "one admin action per credential per second",
                });
                (
                    "rate_limited",
                    retry_after(json(StatusCode::TOO_MANY_REQUESTS, &body), wait),
                )
            }
        }
    }
}

/// The slot an action on `name` may act on now.
fn claim(state: &State, name: &str) -> Result<Arc<CredentialSlot>, Refusal> {
    let slot = state
        .snapshot()
        .slots
        .get(name)
        .cloned()
        .ok_or(Refusal::UnknownCredential)?;
    if let Some(wait) = slot.refused_for() {
        return Err(Refusal::RefusedBackingOff(wait));
    }
    take_turn(&slot).map_err(Refusal::RateLimited)?;
    Ok(slot)
}

/// When each credential slot last took an admin action, for those that did less than
/// [`ACTION_INTERVAL`] ago. Kept by slot, not by name, so that a slot a reload replaced
/// starts afresh, and process-wide because [`handle`] is called without its listener.
static LAST_ACTIONS: Mutex<Vec<(Weak<CredentialSlot>, Instant)>> = Mutex::new(Vec::new());

/// Records an action on `slot` now, or says how long until it may take one.
fn take_turn(slot: &Arc<CredentialSlot>) -> Result<(), Duration> {
    let mut last = LAST_ACTIONS.lock().unwrap_or_else(PoisonError::into_inner);
    let now = Instant::now();
    last.retain(|(s, at)| s.strong_count() > 0 && now.duration_since(*at) < ACTION_INTERVAL);
    if let Some((_, at)) = last
        .iter()
        .find(|(s, _)| std::ptr::eq(s.as_ptr(), Arc::as_ptr(slot)))
    {
        return Err(ACTION_INTERVAL.saturating_sub(now.duration_since(*at)));
    }
    last.push((Arc::downgrade(slot), now));
    Ok(())
}

/// `Retry-After` in whole seconds, rounded up: a client that obeys it is not refused again.
fn retry_after(mut response: Response<Full<Bytes>>, wait: Duration) -> Response<Full<Bytes>> {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(secs.max(1)));
    response
}

/// `POST /credentials/{name}/refresh`: fetches now (ignoring a backoff unless the secret was
/// refused) and answers the new expiry — never the token.
async fn refresh(state: &State, name: &str) -> Answer {
    let slot = match claim(state, name) {
        Ok(slot) => slot,
        Err(refusal) => return refusal.answer(name),
    };
    match slot.refresh_now().await {
        Ok(token) => (
            "done",
            json(
                StatusCode::OK,
                &serde_json::json!({
                    "credential": name,
                    "refreshed": true,
                    "expires_at": token
                        .expires_at()
                        .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
                }),
            ),
        ),
        Err(unavailable) => {
            let mut body = serde_json::json!({ "error": "credential_unavailable" });
            describe_unavailable(&mut body, &unavailable);
            ("fetch_failed", json(StatusCode::BAD_GATEWAY, &body))
        }
    }
}

/// `POST /credentials/{name}/invalidate`: drops the cached token; the next request fetches.
fn invalidate(state: &State, name: &str) -> Answer {
    let slot = match claim(state, name) {
        Ok(slot) => slot,
        Err(refusal) => return refusal.answer(name),
    };
    slot.invalidate();
    (
        "done",
        json(
            StatusCode::OK,
            &serde_json::json!({ "credential": name, "invalidated": true }),
        ),
    )
}

/// `POST /credentials/{name}/authorize`: starts a person's consent for a consent credential
/// and answers what to show them (`open`: the URL; or `verification_uri` and `user_code`).
/// The rest runs in the background for at most [`CONSENT_WAIT`] — the code grant's callback
/// on its loopback `redirect_uri`, or the device grant's polling — and the tokens, once
/// stored, are taken up by the slot at once. Not refused for a credential that needs
/// consent: that is what it is for.
async fn authorize(state: &State, name: &str) -> Answer {
    let Some(slot) = state.snapshot().slots.get(name).cloned() else {
        return Refusal::UnknownCredential.answer(name);
    };
    if let Err(wait) = take_turn(&slot) {
        return Refusal::RateLimited(wait).answer(name);
    }
    let started = match crate::authorize::consent_credential(state, name) {
        Ok(credential) => crate::authorize::start(credential).await,
        Err(e) => Err(e),
    };
    let (event, pending) = match started {
        Ok(started) => started,
        Err(e @ ConsentCommandError::NotConsent(..)) => {
            let body = serde_json::json!({
                "error": "not_a_consent_credential",
                "credential": name,
                "detail": e.to_string(),
            });
            return ("not_consent", json(StatusCode::CONFLICT, &body));
        }
        Err(e) => {
            let body = serde_json::json!({
                "error": "authorize_failed",
                "credential": name,
                "detail": e.to_string(),
            });
            return ("failed", json(StatusCode::BAD_GATEWAY, &body));
        }
    };
    let owned = name.to_string();
    tokio::spawn(async move {
        match tokio::time::timeout(CONSENT_WAIT, pending.finish()).await {
            Ok(Ok(_)) => {
                tracing::info!(credential = %owned, "authorized through the admin listener");
                let _ = slot.refresh_now().await;
            }
            Ok(Err(e)) => {
                tracing::warn!(credential = %owned, error = %e, "authorize did not complete")
            }
            Err(_) => {
                tracing::warn!(credential = %owned, "authorize: no consent within {}", humantime::format_duration(CONSENT_WAIT))
            }
        }
    });
    let mut body = event.to_json();
    body["credential"] = name.into();
    ("started", json(StatusCode::ACCEPTED, &body))
}

/// Sets the per-credential gauges from the current snapshot, just before a scrape.
fn update_credential_gauges(state: &State) {
    let snapshot = state.snapshot();
    state.metrics.set_credential_gauges(
        snapshot
            .slots
            .iter()
            .map(|(name, slot)| (name.as_str(), slot.gauges())),
    );
}

/// Whether the request's `Host` is an IP literal, `localhost`, or in `admin_hosts`: a web
/// page that rebinds its own name to 127.0.0.1 still sends that name, and is refused.
fn host_allowed<B>(request: &Request<B>, admin_hosts: &[String]) -> bool {
    let Some(host) = request.uri().host().map(str::to_string).or_else(|| {
        let value = request.headers().get(http::header::HOST)?.to_str().ok()?;
        value
            .parse::<http::uri::Authority>()
            .ok()
            .map(|a| a.host().to_string())
    }) else {
        return !request.headers().contains_key(http::header::HOST);
    };
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare == "localhost" || bare.parse::<std::net::IpAddr>().is_ok() || admin_hosts.contains(&host)
}

/// Every credential of the current snapshot as the admin endpoint shows it, by name.
pub fn credentials(state: &State) -> Vec<SlotStatus> {
    let snapshot = state.snapshot();
    let mut all: Vec<SlotStatus> = snapshot.slots.values().map(|s| s.status()).collect();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    all
}

/// The `prefetch: true` credentials that hold no usable token (ready when empty).
pub fn not_ready(state: &State) -> Vec<String> {
    let snapshot = state.snapshot();
    snapshot
        .config
        .credentials
        .values()
        .filter(|c| c.prefetch)
        .filter(|c| {
            !snapshot
                .slots
                .get(&c.name)
                .is_some_and(|s| s.has_usable_token())
        })
        .map(|c| c.name.clone())
        .collect()
}

fn readiness(state: &State) -> Response<Full<Bytes>> {
    let waiting = not_ready(state);
    let status = if waiting.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(
        status,
        &serde_json::json!({ "ready": waiting.is_empty(), "not_ready": waiting }),
    )
}

fn json(status: StatusCode, value: &impl serde::Serialize) -> Response<Full<Bytes>> {
    match serde_json::to_string_pretty(value) {
        Ok(mut body) => {
            body.push('\n');
            text(status, "application/json", body)
        }
        Err(_) => text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            "cannot encode the answer\n".into(),
        ),
    }
}

fn text(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// The admin connections open now, each with its requests in flight and a way to close it.
///
/// At [`MAX_CONNECTIONS`] the connection idle the longest (no request in flight: waiting for a
/// first request head, part of one, or the next on a keep-alive connection) is closed to make
/// room, as nginx reuses its idle keep-alive connections when it runs out and as the proxy
/// listener does at `max_connections`. A cap per client address would not do: a liveness
/// probe usually comes from the same address as whatever holds the connections (loopback,
/// the pod's network), so it would be refused with them.
#[derive(Default)]
struct Connections {
    next_id: u64,
    open: HashMap<u64, (Arc<Activity>, AbortHandle)>,
}

impl Connections {
    /// Closes the connection idle the longest; false when every one has a request in flight.
    fn evict_idle(&mut self) -> bool {
        let idlest = self
            .open
            .iter()
            .filter(|(_, (activity, _))| !activity.busy())
            .max_by_key(|(_, (activity, _))| activity.idle_for())
            .map(|(id, _)| *id);
        match idlest.and_then(|id| self.open.remove(&id)) {
            Some((_, task)) => {
                task.abort();
                true
            }
            None => false,
        }
    }
}

fn lock(connections: &Mutex<Connections>) -> MutexGuard<'_, Connections> {
    connections.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Takes a connection off the list however its task ends (done, shut down or aborted).
struct Listed {
    connections: Arc<Mutex<Connections>>,
    id: u64,
}

impl Drop for Listed {
    fn drop(&mut self) {
        lock(&self.connections).open.remove(&self.id);
    }
}

/// Serves the admin endpoints on `listener` until `shutdown` turns true; open connections
/// are closed gracefully then. At most [`MAX_CONNECTIONS`] are served at once (see
/// [`Connections`] for who makes room), each with [`HEADER_READ_TIMEOUT`] to send a request
/// head.
pub async fn serve(listener: TcpListener, state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    let connections = Arc::new(Mutex::new(Connections::default()));
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = crate::vocab::shutdown::shutdown_requested(&mut shutdown) => break,
        };
        // Held while the task is spawned and listed, so that its `Listed` guard cannot run
        // before it is on the list.
        let mut open = lock(&connections);
        if open.open.len() >= MAX_CONNECTIONS {
            if open.evict_idle() {
                tracing::debug!(
                    max = MAX_CONNECTIONS,
                    "admin connection limit reached: closed the connection idle the longest"
                );
            } else {
                tracing::warn!(
                    max = MAX_CONNECTIONS,
                    "admin connection closed: every connection has a request in flight"
                );
                drop(stream);
                continue;
            }
        }
        let id = open.next_id;
        open.next_id += 1;
        let activity = Arc::new(Activity::new());
        let listed = Listed {
            connections: Arc::clone(&connections),
            id,
        };
        let task = tokio::spawn(serve_connection(
            stream,
            Arc::clone(&state),
            Arc::clone(&activity),
            shutdown.clone(),
            listed,
        ));
        open.open.insert(id, (activity, task.abort_handle()));
    }
}

/// Serves one admin connection; `activity` tells the listener whether a request is in flight.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    state: Arc<State>,
    activity: Arc<Activity>,
    mut shutdown: watch::Receiver<bool>,
    _listed: Listed,
) {
    let service = service_fn(move |request: Request<hyper::body::Incoming>| {
        let state = Arc::clone(&state);
        let in_flight = activity.begin();
        async move {
            let response = handle(&state, &request).await;
            drop(in_flight);
            Ok::<_, Infallible>(response)
        }
    });
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = crate::vocab::shutdown::shutdown_requested(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}
