//! Redirects stay behind the proxy: an upstream's `Location` naming itself (absolute) or an
//! absolute path under its base path is mapped back to the mount (base-URL mode) or to the
//! host the client asked for (forward mode), so every hop goes through the route and gets the
//! credential; a redirect to another host is left alone and never carries the credential.

use std::sync::Arc;

use crate::support::server::{self, Origin, Seen};
use crate::support::{self, Proxy};

const TOKEN: &str = "Bearer redirect-token";

/// An upstream under `/base`: `/base/redirect/N` answers 302 to N-1 — an absolute URL naming
/// itself on even N, an absolute path on odd N — and `/base/redirect/0` answers 200;
/// `/base/away` redirects to `foreign`. Also sets `Content-Location` and `Refresh`.
async fn redirecting_upstream(foreign: &Origin) -> Origin {
    let foreign = foreign.url();
    let me: Arc<std::sync::OnceLock<String>> = Arc::default();
    let own = Arc::clone(&me);
    let origin = server::serve(move |seen: Seen| {
        let own = own.get().cloned().unwrap_or_default();
        let foreign = foreign.clone();
        async move {
            let path = seen.target.clone();
            if path == "/base/away" {
                let mut r = server::respond(302, "");
                r.headers_mut()
                    .insert("location", format!("{foreign}/landing").parse().unwrap());
                return r;
            }
            let n: u32 = path
                .strip_prefix("/base/redirect/")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            if n == 0 {
                let mut r = server::respond(200, "landed");
                r.headers_mut().insert(
                    "content-location",
                    format!("{own}/base/redirect/0").parse().unwrap(),
                );
                r.headers_mut()
                    .insert("refresh", "5; url=/base/redirect/0".parse().unwrap());
                return r;
            }
            let location = if n % 2 == 0 {
                format!("{own}/base/redirect/{}", n - 1)
            } else {
                format!("/base/redirect/{}", n - 1)
            };
            let mut r = server::respond(302, "");
            r.headers_mut()
                .insert("location", location.parse().unwrap());
            r
        }
    })
    .await;
    me.set(origin.url()).unwrap();
    origin
}

async fn start(upstream: &Origin, rewrite: bool) -> Proxy {
    let yaml = format!(
        "credentials:\n  key:\n    type: static\n    value: \"{TOKEN}\"\n\
         routes:\n\
         \x20 - name: forward\n    host: api.test\n    upstream: {up}/base\n    credential: key\n    rewrite_location: {rewrite}\n\
         \x20 - name: mount\n    mount: /m\n    upstream: {up}/base\n    credential: key\n    rewrite_location: {rewrite}\n",
        up = upstream.url()
    );
    support::proxy(&yaml).await
}

fn every_hop_had_the_credential(upstream: &Origin, hops: usize) {
    let seen = upstream.requests();
    assert_eq!(seen.len(), hops, "{seen:#?}");
    for s in seen {
        assert_eq!(s.header("authorization"), TOKEN, "{}", s.target);
    }
}

#[tokio::test]
async fn mount_mode_redirects_are_mapped_to_the_mount() {
    let foreign = server::echo_origin().await;
    let upstream = redirecting_upstream(&foreign).await;
    let proxy = start(&upstream, true).await;

    let res = support::direct_client()
        .get(format!("{}/m/redirect/4", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.url().path(), "/m/redirect/0");
    assert_eq!(res.headers()["content-location"], "/m/redirect/0");
    assert_eq!(res.headers()["refresh"], "5; url=/m/redirect/0");
    assert_eq!(res.text().await.unwrap(), "landed");
    every_hop_had_the_credential(&upstream, 5);

    // A redirect to another host is not rewritten; following it leaves the route.
    let res = support::direct_client()
        .get(format!("{}/m/away", proxy.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(foreign.count(), 1);
    assert_eq!(foreign.last().header("authorization"), "");
    proxy.stop().await;
}

#[tokio::test]
async fn forward_mode_redirects_are_mapped_to_the_requested_host() {
    let foreign = server::echo_origin().await;
    let upstream = redirecting_upstream(&foreign).await;
    let proxy = start(&upstream, true).await;
    let res = proxy
        .client()
        .get("http://api.test/redirect/4")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.url().as_str(), "http://api.test/redirect/0");
    every_hop_had_the_credential(&upstream, 5);

    let res = proxy
        .client()
        .get("http://api.test/away")
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(foreign.last().header("authorization"), "");
    proxy.stop().await;
}

#[tokio::test]
async fn rewrite_location_false_passes_redirects_unchanged() {
    let foreign = server::echo_origin().await;
    let upstream = redirecting_upstream(&foreign).await;
    let proxy = start(&upstream, false).await;
    let res = support::direct_client()
        .get(format!("{}/m/redirect/2", proxy.url()))
        .send()
        .await
        .unwrap();
    // The absolute Location names the upstream: the client goes there directly, without
    // the proxy and so without the credential.
    assert_eq!(res.url().port(), Some(upstream.addr.port()));
    let seen = upstream.requests();
    assert_eq!(seen.len(), 3);
    assert_eq!(seen[0].header("authorization"), TOKEN);
    assert_eq!(seen[1].header("authorization"), "");
    proxy.stop().await;
}

/// The issue's own check, with the real curl when it is installed.
#[tokio::test]
async fn curl_follows_mount_redirects_with_the_credential_on_every_hop() {
    if std::process::Command::new("curl")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("curl not installed; skipping");
        return;
    }
    let foreign = server::echo_origin().await;
    let upstream = redirecting_upstream(&foreign).await;
    let proxy = start(&upstream, true).await;
    let out = tokio::process::Command::new("curl")
        .args(["--silent", "--show-error", "--location", "--noproxy", "*"])
        .arg(format!("{}/m/redirect/3", proxy.url()))
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "landed");
    every_hop_had_the_credential(&upstream, 4);
    proxy.stop().await;
}

