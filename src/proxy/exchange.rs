//! The replay driver: sending an admitted request upstream with its credential, and the
//! refresh-and-replay when the upstream refuses the token — one driver for ordinary requests
//! and WebSocket handshakes alike (only the leg they go out on differs: the pool, or a
//! connection of their own), so both get the same replays, quiet periods and body rules.
//!
//! Whether the token was refused is decided by what the upstream said, never by the token's
//! age: RFC 6750 `WWW-Authenticate: Bearer error="…"` when present (`invalid_token`: refresh;
//! `insufficient_scope` or `invalid_request`: the token is fine, pass the answer on), else the
//! status (401, and 403 where the route's `refresh_on` lists it). A route where even a fresh
//! token is refused stops refreshing for a while (see `CredentialSlot::refresh_after_rejection`).

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::Either;
use futures_util::FutureExt;
use http::header::{self, HeaderMap};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use hyper::body::Incoming;

use super::replay::{self, PreparedBody};
use super::respond::ProxyError;
use super::sign;
use super::target::Target;
use crate::config::Config;
use crate::credentials::RequestSigner;
use crate::metrics::RetryOutcome;
use crate::routes::Route;
use crate::token_store::{CredentialSlot, IssuedToken};
use crate::upstream::{Deadline, PinnedAddrs, ProxyBody, UpstreamClient};
use crate::vocab::redact::Redactor;

/// What happened to a forwarded request, for the access log.
pub(crate) struct Forwarded {
    /// The upstream's answer, as received (see [`finish`]).
    pub(crate) response: Response<ProxyBody>,
    /// Whether the request was replayed after a 401/403.
    pub(crate) retried: bool,
}

/// What an attempt goes out on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Leg {
    /// The pooled upstream client.
    Request,
    /// A connection of its own that can switch protocols after a 101.
    Upgrade,
}

/// Everything one exchange needs besides the request.
pub(crate) struct Exchange<'a> {
    pub(crate) upstream: &'a UpstreamClient,
    pub(crate) config: &'a Config,
    pub(crate) target: &'a Target,
    /// The credential admission chose for the client on the target's route.
    pub(crate) credential: Option<&'a Arc<CredentialSlot>>,
    pub(crate) pinned: Option<&'a PinnedAddrs>,
    pub(crate) leg: Leg,
}

/// What an upstream answer says about the token that was sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenVerdict {
    /// Not a 401/403: the token was accepted.
    Accepted,
    /// The token was refused: a fresh one may cure it.
    Refused,
    /// A 401/403 about something else (a missing permission, a bad request): a new token of
    /// the same kind will not help, so the answer goes to the client untouched.
    NotTheToken,
}

