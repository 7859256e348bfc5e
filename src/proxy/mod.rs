//! The proxy: the listener and the one request pipeline every way in joins.
//!
//! In the order a request meets them: `listener` (accept, connection cap, HTTP/1.1 and
//! HTTP/2), `context` (what the pipeline knows about a request, made once), `dispatch` (the
//! pipeline's steps), `admission` (every rule on who may send what where; routing in
//! `target`), `connect` and `intercepted` (tunnels, whose requests re-enter the pipeline),
//! `exchange` (credential, send, refresh-and-replay; request bodies in `replay`), `upgrade`
//! (WebSocket switch), `headers`, `location`, `respond` (every answer the proxy gives
//! itself), and `activity`, `gate`, `limits`, `splice` below them.

pub(crate) mod activity;
pub mod admission;
pub(crate) mod connect;
pub(crate) mod context;
pub(crate) mod dispatch;
pub mod exchange;
pub(crate) mod gate;
pub(crate) mod headers;
pub(crate) mod intercepted;
pub mod limits;
pub(crate) mod listener;
pub(crate) mod location;
pub(crate) mod replay;
pub(crate) mod respond;
pub(crate) mod sign;
pub(crate) mod splice;
pub mod target;
pub(crate) mod upgrade;

pub use listener::serve;
