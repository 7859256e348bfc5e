//! The signing seam: a route whose credential signs each request (`type: hmac`,
//! `aws_sigv4`) gets no token; each attempt is signed just before it goes out. A signature
//! over the body needs the whole body before the head, so that body is read first (within
//! `retry.max_body_bytes`, 413 beyond); any other body streams.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap};
use http::uri::Scheme;
use http::{HeaderName, Method, Request, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::replay::{self, Reservation};
use super::respond::ProxyError;
use crate::config::Config;
use crate::credentials::{RequestSigner, SigningRequest};
use crate::upstream::authority::host_and_port;
use crate::upstream::budget::ReplayBudget;
use crate::upstream::idle::Stalled;
use crate::upstream::ProxyBody;

/// The body a signer sees: whole bytes (held against the replay budget) when the signature
/// covers them, else the client's stream.
pub(crate) enum SignedBody {
    Whole(Bytes, Reservation),
    Streaming(ProxyBody),
}

/// Reads the body whole when `signer` covers it, else passes the stream on.
pub(crate) async fn prepare(
    signer: &dyn RequestSigner,
    credential: &Arc<str>,
    body: Incoming,
    headers: &HeaderMap,
    config: &Config,
    budget: &Arc<ReplayBudget>,
) -> Result<SignedBody, ProxyError> {
    let body = replay::streaming(body, config);
    if !signer.signs_body() {
        return Ok(SignedBody::Streaming(body));
    }
    let limit = config.retry.max_body_bytes;
    let too_large = || ProxyError::SignedBodyTooLarge {
        credential: credential.to_string(),
        limit,
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit) {
        return Err(too_large());
    }
    let mut reserved = Reservation::new(budget);
    let mut buffer = BytesMut::new();
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| match Stalled::find(&*e) {
            Some(stalled) => ProxyError::ClientBodyTimeout(stalled.idle),
            None => ProxyError::BadRequest(e.to_string()),
        })?;
        if let Ok(data) = frame.into_data() {
            buffer.extend_from_slice(&data);
            let total = buffer.len() as u64;
            if total > limit {
                return Err(too_large());
            }
            if !reserved.grow_to(total, config.retry.max_buffered_total) {
                return Err(ProxyError::SigningBusy(credential.to_string()));
            }
        }
    }
    Ok(SignedBody::Whole(buffer.freeze(), reserved))
}

/// The request for one attempt, signed now.
pub(crate) fn build(
    signer: &dyn RequestSigner,
    signature_header: &HeaderName,
    credential: &Arc<str>,
    method: &Method,
    uri: &Uri,
    mut headers: HeaderMap,
    body: SignedBody,
) -> Result<Request<ProxyBody>, ProxyError> {
    // The client's `Host` is not what the upstream receives (its leg sets the connection's):
    // a template's `{header:host}` must not sign it. Signing is the rare path; the pipeline
    // leaves `Host` to the legs.
    headers.remove(header::HOST);
    let authority = uri.authority().map_or("", |a| a.as_str());
    let default_port = if uri.scheme() == Some(&Scheme::HTTPS) {
        443
    } else {
        80
    };
    // The `Host` the upstream receives: hyper and the plain pool both leave a default port out.
    let host = match host_and_port(authority) {
        (_, Some(port)) if port != default_port => authority,
        (host, _) => host,
    };
    let (bytes, body) = match body {
        SignedBody::Whole(bytes, reserved) => {
            // The reservation lives as long as the body that is sent.
            let sent = crate::upstream::body::full(bytes.clone())
                .map_frame(move |f| {
                    let _held = &reserved;
                    f
                })
                .boxed();
            (Some(bytes), sent)
        }
        SignedBody::Streaming(body) => (None, body),
    };
    let request = SigningRequest {
        method,
        host,
        path: uri.path(),
        query: uri.query().unwrap_or_default(),
        headers: &mut headers,
        body: bytes.as_deref(),
        now: SystemTime::now(),
    };
    signer
        .sign(signature_header, request)
        .map_err(|detail| ProxyError::CannotSign {
            credential: credential.to_string(),
            detail,
        })?;
    let mut request = Request::new(body);
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri.clone();
    *request.headers_mut() = headers;
    Ok(request)
}