impl Exchange<'_> {
    /// Sends the request (hop-by-hop headers already removed) to the target, injecting the
    /// route's credential; on a refusal of the token, refreshes and replays as the route allows.
    /// The head is borrowed (its headers are taken): the caller's future holds it already.
    ///
    /// Not an `async fn`: its arguments would be kept twice in its future (as arguments and
    /// as the body's locals), and every level above moves that future.
    pub(crate) fn run<'p>(
        &'p self,
        parts: &'p mut Parts,
        body: Incoming,
    ) -> impl Future<Output = Result<Forwarded, ProxyError>> + Send + 'p {
        async move {
            let Some((route, slot)) = self.target.route.as_ref().zip(self.credential) else {
                let headers = std::mem::take(&mut parts.headers);
                let body = replay::streaming(body, self.config);
                let uri = self.first_uri(parts);
                let request = build(&parts.method, uri, headers, None, body);
                let response = self.send(self.target.route.as_deref(), request).await?;
                return Ok(Forwarded {
                    response,
                    retried: false,
                });
            };

            if let Some(signer) = slot.signer() {
                // Boxed: its body buffering and signing would otherwise be part of every
                // request's future.
                return Box::pin(self.run_signed(route, slot, signer, parts, body)).await;
            }
            let token = slot.get().await?;
            let mut body = if route.refreshes_on_unauthorized(slot) {
                let budget = self.upstream.replay_budget();
                replay::prepare(body, &parts.headers, self.config, budget).await?
            } else {
                PreparedBody::Streaming(replay::streaming(body, self.config))
            };
            // Headers are kept for a replay only when the body can be replayed too.
            let headers = if body.replayable() {
                parts.headers.clone()
            } else {
                std::mem::take(&mut parts.headers)
            };
            let (uri, injection) = place(self.first_uri(parts), slot, &token);
            let first = build(&parts.method, uri, headers, injection, body.take());
            let mut response = self.send(Some(route), first).await?;
            mask_echoed_query_credential(&mut response, slot, &token);

            match verdict(route, &response) {
                TokenVerdict::Accepted => slot.upstream_accepted(&route.name),
                TokenVerdict::Refused
                    if body.replayable() && route.refreshes_on_unauthorized(slot) =>
                {
                    let replay = Replay {
                        exchange: self,
                        route,
                        slot,
                        parts,
                        body,
                    };
                    // Boxed: rare, and as large as the first send; unboxed it would grow every
                    // request's future (which is moved, not just polled) by its size.
                    return Box::pin(replay.run(&token, response)).await;
                }
                TokenVerdict::Refused => slot.fixed_value_refused(),
                TokenVerdict::NotTheToken => {}
            }
            Ok(Forwarded {
                response,
                retried: false,
            })
        }
    }

    /// Sends a request whose credential signs it (`proxy/sign.rs`). Never replayed after a
    /// 401/403: the key is fixed in the config, so signing again cannot cure a refusal.
    async fn run_signed(
        &self,
        route: &Route,
        slot: &CredentialSlot,
        signer: &dyn RequestSigner,
        parts: &mut Parts,
        body: Incoming,
    ) -> Result<Forwarded, ProxyError> {
        let budget = self.upstream.replay_budget();
        let body = sign::prepare(
            signer,
            slot.name(),
            body,
            &parts.headers,
            self.config,
            budget,
        )
        .await?;
        let request = sign::build(
            signer,
            slot.header(),
            slot.name(),
            &parts.method,
            &self.target.uri,
            std::mem::take(&mut parts.headers),
            body,
        )?;
        let response = self.send(Some(route), request).await?;
        if verdict(route, &response) == TokenVerdict::Refused {
            slot.fixed_value_refused();
        }
        Ok(Forwarded {
            response,
            retried: false,
        })
    }

    /// The URI of the first attempt: the request's own, moved out of its head when routing
    /// kept it unchanged (a replay, the access line and redirect rewriting read the
    /// target's), else a copy of the target's.
    fn first_uri(&self, parts: &mut Parts) -> Uri {
        if self.target.uri_is_the_requests {
            std::mem::take(&mut parts.uri)
        } else {
            self.target.uri.clone()
        }
    }

    /// Sends one attempt on this exchange's leg and records the time to its response head.
    ///
    /// Combinators, not an `async` block: a block would keep the request as an argument
    /// beside the upstream's future that holds it too, and every level above moves this
    /// future.
    fn send<'s>(
        &'s self,
        route: Option<&'s Route>,
        request: Request<ProxyBody>,
    ) -> impl Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send + 's {
        let started = Instant::now();
        let timeouts = &self.config.timeouts;
        let deadline = Deadline::after(timeouts.upstream, timeouts.upstream_body_idle, started);
        let identity = route.and_then(|r| r.config.tls_client_cert.as_ref());
        let response = match self.leg {
            Leg::Request => {
                Either::Left(self.upstream.send(request, self.pinned, identity, deadline))
            }
            // Boxed, like the signed path: handshakes are rare next to requests, and their
            // connect-and-handshake future would grow (and be moved with) every request's.
            Leg::Upgrade => Either::Right(Box::pin(self.upstream.send_upgrade(
                request,
                self.pinned,
                identity,
                deadline,
            ))),
        };
        response.map(move |response| {
            let response = response?;
            if let Some(r) = route {
                r.metrics.upstream_latency(started.elapsed());
            }
            Ok(response)
        })
    }
}

