//! Credentials that sign each request: `type: hmac` checked by an origin that recomputes the
//! signature, the body limit of a signature over the body, a streaming upload when the
//! signature does not cover the body, and `type: aws_sigv4` against moto in server mode.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use ring::{digest, hmac};

use crate::support::server::{self, Seen};
use crate::support::{direct_client, proxy};

const KEY: &str = "whsec-test-key";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the origin expects in `X-Signature`: `t=TS,v1=HMAC(key, "TS.METHOD.PATH.SHA256(body)")`.
fn expected_signature(seen: &Seen) -> Option<String> {
    let ts = seen.header("x-timestamp");
    if ts.is_empty() {
        return None;
    }
    let path = seen.target.split('?').next().unwrap_or_default();
    let body_hash = hex(digest::digest(&digest::SHA256, &seen.body).as_ref());
    let text = format!("{ts}.{}.{path}.{body_hash}", seen.method);
    let key = hmac::Key::new(hmac::HMAC_SHA256, KEY.as_bytes());
    Some(format!(
        "t={ts},v1={}",
        hex(hmac::sign(&key, text.as_bytes()).as_ref())
    ))
}

/// An origin that answers 401 unless the signature is the one it computes itself.
async fn verifying_origin() -> server::Origin {
    server::serve(|seen| async move {
        match expected_signature(&seen) {
            Some(sig) if sig == seen.header("x-signature") => server::respond(200, "verified"),
            _ => server::respond(401, "bad signature"),
        }
    })
    .await
}

fn hmac_config(upstream: &str, key: &str, max_body: &str) -> String {
    format!(
        r#"
retry:
  max_body_bytes: {max_body}
credentials:
  signer:
    type: hmac
    key: {key}
    header: X-Signature
    string_to_sign: "{{timestamp}}.{{method}}.{{path}}.{{body_sha256}}"
    format: "t={{timestamp}},v1={{signature}}"
    timestamp_header: X-Timestamp
routes:
  - name: signed
    mount: /signed
    upstream: {upstream}
    credential: signer
  - name: plain
    mount: /plain
    upstream: {upstream}
"#
    )
}

