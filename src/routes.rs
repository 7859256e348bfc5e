//! The immutable route table: which rule (and so which credential) applies to a request.
//!
//! Lookup is indexed by host, so its cost grows with the number of DNS labels in the request's
//! host, not with the number of routes. Among the routes that match, the one written first in
//! the file wins.

use std::collections::HashMap;
use std::sync::Arc;

use http::Method;

use crate::config::{CredentialChoice, OnUnauthorized, RouteConfig};
use crate::metrics::{Metrics, RouteMetrics};
use crate::token_store::CredentialSlot;
pub use crate::vocab::hosts::{HostPattern, UpstreamTarget};

/// A route ready for traffic: the validated rule as configured, plus what is resolved once
/// for it — its credential's token slot, the upstream a mount route defaults to, its metric
/// handles. A new route option is a field of `RouteConfig` read from here; nothing is copied.
#[derive(Debug)]
pub struct Route {
    /// The route's name, for logs and metrics (shared, not copied per request).
    pub name: Arc<str>,
    /// The rule as configured and validated.
    pub config: RouteConfig,
    /// Where to send matched requests (`config.upstream`, or the https origin of a mount
    /// route's host); `None` means the request's own origin.
    pub upstream: Option<UpstreamTarget>,
    /// The credential injected on matched requests: one slot, or one per client.
    pub credential: Option<RouteCredential>,
    /// This route's metric handles.
    pub metrics: RouteMetrics,
}

/// The credential slots a route injects from.
#[derive(Debug)]
pub enum RouteCredential {
    /// One slot for every client.
    Shared(Arc<CredentialSlot>),
    /// A slot per authenticated user, and the slot of users without an entry.
    PerClient {
        by_client: HashMap<String, Arc<CredentialSlot>>,
        default: Option<Arc<CredentialSlot>>,
    },
}

impl Route {
    /// The slot whose token `user`'s requests on this route carry; `None` on a route without
    /// credential, and for a user a per-client credential has no entry (and no default) for.
    pub fn credential_for(&self, user: Option<&str>) -> Option<&Arc<CredentialSlot>> {
        match self.credential.as_ref()? {
            RouteCredential::Shared(slot) => Some(slot),
            RouteCredential::PerClient { by_client, default } => {
                user.and_then(|u| by_client.get(u)).or(default.as_ref())
            }
        }
    }

    /// Whether a request to `port` may use this route. A host written without a port confines
    /// the route to the scheme's `default_port` (a credential for `localhost` is not for every
    /// service on it), unless the route names its `upstream`, where the credential goes anyway.
    fn accepts_port(&self, port: u16, default_port: u16) -> bool {
        match self.config.host.as_ref().and_then(HostPattern::port) {
            Some(p) => p == port,
            None => self.upstream.is_some() || port == default_port,
        }
    }

    /// Whether `user` (the authenticated client, if any) may use this route.
    pub fn allows_client(&self, user: Option<&str>) -> bool {
        match (&self.config.clients, user) {
            (None, _) => true,
            (Some(list), Some(u)) => list.iter().any(|c| c == u),
            (Some(_), None) => false,
        }
    }

    /// Whether requests on this route must not name a method other than their own (the
    /// route restricts `methods`, so `X-HTTP-Method-Override` would get around it).
    pub fn restricts_methods(&self) -> bool {
        self.config.methods.is_some()
    }

    fn matches_request(&self, path: &str, method: &Method) -> bool {
        self.config
            .methods
            .as_ref()
            .is_none_or(|m| m.contains(method))
            && self
                .config
                .path_prefix
                .as_deref()
                .is_none_or(|prefix| path_has_prefix(path, prefix))
    }

    /// Whether a 401/403 for `slot`'s token on this route is worth a refresh and a replay.
    pub fn refreshes_on_unauthorized(&self, slot: &CredentialSlot) -> bool {
        self.config.on_unauthorized == OnUnauthorized::Retry && slot.refreshable()
    }
}

/// The slots of a validated choice; a name without a slot leaves that entry out (validation
/// guarantees every name has one).
fn route_credential(
    choice: &CredentialChoice,
    slots: &HashMap<String, Arc<CredentialSlot>>,
) -> Option<RouteCredential> {
    match choice {
        CredentialChoice::Shared(name) => slots.get(name).cloned().map(RouteCredential::Shared),
        CredentialChoice::PerClient { by_client, default } => Some(RouteCredential::PerClient {
            by_client: by_client
                .iter()
                .filter_map(|(user, name)| Some((user.clone(), slots.get(name)?.clone())))
                .collect(),
            default: default.as_ref().and_then(|name| slots.get(name).cloned()),
        }),
    }
}

/// Segment-aware prefix test: `/api/v1` and `/api/v1/` both match `/api/v1` and `/api/v1/x`,
/// never `/api/v1x`.
pub fn path_has_prefix(path: &str, prefix: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// What the routes say about a CONNECT tunnel's `host:port`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TunnelRoutes {
    /// Some route names the host and port.
    pub routed: bool,
    /// Some route naming it says `intercept: true`.
    pub intercepted: bool,
}