/// `Location`s that a browser (WHATWG URL parser) reads as another host once the base path is
/// stripped: `\` counts as `/`, and tabs and newlines are dropped. Each must reach the client
/// exactly as the upstream sent it, in every mode; `/base/ok` shows the rewrite is on.
#[tokio::test]
async fn redirects_that_would_name_another_host_are_left_alone_in_every_mode() {
    use tokio::io::AsyncWriteExt;

    let payloads: Arc<Vec<String>> = Arc::new(vec![
        "/base/\\127.0.0.1:18081/steal".into(),
        "/base/\t/127.0.0.1:18081/steal".into(),
        "/base/\t\\127.0.0.1:18081/steal".into(),
        "/base/ /127.0.0.1:18081/steal".into(),
        "/\\127.0.0.1:18081/steal".into(),
        "/base/ok".into(),
    ]);
    let table = Arc::clone(&payloads);
    let upstream = server::serve(move |seen: Seen| {
        let table = Arc::clone(&table);
        async move {
            let n: usize = seen
                .target
                .strip_prefix("/base/steal/")
                .and_then(|n| n.parse().ok())
                .unwrap();
            let mut r = server::respond(302, "");
            r.headers_mut()
                .insert("location", table[n].parse().unwrap());
            r
        }
    })
    .await;
    let proxy = start(&upstream, true).await;

    // (mode, how to open the connection, the request line's target, the rewrite of /base/ok)
    let modes = [
        ("mount", "/m/steal/", "/m/ok"),
        ("forward", "http://api.test/steal/", "/ok"),
        ("tunnel", "/steal/", "/ok"),
    ];
    for (mode, prefix, rewritten_ok) in modes {
        for (n, sent) in payloads.iter().enumerate() {
            let mut stream = if mode == "tunnel" {
                let (stream, head) = support::connect_tunnel(&proxy, "api.test:80").await;
                assert!(head.starts_with("HTTP/1.1 200"), "{head}");
                stream
            } else {
                tokio::net::TcpStream::connect(proxy.addr).await.unwrap()
            };
            let host = if mode == "mount" {
                "127.0.0.1"
            } else {
                "api.test"
            };
            stream
                .write_all(
                    format!(
                        "GET {prefix}{n} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
                    )
                    .as_bytes(),
                )
                .await
                .unwrap();
            let head = support::read_head(&mut stream).await;
            assert!(head.starts_with("HTTP/1.1 302"), "{mode} {sent:?}: {head}");
            let location = head
                .split("\r\n")
                .find_map(|l| {
                    let (name, value) = l.split_once(':')?;
                    name.eq_ignore_ascii_case("location")
                        .then(|| value.trim_start_matches(' ').to_string())
                })
                .unwrap_or_else(|| panic!("{mode} {sent:?}: no Location in {head}"));
            let expected = if sent == "/base/ok" {
                rewritten_ok
            } else {
                sent.as_str()
            };
            assert_eq!(location, expected, "{mode}: upstream sent {sent:?}");
        }
    }
    proxy.stop().await;
}
