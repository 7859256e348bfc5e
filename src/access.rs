//! Who may use the proxy, and where traffic that no route claims may go.
//!
//! The proxy holds an organisation's credentials and hands them out on behalf of whoever
//! connects, so a client must first come from an allowed address (`clients.allow_from`,
//! loopback by default) and, when `clients.users` is set, name itself with
//! `Proxy-Authorization: Basic`, and one address that keeps guessing passwords is made to
//! wait ([`AuthThrottle`]). Unmatched traffic (`unmatched: pass`) is a relay: it must never
//! reach the proxy's own listeners, link-local addresses (cloud metadata endpoints) or the
//! ranges in `unmatched_deny`; and once clients beyond this machine may connect, it must not
//! open the machine's and its network's inside to them either ([`UnmatchedReach`]).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use http::header::{HeaderMap, PROXY_AUTHORIZATION};
use ipnet::IpNet;

use crate::vocab::secret::Secret;

/// The `Proxy-Authenticate` challenge sent with every 407.
pub const PROXY_AUTHENTICATE_CHALLENGE: &str = "Basic realm=\"authrelay\"";

/// Parses a CIDR range, or a single address (a /32 or /128). The error does not repeat the
/// text: a config error names it by its field or its line and column.
pub fn parse_net(text: &str) -> Result<IpNet, String> {
    let t = text.trim();
    t.parse::<IpNet>()
        .or_else(|_| t.parse::<IpAddr>().map(IpNet::from))
        .map(|n| n.trunc())
        .map_err(|_| "is not an address range like 10.0.0.0/8 or ::1".to_string())
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
    /// The client's address failed too often; nothing it sent was checked. Carries how long
    /// until it may try again.
    #[error("too many failed proxy logins from this address; retry in {}s", .0.as_secs().max(1))]
    Throttled(Duration),
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

    /// Whether `allow_from` admits any address beyond loopback: clients on other machines,
    /// for whom this machine's loopback and its network's private ranges are an inside.
    pub fn admits_beyond_loopback(&self) -> bool {
        let loopback = loopback_nets();
        self.allow_from
            .iter()
            .any(|n| !loopback.iter().any(|l| l.contains(n)))
    }

    /// Why this policy is dangerous, when the proxy listens beyond loopback, admits clients
    /// beyond loopback and asks none of them who they are.
    pub fn open_relay_risk(&self, listen: SocketAddr) -> Option<String> {
        let wide = self.admits_beyond_loopback();
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

/// What `check` and the startup log say when credentials are configured and no client has
/// to name itself.
pub const OPEN_TO_LOCAL_PROCESSES: &str =
    "every local process may use these credentials: name the apps in clients.users";

impl ClientPolicy {
    /// [`OPEN_TO_LOCAL_PROCESSES`] when it applies: credentials exist and `clients.users`
    /// does not, so any process that can reach the listener spends them.
    pub fn open_to_local_processes(&self, has_credentials: bool) -> Option<&'static str> {
        (has_credentials && !self.requires_auth()).then_some(OPEN_TO_LOCAL_PROCESSES)
    }
}

/// Failed logins from one client within [`AUTH_FAILURE_WINDOW`] that start a penalty.
pub const AUTH_FAILURES_PER_BURST: u32 = 10;
/// The window [`AUTH_FAILURES_PER_BURST`] failures are counted in.
pub const AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// The first penalty; each further burst doubles it, up to [`AUTH_MAX_PENALTY`].
pub const AUTH_FIRST_PENALTY: Duration = Duration::from_secs(30);
/// The longest penalty; a client quiet this long after its last failure or penalty is
/// forgotten, escalation included.
pub const AUTH_MAX_PENALTY: Duration = Duration::from_secs(300);
/// Clients tracked at once: a flood from many addresses costs at most this many records.
pub const AUTH_MAX_TRACKED: usize = 4096;

/// Makes password guessing slow: after [`AUTH_FAILURES_PER_BURST`] failed proxy logins from
/// one client within a minute, that client is refused (429) for a penalty that doubles with
/// each further burst, before anything it sends is checked, so a right password does not
/// get it through either. A client is an IPv4 address or an IPv6 /64 (one host commonly
/// holds a whole /64). Lives in `State`, so a reload does not forgive anyone.
pub struct AuthThrottle {
    clients: Mutex<HashMap<IpAddr, Record>>,
    failures: prometheus_client::metrics::counter::Counter,
}

/// One client's recent failures.
#[derive(Debug, Clone, Copy)]
struct Record {
    /// The first failure of the current window.
    window_start: Instant,
    /// Failures since `window_start` (reset when a penalty starts).
    failures: u32,
    last_failure: Instant,
    /// The running (or last) penalty's end.
    blocked_until: Option<Instant>,
    /// The last penalty given, which the next one doubles.
    penalty: Duration,
}

impl Record {
    fn blocked(&self, now: Instant) -> Option<Duration> {
        self.blocked_until
            .and_then(|until| until.checked_duration_since(now))
            .filter(|left| !left.is_zero())
    }

    /// Quiet for [`AUTH_MAX_PENALTY`] since its last failure and penalty.
    fn expired(&self, now: Instant) -> bool {
        let last = self
            .blocked_until
            .map_or(self.last_failure, |b| b.max(self.last_failure));
        now.saturating_duration_since(last) >= AUTH_MAX_PENALTY
    }

    /// No penalty running and no failure within the window.
    fn quiet(&self, now: Instant) -> bool {
        self.blocked(now).is_none()
            && now.saturating_duration_since(self.last_failure) >= AUTH_FAILURE_WINDOW
    }
}

/// The address a client is tracked under: IPv4 as is, IPv6 by its /64.
fn throttle_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let bits = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(Ipv6Addr::from(bits))
        }
        v4 => v4,
    }
}

