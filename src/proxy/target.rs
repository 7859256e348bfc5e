//! Where a request goes: the route it matches and the absolute upstream URI, for both
//! forward-proxy (absolute-form) and reverse-proxy (mount, origin-form) requests.

use std::sync::Arc;

use http::uri::{PathAndQuery, Scheme};
use http::{Method, Uri};

use super::respond::ProxyError;
use crate::config::Unmatched;
use crate::routes::{Route, UpstreamTarget};
use crate::state::Snapshot;

/// The outcome of routing one request.
pub struct Target {
    /// The matched route; `None` for passed-through unmatched traffic.
    pub route: Option<Arc<Route>>,
    /// The absolute URI to send upstream.
    pub uri: Uri,
    /// The scheme and authority the client addressed (forward and tunnel mode; `None` for
    /// mount requests), for the access log and redirect rewriting.
    pub client_origin: Option<(Scheme, http::uri::Authority)>,
}

/// Routes a request by its URI. `origin_scheme` is the scheme of requests that arrive inside
/// an intercepted TLS tunnel (origin-form, but meant for `authority`), else `None`.
pub fn resolve(snapshot: &Snapshot, method: &Method, uri: &Uri) -> Result<Target, ProxyError> {
    match (uri.scheme(), uri.authority()) {
        (Some(scheme), Some(_)) => forward_target(snapshot, method, uri, scheme.clone()),
        (None, None) if uri.path().starts_with('/') => mount_target(snapshot, method, uri),
        _ => Err(ProxyError::BadRequest(
            "request target must be an absolute URL (forward proxy) or a path (mount)".into(),
        )),
    }
}

/// Routes a request that arrived inside a CONNECT tunnel to `host:port`: `scheme` is
/// `https` for a decrypted (intercepted) tunnel and `http` for plain HTTP sent through one.
pub fn tunnel_target(
    snapshot: &Snapshot,
    method: &Method,
    uri: &Uri,
    authority: &http::uri::Authority,
    scheme: Scheme,
) -> Result<Target, ProxyError> {
    let path_and_query = uri.path_and_query().map_or("/", PathAndQuery::as_str);
    let absolute = Uri::builder()
        .scheme(scheme.clone())
        .authority(authority.clone())
        .path_and_query(path_and_query)
        .build()
        .map_err(|e| ProxyError::BadRequest(format!("invalid request target: {e}")))?;
    forward_target(snapshot, method, &absolute, scheme)
}

fn forward_target(
    snapshot: &Snapshot,
    method: &Method,
    uri: &Uri,
    scheme: Scheme,
) -> Result<Target, ProxyError> {
    let default_port = if scheme == Scheme::HTTP {
        80
    } else if scheme == Scheme::HTTPS {
        443
    } else {
        return Err(ProxyError::BadRequest(format!(
            "scheme `{scheme}` is not supported"
        )));
    };
    let authority = uri
        .authority()
        .ok_or_else(|| ProxyError::BadRequest("no host".into()))?;
    if authority.as_str().contains('@') {
        return Err(ProxyError::BadRequest(
            "user info in the request URL is not allowed".into(),
        ));
    }
    let (host, port) = crate::upstream::authority::host_and_port(authority.as_str());
    if host.is_empty() {
        return Err(ProxyError::BadRequest("empty host".into()));
    }
    check_path(uri.path())?;
    let port = port.unwrap_or(default_port);
    let route = snapshot
        .routes
        .find(host, port, default_port, uri.path(), method)
        .cloned();
    let Some(route) = route else {
        if snapshot.config.unmatched == Unmatched::Deny {
            return Err(ProxyError::Denied(host.to_string()));
        }
        return Ok(Target {
            route: None,
            uri: uri.clone(),
            client_origin: None,
        });
    };
    let upstream_uri = match &route.upstream {
        // The request's own path and query, unchanged: shared rather than copied and parsed.
        Some(up) if up.base_path.is_empty() => {
            let mut parts = http::uri::Parts::default();
            parts.scheme = Some(up.scheme.clone());
            parts.authority = Some(up.authority.clone());
            parts.path_and_query = Some(
                uri.path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            );
            Uri::from_parts(parts)
                .map_err(|e| ProxyError::BadRequest(format!("invalid request target: {e}")))?
        }
        Some(up) => rebase(up, uri.path(), uri.query())?,
        None if scheme == Scheme::HTTP && sends_in_clear(&route, host) => {
            if port != default_port {
                return Err(ProxyError::CleartextRefused(route.name.to_string()));
            }
            to_https(uri)?
        }
        None => uri.clone(),
    };
    let client_origin = Some((scheme, authority.clone()));
    Ok(Target {
        route: Some(route),
        uri: upstream_uri,
        client_origin,
    })
}

