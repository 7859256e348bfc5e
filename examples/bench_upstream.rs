//! Loopback upstream for `benches/load.sh`: answers every request with a ~100-byte body when
//! the `Authorization` header equals `BENCH_EXPECT` (default `Bearer bench-token`) and with
//! 401 otherwise, so that a benchmark run also proves the proxy injected the credential.
//!
//! Usage: `bench_upstream 127.0.0.1:PORT` (loopback addresses only). Runs on a single-threaded
//! runtime so that it uses one core, like the other pinned processes of the benchmark. With
//! `BENCH_TLS_CERT` and `BENCH_TLS_KEY` (PEM files) it serves HTTPS (HTTP/1.1 only, as most
//! API vendors' edges answer a client that offers it) instead of plain HTTP.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// The body of a successful answer: 100 bytes, about the size of a small JSON API reply.
const BODY: &[u8; 100] =
    b"{\"ok\":true,\"id\":\"0123456789abcdef\",\"items\":[1,2,3,4,5,6,7,8,9],\"note\":\"authrelay bench upstream!!\"}\n";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:18080".into())
        .parse()?;
    if !addr.ip().is_loopback() {
        return Err("bench_upstream only listens on a loopback address".into());
    }
    let expected: &'static [u8] = Box::leak(
        std::env::var("BENCH_EXPECT")
            .unwrap_or_else(|_| "Bearer bench-token".into())
            .into_bytes()
            .into_boxed_slice(),
    );
    let tls = match (
        std::env::var_os("BENCH_TLS_CERT"),
        std::env::var_os("BENCH_TLS_KEY"),
    ) {
        (Some(cert), Some(key)) => Some(tls_acceptor(cert.as_ref(), key.as_ref())?),
        _ => None,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(addr, expected, tls))
}

fn tls_acceptor(
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Result<tokio_rustls::TlsAcceptor, Box<dyn std::error::Error>> {
    let certs = rustls_pemfile::certs(&mut std::fs::read(cert)?.as_slice())
        .collect::<Result<Vec<_>, _>>()?;
    let key = rustls_pemfile::private_key(&mut std::fs::read(key)?.as_slice())?
        .ok_or("no private key in BENCH_TLS_KEY")?;
    let mut config = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config)))
}

async fn serve(
    addr: SocketAddr,
    expected: &'static [u8],
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Result<(), Box<dyn std::error::Error>> {
    let listener = TcpListener::bind(addr).await?;
    eprintln!(
        "bench_upstream listening on {addr}{}",
        if tls.is_some() { " (TLS)" } else { "" }
    );
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let tls = tls.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| async move {
                Ok::<_, Infallible>(answer(&req, expected))
            });
            let mut builder = http1::Builder::new();
            builder.keep_alive(true);
            match tls {
                Some(tls) => {
                    if let Ok(stream) = tls.accept(stream).await {
                        let _ = builder
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    }
                }
                None => {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
            }
        });
    }
}

fn answer(req: &Request<Incoming>, expected: &[u8]) -> Response<Full<Bytes>> {
    let authorized = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .is_some_and(|v| v.as_bytes() == expected);
    let mut response = if authorized {
        Response::new(Full::new(Bytes::from_static(BODY)))
    } else {
        let mut r = Response::new(Full::new(Bytes::from_static(b"missing credential\n")));
        *r.status_mut() = StatusCode::UNAUTHORIZED;
        r
    };
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
