//! Load client for `benches/load.sh`'s TLS-to-the-proxy runs, which wrk cannot make: each of
//! `-c` connections optionally sends `CONNECT host:port` to a proxy, then speaks TLS (SNI
//! `host`, trusting `--ca`) and sends keep-alive `GET`s one after another for `-d` seconds.
//! Every connection is open and through its handshake before the clock starts (the file
//! `--ready` is created then), so the run measures requests, not handshakes. Prints wrk's
//! summary lines (latency distribution, requests, Requests/sec, Non-2xx) so that the script
//! reads both alike.
//!
//! `bench_tls_client --addr 127.0.0.1:PORT [--connect host:443] --host host --ca ca.pem
//!  --path /p -c 32 -d 5 [--ready FILE]`

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[derive(Clone)]
struct Opts {
    addr: SocketAddr,
    connect: Option<String>,
    host: String,
    ca: String,
    path: String,
    conns: usize,
    duration: Duration,
    ready: Option<String>,
}

fn opts() -> Result<Opts, BoxError> {
    let mut args = std::env::args().skip(1);
    let mut o = Opts {
        addr: "127.0.0.1:443".parse()?,
        connect: None,
        host: "localhost".into(),
        ca: String::new(),
        path: "/".into(),
        conns: 8,
        duration: Duration::from_secs(5),
        ready: None,
    };
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--addr" => o.addr = value.parse()?,
            "--connect" => o.connect = Some(value),
            "--host" => o.host = value,
            "--ca" => o.ca = value,
            "--path" => o.path = value,
            "-c" => o.conns = value.parse()?,
            "-d" => o.duration = Duration::from_secs_f64(value.trim_end_matches('s').parse()?),
            "--ready" => o.ready = Some(value),
            other => return Err(format!("unknown flag {other}").into()),
        }
    }
    Ok(o)
}

fn main() -> Result<(), BoxError> {
    let o = opts()?;
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(run(o))
}

async fn run(o: Opts) -> Result<(), BoxError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut std::fs::read(&o.ca)?.as_slice()) {
        roots.add(cert?)?;
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config));

    let mut senders = Vec::with_capacity(o.conns);
    for _ in 0..o.conns {
        senders.push(open(&o, &tls).await?);
    }
    if let Some(ready) = &o.ready {
        std::fs::write(ready, b"ready\n")?;
    }
    let started = Instant::now();
    let deadline = started + o.duration;
    let tasks: Vec<_> = senders
        .into_iter()
        .map(|sender| {
            let o = o.clone();
            tokio::spawn(requests(sender, o, deadline))
        })
        .collect();
    let mut latencies = Vec::new();
    let (mut non_2xx, mut errors) = (0u64, 0u64);
    for task in tasks {
        let (l, bad, failed) = task.await?;
        latencies.extend(l);
        non_2xx += bad;
        errors += failed;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let pct = |p: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let i = ((latencies.len() as f64 * p).ceil() as usize).clamp(1, latencies.len()) - 1;
        f64::from(latencies[i]) / 1000.0
    };
    println!("  Latency Distribution");
    for (label, p) in [("50%", 0.5), ("75%", 0.75), ("90%", 0.9), ("99%", 0.99)] {
        println!("     {label} {:>8.3}ms", pct(p));
    }
    println!("  {} requests in {elapsed:.2}s, 0B read", latencies.len());
    if errors > 0 {
        println!("  Socket errors: connect 0, read {errors}, write 0, timeout 0");
    }
    if non_2xx > 0 {
        println!("  Non-2xx or 3xx responses: {non_2xx}");
    }
    println!("Requests/sec: {:.2}", latencies.len() as f64 / elapsed);
    Ok(())
}

/// One connection, through CONNECT (when asked) and the TLS handshake.
async fn open(
    o: &Opts,
    tls: &tokio_rustls::TlsConnector,
) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>, BoxError> {
    let mut stream = TcpStream::connect(o.addr).await?;
    stream.set_nodelay(true)?;
    if let Some(authority) = &o.connect {
        stream
            .write_all(
                format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n").as_bytes(),
            )
            .await?;
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if stream.read(&mut byte).await? == 0 {
                return Err("the proxy closed the CONNECT".into());
            }
            head.push(byte[0]);
        }
        if !head.starts_with(b"HTTP/1.1 200") {
            return Err(format!("CONNECT answered {}", String::from_utf8_lossy(&head)).into());
        }
    }
    let name = rustls::pki_types::ServerName::try_from(o.host.clone())?;
    let stream = tls.connect(name, stream).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// Sends requests on one connection until `deadline`: (latencies in µs, non-2xx, errors).
async fn requests(
    mut sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    o: Opts,
    deadline: Instant,
) -> (Vec<u32>, u64, u64) {
    let mut latencies = Vec::with_capacity(1 << 14);
    let mut non_2xx = 0;
    while Instant::now() < deadline {
        let request = Request::get(o.path.as_str())
            .header(http::header::HOST, o.host.as_str())
            .body(Empty::new());
        let Ok(request) = request else {
            return (latencies, non_2xx, 1);
        };
        let sent = Instant::now();
        let answered = async {
            let response = sender.send_request(request).await?;
            let status = response.status();
            response.into_body().collect().await?;
            Ok::<_, BoxError>(status)
        };
        match answered.await {
            Ok(status) => {
                if !status.is_success() {
                    non_2xx += 1;
                }
                latencies.push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
            }
            Err(_) => return (latencies, non_2xx, 1),
        }
    }
    (latencies, non_2xx, 0)
}
