//! A raw HTTP/1.1 exchange over TCP, for requests a well-behaved client would not send.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Sends `request` verbatim (with `Connection: close` semantics: the proxy's answer is read
/// until it closes or a complete response with a body length arrives) and returns the text.
pub async fn send(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let read =
            tokio::time::timeout(std::time::Duration::from_secs(10), stream.read(&mut chunk))
                .await
                .expect("answer within 10 s")
                .unwrap_or(0);
        if read == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..read]);
        if complete(&buf) {
            break;
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

fn complete(buf: &[u8]) -> bool {
    let text = String::from_utf8_lossy(buf);
    let Some(head_end) = text.find("\r\n\r\n") else {
        return false;
    };
    let head = text[..head_end].to_ascii_lowercase();
    let body_len = text.len() - head_end - 4;
    match head.lines().find_map(|l| l.strip_prefix("content-length:")) {
        Some(n) => n.trim().parse::<usize>().is_ok_and(|n| body_len >= n),
        None => false,
    }
}