/// All routes, indexed for lookup.
#[derive(Debug, Default)]
pub struct RouteTable {
    routes: Vec<Arc<Route>>,
    exact: HostIndex,
    wildcard: HostIndex,
    mounts: Vec<usize>,
}

/// Route indexes by host, in file order. Looked up with every request's host: foldhash
/// (seeded per process) rather than SipHash.
type HostIndex = HashMap<String, Vec<usize>, foldhash::fast::RandomState>;

impl RouteTable {
    /// Builds the table; `slots` must hold every credential the routes name (validation
    /// guarantees it; a missing one leaves the route without credential).
    pub fn build(
        configs: &[RouteConfig],
        slots: &HashMap<String, Arc<CredentialSlot>>,
        metrics: &Metrics,
    ) -> Self {
        let mut table = RouteTable::default();
        for (i, c) in configs.iter().enumerate() {
            let upstream = c.upstream.clone().or_else(|| {
                c.mount
                    .as_ref()
                    .and(c.host.as_ref())
                    .and_then(UpstreamTarget::https_for)
            });
            let route = Route {
                name: Arc::from(c.name.as_str()),
                config: c.clone(),
                upstream,
                credential: c
                    .credential
                    .as_ref()
                    .and_then(|choice| route_credential(choice, slots)),
                metrics: metrics.for_route(&c.name, &c.credential_names()),
            };
            if let Some(h) = &c.host {
                let index = if h.is_exact() {
                    &mut table.exact
                } else {
                    &mut table.wildcard
                };
                index.entry(h.host().to_string()).or_default().push(i);
            }
            if c.mount.is_some() {
                table.mounts.push(i);
            }
            table.routes.push(Arc::new(route));
        }
        table
    }

    /// Number of routes.
    pub fn len(&self) -> usize {
        self.routes.len()
    }

    /// True when there are no routes.
    pub fn is_empty(&self) -> bool {
        self.routes.is_empty()
    }

    /// The first route (in file order) whose host, port, path and method match a
    /// forward-proxy request. `host` may be in any case and carry a trailing dot;
    /// `default_port` is the request scheme's (80 or 443), which a route host written without
    /// a port is confined to.
    pub fn find(
        &self,
        host: &str,
        port: u16,
        default_port: u16,
        path: &str,
        method: &Method,
    ) -> Option<&Arc<Route>> {
        let host = normalize_host(host);
        let host = host.as_ref();
        let mut best: Option<usize> = None;
        let mut consider = |candidates: Option<&Vec<usize>>| {
            for &i in candidates.into_iter().flatten() {
                if best.is_some_and(|b| b < i) {
                    break;
                }
                let r = &self.routes[i];
                if r.config
                    .host
                    .as_ref()
                    .is_some_and(|h| h.matches(host, port))
                    && r.accepts_port(port, default_port)
                    && r.matches_request(path, method)
                {
                    best = Some(i);
                    break;
                }
            }
        };
        consider(self.exact.get(host));
        if !self.wildcard.is_empty() {
            for (dot, _) in host.match_indices('.') {
                consider(self.wildcard.get(&host[dot + 1..]));
            }
        }
        best.map(|i| &self.routes[i])
    }

    /// What the routes say about a CONNECT tunnel to `host:port`, in one pass: whether any
    /// route names it (a route host without a port names port 443 only), and whether one
    /// intercepts it.
    pub fn for_tunnel(&self, host: &str, port: u16) -> TunnelRoutes {
        let host = normalize_host(host);
        let mut found = TunnelRoutes::default();
        for r in &self.routes {
            if r.accepts_port(port, 443)
                && r.config
                    .host
                    .as_ref()
                    .is_some_and(|h| h.matches(host.as_ref(), port))
            {
                found.routed = true;
                if r.config.intercept {
                    found.intercepted = true;
                    break;
                }
            }
        }
        found
    }

    /// The first mount route whose prefix, path and method match an origin-form request,
    /// with the path that remains after the mount prefix (always starting with `/`).
    pub fn find_mount<'p>(&self, path: &'p str, method: &Method) -> Option<(&Arc<Route>, &'p str)> {
        self.mounts.iter().find_map(|&i| {
            let r = &self.routes[i];
            let mount = r.config.mount.as_deref()?;
            let rest = path.strip_prefix(mount)?;
            if !(rest.is_empty() || rest.starts_with('/')) {
                return None;
            }
            let rest = if rest.is_empty() { "/" } else { rest };
            r.matches_request(rest, method).then_some((r, rest))
        })
    }

    /// Every route, in file order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Route>> {
        self.routes.iter()
    }
}

