//! Where an unmatched request may connect: the addresses its host was checked at.

use std::net::SocketAddr;
use std::sync::Arc;

/// The addresses an unmatched request's host was checked at (`access.rs`: never the proxy
/// itself, link-local or `unmatched_deny`). Carried as a request extension, it makes the
/// connection go to one of them, never to a second, different DNS answer.
#[derive(Debug, Clone)]
pub struct PinnedAddrs(pub Arc<[SocketAddr]>);
