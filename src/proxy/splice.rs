//! Joining two byte streams: CONNECT tunnels nobody reads, and connections after a protocol
//! upgrade. Buffers are bounded (16 KiB each way) and a splice with no traffic either way for
//! its idle time ends. Traffic marks the client's connection active, and the listener can
//! close it to make room when it is the idlest.

use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};

use super::activity::Activity;

/// Copies bytes both ways until either side closes, nothing moves for `idle`, or the
/// listener evicts the client's connection (`activity`).
pub async fn splice<A, B>(a: A, b: B, idle: Duration, activity: &Activity) -> std::io::Result<()>
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
                () = activity.evicted() => Err(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    "closed to make room under max_connections",
                )),
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
            Ok(result) => {
                result?;
                activity.touch();
            }
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
