//! Every way the proxy itself can answer a request, and the one place where each becomes an
//! HTTP response: a status and a short JSON body naming the route or credential, never a
//! secret.

use bytes::Bytes;
use http::{header, HeaderValue, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use serde_json::json;

use crate::token_store::Unavailable;
use crate::upstream::{ProxyBody, UpstreamError};

/// Why the proxy answered instead of the upstream.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The request is malformed or unsafe to forward (400).
    #[error("{0}")]
    BadRequest(String),
    /// An origin-form request that no mount route serves (404).
    #[error("no route is mounted at `{0}`")]
    NoMount(String),
    /// No route matches and `unmatched: deny` is set (403).
    #[error("no route matches host `{0}` and unmatched traffic is denied")]
    Denied(String),
    /// A CONNECT to a port outside `connect.allowed_ports` (403).
    #[error("CONNECT to port {0} is not allowed")]
    PortNotAllowed(u16),
    /// A tunnel that a route intercepts could not be decrypted (502).
    #[error("cannot intercept the tunnel: {0}")]
    Interception(String),
    /// The route's credential could not supply a token (502).
    #[error(transparent)]
    Credential(#[from] Unavailable),
    /// The upstream could not be reached or broke the exchange (502).
    #[error("upstream unreachable: {0}")]
    Upstream(String),
    /// The upstream did not answer in time (504).
    #[error("upstream did not answer within {0}")]
    UpstreamTimeout(String),
    /// `clients.users` is set and the request has no valid `Proxy-Authorization` (407).
    #[error(transparent)]
    ProxyAuth(crate::access::AuthFailure),
    /// The client's address failed proxy authentication too often; nothing it sent was
    /// checked (429, `Retry-After`).
    #[error("too many failed proxy logins from this address")]
    ProxyAuthThrottled(std::time::Duration),
    /// The authenticated client is not in the route's `clients` (403).
    #[error("this client may not use route `{0}`")]
    ClientNotAllowed(String),
    /// Unmatched traffic to the proxy itself, a link-local address or `unmatched_deny` (403).
    #[error("destination `{0}` is not allowed")]
    DestinationDenied(String),
    /// A credential would travel over plain HTTP to a non-loopback host (403).
    #[error("route `{0}` does not send its credential over plain HTTP to this port; use https://")]
    CleartextRefused(String),
    /// A method never allowed on a credential route (405): TRACE would echo the credential.
    #[error("method {0} is not allowed on a route with a credential")]
    MethodNotAllowed(http::Method),
    /// An upstream the client picked itself (unmatched traffic, CONNECT) could not be reached
    /// (502). One text for every cause: a distinct one would tell an open port from a closed
    /// one. The cause goes to the debug log.
    #[error("upstream unreachable")]
    Unreachable,
    /// The client's request body sent nothing for `timeouts.client_body` (408; the
    /// connection is closed, as the rest of the body can no longer be framed).
    #[error("the request body sent nothing for {}", humantime::format_duration(*.0))]
    ClientBodyTimeout(std::time::Duration),
    /// The route's credential signs the body, and the body is larger than
    /// `retry.max_body_bytes`, the most read before signing (413).
    #[error("credential `{credential}` signs the request body, which may be at most {limit} bytes (retry.max_body_bytes)")]
    SignedBodyTooLarge { credential: String, limit: u64 },
    /// Bodies held for signing and replay already fill `retry.max_buffered_total` (503).
    #[error("credential `{credential}` signs the request body, and too many bodies are held right now; try again", credential = .0)]
    SigningBusy(String),
    /// The request lacks something the signature must cover, such as a header the
    /// credential's `string_to_sign` names (400).
    #[error("credential `{credential}` cannot sign this request: {detail}")]
    CannotSign { credential: String, detail: String },
}

impl From<crate::access::AuthFailure> for ProxyError {
    fn from(e: crate::access::AuthFailure) -> Self {
        match e {
            crate::access::AuthFailure::Throttled(left) => ProxyError::ProxyAuthThrottled(left),
            other => ProxyError::ProxyAuth(other),
        }
    }
}

impl From<UpstreamError> for ProxyError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Timeout(d) => {
                ProxyError::UpstreamTimeout(humantime::format_duration(d).to_string())
            }
            UpstreamError::Failed(detail) => ProxyError::Upstream(detail),
            UpstreamError::ClientBodyStalled(idle) => ProxyError::ClientBodyTimeout(idle),
            UpstreamError::ClientBody(detail) => ProxyError::BadRequest(detail),
        }
    }
}

