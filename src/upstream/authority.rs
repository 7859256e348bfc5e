//! Reading an upstream authority (`host[:port]`) on the request path.

/// `Authority::host()` and `Authority::port_u16()` in one pass over the bytes: the `http`
/// crate's versions search with `str` patterns and parse the port with `str::parse`,
/// several hundred instructions per request for what is a short scan.
pub fn host_and_port(authority: &str) -> (&str, Option<u16>) {
    let (host, port, _) = host_port_and_user_info(authority);
    (host, port)
}

/// [`host_and_port`], and whether the authority carries user info (`user@host`), from the
/// same pass: the forward path refuses user info, and a search of its own for the `@`
/// (`str::contains`) cost a third of routing's instructions.
pub fn host_port_and_user_info(authority: &str) -> (&str, Option<u16>, bool) {
    let bytes = authority.as_bytes();
    // One pass: where the host starts (after the last `@`), and the first and last `:`
    // after that (three searches and `memchr` cost more on strings this short).
    let (mut start, mut first_colon, mut last_colon) = (0, None, None);
    for (i, &b) in bytes.iter().enumerate() {
        if b == b'@' {
            (start, first_colon, last_colon) = (i + 1, None, None);
        } else if b == b':' {
            first_colon = first_colon.or(Some(i));
            last_colon = Some(i);
        }
    }
    let host_port = &bytes[start..];
    let host_end = if host_port.first() == Some(&b'[') {
        host_port
            .iter()
            .position(|&b| b == b']')
            .map_or(bytes.len(), |i| start + i + 1)
    } else {
        first_colon.unwrap_or(bytes.len())
    };
    let host = &authority[start..host_end];
    // The port is what follows the last `:` (inside `[…]` it does not parse as one).
    let port = last_colon.and_then(|colon| parse_port(&bytes[colon + 1..]));
    (host, port, start > 0)
}

/// `authority` without its port when that is `default_port` or empty (`example.com:80` →
/// `example.com`, `[::1]:443` → `[::1]` for 443), else unchanged: the `Host` an origin server
/// is sent. A suffix check, not a parse: it runs for every request.
pub fn without_default_port(authority: &str, default_port: u16) -> &str {
    // From the end: the port is a few bytes (`rsplit_once` goes through a generic searcher).
    let bytes = authority.as_bytes();
    match bytes.iter().rposition(|&b| b == b':') {
        // An empty port means the default one too (RFC 3986 §3.2.3: `example.com:`).
        Some(colon)
            if colon + 1 == bytes.len()
                || parse_port(&bytes[colon + 1..]) == Some(default_port) =>
        {
            &authority[..colon]
        }
        _ => authority,
    }
}

/// A port as `str::parse::<u16>` reads one (an optional `+`, then decimal digits, at most
/// 65535), without its generic overflow checks.
fn parse_port(text: &[u8]) -> Option<u16> {
    let digits = text.strip_prefix(b"+").unwrap_or(text);
    if digits.is_empty() {
        return None;
    }
    let mut value: u32 = 0;
    for &b in digits {
        let digit = b.wrapping_sub(b'0');
        if digit > 9 {
            return None;
        }
        value = value * 10 + u32::from(digit);
        if value > u32::from(u16::MAX) {
            return None;
        }
    }
    u16::try_from(value).ok()
}

#[cfg(test)]
mod tests {
    use super::{host_and_port, host_port_and_user_info, parse_port, without_default_port};
    use http::uri::Authority;

    #[test]
    fn host_and_port_read_as_the_http_crate_reads_them() {
        for text in [
            "example.com",
            "example.com:8080",
            "example.com:",
            "127.0.0.1:18181",
            "[::1]",
            "[::1]:443",
            "[fe80::1%25eth0]:80",
            "user:pw@example.com:81",
            "user@[::1]",
            "a:99999",
            "a:+80",
            "a:+",
            "a:-1",
            "a:65535",
            "a:65536",
            "a:0080",
            "[::1]:",
        ] {
            let authority: Authority = text.parse().unwrap();
            assert_eq!(
                host_and_port(authority.as_str()),
                (authority.host(), authority.port_u16()),
                "{text}"
            );
            assert_eq!(
                host_port_and_user_info(authority.as_str()).2,
                text.contains('@'),
                "{text}"
            );
        }
    }

    #[test]
    fn the_default_port_goes_from_the_host_header_and_any_other_stays() {
        for (text, default, host) in [
            ("example.com", 80, "example.com"),
            ("example.com:80", 80, "example.com"),
            ("example.com:8080", 80, "example.com:8080"),
            ("example.com:443", 80, "example.com:443"),
            ("example.com:443", 443, "example.com"),
            ("[::1]", 443, "[::1]"),
            ("[::1]:443", 443, "[::1]"),
            ("[::1]:8443", 443, "[::1]:8443"),
            ("127.0.0.1:80", 80, "127.0.0.1"),
            ("example.com:", 80, "example.com"),
            ("[::1]:", 443, "[::1]"),
        ] {
            assert_eq!(without_default_port(text, default), host, "{text}");
        }
    }

    #[test]
    fn ports_read_as_str_parse_reads_them() {
        for text in [
            "",
            "+",
            "-1",
            "0",
            "80",
            "+80",
            "0080",
            "65535",
            "65536",
            "8a",
            " 80",
            "99999999999",
        ] {
            assert_eq!(
                parse_port(text.as_bytes()),
                text.parse::<u16>().ok(),
                "{text:?}"
            );
        }
    }
}