/// Everything needed to send a request a second time, with a fresh token.
struct Replay<'a> {
    exchange: &'a Exchange<'a>,
    route: &'a Arc<Route>,
    slot: &'a Arc<CredentialSlot>,
    parts: &'a mut Parts,
    body: PreparedBody,
}

impl Replay<'_> {
    /// Refreshes after `rejected` was refused and replays; passes the refusal on when
    /// refreshing would not help on this route. One replay, unless its token was not fetched
    /// in answer to a refusal (fetched early, by an operator or by another replica) and is
    /// refused too: that proves nothing about the route, so one more refresh and replay.
    async fn run(
        mut self,
        rejected: &Arc<IssuedToken>,
        refused: Response<ProxyBody>,
    ) -> Result<Forwarded, ProxyError> {
        let metrics = &self.route.metrics;
        let mut rejected = Arc::clone(rejected);
        let mut refused = refused;
        let mut replays = 0;
        loop {
            let fresh = match self
                .slot
                .refresh_after_rejection(&self.route.name, &rejected)
                .await
            {
                Ok(Some(fresh)) => fresh,
                Ok(None) => {
                    return Ok(Forwarded {
                        response: refused,
                        retried: replays > 0,
                    })
                }
                Err(unavailable) => {
                    metrics.retried(self.slot.name(), RetryOutcome::Unavailable);
                    return Err(unavailable.into());
                }
            };
            drop(refused);
            replays += 1;
            let last = replays == 2 || fresh.answers_a_refusal();
            tracing::info!(credential = %self.slot.name(), route = %self.route.name, "upstream refused the token; replaying with a fresh one");
            let headers = if last {
                std::mem::take(&mut self.parts.headers)
            } else {
                self.parts.headers.clone()
            };
            let (uri, injection) = place(self.exchange.target.uri.clone(), self.slot, &fresh);
            let again = build(
                &self.parts.method,
                uri,
                headers,
                injection,
                self.body.take(),
            );
            let mut response = self.exchange.send(Some(self.route), again).await?;
            mask_echoed_query_credential(&mut response, self.slot, &fresh);
            let verdict = verdict(self.route, &response);
            if verdict == TokenVerdict::Accepted {
                self.slot.upstream_accepted(&self.route.name);
                metrics.retried(self.slot.name(), RetryOutcome::Success);
            } else if last || verdict == TokenVerdict::NotTheToken {
                self.slot.replay_refused(&self.route.name);
                metrics.retried(self.slot.name(), RetryOutcome::Failed);
            } else {
                rejected = fresh;
                refused = response;
                continue;
            }
            return Ok(Forwarded {
                response,
                retried: true,
            });
        }
    }
}

/// Reads what the upstream said about the token: the RFC 6750 `error` of a
/// `WWW-Authenticate` challenge first, the status (and the route's `refresh_on`) otherwise.
pub fn verdict<B>(route: &Route, response: &Response<B>) -> TokenVerdict {
    let status = response.status();
    if status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN {
        return TokenVerdict::Accepted;
    }
    match challenge_error(response.headers()).as_deref() {
        Some("invalid_token") => TokenVerdict::Refused,
        Some("insufficient_scope" | "invalid_request") => TokenVerdict::NotTheToken,
        _ if route.config.refresh_on.includes(status) => TokenVerdict::Refused,
        _ => TokenVerdict::NotTheToken,
    }
}

/// The `error` parameter of the first `WWW-Authenticate` challenge that has one
/// (RFC 6750 §3: `Bearer realm="api", error="invalid_token", error_description="…"`).
pub fn challenge_error(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::WWW_AUTHENTICATE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| {
            auth_params(v)
                .into_iter()
                .find(|(name, _)| name.eq_ignore_ascii_case("error"))
                .map(|(_, value)| value)
        })
}

