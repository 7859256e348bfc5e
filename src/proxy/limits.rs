//! How much one client may hold: connections at once, derived from the file-descriptor
//! limit, and raising that limit at start (as nginx's `worker_rlimit_nofile` does), so that
//! idle sockets cannot use up every descriptor and starve upstream and token connections;
//! and the HTTP server settings every client connection and read tunnel is served with.

use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use rustix::process::{getrlimit, setrlimit, Resource};

/// Descriptors kept for everything that is not a client or upstream connection: listeners,
/// the config watcher, token endpoint calls, log and config files.
const RESERVED_DESCRIPTORS: u64 = 64;

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the soft limit now in force
/// (`None` when it is unlimited or cannot be read).
pub fn raise_fd_limit() -> Option<u64> {
    let mut limit = getrlimit(Resource::Nofile);
    if let (Some(current), Some(hard)) = (limit.current, limit.maximum) {
        if current < hard {
            limit.current = Some(hard);
            match setrlimit(Resource::Nofile, limit) {
                Ok(()) => tracing::debug!(
                    from = current,
                    to = hard,
                    "raised the file-descriptor limit"
                ),
                Err(e) => {
                    tracing::warn!(error = %e, limit = current, "cannot raise the file-descriptor limit")
                }
            }
        }
    }
    getrlimit(Resource::Nofile).current
}

/// The soft file-descriptor limit in force.
pub fn fd_limit() -> Option<u64> {
    getrlimit(Resource::Nofile).current
}

/// `max_connections` when the config does not set it: half of the descriptors left after
/// [`RESERVED_DESCRIPTORS`], since every client connection in flight may hold an upstream
/// connection too. Unlimited descriptors give a generous fixed number.
pub fn default_max_connections(fd_limit: Option<u64>) -> usize {
    let fds = fd_limit.unwrap_or(1 << 20);
    let usable = fds.saturating_sub(RESERVED_DESCRIPTORS) / 2;
    usize::try_from(usable).unwrap_or(usize::MAX).max(1)
}

/// Concurrent HTTP/2 requests one client connection (or tunnel) may have in flight (like
/// nginx's `http2_max_concurrent_streams`, but lower: every stream can hold an upstream
/// socket, and hyper's default of 200 would let a few connections use up the descriptors
/// `max_connections` was sized for).
pub const MAX_STREAMS_PER_CONNECTION: u32 = 32;

/// HTTP/1.1 as every client connection that does not start with the HTTP/2 preface is
/// served. No hyper header-read timer (it arms one per request head): the caller closes a
/// connection with nothing in flight for `client_idle`, a partly sent head included.
pub(crate) fn http1() -> http1::Builder {
    let mut builder = http1::Builder::new();
    builder
        .max_buf_size(crate::upstream::CONNECTION_BUFFER)
        .header_read_timeout(None)
        .keep_alive(true);
    builder
}

/// HTTP/2 as a client connection that starts with its preface (h2c prior knowledge) is
/// served.
pub(crate) fn http2() -> http2::Builder<TokioExecutor> {
    let mut builder = http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION);
    builder
}

/// The server for requests inside a tunnel (an intercepted TLS stream or a plain-HTTP
/// tunnel): the same HTTP/1.1 and HTTP/2 settings, the protocol told from the first bytes
/// read. (The listener tells it by peeking at the socket instead, see `listener.rs`.)
pub(crate) fn tunnel_server() -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .max_buf_size(crate::upstream::CONNECTION_BUFFER)
        .header_read_timeout(None)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS_PER_CONNECTION);
    builder
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_leaves_room_for_upstream_connections() {
        assert_eq!(default_max_connections(Some(256)), 96);
        assert_eq!(default_max_connections(Some(65_536)), 32_736);
        assert_eq!(default_max_connections(Some(10)), 1);
        assert!(default_max_connections(None) > 100_000);
    }
}
