//! The admin listener (`admin: 127.0.0.1:9901`, off when absent): health, readiness,
//! Prometheus metrics and the state of every credential — never a token or secret. A plain
//! hyper HTTP/1 server: four read-only endpoints do not need a framework.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

use crate::state::State;
use crate::token_store::SlotStatus;

/// The content type Prometheus scrapers expect for the text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// How long a client may take to send a request head, and how long a keep-alive connection
/// may sit idle: a client dribbling bytes cannot hold a connection for minutes.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Admin connections open at once; more are closed unanswered.
pub const MAX_CONNECTIONS: usize = 32;

/// Answers one admin request. Separate from [`serve`] so that it can be called directly.
pub fn handle<B>(state: &State, request: &Request<B>) -> Response<Full<Bytes>> {
    if !host_allowed(request, &state.snapshot().config.admin_hosts) {
        return text(
            StatusCode::FORBIDDEN,
            "text/plain",
            "unknown host; add it to admin_hosts\n".into(),
        );
    }
    let path = request.uri().path();
    let known = matches!(path, "/healthz" | "/readyz" | "/metrics" | "/credentials");
    if !known {
        return text(StatusCode::NOT_FOUND, "text/plain", "not found\n".into());
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        let mut response = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "method not allowed\n".into(),
        );
        response
            .headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return response;
    }
    match path {
        "/healthz" => text(StatusCode::OK, "text/plain", "ok\n".into()),
        "/readyz" => readiness(state),
        "/metrics" => text(StatusCode::OK, METRICS_CONTENT_TYPE, state.metrics.encode()),
        _ => json(StatusCode::OK, &credentials(state)),
    }
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

/// Serves the admin endpoints on `listener` until `shutdown` turns true; open connections
/// are closed gracefully then. At most [`MAX_CONNECTIONS`] are served at once, each with
/// [`HEADER_READ_TIMEOUT`] to send a request head.
pub async fn serve(listener: TcpListener, state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
            _ = crate::shutdown_requested(&mut shutdown) => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::warn!(
                max = MAX_CONNECTIONS,
                "admin connection closed: too many open"
            );
            drop(stream);
            continue;
        };
        let state = Arc::clone(&state);
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let response = handle(&state, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = crate::shutdown_requested(&mut shutdown) => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
}
