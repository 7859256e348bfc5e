//! Redirects that stay behind the proxy, as nginx's `proxy_redirect default` does: when a
//! route sends requests to an `upstream:` other than what the client addressed, a `Location`,
//! `Content-Location` or `Refresh` URL naming that upstream (or an absolute path under its
//! base path) is mapped back to what the client used — the mount prefix in base-URL mode, the
//! requested origin in forward and tunnel mode. A URL naming any other host is left alone: the
//! client then leaves the route, and no credential follows it.

use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, Scheme};

use super::target::Target;
use crate::routes::{Route, UpstreamTarget};

/// How one routed request maps upstream URLs back to the client's view.
pub struct Rewrite {
    route: Arc<Route>,
    /// The scheme and authority the client asked for; `None` in mount mode.
    client_origin: Option<(Scheme, Authority)>,
}

impl Rewrite {
    /// The rewrite for `target`, when its route has an `upstream:` and `rewrite_location`.
    pub fn for_target(target: &Target) -> Option<Self> {
        let route = target.route.as_ref()?;
        if !route.config.rewrite_location || route.upstream.is_none() {
            return None;
        }
        Some(Self {
            route: Arc::clone(route),
            client_origin: target.client_origin.clone(),
        })
    }

    /// Rewrites the redirect headers of a response in place.
    pub fn apply(&self, headers: &mut HeaderMap) {
        let Some(upstream) = &self.route.upstream else {
            return;
        };
        for name in [header::LOCATION, header::CONTENT_LOCATION] {
            let Some(value) = headers.get(&name).and_then(|v| v.to_str().ok()) else {
                continue;
            };
            if let Some(mapped) = self.map(upstream, value) {
                if let Ok(v) = HeaderValue::from_str(&mapped) {
                    headers.insert(name, v);
                }
            }
        }
        let refresh = HeaderName::from_static("refresh");
        let Some(value) = headers.get(&refresh).and_then(|v| v.to_str().ok()) else {
            return;
        };
        if let Some(mapped) = self.map_refresh(upstream, value) {
            if let Ok(v) = HeaderValue::from_str(&mapped) {
                headers.insert(refresh, v);
            }
        }
    }

    /// `Refresh: 5; url=/next`: the URL part mapped like a `Location`.
    fn map_refresh(&self, upstream: &UpstreamTarget, value: &str) -> Option<String> {
        let lower = value.to_ascii_lowercase();
        let at = lower.find("url=")? + 4;
        let url = value[at..].trim_matches(|c| c == '"' || c == '\'');
        let mapped = self.map(upstream, url)?;
        Some(format!("{}{mapped}", &value[..at]))
    }

    /// The client's view of `url`, or `None` when it stays as it is.
    fn map(&self, upstream: &UpstreamTarget, url: &str) -> Option<String> {
        map_url(
            self.route.config.mount.as_deref(),
            self.client_origin.as_ref(),
            upstream,
            url,
        )
    }
}

/// `url` from `upstream` as the client should see it: under `mount` in base-URL mode, on
/// `client_origin` in forward and tunnel mode; `None` when it stays as it is.
fn map_url(
    mount: Option<&str>,
    client_origin: Option<&(Scheme, Authority)>,
    upstream: &UpstreamTarget,
    url: &str,
) -> Option<String> {
    let (named_upstream, path) = if leaves_the_site(url) {
        return None;
    } else if url.starts_with('/') {
        (false, url)
    } else {
        let rest = strip_origin(url, upstream)?;
        (true, rest)
    };
    let rest = under_base(path, &upstream.base_path)?;
    // `/base//evil.example/x` would become a protocol-relative redirect off-site once the
    // base is stripped: such a URL is left as the upstream sent it.
    if leaves_the_site(rest) {
        return None;
    }
    match (mount, client_origin) {
        (Some(mount), _) => Some(format!("{mount}{rest}")),
        (None, Some((scheme, authority))) if named_upstream => {
            Some(format!("{scheme}://{authority}{rest}"))
        }
        (None, _) => Some(rest.to_string()),
    }
}

/// Whether `path` would be read by a browser as naming another host: `//host`, and also
/// `/\host` (WHATWG parsers read `\` as `/` in http URLs), and `/` followed by a control or
/// whitespace character (they drop tabs and newlines anywhere, so `/<TAB>/host` is `//host`;
/// the other such characters are left alone too rather than guessed about).
fn leaves_the_site(path: &str) -> bool {
    let mut chars = path.chars();
    chars.next() == Some('/')
        && chars
            .next()
            .is_some_and(|c| c == '/' || c == '\\' || c.is_control() || c.is_whitespace())
}

