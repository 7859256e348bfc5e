//! Per-request costs that do not involve the network: route lookup at 1, 100 and 10 000
//! routes, the work of injecting a credential (snapshot load, cached token, header insert),
//! and parsing + validating a 1 000-route config file.
//!
//! Run with `cargo bench --bench routing`. Measurement times are short so that the whole
//! suite finishes in a few minutes on a small shared machine; compare ratios between lines,
//! not absolute numbers.
#![allow(clippy::expect_used)] // a benchmark whose setup fails must stop, loudly

use std::collections::HashMap;
use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use http::header::HeaderMap;
use http::{HeaderValue, Method, Uri};

use authrelay::config::{OnUnauthorized, RouteConfig};
use authrelay::metrics::Metrics;
use authrelay::proxy::exchange::inject;
use authrelay::proxy::target;
use authrelay::routes::{HostPattern, RouteTable};
use authrelay::{Config, State};

/// Route counts the lookup is measured at.
const SIZES: [usize; 3] = [1, 100, 10_000];

/// A table of `n` routes: a third exact hosts, a third wildcard hosts, a third path-prefix
/// routes (four prefixes per host). The routes looked up are the last of each kind, so a
/// linear scan would pay for the whole table.
fn table(n: usize) -> RouteTable {
    let routes: Vec<RouteConfig> = (0..n)
        .map(|i| {
            let (host, prefix) = match i % 3 {
                0 => (format!("api{i}.vendor.test"), None),
                1 => (format!("*.tenant{i}.example"), None),
                _ => (
                    format!("prefixed{}.vendor.test", i / 12),
                    Some(format!("/v{}/items", i % 4)),
                ),
            };
            route(&format!("r{i}"), &host, prefix)
        })
        .collect();
    RouteTable::build(&routes, &HashMap::new(), &Metrics::new())
}

fn route(name: &str, host: &str, prefix: Option<String>) -> RouteConfig {
    RouteConfig {
        name: name.into(),
        host: HostPattern::parse(host).ok(),
        path_prefix: prefix,
        methods: None,
        mount: None,
        upstream: None,
        credential: None,
        on_unauthorized: OnUnauthorized::Retry,
        refresh_on: Default::default(),
        intercept: false,
        rewrite_location: true,
        clients: None,
        allow_cleartext: false,
        tls_client_cert: None,
    }
}

/// The last route index of kind `kind` (0 exact, 1 wildcard, 2 prefix) below `n`.
fn last_of_kind(n: usize, kind: usize) -> Option<usize> {
    (0..n).rev().find(|i| i % 3 == kind)
}

fn route_lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_find");
    group
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(30);
    for n in SIZES {
        let t = table(n);
        let get = Method::GET;
        if let Some(i) = last_of_kind(n, 0) {
            let host = format!("api{i}.vendor.test");
            assert!(t.find(&host, 443, 443, "/x", &get).is_some());
            group.bench_with_input(BenchmarkId::new("exact_host", n), &host, |b, host| {
                b.iter(|| black_box(t.find(black_box(host), 443, 443, "/v1/x", &get)).is_some())
            });
        }
        // With one route there is no wildcard and no prefix route: use a route of each kind
        // built alone so that every size has every line.
        let (wt, wi) = match last_of_kind(n, 1) {
            Some(i) => (None, i),
            None => (Some(table_of(route("w", "*.tenant1.example", None))), 1),
        };
        let wt_ref = wt.as_ref().unwrap_or(&t);
        let host = format!("deep.api.tenant{wi}.example");
        assert!(wt_ref.find(&host, 443, 443, "/x", &get).is_some());
        group.bench_with_input(BenchmarkId::new("wildcard_host", n), &host, |b, host| {
            b.iter(|| black_box(wt_ref.find(black_box(host), 443, 443, "/v1/x", &get)).is_some())
        });

        let (pt, host, path) = match last_of_kind(n, 2) {
            Some(i) => (
                None,
                format!("prefixed{}.vendor.test", i / 12),
                format!("/v{}/items/42", i % 4),
            ),
            None => (
                Some(table_of(route(
                    "p",
                    "prefixed0.vendor.test",
                    Some("/v3/items".into()),
                ))),
                "prefixed0.vendor.test".to_string(),
                "/v3/items/42".to_string(),
            ),
        };
        let pt_ref = pt.as_ref().unwrap_or(&t);
        assert!(pt_ref.find(&host, 443, 443, &path, &get).is_some());
        group.bench_with_input(BenchmarkId::new("path_prefix", n), &n, |b, _| {
            b.iter(|| {
                black_box(pt_ref.find(black_box(&host), 443, 443, black_box(&path), &get)).is_some()
            })
        });

        group.bench_with_input(BenchmarkId::new("miss", n), &n, |b, _| {
            b.iter(|| {
                black_box(t.find(black_box("unknown.host.test"), 443, 443, "/v1/x", &get)).is_none()
            })
        });
    }
    group.finish();
}

fn table_of(r: RouteConfig) -> RouteTable {
    RouteTable::build(&[r], &HashMap::new(), &Metrics::new())
}

