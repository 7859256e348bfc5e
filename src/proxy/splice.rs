//! Joining two byte streams: CONNECT tunnels nobody reads, and connections after a protocol
//! upgrade. Buffers are bounded (16 KiB each way) and a splice with no traffic either way for
//! its idle time ends.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

/// Copies bytes both ways until either side closes or nothing moves for `idle`.
pub async fn splice<A, B>(a: A, b: B, idle: Duration) -> std::io::Result<()>
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let mut buf_a = vec![0u8; 16 * 1024];
    let mut buf_b = vec![0u8; 16 * 1024];
    let (mut a_open, mut b_open) = (true, true);
    while a_open || b_open {
        let step = tokio::time::timeout(idle, async {
            tokio::select! {
                n = ar.read(&mut buf_a), if a_open => {
                    let n = n?;
                    if n == 0 { a_open = false; bw.shutdown().await?; } else { bw.write_all(&buf_a[..n]).await?; }
                    Ok::<_, std::io::Error>(())
                }
                n = br.read(&mut buf_b), if b_open => {
                    let n = n?;
                    if n == 0 { b_open = false; aw.shutdown().await?; } else { aw.write_all(&buf_b[..n]).await?; }
                    Ok(())
                }
            }
        })
        .await;
        match step {
            Ok(result) => result?,
            Err(_) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "tunnel idle",
                ))
            }
        }
    }
    Ok(())
}
