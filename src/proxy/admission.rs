//! Admission: every rule on who may send what where, in one module that every way in calls —
//! forward and mount requests, CONNECT, plain HTTP inside a tunnel, intercepted requests,
//! WebSocket handshakes and HTTP/2. In order: who the client is (`Proxy-Authorization`),
//! where the request goes (the route table, queried once), and whether it may go there: the
//! route's `clients`, methods and method overrides, path tricks, cleartext; for traffic no
//! route claims, the destination's addresses; for CONNECT, its port and interception.
//! Nothing is sent anywhere before admission says yes.

use std::net::SocketAddr;
use std::sync::Arc;

use http::request::Parts;
use http::uri::{Authority, Scheme};
use http::{HeaderMap, Method, Uri, Version};

use super::context::{Admitted, RequestContext};
use super::respond::ProxyError;
use super::target::{self, Target};
use crate::access::{DestinationError, DestinationPolicy, UnmatchedReach};
use crate::config::Unmatched;
use crate::routes::Route;
use crate::state::Snapshot;
use crate::upstream::{authority, PinnedAddrs};

/// What admission lets a request do.
pub(crate) enum Decision {
    /// An HTTP request (a WebSocket handshake included) to forward.
    Forward(Admitted),
    /// A CONNECT tunnel to open.
    Tunnel(TunnelPlan),
}

/// An admitted CONNECT: where to, and what the tunnel will carry.
pub(crate) struct TunnelPlan {
    pub(crate) authority: Authority,
    pub(crate) kind: TunnelKind,
}

/// How a tunnel is joined to its upstream.
pub(crate) enum TunnelKind {
    /// A route intercepts the host: TLS is decrypted with this config (plain HTTP is read
    /// as is), and each request inside comes back through admission.
    Intercept(Arc<rustls::ServerConfig>),
    /// Spliced to one of these checked addresses — unless the host is routed and the client
    /// speaks plain HTTP, which is then served request by request.
    Open {
        addrs: Vec<SocketAddr>,
        routed: bool,
    },
    /// A routed host on a port only its route opens: plain HTTP is served, nothing else.
    HttpOnly,
}

/// Admits the request whose head is `request`, or says why not. Fills in the context's
/// authenticated user.
pub(crate) async fn admit(
    ctx: &mut RequestContext,
    request: &Parts,
) -> Result<Decision, ProxyError> {
    authenticate(ctx, &request.headers)?;
    let method = &request.method;
    if method == Method::CONNECT {
        if ctx.conn.tunnel.is_some() {
            return Err(ProxyError::BadRequest(
                "CONNECT inside a tunnel is not supported".into(),
            ));
        }
        return tunnel(ctx, &request.uri).await.map(Decision::Tunnel);
    }
    let uri = &request.uri;
    check_path(uri.path())?;
    let target = route(ctx, request)?;
    let (pinned, credential) = match &target.route {
        Some(route) => {
            let user = ctx.client.user.as_deref();
            check_routed(route, user, method, uri, &request.headers)?;
            if target.in_clear {
                return Err(ProxyError::CleartextRefused(route.name.to_string()));
            }
            (None, route.credential_for(user).cloned())
        }
        None => {
            let (host, port) = host_and_port(&target.uri);
            let unmatched = Some(&ctx.snapshot.config.unmatched_reach);
            let addrs = destination(ctx, host, port, unmatched).await?;
            (Some(PinnedAddrs(addrs.into())), None)
        }
    };
    Ok(Decision::Forward(Admitted {
        target,
        pinned,
        credential,
    }))
}

/// With `clients.users` set, a request on the listener must name its user; requests inside
/// a tunnel were authenticated by their CONNECT.
fn authenticate(ctx: &mut RequestContext, headers: &HeaderMap) -> Result<(), ProxyError> {
    if ctx.conn.tunnel.is_some() {
        return Ok(());
    }
    let clients = &ctx.snapshot.config.clients;
    ctx.client.user = ctx
        .state()
        .auth_throttle
        .authenticate(clients, ctx.conn.peer, headers)?;
    Ok(())
}

/// The request's route and upstream URI: one query of the route table. Inside a tunnel an
/// origin-form request is meant for the tunnel's origin; on the listener, absolute-form is a
/// forward-proxy request and origin-form a mount request. HTTP/2 has no absolute form: its
/// `:authority` always names a host, and a request whose `:authority` is on the proxy's own
/// port is a mount request, any other a forward-proxy request.
fn route(ctx: &RequestContext, request: &Parts) -> Result<Target, ProxyError> {
    let (snapshot, method, uri) = (&*ctx.snapshot, &request.method, &request.uri);
    if let Some(tunnel) = &ctx.conn.tunnel {
        return target::tunnel_target(
            snapshot,
            method,
            uri,
            &tunnel.authority,
            tunnel.scheme.clone(),
        );
    }
    if request.version == Version::HTTP_2 {
        let default_port = if uri.scheme() == Some(&Scheme::HTTPS) {
            443
        } else {
            80
        };
        let port = uri.port_u16().unwrap_or(default_port);
        if uri.authority().is_none() || Some(port) == ctx.conn.local_port {
            return target::mount_target(snapshot, method, uri);
        }
    }
    target::resolve(snapshot, method, uri)
}

