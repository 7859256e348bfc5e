//! Large bodies stream through the real binary in both directions with flat memory: the
//! proxy's peak RSS stays far below the body size.

use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

use crate::support::server;

const CHUNK: usize = 1 << 20;
const CHUNKS: usize = 64;

/// A request body of `CHUNKS` MiB produced on the fly (the test never holds it whole).
struct Generated {
    chunk: Bytes,
    left: usize,
}

impl Body for Generated {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        self.left -= 1;
        Poll::Ready(Some(Ok(Frame::data(self.chunk.clone()))))
    }
}

struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn a_64_mib_upload_and_download_stream_with_flat_memory() {
    let received = Arc::new(Mutex::new((0usize, String::new())));
    let record = Arc::clone(&received);
    let origin = server::serve_streaming(
        move |req: http::Request<hyper::body::Incoming>| {
            let record = Arc::clone(&record);
            async move {
                let auth = req
                    .headers()
                    .get("authorization")
                    .map(|v| v.to_str().unwrap().to_string())
                    .unwrap_or_default();
                if req.method() == http::Method::GET {
                    return server::respond(200, vec![b'x'; CHUNK * CHUNKS]);
                }
                let mut body = req.into_body();
                let mut total = 0;
                while let Some(frame) = body.frame().await {
                    if let Ok(data) = frame.unwrap().into_data() {
                        total += data.len();
                    }
                }
                *record.lock().unwrap() = (total, auth);
                server::respond(200, total.to_string())
            }
        },
        Arc::default(),
    )
    .await;

    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let config = dir.path().join("routes.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: 127.0.0.1:{port}\ncredentials:\n  c:\n    type: static\n    value: \"Token big\"\n\
             routes:\n  - name: big\n    host: {}\n    credential: c\n",
            origin.addr
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_authrelay"))
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let child = KillOnDrop(child);
    let proxy = format!("127.0.0.1:{port}");
    let stream = loop {
        match tokio::net::TcpStream::connect(&proxy).await {
            Ok(s) => break s,
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
        }
    };
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);

    let upload = http::Request::post(format!("http://{}/upload", origin.addr))
        .header("host", origin.addr.to_string())
        .body(Generated {
            chunk: Bytes::from(vec![b'u'; CHUNK]),
            left: CHUNKS,
        })
        .unwrap();
    let res = sender.send_request(upload).await.unwrap();
    assert_eq!(res.status(), 200);
    let body = res.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, (CHUNK * CHUNKS).to_string());
    assert_eq!(
        *received.lock().unwrap(),
        (CHUNK * CHUNKS, "Token big".to_string())
    );

    let download = http::Request::get(format!("http://{}/download", origin.addr))
        .header("host", origin.addr.to_string())
        .body(Generated {
            chunk: Bytes::new(),
            left: 0,
        })
        .unwrap();
    let res = sender.send_request(download).await.unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let mut total = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            total += data.len();
        }
    }
    assert_eq!(total, CHUNK * CHUNKS);

    let peak_mib = peak_rss_kib(child.0.id()) / 1024;
    assert!(
        peak_mib < 40,
        "proxy peak RSS {peak_mib} MiB for a {CHUNKS} MiB body each way"
    );
}