impl AuthThrottle {
    /// A throttle that counts every failed login in `failures`
    /// (`authrelay_proxy_auth_failures_total`).
    pub fn new(failures: prometheus_client::metrics::counter::Counter) -> Self {
        Self {
            clients: Mutex::new(HashMap::new()),
            failures,
        }
    }

    fn clients(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Record>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `Err(time left)` while `ip` serves a penalty.
    pub fn check(&self, ip: IpAddr) -> Result<(), Duration> {
        self.check_at(ip, Instant::now())
    }

    fn check_at(&self, ip: IpAddr, now: Instant) -> Result<(), Duration> {
        match self
            .clients()
            .get(&throttle_key(ip))
            .and_then(|r| r.blocked(now))
        {
            Some(left) => Err(left),
            None => Ok(()),
        }
    }

    /// Counts a failed login from `ip`; returns the penalty when this failure starts one.
    pub fn failed(&self, ip: IpAddr) -> Option<Duration> {
        self.failed_at(ip, Instant::now())
    }

    fn failed_at(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        self.failures.inc();
        let key = throttle_key(ip);
        let mut clients = self.clients();
        if !clients.contains_key(&key) && clients.len() >= AUTH_MAX_TRACKED {
            make_room(&mut clients, now);
        }
        let record = clients.entry(key).or_insert(Record {
            window_start: now,
            failures: 0,
            last_failure: now,
            blocked_until: None,
            penalty: Duration::ZERO,
        });
        if record.blocked(now).is_some() {
            // Checked before the password by `authenticate`; a request that raced the start
            // of its own penalty adds nothing to it.
            return None;
        }
        if record.failures == 0
            || now.saturating_duration_since(record.window_start) >= AUTH_FAILURE_WINDOW
        {
            record.window_start = now;
            record.failures = 0;
        }
        record.failures += 1;
        record.last_failure = now;
        if record.failures < AUTH_FAILURES_PER_BURST {
            return None;
        }
        record.penalty = if record.penalty.is_zero() {
            AUTH_FIRST_PENALTY
        } else {
            (record.penalty * 2).min(AUTH_MAX_PENALTY)
        };
        record.failures = 0;
        record.blocked_until = Some(now + record.penalty);
        Some(record.penalty)
    }

    /// A successful login from `ip`: a client with no failure within the window and no
    /// penalty running is forgotten. A success never wipes the failures of the current
    /// window, or a client holding one password could go on guessing another's.
    pub fn succeeded(&self, ip: IpAddr) {
        self.succeeded_at(ip, Instant::now());
    }

    fn succeeded_at(&self, ip: IpAddr, now: Instant) {
        let key = throttle_key(ip);
        let mut clients = self.clients();
        if clients.get(&key).is_some_and(|r| r.quiet(now)) {
            clients.remove(&key);
        }
    }

    /// `policy.authenticate(headers)` for a client at `peer`, refused unread while `peer`
    /// serves a penalty. Only a wrong or malformed `Proxy-Authorization` counts as a
    /// failure (a missing one is the first step of the Basic challenge). Logs once per
    /// burst, naming the address only.
    pub fn authenticate(
        &self,
        policy: &ClientPolicy,
        peer: IpAddr,
        headers: &HeaderMap,
    ) -> Result<Option<Arc<str>>, AuthFailure> {
        if !policy.requires_auth() {
            return Ok(None);
        }
        self.check(peer).map_err(AuthFailure::Throttled)?;
        let outcome = policy.authenticate(headers);
        match &outcome {
            Ok(_) => self.succeeded(peer),
            Err(AuthFailure::Rejected) => {
                if let Some(penalty) = self.failed(peer) {
                    tracing::warn!(
                        client = %peer,
                        failures = AUTH_FAILURES_PER_BURST,
                        penalty = ?penalty,
                        "proxy logins throttled: too many wrong passwords from this address"
                    );
                }
            }
            Err(_) => {}
        }
        outcome
    }
}

impl fmt::Debug for AuthThrottle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "AuthThrottle({} clients)", self.clients().len())
    }
}

