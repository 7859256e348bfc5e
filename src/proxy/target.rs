//! Where a request goes: the route it matches and the absolute upstream URI, for
//! forward-proxy (absolute-form), reverse-proxy (mount, origin-form) and in-tunnel requests.
//! Routing only: whether the request may go there is `admission.rs`'s to say.

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
    /// The scheme and authority the client addressed, for the access log and redirect
    /// rewriting, where `uri` does not carry them: `None` for mount requests, and where `uri`
    /// goes where the client named (its own copy, a reference count up and down, would be all
    /// this kept).
    pub client_origin: Option<(Scheme, http::uri::Authority)>,
    /// How long the host is at the start of the authority the client named (`client_origin`'s,
    /// or `uri`'s when the request goes where it named), as routing read it; `None` for mount
    /// requests. The access line names that host without reading the authority again.
    pub named_host_len: Option<usize>,
    /// Whether the request would carry its route's credential (or need its client
    /// certificate) over plain HTTP beyond this machine: read here, where the host is
    /// parsed anyway; admission refuses it (`cleartext_refused`).
    pub in_clear: bool,
    /// Whether `uri` is the request's own URI, unchanged (forward-proxy traffic to the host
    /// it named): the first attempt then takes the request's instead of a copy of this one
    /// (`Exchange::first_uri`; a copy and its drop are four reference counts).
    pub uri_is_the_requests: bool,
}

impl Target {
    /// The host the client named, as routing read it (`None` for mount requests).
    pub fn named_host(&self) -> Option<&str> {
        let authority = match &self.client_origin {
            Some((_, authority)) => authority,
            None => self.uri.authority()?,
        };
        authority.as_str().get(..self.named_host_len?)
    }
}

/// Routes a request by its URI: absolute-form is a forward-proxy request, origin-form a
/// mount (base-URL) request.
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
    let mut target = forward_target(snapshot, method, &absolute, scheme)?;
    // Routed by the absolute URI made here; the request's own is in origin form.
    target.uri_is_the_requests = false;
    Ok(target)
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
    let (host, port, user_info) =
        crate::upstream::authority::host_port_and_user_info(authority.as_str());
    if user_info {
        return Err(ProxyError::BadRequest(
            "user info in the request URL is not allowed".into(),
        ));
    }
    if host.is_empty() {
        return Err(ProxyError::BadRequest("empty host".into()));
    }
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
            named_host_len: Some(host.len()),
            in_clear: false,
            uri_is_the_requests: true,
        });
    };
    let in_clear =
        scheme == Scheme::HTTP && route.upstream.is_none() && sends_in_clear(&route, host);
    let mut uri_is_the_requests = false;
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
        // On the scheme's own port, plain http to a credential host is taken to its https
        // origin; on another port it stays, and admission refuses it (`cleartext_refused`).
        None if in_clear && port == default_port => to_https(uri)?,
        None => {
            uri_is_the_requests = true;
            uri.clone()
        }
    };
    let client_origin = (!uri_is_the_requests).then(|| (scheme, authority.clone()));
    Ok(Target {
        in_clear: in_clear && port != default_port,
        route: Some(route),
        uri: upstream_uri,
        client_origin,
        named_host_len: Some(host.len()),
        uri_is_the_requests,
    })
}

/// Routes an origin-form request by its path alone (HTTP/2 requests, whose `:authority`
/// names the proxy itself, come here too).
pub fn mount_target(snapshot: &Snapshot, method: &Method, uri: &Uri) -> Result<Target, ProxyError> {
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
        named_host_len: None,
        in_clear: false,
        uri_is_the_requests: false,
    })
}

/// Whether plain HTTP to `host` would defeat this route: it would expose the route's
/// credential on the network (the route has one, did not say `allow_cleartext`, and `host`
/// is not this machine), or could not present the route's client certificate at all (that
/// takes a TLS handshake, whatever the host).
fn sends_in_clear(route: &Route, host: &str) -> bool {
    route.config.tls_client_cert.is_some()
        || (route.credential.is_some()
            && !route.config.allow_cleartext
            && !route_host_is_loopback(route, host))
}

/// Whether `host`, which matched `route`, is this machine: known from the config when the
/// route names one exact host (no parsing per request), read from `host` otherwise.
fn route_host_is_loopback(route: &Route, host: &str) -> bool {
    match &route.config.host {
        Some(pattern) if pattern.is_exact() => pattern.is_loopback(),
        _ => crate::vocab::hosts::is_loopback_host(host),
    }
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

#[cfg(test)]
mod tests {
    use super::to_https;

    #[test]
    fn plain_http_goes_to_the_https_origin() {
        let uri: http::Uri = "http://api.example.com/v1/x?q=1".parse().unwrap();
        assert_eq!(
            to_https(&uri).unwrap().to_string(),
            "https://api.example.com/v1/x?q=1"
        );
    }
}