/// A config with one static credential and `routes` routes, the matched one last.
fn config_yaml(routes: usize) -> String {
    let mut yaml = String::from(
        "listen: 127.0.0.1:0\nunmatched: pass\ncredentials:\n  bench:\n    type: static\n    value: \"Bearer ${TOKEN}\"\n",
    );
    for i in 0..10 {
        yaml.push_str(&format!(
            "  extra{i}:\n    type: static\n    header: X-Api-Key\n    value: \"key-{i}-${{TOKEN}}\"\n"
        ));
    }
    yaml.push_str("routes:\n");
    for i in 0..routes {
        match i % 4 {
            0 => yaml.push_str(&format!(
                "  - name: exact-{i}\n    host: api{i}.vendor.test\n    credential: extra{}\n",
                i % 10
            )),
            1 => yaml.push_str(&format!(
                "  - name: wild-{i}\n    host: \"*.tenant{i}.example\"\n    path_prefix: /api/v1/\n    methods: [GET, POST]\n    credential: extra{}\n",
                i % 10
            )),
            2 => yaml.push_str(&format!(
                "  - name: mount-{i}\n    mount: /m{i}\n    upstream: https://api{i}.vendor.test/base\n    credential: extra{}\n",
                i % 10
            )),
            _ => yaml.push_str(&format!(
                "  - name: port-{i}\n    host: \"10.0.{}.{}:8443\"\n    on_unauthorized: pass\n",
                (i / 250) % 250,
                i % 250
            )),
        }
    }
    yaml.push_str("  - name: bench\n    host: \"127.0.0.1:9\"\n    credential: bench\n");
    yaml
}

fn env() -> HashMap<String, String> {
    HashMap::from([("TOKEN".to_string(), "bench-token".to_string())])
}

fn config_parse(c: &mut Criterion) {
    let yaml = config_yaml(1_000);
    let env = env();
    let path = Path::new("/tmp/authrelay-bench/routes.yaml");
    let parsed = Config::from_yaml(&yaml, path, &env);
    assert!(parsed.is_ok(), "{:?}", parsed.err());
    let mut group = c.benchmark_group("config");
    group
        .measurement_time(Duration::from_secs(3))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(10);
    group.bench_function("parse_validate_1000_routes", |b| {
        b.iter(|| Config::from_yaml(black_box(&yaml), path, &env).is_ok())
    });
    group.finish();
}

/// Typical headers of a request from a legacy client.
fn client_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(
        http::header::ACCEPT,
        HeaderValue::from_static("application/json"),
    );
    h.insert(
        http::header::USER_AGENT,
        HeaderValue::from_static("legacy-app/1.0"),
    );
    h.insert(
        http::header::ACCEPT_ENCODING,
        HeaderValue::from_static("gzip"),
    );
    h.insert("x-request-id", HeaderValue::from_static("4f1c2a9e-bench"));
    h
}

fn injection(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let yaml = config_yaml(1_000);
    let config = Config::from_yaml(&yaml, Path::new("/tmp/routes.yaml"), &env()).expect("config");
    let state =
        runtime.block_on(async { State::new(config, None, Arc::new(env())).expect("state") });
    let uri: Uri = "http://127.0.0.1:9/v1/items?limit=10".parse().expect("uri");
    let snapshot = state.snapshot();
    let routed = target::resolve(&snapshot, &Method::GET, &uri).expect("routed");
    let slot = routed
        .route
        .as_ref()
        .and_then(|r| r.credential_for(None).cloned())
        .expect("route with credential");
    // Fill the cache once; every measured `get` is then a cache hit.
    runtime.block_on(slot.get()).expect("token");
    drop(snapshot);

    let mut group = c.benchmark_group("inject");
    group
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500))
        .sample_size(30);
    group.bench_function("snapshot_load", |b| b.iter(|| black_box(state.snapshot())));
    group.bench_function("route_resolve", |b| {
        let snapshot = state.snapshot();
        b.iter(|| target::resolve(&snapshot, &Method::GET, black_box(&uri)).is_ok())
    });
    group.bench_function("cached_token_get", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    black_box(slot.get().await.is_ok());
                }
                start.elapsed()
            })
        })
    });
    let template = client_headers();
    group.bench_function("header_map_clone_baseline", |b| {
        b.iter(|| black_box(template.clone()))
    });
    group.bench_function("header_insert_with_clone", |b| {
        let token = runtime.block_on(slot.get()).expect("token");
        b.iter(|| {
            let mut headers = template.clone();
            inject(&mut headers, slot.header(), token.header_value());
            black_box(headers)
        })
    });
    group.bench_function("full_per_request_injection", |b| {
        b.iter_custom(|iters| {
            runtime.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let snapshot = state.snapshot();
                    let Ok(routed) = target::resolve(&snapshot, &Method::GET, black_box(&uri))
                    else {
                        continue;
                    };
                    let Some(slot) = routed.route.as_ref().and_then(|r| r.credential_for(None))
                    else {
                        continue;
                    };
                    let Ok(token) = slot.get().await else {
                        continue;
                    };
                    let mut headers = template.clone();
                    inject(&mut headers, slot.header(), token.header_value());
                    black_box(headers);
                }
                start.elapsed()
            })
        })
    });
    group.finish();
}

criterion_group!(benches, route_lookup, injection, config_parse);
criterion_main!(benches);
