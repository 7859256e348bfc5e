//! Host patterns and upstream targets: the words routes are written in. Parsed once from the
//! config; matched on every request by the route table.

use std::net::IpAddr;

use http::uri::{Authority, Scheme};

/// The host part of a route rule: exact (`api.example.com`) or a wildcard (`*.example.com`,
/// one or more labels), with an optional port (`127.0.0.1:9000`). Matching is on the host of
/// the request's authority, case-insensitive, never a substring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPattern {
    host: String,
    wildcard: bool,
    port: Option<u16>,
    /// An exact host that is this machine (read once here, not per request).
    loopback: bool,
}

impl HostPattern {
    /// Parses `host`, `*.suffix`, optionally followed by `:port`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let lower = text.trim().to_ascii_lowercase();
        let (host_part, port) =
            split_port(&lower).ok_or_else(|| format!("`{text}`: invalid port"))?;
        let host_part = host_part.trim_end_matches('.');
        let (wildcard, host) = match host_part.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, host_part),
        };
        let valid = !host.is_empty()
            && if host.starts_with('[') {
                host.ends_with(']')
                    && host[1..host.len() - 1]
                        .parse::<std::net::Ipv6Addr>()
                        .is_ok()
            } else {
                host.split('.').all(|label| {
                    !label.is_empty()
                        && label
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
                })
            };
        if !valid {
            return Err(format!(
                "`{text}` is not a host name; write `api.example.com`, `*.example.com` or `127.0.0.1:9000`"
            ));
        }
        Ok(Self {
            loopback: !wildcard && is_loopback_host(host),
            host: host.to_string(),
            wildcard,
            port,
        })
    }

    /// True for a pattern naming exactly one host (no `*.`).
    pub fn is_exact(&self) -> bool {
        !self.wildcard
    }

    /// True for an exact host that is this machine (`localhost`, a loopback address).
    pub fn is_loopback(&self) -> bool {
        self.loopback
    }

    /// The host (for a wildcard, the suffix after `*.`).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// The port the pattern is restricted to, if any.
    pub fn port(&self) -> Option<u16> {
        self.port
    }

    /// Whether `host` (already lower-case, no trailing dot) and `port` match.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        if self.wildcard {
            host.len() > self.host.len() + 1
                && host.ends_with(self.host.as_str())
                && host.as_bytes()[host.len() - self.host.len() - 1] == b'.'
        } else {
            host == self.host
        }
    }
}

/// Splits `host:port`, keeping IPv6 brackets; `None` when the port is not a number.
fn split_port(text: &str) -> Option<(&str, Option<u16>)> {
    let colon = if text.starts_with('[') {
        text.find(']')
            .and_then(|end| text[end..].find(':').map(|c| c + end))
    } else {
        text.rfind(':')
    };
    match colon {
        Some(c) => text[c + 1..].parse().ok().map(|p| (&text[..c], Some(p))),
        None => Some((text, None)),
    }
}

/// Where a route sends its requests instead of the request's own origin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTarget {
    /// `http` or `https`.
    pub scheme: Scheme,
    /// Host and port.
    pub authority: Authority,
    /// A path prepended to the request's path; empty or starting with `/`, no trailing `/`.
    pub base_path: String,
}

impl UpstreamTarget {
    /// Parses `http(s)://host[:port][/base]`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let uri: http::Uri = text
            .parse()
            .map_err(|e| format!("`{text}` is not a URL: {e}"))?;
        let scheme = match uri.scheme_str() {
            Some("http") => Scheme::HTTP,
            Some("https") => Scheme::HTTPS,
            _ => return Err(format!("`{text}` must start with http:// or https://")),
        };
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("`{text}` has no host"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "`{text}`: user info in an upstream URL is not allowed"
            ));
        }
        if uri.query().is_some() {
            return Err(format!("`{text}`: an upstream URL cannot have a query"));
        }
        let base_path = uri.path().trim_end_matches('/').to_string();
        Ok(Self {
            scheme,
            authority,
            base_path,
        })
    }

    /// The implied upstream of a mount route with an exact host and no `upstream`.
    pub fn https_for(host: &HostPattern) -> Option<Self> {
        let authority = match host.port() {
            Some(p) => format!("{}:{p}", host.host()),
            None => host.host().to_string(),
        };
        Some(Self {
            scheme: Scheme::HTTPS,
            authority: authority.parse().ok()?,
            base_path: String::new(),
        })
    }
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