/// Routes a forward-proxy or mount request once path tricks that could escape a route's
/// prefix are refused: what admission does before any route's own rules.
pub fn resolve(snapshot: &Snapshot, method: &Method, uri: &Uri) -> Result<Target, ProxyError> {
    check_path(uri.path())?;
    target::resolve(snapshot, method, uri)
}

/// The host and port (the scheme's default when none is given) a request URI names, read
/// by the one authority parser of the request path.
fn host_and_port(uri: &Uri) -> (&str, u16) {
    let default_port = if uri.scheme() == Some(&Scheme::HTTPS) {
        443
    } else {
        80
    };
    let (host, port) = uri
        .authority()
        .map_or(("", None), |a| authority::host_and_port(a.as_str()));
    (host, port.unwrap_or(default_port))
}

/// Resolves `host:port` (within `timeouts.connect`) and returns its addresses once every
/// one is allowed: never the proxy's own listen or admin address, link-local or unspecified
/// addresses, nor what the `unmatched_*` rules refuse (`unmatched`: `None` for a host a
/// route names).
async fn destination(
    ctx: &RequestContext,
    host: &str,
    port: u16,
    unmatched: Option<&UnmatchedReach>,
) -> Result<Vec<SocketAddr>, ProxyError> {
    let timeout = ctx.snapshot.config.timeouts.connect;
    let policy = DestinationPolicy {
        own: ctx.state().own_addresses.get().map_or(&[], Vec::as_slice),
        unmatched,
    };
    policy
        .resolve(host, port, timeout)
        .await
        .map_err(|e| match e {
            DestinationError::Denied => ProxyError::DestinationDenied(host.to_string()),
            DestinationError::Unreachable => ProxyError::Unreachable,
            DestinationError::Timeout(d) => {
                ProxyError::UpstreamTimeout(humantime::format_duration(d).to_string())
            }
        })
}

/// A CONNECT's `host:port`, refused when it is malformed (no port, empty host, user info) or
/// not allowed. A host some route names (a *routed* host) may be reached on the port its
/// route matches without listing it in `connect.allowed_ports`; other hosts need an allowed
/// port and `unmatched: pass`, and their addresses pass the destination rules.
async fn tunnel(ctx: &RequestContext, uri: &Uri) -> Result<TunnelPlan, ProxyError> {
    let malformed = || ProxyError::BadRequest("CONNECT needs host:port".into());
    let authority = uri.authority().cloned().ok_or_else(malformed)?;
    if authority.as_str().contains('@') {
        return Err(ProxyError::BadRequest(
            "user info in a CONNECT target is not allowed".into(),
        ));
    }
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    if host.is_empty() {
        return Err(malformed());
    }
    let port = authority
        .port_u16()
        .filter(|p| *p != 0)
        .ok_or_else(malformed)?;
    let config = &ctx.snapshot.config;
    let routes = ctx.snapshot.routes.for_tunnel(authority.host(), port);
    let port_allowed = config.connect.allowed_ports.contains(&port);
    if !port_allowed && !routes.routed {
        return Err(ProxyError::PortNotAllowed(port));
    }
    if config.unmatched == Unmatched::Deny && !routes.routed {
        return Err(ProxyError::Denied(authority.host().to_string()));
    }
    let kind = if routes.intercepted {
        let ca = ctx.state().intercept_ca().ok_or_else(|| {
            ProxyError::Interception(
                "no intercept_ca is loaded (see the error logged when it was read)".into(),
            )
        })?;
        let tls = ca
            .server_config(authority.host())
            .map_err(|e| ProxyError::Interception(e.to_string()))?;
        TunnelKind::Intercept(tls)
    } else if routes.routed && !port_allowed {
        TunnelKind::HttpOnly
    } else {
        // An unrouted tunnel passes both port rules: `connect.allowed_ports` above (which
        // ports may carry opaque bytes), `unmatched_ports` in the destination check.
        let unmatched = (!routes.routed).then_some(&config.unmatched_reach);
        TunnelKind::Open {
            addrs: destination(ctx, authority.host(), port, unmatched).await?,
            routed: routes.routed,
        }
    };
    Ok(TunnelPlan { authority, kind })
}

/// Headers that ask a server to treat a request as another method.
const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Checks a routed request before anything is sent: a route's `clients` list and, for a
/// per-client credential, that the user has one (decided here, so that no token is fetched
/// for a client that may not spend it); on routes
/// with a credential, methods that would echo it (TRACE, TRACK), method-override headers
/// that would get around `methods`, and paths that a Java or Windows upstream would resolve
/// outside the route's `path_prefix`.
fn check_routed(
    route: &Route,
    user: Option<&str>,
    method: &Method,
    uri: &Uri,
    headers: &http::HeaderMap,
) -> Result<(), ProxyError> {
    if !route.allows_client(user)
        || (route.credential.is_some() && route.credential_for(user).is_none())
    {
        return Err(ProxyError::ClientNotAllowed(route.name.to_string()));
    }
    if route.restricts_methods() && METHOD_OVERRIDES.iter().any(|h| headers.contains_key(*h)) {
        return Err(ProxyError::BadRequest(
            "method-override headers are not allowed on a route that restricts methods".into(),
        ));
    }
    if route.credential.is_none() {
        return Ok(());
    }
    if method == Method::TRACE || method.as_str().eq_ignore_ascii_case("TRACK") {
        return Err(ProxyError::MethodNotAllowed(method.clone()));
    }
    check_credential_path(uri.path())
}