fn mount_target(snapshot: &Snapshot, method: &Method, uri: &Uri) -> Result<Target, ProxyError> {
    check_path(uri.path())?;
    let (route, rest) = snapshot
        .routes
        .find_mount(uri.path(), method)
        .ok_or_else(|| ProxyError::NoMount(uri.path().to_string()))?;
    let upstream = route
        .upstream
        .as_ref()
        .ok_or_else(|| ProxyError::NoMount(uri.path().to_string()))?;
    let target = rebase(upstream, rest, uri.query())?;
    Ok(Target {
        route: Some(Arc::clone(route)),
        uri: target,
        client_origin: None,
    })
}

/// Whether sending this route's credential to `host` over plain HTTP would expose it on the
/// network: the route has a credential, did not say `allow_cleartext`, and `host` is not this
/// machine.
fn sends_in_clear(route: &Route, host: &str) -> bool {
    route.credential.is_some() && !route.allow_cleartext && !crate::access::is_loopback_host(host)
}

/// The same request to the host's `https://` origin (default port), so that a legacy client
/// speaking plain HTTP to the proxy never puts the credential on the wire in clear.
fn to_https(uri: &Uri) -> Result<Uri, ProxyError> {
    let host = uri.host().unwrap_or_default();
    let path_and_query = uri.path_and_query().map_or("/", PathAndQuery::as_str);
    Uri::builder()
        .scheme(Scheme::HTTPS)
        .authority(host)
        .path_and_query(path_and_query)
        .build()
        .map_err(|e| ProxyError::BadRequest(format!("invalid request target: {e}")))
}

/// Headers that ask a server to treat a request as another method.
const METHOD_OVERRIDES: [&str; 3] = [
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
];

/// Checks a routed request before anything is sent: a route's `clients` list, and on routes
/// with a credential, methods that would echo it (TRACE, TRACK), method-override headers
/// that would get around `methods`, and paths that a Java or Windows upstream would resolve
/// outside the route's `path_prefix`.
pub fn check_routed(
    route: &Route,
    user: Option<&str>,
    method: &Method,
    uri: &Uri,
    headers: &http::HeaderMap,
) -> Result<(), ProxyError> {
    if !route.allows_client(user) {
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

/// `upstream` + its base path + `path` + `?query`.
fn rebase(upstream: &UpstreamTarget, path: &str, query: Option<&str>) -> Result<Uri, ProxyError> {
    let mut pq = String::with_capacity(
        upstream.base_path.len() + path.len() + query.map_or(0, |q| q.len() + 1),
    );
    pq.push_str(&upstream.base_path);
    pq.push_str(path);
    if let Some(q) = query {
        pq.push('?');
        pq.push_str(q);
    }
    Uri::builder()
        .scheme(upstream.scheme.clone())
        .authority(upstream.authority.clone())
        .path_and_query(pq)
        .build()
        .map_err(|e| ProxyError::BadRequest(format!("invalid request target: {e}")))
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
    use super::{check_credential_path, check_path, to_https};

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

    #[test]
    fn plain_http_goes_to_the_https_origin() {
        let uri: http::Uri = "http://api.example.com/v1/x?q=1".parse().unwrap();
        assert_eq!(
            to_https(&uri).unwrap().to_string(),
            "https://api.example.com/v1/x?q=1"
        );
    }
}
