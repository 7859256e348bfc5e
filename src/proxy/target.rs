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
    let host = authority.host();
    if host.is_empty() {
        return Err(ProxyError::BadRequest("empty host".into()));
    }
    check_path(uri.path())?;
    let port = authority.port_u16().unwrap_or(default_port);
    let route = snapshot
        .routes
        .find(host, port, uri.path(), method)
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
    let client_origin = Some((scheme, authority.clone()));
    let uri = match &route.upstream {
        Some(up) => rebase(up, uri.path(), uri.query())?,
        None => uri.clone(),
    };
    Ok(Target {
        route: Some(route),
        uri,
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
    use super::check_path;

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
}
