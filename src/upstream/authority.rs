//! Reading an upstream authority (`host[:port]`) on the request path.

/// `Authority::host()` and `Authority::port_u16()` in one pass over the bytes: the `http`
/// crate's versions search with `str` patterns, several hundred instructions per request
/// for what is a short scan.
pub fn host_and_port(authority: &str) -> (&str, Option<u16>) {
    let bytes = authority.as_bytes();
    let host_port = match bytes.iter().rposition(|&b| b == b'@') {
        Some(at) => &authority[at + 1..],
        None => authority,
    };
    let end = if host_port.as_bytes().first() == Some(&b'[') {
        host_port.bytes().position(|b| b == b']').map(|i| i + 1)
    } else {
        host_port.bytes().position(|b| b == b':')
    };
    let host = &host_port[..end.unwrap_or(host_port.len())];
    let port = bytes
        .iter()
        .rposition(|&b| b == b':')
        .and_then(|colon| authority[colon + 1..].parse().ok());
    (host, port)
}

#[cfg(test)]
mod tests {
    use super::host_and_port;
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
        ] {
            let authority: Authority = text.parse().unwrap();
            assert_eq!(
                host_and_port(authority.as_str()),
                (authority.host(), authority.port_u16()),
                "{text}"
            );
        }
    }
}
