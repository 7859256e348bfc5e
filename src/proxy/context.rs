//! What the pipeline knows about a request, made once where the request enters and passed
//! down explicitly: the connection it came on (peer, activity, shutdown signal, and for a
//! tunnel the origin it was opened to), the one config snapshot it is served from, and once
//! admitted, where it goes. Nothing travels in request extensions.

use std::convert::Infallible;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use http::uri::{Authority, Scheme};
use http::{Method, Request, Response};
use hyper::body::Incoming;
use tokio::sync::watch;

use super::activity::{Activity, InFlightBody};
use super::target::Target;
use crate::access::Client;
use crate::state::{Snapshot, State};
use crate::token_store::CredentialSlot;
use crate::upstream::{PinnedAddrs, ProxyBody};

/// A request's whole answer, as one boxed future: hyper keeps room for one in-flight future
/// in every connection (an unboxed one, several KB, would cost that much per idle
/// keep-alive connection), and a request inside a tunnel re-enters the pipeline that opened
/// the tunnel, a cycle only a named type breaks.
pub(crate) type Answer = Pin<Box<dyn Future<Output = Response<ProxyBody>> + Send>>;

/// The pipeline's entry, handed to the tunnels whose requests re-enter it (as a value, so
/// that tunnels need not import the pipeline that opens them).
pub(crate) type Handler = fn(Arc<Connection>, Request<Incoming>) -> Answer;

/// Answers `request` through `pipeline`, counted as in flight on its connection until its
/// answer's body has been sent: the service of every server that reads requests (the
/// listener's, an intercepted tunnel's).
pub(crate) fn serve_counted(
    conn: &Arc<Connection>,
    request: Request<Incoming>,
    pipeline: Handler,
) -> impl Future<Output = Result<Response<InFlightBody>, Infallible>> + Send + 'static {
    let in_flight = conn.activity.begin();
    let answer = pipeline(Arc::clone(conn), request);
    async move { Ok(in_flight.until_sent(answer.await)) }
}

/// What every request on one client connection shares. Made once per connection accepted by
/// the listener, and once per CONNECT tunnel whose requests are served one by one.
pub(crate) struct Connection {
    pub(crate) state: Arc<State>,
    /// The client's address.
    pub(crate) peer: IpAddr,
    /// In-flight requests and traffic of the listener's connection (a tunnel shares its
    /// CONNECT's): eviction and the idle limit read it.
    pub(crate) activity: Arc<Activity>,
    pub(crate) shutdown: watch::Receiver<bool>,
    /// The listener's port (`None` inside a tunnel): an HTTP/2 request whose `:authority`
    /// names it is a mount request.
    pub(crate) local_port: Option<u16>,
    /// Set on a connection carried inside a CONNECT tunnel.
    pub(crate) tunnel: Option<Tunnel>,
}

/// A CONNECT tunnel whose requests the proxy reads: origin-form requests inside it are meant
/// for `scheme://authority`, on behalf of the client the CONNECT authenticated.
pub(crate) struct Tunnel {
    pub(crate) authority: Authority,
    /// `https` for a decrypted tunnel, `http` for plain HTTP sent through one.
    pub(crate) scheme: Scheme,
    pub(crate) client: Client,
}

/// One request on its way through the pipeline.
pub(crate) struct RequestContext {
    pub(crate) conn: Arc<Connection>,
    /// The config, routes and credential slots this request is served with, start to end.
    pub(crate) snapshot: Arc<Snapshot>,
    /// Who sent it; the user is filled in by admission.
    pub(crate) client: Client,
    pub(crate) method: Method,
    /// When it arrived, for the access line's latency; set only while that line is on
    /// ([`crate::access_log::line_enabled`]), which is how the pipeline tells: a clock read
    /// per request is not free.
    pub(crate) started: Option<Instant>,
}

impl RequestContext {
    /// The context of a request arriving on `conn`: one snapshot load.
    pub(crate) fn new(conn: &Arc<Connection>, method: &Method) -> Self {
        let client = match &conn.tunnel {
            Some(t) => t.client.clone(),
            None => Client {
                addr: conn.peer,
                user: None,
            },
        };
        Self {
            conn: Arc::clone(conn),
            snapshot: conn.state.snapshot(),
            client,
            method: method.clone(),
            started: crate::access_log::line_enabled().then(Instant::now),
        }
    }

    pub(crate) fn state(&self) -> &State {
        &self.conn.state
    }
}

/// Where an admitted request goes.
pub(crate) struct Admitted {
    pub(crate) target: Target,
    /// For traffic no route claims: the addresses its host was checked at, the only ones
    /// it may be connected to.
    pub(crate) pinned: Option<PinnedAddrs>,
    /// The credential slot chosen for this client on its route (`None` without credential).
    pub(crate) credential: Option<Arc<CredentialSlot>>,
}
