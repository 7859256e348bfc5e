//! Who may use the proxy, and where traffic that no route claims may go.
//!
//! The proxy holds an organisation's credentials and hands them out on behalf of whoever
//! connects, so a client must first come from an allowed address (`clients.allow_from`,
//! loopback by default) and, when `clients.users` is set, name itself with
//! `Proxy-Authorization: Basic`. Unmatched traffic (`unmatched: pass`) is a relay: it must
//! never reach the proxy's own listeners, link-local addresses (cloud metadata endpoints) or
//! the ranges in `unmatched_deny`.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use http::header::{HeaderMap, PROXY_AUTHORIZATION};
use ipnet::IpNet;

use crate::vocab::secret::Secret;

/// The `Proxy-Authenticate` challenge sent with every 407.
pub const PROXY_AUTHENTICATE_CHALLENGE: &str = "Basic realm=\"authrelay\"";

/// Parses a CIDR range, or a single address (a /32 or /128).
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    let t = text.trim();
    t.parse::<IpNet>()
        .or_else(|_| t.parse::<IpAddr>().map(IpNet::from))
        .map(|n| n.trunc())
        .map_err(|_| format!("`{text}` is not an address range like 10.0.0.0/8 or ::1"))
}

/// Loopback only: the default `allow_from`.
pub fn loopback_nets() -> Vec<IpNet> {
    ["127.0.0.0/8", "::1/128"]
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect()
}

/// One named client's password, kept only as a SHA-256 digest so that comparing it takes
/// the same time whatever the guess.
#[derive(Clone, PartialEq, Eq)]
pub struct User {
    name: Arc<str>,
    digest: [u8; 32],
}

impl User {
    /// A user `name` whose password is `password`.
    pub fn new(name: &str, password: &Secret) -> Self {
        Self {
            name: Arc::from(name),
            digest: sha256(password.expose().as_bytes()),
        }
    }
}

impl fmt::Debug for User {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "User({}, ***)", self.name)
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

/// Equal-length digests compared without an early exit.
fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The validated `clients:` section.
#[derive(Debug, Clone, PartialEq)]
pub struct ClientPolicy {
    /// Client address ranges allowed to connect.
    pub allow_from: Vec<IpNet>,
    /// Named clients by name; empty means no `Proxy-Authorization` is asked for.
    pub users: BTreeMap<String, User>,
}

impl Default for ClientPolicy {
    fn default() -> Self {
        Self {
            allow_from: loopback_nets(),
            users: BTreeMap::new(),
        }
    }
}

/// Why a client's `Proxy-Authorization` was not accepted; never carries what it sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AuthFailure {
    /// No `Proxy-Authorization` header.
    #[error("proxy authentication required")]
    Missing,
    /// A header that is not `Basic` with a known user and the right password.
    #[error("proxy authentication failed")]
    Rejected,
}

impl ClientPolicy {
    /// Whether a client at `peer` may connect at all.
    pub fn admits(&self, peer: IpAddr) -> bool {
        let peer = peer.to_canonical();
        self.allow_from.iter().any(|n| n.contains(&peer))
    }

    /// Whether requests must carry `Proxy-Authorization`.
    pub fn requires_auth(&self) -> bool {
        !self.users.is_empty()
    }

    /// The authenticated user's name (`None` when no users are configured), or why not.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Arc<str>>, AuthFailure> {
        if self.users.is_empty() {
            return Ok(None);
        }
        let value = headers
            .get(PROXY_AUTHORIZATION)
            .ok_or(AuthFailure::Missing)?;
        let (name, password) = basic_credentials(value.as_bytes()).ok_or(AuthFailure::Rejected)?;
        let offered = sha256(password.as_bytes());
        // An unknown name costs the same comparison as a wrong password.
        let (user, expected) = match self.users.get(&name) {
            Some(u) => (Some(u), u.digest),
            None => (None, sha256(b"\0no such user\0")),
        };
        match (same_digest(&offered, &expected), user) {
            (true, Some(u)) => Ok(Some(Arc::clone(&u.name))),
            _ => Err(AuthFailure::Rejected),
        }
    }

    /// Why this policy is dangerous, when the proxy listens beyond loopback, admits clients
    /// beyond loopback and asks none of them who they are.
    pub fn open_relay_risk(&self, listen: SocketAddr) -> Option<String> {
        let loopback = loopback_nets();
        let wide = self
            .allow_from
            .iter()
            .any(|n| !loopback.iter().any(|l| l.contains(n)));
        (!listen.ip().is_loopback() && wide && self.users.is_empty()).then(|| {
            format!(
                "the proxy listens on {listen} and admits clients from {} without `clients.users`: \
                 anyone who can reach it can use every configured credential; add `clients.users` \
                 or narrow `clients.allow_from`",
                self.allow_from
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
    }
}

/// `Basic base64(name:password)` → (name, password).
fn basic_credentials(value: &[u8]) -> Option<(String, String)> {
    let text = std::str::from_utf8(value).ok()?.trim();
    let (scheme, encoded) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (name, password) = decoded.split_once(':')?;
    Some((name.to_string(), password.to_string()))
}

/// Who sent a request: the peer address and, when users are configured, the user's name.
/// Travels with each request (as a request extension) into routing and the access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    /// The client's address.
    pub addr: IpAddr,
    /// The authenticated user, if users are configured.
    pub user: Option<Arc<str>>,
}

impl Client {
    /// How the access log names the client: the user, else the address.
    pub fn label(&self) -> String {
        match &self.user {
            Some(u) => u.to_string(),
            None => self.addr.to_string(),
        }
    }
}

/// Where unmatched traffic may not go: the proxy's own listeners, unspecified and link-local
/// addresses, and the configured extra ranges.
#[derive(Debug, Clone, Copy)]
pub struct DestinationPolicy<'a> {
    /// The proxy's own bound listen and admin addresses.
    pub own: &'a [SocketAddr],
    /// `unmatched_deny`.
    pub deny: &'a [IpNet],
}