/// The `name=value` pairs of a challenge list (RFC 9110 §11.6.1), values unquoted. Scheme
/// names and token68 values are skipped: only parameters matter here.
fn auth_params(text: &str) -> Vec<(String, String)> {
    let mut params = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace() || *c == ',').is_some() {}
        let mut name = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && !matches!(c, ',' | '=')) {
            name.push(c);
        }
        if name.is_empty() && chars.peek().is_none() {
            return params;
        }
        while chars.next_if(|c| *c == ' ' || *c == '\t').is_some() {}
        if chars.next_if_eq(&'=').is_none() {
            if name.is_empty() {
                chars.next();
            }
            continue;
        }
        while chars.next_if(|c| *c == ' ' || *c == '\t').is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            while let Some(c) = chars.next() {
                match c {
                    '"' => break,
                    '\\' => value.extend(chars.next()),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != ',') {
                value.push(c);
            }
        }
        params.push((name, value));
    }
}

fn build(
    method: &Method,
    uri: Uri,
    mut headers: HeaderMap,
    injection: Option<(&Arc<CredentialSlot>, &Arc<IssuedToken>)>,
    body: ProxyBody,
) -> Request<ProxyBody> {
    if let Some((slot, token)) = injection {
        inject(&mut headers, slot.header(), token.header_value());
    }
    let mut request = Request::new(body);
    *request.method_mut() = method.clone();
    *request.uri_mut() = uri;
    *request.headers_mut() = headers;
    request
}

/// Where a token goes: into the slot's `query_param` of the URI (then no header is
/// injected), or into the slot's header.
fn place<'a>(
    uri: Uri,
    slot: &'a Arc<CredentialSlot>,
    token: &'a Arc<IssuedToken>,
) -> (Uri, Injection<'a>) {
    match slot.query_param() {
        Some(name) => (
            with_query_credential(&uri, name, &token.query_form().encoded),
            None,
        ),
        None => (uri, Some((slot, token))),
    }
}

type Injection<'a> = Option<(&'a Arc<CredentialSlot>, &'a Arc<IssuedToken>)>;

/// `uri` with `encoded` (a percent-encoded value, [`QueryForm::encoded`](crate::token_store::QueryForm::encoded)) in query
/// parameter `name`: every parameter the client sent under that name, however
/// percent-encoded, is dropped (an upstream that reads the first or the last of duplicates
/// must still see the configured one).
pub fn with_query_credential(uri: &Uri, name: &str, encoded: &str) -> Uri {
    let pair = format!("{name}={encoded}");
    let mut query: Vec<&str> = uri
        .query()
        .unwrap_or_default()
        .split('&')
        .filter(|p| !p.is_empty() && !names_param(p, name))
        .collect();
    query.push(&pair);
    let mut parts = uri.clone().into_parts();
    parts.path_and_query =
        PathAndQuery::try_from(format!("{}?{}", uri.path(), query.join("&"))).ok();
    // Every piece was valid in a URI already, so this holds; were it not to, the request
    // fails (a URI without authority) rather than going out with the client's own value.
    Uri::from_parts(parts).unwrap_or_else(|_| Uri::from_static("/"))
}

/// Masks a query credential wherever the upstream echoes it in a response header (a
/// redirect or a pagination `Link` naming the URL it was asked for would otherwise hand the
/// key to the client), in every form an echo shows it in. Following such a link through
/// the proxy still works: the masked parameter is replaced like any the client sends.
fn mask_echoed_query_credential(
    response: &mut Response<ProxyBody>,
    slot: &CredentialSlot,
    token: &IssuedToken,
) {
    let Some(redactor) = slot.query_param().and(token.query_form().redactor.as_ref()) else {
        return;
    };
    for header in response.headers_mut().values_mut() {
        mask_header(header, redactor);
    }
}