/// Lower-cases and strips one trailing dot, borrowing when nothing changes.
fn normalize_host(host: &str) -> std::borrow::Cow<'_, str> {
    let trimmed = host.strip_suffix('.').unwrap_or(host);
    if trimmed.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(trimmed.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(trimmed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::uri::Scheme;

    fn route(
        name: &str,
        host: &str,
        prefix: Option<&str>,
        methods: Option<Vec<Method>>,
    ) -> RouteConfig {
        RouteConfig {
            name: name.into(),
            host: Some(HostPattern::parse(host).unwrap()),
            path_prefix: prefix.map(String::from),
            methods,
            mount: None,
            upstream: None,
            credential: None,
            on_unauthorized: OnUnauthorized::Retry,
            refresh_on: Default::default(),
            intercept: false,
            rewrite_location: true,
            clients: None,
            allow_cleartext: false,
            tls_client_cert: None,
        }
    }

    fn table(routes: Vec<RouteConfig>) -> RouteTable {
        RouteTable::build(&routes, &HashMap::new(), &Metrics::new())
    }

    fn found(t: &RouteTable, host: &str, path: &str) -> Option<String> {
        t.find(host, 443, 443, path, &Method::GET)
            .map(|r| r.name.to_string())
    }

    #[test]
    fn exact_host_is_case_insensitive_and_never_a_substring() {
        let t = table(vec![route("a", "acme.outseta.com", None, None)]);
        assert_eq!(found(&t, "ACME.Outseta.com", "/"), Some("a".into()));
        assert_eq!(found(&t, "acme.outseta.com.", "/"), Some("a".into()));
        assert_eq!(found(&t, "acme.outseta.com.evil.test", "/"), None);
        assert_eq!(found(&t, "xacme.outseta.com", "/"), None);
        assert_eq!(found(&t, "evil.test", "/?acme.outseta.com"), None);
    }

    #[test]
    fn wildcard_matches_one_or_more_labels_only() {
        let t = table(vec![route("w", "*.outseta.com", None, None)]);
        assert_eq!(found(&t, "acme.outseta.com", "/"), Some("w".into()));
        assert_eq!(found(&t, "a.b.outseta.com", "/"), Some("w".into()));
        assert_eq!(found(&t, "outseta.com", "/"), None);
        assert_eq!(found(&t, "eviloutseta.com", "/"), None);
        assert_eq!(found(&t, "outseta.com.evil.test", "/"), None);
    }

    #[test]
    fn first_route_in_file_order_wins_across_exact_and_wildcard() {
        let t = table(vec![
            route("wild", "*.example.com", Some("/admin"), None),
            route("exact", "api.example.com", None, None),
            route("wild-all", "*.example.com", None, None),
        ]);
        assert_eq!(
            found(&t, "api.example.com", "/admin/x"),
            Some("wild".into())
        );
        assert_eq!(found(&t, "api.example.com", "/other"), Some("exact".into()));
        assert_eq!(
            found(&t, "www.example.com", "/other"),
            Some("wild-all".into())
        );
    }

    #[test]
    fn path_prefix_is_segment_aware() {
        assert!(path_has_prefix("/api/v1", "/api/v1/"));
        assert!(path_has_prefix("/api/v1/x", "/api/v1"));
        assert!(!path_has_prefix("/api/v1x", "/api/v1"));
        assert!(path_has_prefix("/anything", "/"));
    }

    #[test]
    fn methods_and_ports_restrict() {
        let t = table(vec![
            route("get", "h.test:8080", None, Some(vec![Method::GET])),
            route("any", "h.test", None, None),
        ]);
        assert_eq!(
            t.find("h.test", 8080, 80, "/", &Method::GET)
                .map(|r| &*r.name),
            Some("get")
        );
        assert_eq!(
            t.find("h.test", 8080, 80, "/", &Method::POST)
                .map(|r| &*r.name),
            None,
            "a host without a port is confined to the scheme's default port"
        );
        assert_eq!(
            t.find("h.test", 80, 80, "/", &Method::GET)
                .map(|r| &*r.name),
            Some("any")
        );
        assert_eq!(
            t.find("h.test", 443, 80, "/", &Method::GET)
                .map(|r| &*r.name),
            None
        );
    }

    #[test]
    fn mounts_strip_their_prefix() {
        let mut r = route("m", "acme.outseta.com", Some("/api"), None);
        r.mount = Some("/outseta".into());
        let t = table(vec![r]);
        let (m, rest) = t
            .find_mount("/outseta/api/v1/profile", &Method::GET)
            .unwrap();
        assert_eq!((&*m.name, rest), ("m", "/api/v1/profile"));
        assert!(t.find_mount("/outsetax/api", &Method::GET).is_none());
        assert!(t.find_mount("/outseta/other", &Method::GET).is_none());
        assert_eq!(m.upstream.as_ref().unwrap().scheme, Scheme::HTTPS);
    }

    #[test]
    fn host_patterns_reject_garbage() {
        for bad in ["", "*.", "a..b", "exa mple.com", "h:xx", "*"] {
            assert!(HostPattern::parse(bad).is_err(), "{bad}");
        }
        assert!(HostPattern::parse("[::1]:9000").is_ok());
    }
}