/// The path-and-query of an absolute `url` when it names `upstream`'s scheme and authority
/// (host case-insensitively, a default port written or not).
fn strip_origin<'u>(url: &'u str, upstream: &UpstreamTarget) -> Option<&'u str> {
    let (scheme, rest) = url.split_once("://")?;
    if !scheme.eq_ignore_ascii_case(upstream.scheme.as_str()) {
        return None;
    }
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let authority: Authority = rest[..end].parse().ok()?;
    let default_port = if upstream.scheme == Scheme::HTTPS {
        443
    } else {
        80
    };
    let same_host = authority
        .host()
        .eq_ignore_ascii_case(upstream.authority.host());
    let same_port = authority.port_u16().unwrap_or(default_port)
        == upstream.authority.port_u16().unwrap_or(default_port);
    if !(same_host && same_port) || authority.as_str().contains('@') {
        return None;
    }
    let path = &rest[end..];
    Some(if path.is_empty() { "/" } else { path })
}

/// `path` with the upstream's base path removed, when it lies under it (whole segments).
fn under_base<'p>(path: &'p str, base: &str) -> Option<&'p str> {
    let rest = path.strip_prefix(base)?;
    if rest.is_empty() {
        return Some("/");
    }
    rest.starts_with(['/', '?', '#']).then_some(rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upstream(text: &str) -> UpstreamTarget {
        UpstreamTarget::parse(text).unwrap()
    }

    #[test]
    fn origin_is_matched_exactly() {
        let up = upstream("https://api.vendor.example/base");
        assert_eq!(
            strip_origin("https://API.vendor.example:443/base/x?y", &up),
            Some("/base/x?y")
        );
        assert_eq!(strip_origin("https://api.vendor.example", &up), Some("/"));
        for other in [
            "http://api.vendor.example/base/x",
            "https://api.vendor.example:8443/base/x",
            "https://api.vendor.example.evil.test/base/x",
            "https://user@api.vendor.example/base/x",
            "next",
        ] {
            assert_eq!(strip_origin(other, &up), None, "{other}");
        }
    }

    #[test]
    fn a_path_that_would_leave_the_site_is_left_alone() {
        let up = upstream("https://vendor.test/base");
        let origin = (Scheme::HTTPS, Authority::from_static("api.test"));
        for mount in [None, Some("/m")] {
            assert_eq!(
                map_url(mount, Some(&origin), &up, "/base//evil.example/x"),
                None
            );
            assert_eq!(
                map_url(
                    mount,
                    Some(&origin),
                    &up,
                    "https://vendor.test/base//evil.example"
                ),
                None
            );
        }
        assert_eq!(
            map_url(None, Some(&origin), &up, "/base/next").as_deref(),
            Some("/next")
        );
        assert_eq!(
            map_url(Some("/m"), None, &up, "https://vendor.test/base/next").as_deref(),
            Some("/m/next")
        );
    }

    #[test]
    fn a_backslash_or_control_character_after_the_base_is_left_alone() {
        let up = upstream("https://vendor.test/base");
        let origin = (Scheme::HTTPS, Authority::from_static("api.test"));
        let up_at_root = upstream("https://vendor.test");
        for after_base in [
            "/\\127.0.0.1:18081/steal",
            "/\t/127.0.0.1:18081/steal",
            "/\t\\127.0.0.1/steal",
            "/\n/127.0.0.1/steal",
            "/ /127.0.0.1/steal",
            "/\u{1}/127.0.0.1/steal",
        ] {
            for mount in [None, Some("/m")] {
                for (up, base) in [(&up, "/base"), (&up_at_root, "")] {
                    for url in [
                        format!("{base}{after_base}"),
                        format!("https://vendor.test{base}{after_base}"),
                    ] {
                        assert_eq!(map_url(mount, Some(&origin), up, &url), None, "{url:?}");
                    }
                }
            }
        }
        assert_eq!(
            map_url(None, Some(&origin), &up, "/base/a\\b").as_deref(),
            Some("/a\\b"),
            "a backslash further in the path is only a character"
        );
    }

    #[test]
    fn base_path_is_stripped_by_whole_segments() {
        assert_eq!(under_base("/base/x", "/base"), Some("/x"));
        assert_eq!(under_base("/base", "/base"), Some("/"));
        assert_eq!(under_base("/base?q=1", "/base"), Some("?q=1"));
        assert_eq!(under_base("/basement", "/base"), None);
        assert_eq!(under_base("/x", ""), Some("/x"));
    }
}