/// Link-local addresses (`169.254.0.0/16`, `fe80::/10`): cloud metadata endpoints live there,
/// and nothing a legacy app calls through a relay does.
fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

impl DestinationPolicy<'_> {
    /// Whether unmatched traffic may connect to `addr`.
    pub fn allows(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip().to_canonical();
        if ip.is_unspecified() || is_link_local(ip) || self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        !self.own.iter().any(|own| {
            own.port() == addr.port()
                && (own.ip().to_canonical() == ip
                    || (own.ip().is_unspecified() && ip.is_loopback()))
        })
    }

    /// Resolves `host:port` (or takes an IP literal) within `timeout` and returns its
    /// addresses, all of which are allowed; `Denied` when any is not (a name that also
    /// resolves to an internal address is refused whole), `Unreachable` when it does not
    /// resolve.
    pub async fn resolve(
        &self,
        host: &str,
        port: u16,
        timeout: Duration,
    ) -> Result<Vec<SocketAddr>, DestinationError> {
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, port)],
            Err(_) => {
                let lookup = tokio::net::lookup_host((bare, port));
                match tokio::time::timeout(timeout, lookup).await {
                    Ok(Ok(found)) => found.collect(),
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, host, "destination does not resolve");
                        return Err(DestinationError::Unreachable);
                    }
                    Err(_) => return Err(DestinationError::Timeout(timeout)),
                }
            }
        };
        if addrs.is_empty() {
            return Err(DestinationError::Unreachable);
        }
        if addrs.iter().all(|a| self.allows(*a)) {
            Ok(addrs)
        } else {
            Err(DestinationError::Denied)
        }
    }
}

/// Why unmatched traffic cannot go to a destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DestinationError {
    /// The destination is one the policy refuses.
    #[error("destination denied")]
    Denied,
    /// The name does not resolve.
    #[error("upstream unreachable")]
    Unreachable,
    /// The name did not resolve in time.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
}

/// Whether `host` (a request's or an upstream's) is this machine: a loopback IP literal or
/// `localhost`. A credential may travel there over plain HTTP.
pub fn is_loopback_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn policy() -> ClientPolicy {
        let mut users = BTreeMap::new();
        users.insert("app".to_string(), User::new("app", &Secret::new("pw:1")));
        ClientPolicy {
            allow_from: vec![parse_net("10.0.0.0/8").unwrap(), parse_net("::1").unwrap()],
            users,
        }
    }

    fn basic(text: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        let value = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(text)
        );
        h.insert(PROXY_AUTHORIZATION, HeaderValue::from_str(&value).unwrap());
        h
    }

    #[test]
    fn allow_from_matches_ranges_and_mapped_addresses() {
        let p = policy();
        assert!(p.admits("10.1.2.3".parse().unwrap()));
        assert!(p.admits("::ffff:10.1.2.3".parse().unwrap()));
        assert!(p.admits("::1".parse().unwrap()));
        assert!(!p.admits("127.0.0.1".parse().unwrap()));
        assert!(ClientPolicy::default().admits("127.0.0.2".parse().unwrap()));
        assert!(parse_net("10.0.0.0/33").is_err());
        assert!(parse_net("nope").is_err());
    }

    #[test]
    fn basic_auth_accepts_only_the_right_password() {
        let p = policy();
        assert_eq!(
            p.authenticate(&basic("app:pw:1")).unwrap().as_deref(),
            Some("app")
        );
        assert_eq!(p.authenticate(&basic("app:pw")), Err(AuthFailure::Rejected));
        assert_eq!(
            p.authenticate(&basic("other:pw:1")),
            Err(AuthFailure::Rejected)
        );
        assert_eq!(p.authenticate(&HeaderMap::new()), Err(AuthFailure::Missing));
        assert_eq!(
            ClientPolicy::default().authenticate(&HeaderMap::new()),
            Ok(None)
        );
        assert_eq!(format!("{:?}", p.users["app"]), "User(app, ***)");
    }

    #[test]
    fn destinations_exclude_own_and_link_local_addresses() {
        let own: SocketAddr = "127.0.0.1:3128".parse().unwrap();
        let wildcard: SocketAddr = "0.0.0.0:9901".parse().unwrap();
        let deny = [parse_net("10.0.0.0/8").unwrap()];
        let d = DestinationPolicy {
            own: &[own, wildcard],
            deny: &deny,
        };
        for denied in [
            "127.0.0.1:3128",
            "[::ffff:127.0.0.1]:3128",
            "127.0.0.1:9901",
            "0.0.0.0:80",
            "169.254.169.254:80",
            "[fe80::1]:80",
            "10.2.3.4:443",
        ] {
            assert!(!d.allows(denied.parse().unwrap()), "{denied}");
        }
        for allowed in ["127.0.0.1:8080", "127.0.0.2:3128", "192.0.2.1:443"] {
            assert!(d.allows(allowed.parse().unwrap()), "{allowed}");
        }
    }

    #[test]
    fn open_relay_risk_needs_all_three_conditions() {
        let wide = ClientPolicy {
            allow_from: vec![parse_net("0.0.0.0/0").unwrap()],
            users: BTreeMap::new(),
        };
        let public: SocketAddr = "0.0.0.0:3128".parse().unwrap();
        assert!(wide.open_relay_risk(public).is_some());
        assert!(wide
            .open_relay_risk("127.0.0.1:3128".parse().unwrap())
            .is_none());
        assert!(ClientPolicy::default().open_relay_risk(public).is_none());
        assert!(policy().open_relay_risk(public).is_none());
    }
}