#[tokio::test]
async fn an_origin_that_recomputes_the_hmac_accepts_each_signed_request() {
    let origin = verifying_origin().await;
    let p = proxy(&hmac_config(&origin.url(), KEY, "1KiB")).await;
    let client = direct_client();
    for body in ["", "{\"amount\":100}"] {
        let r = client
            .post(format!("{}/signed/v1/charges?x=1", p.url()))
            .header("x-signature", "forged by the client")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    }
    let seen = origin.last();
    assert_eq!(seen.body, Bytes::from_static(b"{\"amount\":100}"));
    assert!(seen.header("x-signature").starts_with("t="));
    // Without the proxy's signature the same origin refuses.
    let r = client
        .post(format!("{}/plain/v1/charges", p.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    p.stop().await;

    // A wrong key is refused too: the origin really checks.
    let p = proxy(&hmac_config(&origin.url(), "another-key", "1KiB")).await;
    let r = client
        .post(format!("{}/signed/v1/charges", p.url()))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    p.stop().await;
}

#[tokio::test]
async fn a_body_over_the_limit_of_a_body_signature_is_413() {
    let origin = verifying_origin().await;
    let p = proxy(&hmac_config(&origin.url(), KEY, "1KiB")).await;
    let r = direct_client()
        .post(format!("{}/signed/upload", p.url()))
        .body(vec![b'x'; 4096])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "signed_body_too_large");
    assert_eq!(body["credential"], "signer");
    assert_eq!(body["route"], "signed");
    assert_eq!(origin.count(), 0);
    p.stop().await;
}

#[tokio::test]
async fn a_signature_without_the_body_hash_lets_a_large_upload_stream() {
    // The origin answers once the first chunk has arrived, which it can only do if the proxy
    // forwards the head and that chunk before the client has sent the rest: the client holds
    // the rest back until then.
    let (first_seen_tx, first_seen_rx) = tokio::sync::oneshot::channel::<String>();
    let first_seen_tx = Arc::new(Mutex::new(Some(first_seen_tx)));
    let total = Arc::new(Mutex::new(0usize));
    let record = Arc::clone(&total);
    let origin = server::serve_streaming(
        move |req: http::Request<hyper::body::Incoming>| {
            let tx = Arc::clone(&first_seen_tx);
            let record = Arc::clone(&record);
            async move {
                let signature = req
                    .headers()
                    .get("x-signature")
                    .map(|v| v.to_str().unwrap().to_string());
                let mut body = req.into_body();
                let mut n = 0;
                while let Some(frame) = body.frame().await {
                    if let Ok(data) = frame.unwrap().into_data() {
                        n += data.len();
                        if let Some(tx) = tx.lock().unwrap().take() {
                            let _ = tx.send(signature.clone().unwrap_or_default());
                        }
                    }
                }
                *record.lock().unwrap() = n;
                server::respond(200, n.to_string())
            }
        },
        Arc::default(),
    )
    .await;
    let yaml = format!(
        r#"
retry:
  max_body_bytes: 1KiB
credentials:
  signer:
    type: hmac
    key: {KEY}
    header: X-Signature
    string_to_sign: "{{timestamp}}.{{method}}.{{path}}"
    timestamp_header: X-Timestamp
routes:
  - name: upload
    mount: /upload
    upstream: {}
    credential: signer
"#,
        origin.url()
    );
    let p = proxy(&yaml).await;
    const CHUNK: usize = 64 * 1024;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(1);
    let rx = Mutex::new(rx);
    let sender = tokio::spawn(async move {
        tx.send(Ok(Bytes::from(vec![b'a'; CHUNK]))).await.unwrap();
        let signature = first_seen_rx.await.expect("the origin saw the first chunk");
        for _ in 0..15 {
            tx.send(Ok(Bytes::from(vec![b'b'; CHUNK]))).await.unwrap();
        }
        signature
    });
    // hyper's client: it sends a body as its stream yields, chunk by chunk.
    let body = http_body_util::StreamBody::new(futures_util::stream::poll_fn(move |cx| {
        let mut rx = rx.lock().unwrap();
        rx.poll_recv(cx)
            .map(|o| o.map(|r| r.map(hyper::body::Frame::data)))
    }));
    let stream = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let request = http::Request::put("/upload/big")
        .header("host", p.addr.to_string())
        .body(body)
        .unwrap();
    let r = tokio::time::timeout(Duration::from_secs(60), send.send_request(request))
        .await
        .expect("the upload streamed (a buffering proxy would wait forever)")
        .unwrap();
    assert_eq!(r.status(), 200);
    let text = r.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(text, (16 * CHUNK).to_string());
    assert_eq!(*total.lock().unwrap(), 16 * CHUNK);
    let signature = sender.await.unwrap();
    assert!(signature.len() == 64, "a hex HMAC-SHA256: {signature}");
    p.stop().await;
}

#[tokio::test]
async fn a_covered_header_the_client_did_not_send_is_a_clear_400() {
    let origin = verifying_origin().await;
    let yaml = format!(
        r#"
credentials:
  signer:
    type: hmac
    key: {KEY}
    string_to_sign: "{{method}}.{{header:x-request-id}}"
routes:
  - name: signed
    mount: /signed
    upstream: {}
    credential: signer
"#,
        origin.url()
    );
    let p = proxy(&yaml).await;
    let r = direct_client()
        .get(format!("{}/signed/x", p.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"], "cannot_sign");
    assert!(
        body["detail"].as_str().unwrap().contains("x-request-id"),
        "{body}"
    );
    assert!(!body.to_string().contains(KEY));
    p.stop().await;
}

#[test]
fn an_unknown_placeholder_is_refused_with_its_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("routes.yaml");
    std::fs::write(
        &path,
        "routes: []\ncredentials:\n  signer:\n    type: hmac\n    key: k\n    string_to_sign: \"{method}.{bogus}\"\n",
    )
    .unwrap();
    let env = std::collections::HashMap::<String, String>::new();
    let e = authrelay::Config::load(&path, &env)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("unknown placeholder {bogus}") && e.contains("line 3 column"),
        "{e}"
    );
}

/// `moto_server` on a free loopback port, stopped (by its PID) when dropped.
struct Moto {
    child: std::process::Child,
    port: u16,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts moto with request authentication on after the first `free_actions` calls (which
/// create the IAM user whose key the proxy signs with). `None` when moto is not installed.
async fn start_moto(free_actions: u32) -> Option<Moto> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("moto_server")
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .env("INITIAL_NO_AUTH_ACTION_COUNT", free_actions.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let moto = Moto { child, port };
    for _ in 0..300 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Some(moto);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("moto_server did not start listening");
}

fn xml_field(text: &str, name: &str) -> String {
    let open = format!("<{name}>");
    let start = text
        .find(&open)
        .unwrap_or_else(|| panic!("no {name} in {text}"))
        + open.len();
    let end = text[start..].find('<').unwrap() + start;
    text[start..end].to_string()
}

/// IAM calls made before authentication is switched on: a user, its key, an admin policy.
async fn iam_user(moto: &Moto) -> (String, String) {
    let client = direct_client();
    let iam = |form: String| {
        client
            .post(format!("http://127.0.0.1:{}/", moto.port))
            // Only names the service for moto's routing; nothing is checked yet.
            .header(
                "authorization",
                "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20150830/us-east-1/iam/aws4_request, SignedHeaders=host, Signature=0",
            )
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
    };
    let r = iam("Action=CreateUser&UserName=relay&Version=2010-05-08".into())
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    let r = iam("Action=CreateAccessKey&UserName=relay&Version=2010-05-08".into())
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    let key = (
        xml_field(&text, "AccessKeyId"),
        xml_field(&text, "SecretAccessKey"),
    );
    let policy = serde_urlencoded::to_string([
        ("Action", "PutUserPolicy"),
        ("UserName", "relay"),
        ("PolicyName", "everything"),
        (
            "PolicyDocument",
            r#"{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}"#,
        ),
        ("Version", "2010-05-08"),
    ])
    .unwrap();
    let r = iam(policy).await.unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    key
}

fn aws_config(port: u16, key_id: &str, secret: &str) -> String {
    format!(
        r#"
credentials:
  s3:
    type: aws_sigv4
    access_key_id: {key_id}
    secret_access_key: {secret}
    region: us-east-1
    service: s3
  sts:
    type: aws_sigv4
    access_key_id: {key_id}
    secret_access_key: {secret}
    region: us-east-1
    service: sts
routes:
  - name: s3
    mount: /s3
    upstream: http://127.0.0.1:{port}
    credential: s3
    allow_cleartext: true
  - name: sts
    mount: /sts
    upstream: http://127.0.0.1:{port}
    credential: sts
    allow_cleartext: true
"#
    )
}

#[tokio::test]
async fn aws_sigv4_requests_pass_moto_signature_checks() {
    let Some(moto) = start_moto(3).await else {
        eprintln!("SKIPPED: moto_server is not installed (.ci/run installs moto[server])");
        return;
    };
    let (key_id, secret) = iam_user(&moto).await;
    let p = proxy(&aws_config(moto.port, &key_id, &secret)).await;
    let c = direct_client();
    let base = p.url();

    let r = c
        .put(format!("{base}/s3/relay-bucket"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "create bucket: {}",
        r.text().await.unwrap()
    );
    let r = c.get(format!("{base}/s3/")).send().await.unwrap();
    let text = r.text().await.unwrap();
    assert!(
        text.contains("<Name>relay-bucket</Name>"),
        "list buckets: {text}"
    );
    let r = c
        .put(format!("{base}/s3/relay-bucket/notes/a%20b.txt"))
        .header("content-type", "text/plain")
        .body("hello through the proxy")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "put object: {}", r.text().await.unwrap());
    let r = c
        .get(format!("{base}/s3/relay-bucket/notes/a%20b.txt"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "hello through the proxy");

    let r = c
        .post(format!("{base}/sts/"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("Action=GetCallerIdentity&Version=2011-06-15")
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    assert!(text.contains("user/relay"), "GetCallerIdentity: {text}");
    p.stop().await;

    // The same calls with a wrong secret: moto recomputes the signature and refuses it.
    let p = proxy(&aws_config(moto.port, &key_id, "not-the-secret")).await;
    let r = c.get(format!("{}/s3/", p.url())).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("SignatureDoesNotMatch"));
    let r = c
        .post(format!("{}/sts/", p.url()))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("Action=GetCallerIdentity&Version=2011-06-15")
        .send()
        .await
        .unwrap();
    assert!(r.text().await.unwrap().contains("SignatureDoesNotMatch"));
    p.stop().await;
}
