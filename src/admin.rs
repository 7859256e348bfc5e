//! The admin listener (`admin: 127.0.0.1:9901`, off when absent): health, readiness,
//! Prometheus metrics and the state of every credential — never a token or secret. A plain
//! hyper HTTP/1 server: four read-only endpoints do not need a framework.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{ALLOW, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::state::State;
use crate::token_store::SlotStatus;

/// The content type Prometheus scrapers expect for the text exposition format.
pub const METRICS_CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Answers one admin request. Separate from [`serve`] so that it can be called directly.
pub fn handle<B>(state: &State, request: &Request<B>) -> Response<Full<Bytes>> {
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
/// are closed gracefully then.
pub async fn serve(listener: TcpListener, state: Arc<State>, mut shutdown: watch::Receiver<bool>) {
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
        let state = Arc::clone(&state);
        let mut shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let response = handle(&state, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
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