impl ProxyError {
    /// The status this error is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) | ProxyError::CannotSign { .. } => StatusCode::BAD_REQUEST,
            ProxyError::SignedBodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::SigningBusy(_) => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::NoMount(_) => StatusCode::NOT_FOUND,
            ProxyError::Denied(_)
            | ProxyError::PortNotAllowed(_)
            | ProxyError::ClientNotAllowed(_)
            | ProxyError::DestinationDenied(_)
            | ProxyError::CleartextRefused(_) => StatusCode::FORBIDDEN,
            ProxyError::ProxyAuth(_) => StatusCode::PROXY_AUTHENTICATION_REQUIRED,
            ProxyError::ProxyAuthThrottled(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::Credential(_)
            | ProxyError::Upstream(_)
            | ProxyError::Unreachable
            | ProxyError::Interception(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
            ProxyError::ClientBodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// The machine-readable `error` field.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::NoMount(_) => "no_route",
            ProxyError::Denied(_) => "unmatched_denied",
            ProxyError::PortNotAllowed(_) => "connect_port_denied",
            ProxyError::Interception(_) => "interception_unavailable",
            ProxyError::Credential(u) if u.source.needs_consent() => "consent_required",
            ProxyError::Credential(_) => "credential_unavailable",
            ProxyError::Upstream(_) | ProxyError::Unreachable => "upstream_unreachable",
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
            ProxyError::ProxyAuth(_) => "proxy_auth_required",
            ProxyError::ProxyAuthThrottled(_) => "proxy_auth_throttled",
            ProxyError::ClientNotAllowed(_) => "client_not_allowed",
            ProxyError::DestinationDenied(_) => "destination_denied",
            ProxyError::CleartextRefused(_) => "cleartext_refused",
            ProxyError::MethodNotAllowed(_) => "method_not_allowed",
            ProxyError::ClientBodyTimeout(_) => "client_body_timeout",
            ProxyError::SignedBodyTooLarge { .. } => "signed_body_too_large",
            ProxyError::SigningBusy(_) => "signing_busy",
            ProxyError::CannotSign { .. } => "cannot_sign",
        }
    }

    /// The route a refusal of an admitted route's rules names (its metrics and access line
    /// count it there), for the refusals that know one.
    pub fn route_name(&self) -> Option<&str> {
        match self {
            ProxyError::ClientNotAllowed(route) | ProxyError::CleartextRefused(route) => {
                Some(route)
            }
            _ => None,
        }
    }

    /// The answer sent to the client. `route` is named in the body when known.
    pub fn into_response(self, route: Option<&str>) -> Response<ProxyBody> {
        let status = self.status();
        let mut body = json!({ "error": self.code() });
        if let Some(r) = route {
            body["route"] = json!(r);
        }
        let mut retry_after = None;
        match &self {
            ProxyError::Credential(u) => {
                describe_unavailable(&mut body, u);
                retry_after = u.retry_in.map(|d| d.as_secs().max(1));
            }
            ProxyError::SignedBodyTooLarge { credential, .. }
            | ProxyError::SigningBusy(credential)
            | ProxyError::CannotSign { credential, .. } => {
                body["credential"] = json!(credential);
                body["detail"] = json!(self.to_string());
            }
            ProxyError::ProxyAuthThrottled(left) => {
                body["detail"] = json!(self.to_string());
                // Rounded up: a client that waits exactly this long is let in.
                retry_after = Some(left.as_secs() + u64::from(left.subsec_nanos() > 0));
            }
            other => body["detail"] = json!(other.to_string()),
        }
        let mut response = json_response(status, &body);
        if let Some(secs) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        match self {
            ProxyError::ProxyAuth(_) => {
                response.headers_mut().insert(
                    header::PROXY_AUTHENTICATE,
                    HeaderValue::from_static(crate::access::PROXY_AUTHENTICATE_CHALLENGE),
                );
            }
            ProxyError::MethodNotAllowed(_) => {
                response.headers_mut().insert(
                    header::ALLOW,
                    HeaderValue::from_static("GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"),
                );
            }
            ProxyError::ClientBodyTimeout(_) => {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

/// Adds what the JSON answers say about an unavailable credential (here and on the admin
/// listener): its name, the failure, and — when the token endpoint refused the configured
/// secret — `"refused": true` with the vendor's `error` code.
pub fn describe_unavailable(body: &mut serde_json::Value, u: &Unavailable) {
    body["credential"] = json!(&*u.credential);
    body["detail"] = json!(u.source.to_string());
    if u.source.is_final() {
        body["refused"] = json!(true);
        body["vendor_error"] = json!(u.source.vendor_error());
    }
}

/// A JSON response with the given status.
pub fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<ProxyBody> {
    let mut text = body.to_string();
    text.push('\n');
    let mut response = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