/// `header` with the secrets `redactor` knows masked. A value that is not text (obs-text
/// bytes) cannot be edited in place: if it shows a secret, it becomes `***` whole.
fn mask_header(header: &mut HeaderValue, redactor: &Redactor) {
    let masked = match header.to_str() {
        Ok(text) => {
            let masked = redactor.redact(text);
            if masked == text {
                return;
            }
            HeaderValue::from_str(&masked).ok()
        }
        Err(_) if redactor.reveals(header.as_bytes()) => None,
        Err(_) => return,
    };
    *header = masked.unwrap_or_else(|| HeaderValue::from_static("***"));
}

/// Whether the query pair `pair` (`name=value`, percent-encoded) is for parameter `name`.
fn names_param(pair: &str, name: &str) -> bool {
    let raw_name = pair.split('=').next().unwrap_or_default();
    serde_urlencoded::from_str::<Vec<(String, String)>>(raw_name)
        .ok()
        .and_then(|decoded| decoded.into_iter().next())
        .is_some_and(|(decoded, _)| decoded == name)
}

/// Sets the credential header, replacing whatever the client sent under that name.
pub fn inject(headers: &mut HeaderMap, name: &HeaderName, value: &HeaderValue) {
    headers.insert(name.clone(), value.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error_of(values: &[&str]) -> Option<String> {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(header::WWW_AUTHENTICATE, HeaderValue::from_str(v).unwrap());
        }
        challenge_error(&headers)
    }

    /// An upstream echoing the query credential in a header gets it masked, in a text value
    /// in place and in a value with obs-text bytes (not editable as text) whole.
    #[test]
    fn an_echoed_query_credential_is_masked_in_text_and_byte_headers() {
        let redactor = Redactor::new(["k y&"]);
        let mut text = HeaderValue::from_static("</p?api_key=k%20y%26&page=2>; rel=next");
        mask_header(&mut text, &redactor);
        assert_eq!(text, "</p?api_key=***&page=2>; rel=next");

        let mut bytes = HeaderValue::from_bytes(b"/p?api_key=k%20y%26&n=\xe9").unwrap();
        assert!(bytes.to_str().is_err(), "obs-text, not text");
        mask_header(&mut bytes, &redactor);
        assert_eq!(bytes, "***");

        let mut other = HeaderValue::from_bytes(b"caf\xe9").unwrap();
        mask_header(&mut other, &redactor);
        assert_eq!(other.as_bytes(), b"caf\xe9", "left alone without a secret");
    }

    #[test]
    fn the_query_credential_replaces_every_client_copy_and_is_encoded() {
        let value = "k%20y%26%3D%2B%2F%25";
        let at =
            |uri: &str| with_query_credential(&uri.parse().unwrap(), "api_key", value).to_string();
        assert_eq!(
            at("http://h.test/p?api_key=mine&x=1&api%5Fkey=again&api_key"),
            "http://h.test/p?x=1&api_key=k%20y%26%3D%2B%2F%25"
        );
        assert_eq!(
            at("https://h.test"),
            "https://h.test/?api_key=k%20y%26%3D%2B%2F%25"
        );
        assert_eq!(
            at("http://h.test/p?api_keys=1&&x=%20"),
            "http://h.test/p?api_keys=1&x=%20&api_key=k%20y%26%3D%2B%2F%25"
        );
    }

    #[test]
    fn reads_the_rfc6750_error_of_a_challenge() {
        assert_eq!(
            error_of(&[r#"Bearer realm="example", error="invalid_token", error_description="The access token expired""#]).as_deref(),
            Some("invalid_token")
        );
        assert_eq!(
            error_of(&[r#"Bearer error_description="x, error=\"invalid_token\"", error=insufficient_scope, scope="read""#]).as_deref(),
            Some("insufficient_scope")
        );
        assert_eq!(
            error_of(&[r#"Basic realm="x""#, r#"Bearer ERROR="invalid_token""#]).as_deref(),
            Some("invalid_token")
        );
        assert_eq!(error_of(&["Bearer abc123=="]), None);
        assert_eq!(error_of(&[r#"Bearer realm="api""#]), None);
        assert_eq!(error_of(&[]), None);
        assert_eq!(
            error_of(&["Bearer error=\"unterminated"]).as_deref(),
            Some("unterminated")
        );
    }
}