/// Frees one place in a full table: expired records go first; failing that, the record
/// that matters least — one without a running penalty, failing that the penalty that ends
/// soonest — so a flood from fresh addresses cannot flush out the addresses it made wait.
fn make_room(clients: &mut HashMap<IpAddr, Record>, now: Instant) {
    clients.retain(|_, r| !r.expired(now));
    if clients.len() < AUTH_MAX_TRACKED {
        return;
    }
    let least = clients
        .iter()
        .min_by_key(|(_, r)| (r.blocked(now).is_some(), r.blocked_until, r.last_failure))
        .map(|(k, _)| *k);
    if let Some(key) = least {
        clients.remove(&key);
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

/// Where traffic no route claims may go: the `unmatched_*` keys, validated.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct UnmatchedReach {
    /// `unmatched_deny`: ranges never reached.
    pub deny: Vec<IpNet>,
    /// Whether the inside ranges ([`is_inside`]) are closed, except `allow`: set when
    /// `clients.allow_from` admits addresses beyond loopback, because then this machine's
    /// loopback services and its network's private addresses would be opened to others.
    pub inside_closed: bool,
    /// `unmatched_allow`: inside ranges that stay reachable when the inside is closed.
    pub allow: Vec<IpNet>,
    /// `unmatched_ports`: the only ports reached (`None`: every port). Defaults to 80 and
    /// 443 when the inside is closed, so the relay cannot scan ports.
    pub ports: Option<Vec<u16>>,
}

/// `unmatched_ports` when clients beyond loopback may connect and the file names none.
pub const CLOSED_INSIDE_PORTS: [u16; 2] = [80, 443];

impl UnmatchedReach {
    /// Whether unmatched traffic may go to `port`.
    pub fn allows_port(&self, port: u16) -> bool {
        self.ports.as_ref().is_none_or(|p| p.contains(&port))
    }

    /// Whether unmatched traffic may go to `ip` (already canonical: mapped IPv4 unwrapped).
    fn allows_ip(&self, ip: IpAddr) -> bool {
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        !(self.inside_closed && is_inside(ip) && !self.allow.iter().any(|n| n.contains(&ip)))
    }

    /// One line for `authrelay check` and the startup log: which regime applies.
    pub fn summary(&self) -> String {
        let ports = match &self.ports {
            None => "any port".to_string(),
            Some(p) => format!(
                "ports {}",
                p.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
            ),
        };
        if !self.inside_closed {
            return format!(
                "unmatched traffic: clients are loopback-only, so it may reach every address \
                 ({ports}) but the proxy's own listeners, link-local ranges and unmatched_deny"
            );
        }
        let open = if self.allow.is_empty() {
            String::new()
        } else {
            format!(
                " except unmatched_allow ({})",
                self.allow
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        format!(
            "unmatched traffic: clients beyond loopback may connect, so loopback, private, \
             link-local and unique-local ranges are refused{open}, and only {ports} are reached"
        )
    }
}

/// Where unmatched traffic may not go: the proxy's own listeners, unspecified and link-local
/// addresses always; for a host no route names, what [`UnmatchedReach`] refuses too.
#[derive(Debug, Clone, Copy)]
pub struct DestinationPolicy<'a> {
    /// The proxy's own bound listen and admin addresses.
    pub own: &'a [SocketAddr],
    /// The `unmatched_*` rules; `None` for a host a route names, which its route names
    /// explicitly.
    pub unmatched: Option<&'a UnmatchedReach>,
}

/// Link-local addresses (`169.254.0.0/16`, `fe80::/10`): cloud metadata endpoints live there,
/// and nothing a legacy app calls through a relay does.
fn is_link_local(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

/// The inside of a machine and its network: loopback, `0.0.0.0/8`, private (10/8,
/// 172.16/12, 192.168/16), CGNAT (100.64/10), link-local, unique-local (`fc00::/7`) and
/// site-local (`fec0::/10`) addresses, and IPv4 ones written as NAT64 (`64:ff9b::/96`).
/// IPv4-mapped IPv6 is unwrapped by the caller (`to_canonical`).
pub fn is_inside(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_inside_v4(v4),
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
            v6.is_loopback()
                || v6.is_unspecified()
                || s[0] & 0xfe00 == 0xfc00
                || s[0] & 0xffc0 == 0xfe80
                || s[0] & 0xffc0 == 0xfec0
                || (nat64 && is_inside_v4(Ipv4Addr::from(u128::from(v6) as u32)))
        }
    }
}

fn is_inside_v4(v4: Ipv4Addr) -> bool {
    let [a, b, ..] = v4.octets();
    a == 0
        || v4.is_loopback()
        || v4.is_private()
        || v4.is_link_local()
        || (a == 100 && b & 0xc0 == 64)
}

impl DestinationPolicy<'_> {
    /// Whether unmatched traffic may connect to `addr`.
    pub fn allows(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip().to_canonical();
        if ip.is_unspecified() || is_link_local(ip) {
            return false;
        }
        if let Some(reach) = self.unmatched {
            if !reach.allows_port(addr.port()) || !reach.allows_ip(ip) {
                return false;
            }
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
        if self.unmatched.is_some_and(|reach| !reach.allows_port(port)) {
            // Refused before any lookup: a port scan through the relay costs no DNS query.
            return Err(DestinationError::Denied);
        }
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
        let reach = UnmatchedReach {
            deny: vec![parse_net("10.0.0.0/8").unwrap()],
            ..UnmatchedReach::default()
        };
        let d = DestinationPolicy {
            own: &[own, wildcard],
            unmatched: Some(&reach),
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
        let routed = DestinationPolicy {
            unmatched: None,
            ..d
        };
        assert!(routed.allows("10.2.3.4:443".parse().unwrap()));
        assert!(!routed.allows("169.254.169.254:80".parse().unwrap()));
    }

    #[test]
    fn a_closed_inside_refuses_internal_ranges_and_other_ports() {
        let reach = UnmatchedReach {
            inside_closed: true,
            allow: vec![parse_net("10.1.0.0/16").unwrap()],
            ports: Some(CLOSED_INSIDE_PORTS.to_vec()),
            ..UnmatchedReach::default()
        };
        let d = DestinationPolicy {
            own: &[],
            unmatched: Some(&reach),
        };
        for denied in [
            "127.0.0.1:80",
            "127.9.9.9:443",
            "[::1]:443",
            "[::ffff:127.0.0.1]:80",
            "[::ffff:192.168.1.1]:443",
            "0.1.2.3:80",
            "10.2.3.4:443",
            "172.16.0.1:80",
            "172.31.255.255:80",
            "192.168.0.1:443",
            "100.64.0.1:80",
            "100.127.255.255:443",
            "[fc00::1]:443",
            "[fd12:3456::1]:80",
            "[fe80::1]:80",
            "[64:ff9b::10.0.0.1]:443",
            "[64:ff9b::127.0.0.1]:80",
            // Public, but not a web port.
            "192.0.2.1:22",
            "10.1.2.3:8080",
        ] {
            assert!(!d.allows(denied.parse().unwrap()), "{denied}");
        }
        for allowed in [
            "192.0.2.1:443",
            "[2001:db8::1]:80",
            "172.32.0.1:80",
            "100.128.0.1:443",
            "[64:ff9b::192.0.2.1]:443",
            "10.1.2.3:443",
        ] {
            assert!(d.allows(allowed.parse().unwrap()), "{allowed}");
        }
        let summary = reach.summary();
        assert!(
            summary.contains("10.1.0.0/16") && summary.contains("ports 80, 443"),
            "{summary}"
        );
        assert!(UnmatchedReach::default()
            .summary()
            .contains("loopback-only"));
    }

    #[tokio::test]
    async fn a_port_outside_unmatched_ports_is_refused_before_any_lookup() {
        let reach = UnmatchedReach {
            ports: Some(vec![443]),
            ..UnmatchedReach::default()
        };
        let d = DestinationPolicy {
            own: &[],
            unmatched: Some(&reach),
        };
        // `.invalid` never resolves: only a refusal that comes before the lookup says Denied.
        assert_eq!(
            d.resolve("nowhere.invalid", 22, Duration::from_secs(5))
                .await,
            Err(DestinationError::Denied)
        );
    }

    fn throttle() -> AuthThrottle {
        AuthThrottle::new(prometheus_client::metrics::counter::Counter::default())
    }

    #[test]
    fn ten_failures_start_a_penalty_that_doubles_up_to_five_minutes() {
        let t = throttle();
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        let mut now = Instant::now();
        let mut penalties = Vec::new();
        for _burst in 0..6 {
            for i in 1..=AUTH_FAILURES_PER_BURST {
                assert_eq!(t.check_at(ip, now), Ok(()));
                let started = t.failed_at(ip, now);
                assert_eq!(started.is_some(), i == AUTH_FAILURES_PER_BURST);
                if let Some(p) = started {
                    penalties.push(p.as_secs());
                    assert_eq!(t.check_at(ip, now), Err(p));
                    // A success while waiting changes nothing.
                    t.succeeded_at(ip, now);
                    assert_eq!(t.check_at(ip, now + p / 2), Err(p - p / 2));
                    now += p;
                }
            }
        }
        assert_eq!(penalties, [30, 60, 120, 240, 300, 300]);
        assert_eq!(t.failures.get(), 60);
        assert_eq!(t.check_at(ip, now), Ok(()));
    }

    #[test]
    fn failures_count_within_a_minute_and_a_success_does_not_launder_them() {
        let t = throttle();
        let ip: IpAddr = "192.0.2.8".parse().unwrap();
        let start = Instant::now();
        for _ in 0..9 {
            t.failed_at(ip, start);
        }
        // A right password in between does not reset the count...
        t.succeeded_at(ip, start);
        assert!(t.failed_at(ip, start).is_some());
        // ...but failures a minute apart never add up to a burst.
        let other: IpAddr = "192.0.2.9".parse().unwrap();
        for i in 0..30u32 {
            let at = start + AUTH_FAILURE_WINDOW * (i / 9) + Duration::from_secs(1);
            assert_eq!(t.failed_at(other, at), None, "failure {i}");
        }
        // A quiet client that logs in is forgotten.
        let later = start + AUTH_FAILURE_WINDOW * 5;
        t.succeeded_at(other, later);
        assert!(!t.clients().contains_key(&other));
    }

    #[test]
    fn ipv6_clients_are_tracked_by_their_64_and_mapped_ipv4_as_ipv4() {
        let t = throttle();
        let now = Instant::now();
        for i in 0..AUTH_FAILURES_PER_BURST {
            t.failed_at(format!("2001:db8:1:2::{i:x}").parse().unwrap(), now);
        }
        assert!(t
            .check_at("2001:db8:1:2:ffff::1".parse().unwrap(), now)
            .is_err());
        assert!(t.check_at("2001:db8:1:3::1".parse().unwrap(), now).is_ok());
        for _ in 0..AUTH_FAILURES_PER_BURST {
            t.failed_at("::ffff:192.0.2.1".parse().unwrap(), now);
        }
        assert!(t.check_at("192.0.2.1".parse().unwrap(), now).is_err());
    }

    #[test]
    fn the_table_stays_bounded_and_keeps_the_clients_it_made_wait() {
        let t = throttle();
        let now = Instant::now();
        let blocked: IpAddr = "198.51.100.1".parse().unwrap();
        for _ in 0..AUTH_FAILURES_PER_BURST {
            t.failed_at(blocked, now);
        }
        for i in 0..(AUTH_MAX_TRACKED as u32 * 2) {
            t.failed_at(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i)), now);
        }
        assert_eq!(t.clients().len(), AUTH_MAX_TRACKED);
        assert!(
            t.check_at(blocked, now).is_err(),
            "a flood did not flush it"
        );
        // Expired records make room first.
        let later = now + AUTH_MAX_PENALTY + AUTH_FIRST_PENALTY;
        t.failed_at("203.0.113.1".parse().unwrap(), later);
        assert_eq!(t.clients().len(), 1);
    }

    #[test]
    fn throttled_logins_are_refused_unread_and_missing_ones_are_not_failures() {
        let t = throttle();
        let p = policy();
        let ip: IpAddr = "10.0.0.5".parse().unwrap();
        for _ in 0..AUTH_FAILURES_PER_BURST {
            assert_eq!(
                t.authenticate(&p, ip, &HeaderMap::new()),
                Err(AuthFailure::Missing)
            );
        }
        assert_eq!(t.failures.get(), 0);
        for _ in 0..AUTH_FAILURES_PER_BURST {
            assert_eq!(
                t.authenticate(&p, ip, &basic("app:guess")),
                Err(AuthFailure::Rejected)
            );
        }
        assert!(matches!(
            t.authenticate(&p, ip, &basic("app:pw:1")),
            Err(AuthFailure::Throttled(_))
        ));
        assert_eq!(
            t.authenticate(&p, "10.0.0.6".parse().unwrap(), &basic("app:pw:1"))
                .unwrap()
                .as_deref(),
            Some("app")
        );
        assert_eq!(
            t.authenticate(&ClientPolicy::default(), ip, &HeaderMap::new()),
            Ok(None)
        );
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