/// How many levels of percent-encoding are undone looking for hidden dots and slashes;
/// deeper nesting is refused outright.
const MAX_DECODE_LEVELS: usize = 4;

/// Refuses, at every level of percent-encoding, what Tomcat, Spring, Jetty or IIS would turn
/// into a different path: `;` parameters (`/..;/`), encoded dots and slashes (`%2e`,
/// `%252e`, `%2f`, `%5c`), NUL, backslashes, dot segments, and bytes that are not UTF-8
/// (overlong encodings such as `%c0%ae`).
fn check_credential_path(path: &str) -> Result<(), ProxyError> {
    // Most paths hold none of these bytes: answer without allocating.
    if !path
        .bytes()
        .any(|b| matches!(b, b'%' | b';' | b'\\' | b'.'))
    {
        return Ok(());
    }
    let refuse = |why: &str| Err(ProxyError::BadRequest(format!("path refused: {why}")));
    let mut level: Vec<u8> = path.as_bytes().to_vec();
    for _ in 0..=MAX_DECODE_LEVELS {
        let lower = level.to_ascii_lowercase();
        if ["%2e", "%2f", "%5c", "%00"]
            .iter()
            .any(|needle| lower.windows(3).any(|w| w == needle.as_bytes()))
        {
            return refuse("encoded dots, slashes or NUL");
        }
        if level.iter().any(|b| matches!(b, b';' | b'\\' | 0)) {
            return refuse("`;` parameters, backslashes or NUL");
        }
        let Ok(text) = std::str::from_utf8(&level) else {
            return refuse("bytes that are not UTF-8 (overlong encodings)");
        };
        if text.split('/').any(|seg| seg == "." || seg == "..") {
            return refuse("dot segments");
        }
        let next = percent_decode(&level);
        if next == level {
            return Ok(());
        }
        level = next;
    }
    refuse("too many levels of percent-encoding")
}

/// One level of percent-decoding; a `%` not followed by two hex digits stays as it is.
fn percent_decode(bytes: &[u8]) -> Vec<u8> {
    let hex = |b: u8| (b as char).to_digit(16);
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    out
}

/// Refuses `.`/`..` segments (also percent-encoded) and encoded slashes: an upstream that
/// normalises them would serve a path that the route's `path_prefix` did not allow.
fn check_path(path: &str) -> Result<(), ProxyError> {
    // Most paths hold none of these bytes: answer without allocating.
    if !path.bytes().any(|b| matches!(b, b'%' | b'.' | b'\\')) {
        return Ok(());
    }
    let lower = path.to_ascii_lowercase();
    let decoded = lower.replace("%2e", ".");
    if lower.contains("%2f") || lower.contains("%5c") || path.contains('\\') {
        return Err(ProxyError::BadRequest(
            "encoded slashes in the path are not allowed".into(),
        ));
    }
    if decoded.split('/').any(|seg| seg == "." || seg == "..") {
        return Err(ProxyError::BadRequest(
            "dot segments in the path are not allowed".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{check_credential_path, check_path};

    #[test]
    fn dot_segments_and_encoded_slashes_are_refused() {
        assert!(check_path("/api/v1/x").is_ok());
        assert!(check_path("/api/v1/..x").is_ok());
        for bad in [
            "/api/v1/../admin",
            "/api/./x",
            "/api/%2e%2E/x",
            "/api%2fx",
            "/a\\b",
            "/..",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn credential_paths_refuse_what_java_servers_would_resolve() {
        for good in [
            "/api/v1/x",
            "/api/v1/a.b/c..d",
            "/api/v1/caf%C3%A9",
            "/api/v1/%41",
            "/api/v1/100%25",
            "/api/v1/50%",
        ] {
            assert!(check_credential_path(good).is_ok(), "{good}");
        }
        for bad in [
            "/api/v1/..;/admin",
            "/api/v1/%2e%2e%3b/admin",
            "/api/v1/%252e%252e/admin",
            "/api/v1/%25252e/admin",
            "/api/v1/..%00/admin",
            "/api/v1/%c0%ae%c0%ae/admin",
            "/api/v1/%e0%80%ae/admin",
            "/api/v1/%252f",
            "/api/v1/%255c",
            "/api/v1/x;a=b",
            "/api/v1/%3b",
            "/api/v1/%2525252525252e",
        ] {
            assert!(check_credential_path(bad).is_err(), "{bad}");
        }
    }
}
