//! The floor for `benches/load.sh`: a header-injecting forward proxy on hyper 1 and tokio
//! alone (single-threaded runtime), one upstream keep-alive connection per client
//! connection, no routing, no admission, no logging, a fixed `Authorization` header. A
//! measuring stick, not a product: what authrelay spends per request above it is
//! authrelay's own work; what it spends above nginx is hyper's and tokio's. The same program
//! as `../shared/hyperfloor`, built with this crate's release profile (and, like it, the
//! system allocator).
//!
//! Usage: `hyper_floor 127.0.0.1:LISTEN 127.0.0.1:UPSTREAM "Bearer TOKEN"`.
//!
//! `FLOOR_IDLE_THREAD=1` starts one more thread that only parks. A process with a second
//! thread pays glibc's cancellation bookkeeping (a locked compare-and-swap before and after
//! every `writev` and `recvfrom`) that a single-threaded one skips, and authrelay always has
//! more than one thread; this measures what that costs the floor (docs/performance.md, issue
//! 24, ninth round).

use std::sync::Arc;

use http::HeaderValue;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Mutex;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream), Some(auth)) = (args.next(), args.next(), args.next()) else {
        return Err("usage: hyper_floor LISTEN_ADDR UPSTREAM_ADDR AUTHORIZATION".into());
    };
    let auth = HeaderValue::from_str(&auth)?;
    if std::env::var_os("FLOOR_IDLE_THREAD").is_some() {
        std::thread::spawn(|| loop {
            std::thread::park();
        });
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(async {
            tokio::select! {
                served = serve(listen, upstream, auth) => served,
                () = stopped() => Ok(()),
            }
        })
}

/// SIGTERM or Ctrl-C. The floor returns from `main` on either rather than dying of it, so that
/// a build instrumented for profile-guided optimisation (`benches/pgo.sh`) writes its profile.
async fn stopped() {
    #[cfg(unix)]
    if let Ok(mut term) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
    {
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        return;
    }
    let _ = tokio::signal::ctrl_c().await;
}

async fn serve(
    listen: String,
    upstream: String,
    auth: HeaderValue,
) -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind(&listen).await?;
    loop {
        let (client, _) = listener.accept().await?;
        let _ = client.set_nodelay(true);
        let upstream = upstream.clone();
        let auth = auth.clone();
        tokio::spawn(async move {
            let Ok(origin) = TcpStream::connect(&upstream).await else {
                return;
            };
            let _ = origin.set_nodelay(true);
            let Ok((sender, connection)) =
                hyper::client::conn::http1::handshake(TokioIo::new(origin)).await
            else {
                return;
            };
            tokio::spawn(connection);
            let sender = Arc::new(Mutex::new(sender));
            let service = service_fn(move |mut request: Request<Incoming>| {
                let sender = Arc::clone(&sender);
                let auth = auth.clone();
                async move {
                    let target = request
                        .uri()
                        .path_and_query()
                        .map_or("/", |p| p.as_str())
                        .parse()
                        .unwrap_or_default();
                    *request.uri_mut() = target;
                    request
                        .headers_mut()
                        .insert(http::header::AUTHORIZATION, auth);
                    let response: Result<Response<Incoming>, hyper::Error> =
                        sender.lock().await.send_request(request).await;
                    response
                }
            });
            let _ = http1::Builder::new()
                .keep_alive(true)
                .serve_connection(TokioIo::new(client), service)
                .await;
        });
    }
}
