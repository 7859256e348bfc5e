//! A token refresh in progress must add nothing to requests that do not need it.
//!
//! The token endpoint here is slow: after the first token, every fetch takes two minutes.
//! Each group measures `CredentialSlot::get` three ways:
//! - `baseline`: nothing is refreshing;
//! - `other_slot_refreshing`: another credential is stuck in its (slow) fetch;
//! - `same_slot_refreshing`: this credential's token is due for refresh, the background
//!   refresh is stuck in the slow fetch, and the cached token is still valid.
//!
//! The three lines should be equal within noise. Run with `cargo bench --bench refresh`.
#![allow(clippy::expect_used)] // a benchmark whose setup fails must stop, loudly

use std::collections::HashMap;
use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use criterion::{criterion_group, criterion_main, Criterion};

use authrelay::config::{CredentialConfig, TokenSettings};
use authrelay::credentials::{CredentialError, FetchFuture, Token, TokenSource};
use authrelay::metrics::Metrics;
use authrelay::token_store::CredentialSlot;
use authrelay::vocab::secret::Secret;
use authrelay::Config;

/// Lifetime of the one fast token: refresh becomes due after half of it (5 s) and the token
/// stays usable until 90% (9 s), which leaves a 4 s window to measure in.
const LIFETIME: Duration = Duration::from_secs(10);

/// A token endpoint that answers the first call at once and hangs on every later one.
struct SlowEndpoint {
    calls: AtomicU32,
}

impl TokenSource for SlowEndpoint {
    fn fetch<'a>(&'a self, _previous: Option<&'a Token>) -> FetchFuture<'a> {
        let call = self.calls.fetch_add(1, Ordering::AcqRel);
        Box::pin(async move {
            if call > 0 {
                tokio::time::sleep(Duration::from_secs(120)).await;
            }
            Ok::<_, CredentialError>(Token {
                value: Secret::new(format!("Bearer slow-token-{call}")),
                expires_at: Some(SystemTime::now() + LIFETIME),
                refresh: None,
            })
        })
    }
}

/// Credential and token settings taken from a validated config (the credential's own
/// settings are irrelevant: the slot is given its source directly).
fn settings() -> (CredentialConfig, TokenSettings) {
    let yaml = "credentials:\n  slow:\n    type: static\n    value: \"Bearer x\"\ntokens:\n  fetch_timeout: 300s\n";
    let config = Config::from_yaml(
        yaml,
        Path::new("/tmp/refresh-bench.yaml"),
        &HashMap::<String, String>::new(),
    )
    .expect("config");
    let credential = config.credentials.get("slow").cloned().expect("credential");
    (credential, config.tokens)
}

fn slot(name: &str) -> Arc<CredentialSlot> {
    let (mut credential, tokens) = settings();
    credential.name = name.into();
    CredentialSlot::new(
        credential,
        tokens,
        Arc::new(SlowEndpoint {
            calls: AtomicU32::new(0),
        }),
        Arc::new(Metrics::new()),
    )
}

/// Measures `iters` cached `get`s on `slot`.
fn gets(runtime: &tokio::runtime::Runtime, slot: &Arc<CredentialSlot>, iters: u64) -> Duration {
    runtime.block_on(async {
        let start = Instant::now();
        for _ in 0..iters {
            black_box(slot.get().await.is_ok());
        }
        start.elapsed()
    })
}

fn refresh_in_progress(c: &mut Criterion) {
    // One worker runs the background refreshes; the bench thread drives `block_on`.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let measured = slot("measured");
    let hanging = slot("hanging");
    runtime.block_on(measured.get()).expect("first token");
    runtime.block_on(hanging.get()).expect("first token");
    let issued = Instant::now();
    // The other slot: its token falls due at the same time as `measured`'s; a task then
    // asks for it, which starts its background refresh, which hangs in the slow fetch.
    let waiter = {
        let hanging = Arc::clone(&hanging);
        runtime.spawn(async move {
            tokio::time::sleep(LIFETIME / 2 + Duration::from_millis(50)).await;
            let _ = hanging.get().await;
        })
    };

    let mut group = c.benchmark_group("get_during_refresh");
    group
        .measurement_time(Duration::from_millis(700))
        .warm_up_time(Duration::from_millis(200))
        .sample_size(20);
    group.bench_function("baseline", |b| {
        b.iter_custom(|iters| gets(&runtime, &measured, iters))
    });

    // Wait until both tokens are due (same issue time within milliseconds) and the
    // `hanging` slot's refresh has started.
    let due = LIFETIME / 2 + Duration::from_millis(200);
    std::thread::sleep(due.saturating_sub(issued.elapsed()));
    assert_eq!(
        hanging.status().state,
        "refreshing",
        "the other slot should be in its slow fetch"
    );
    assert_eq!(
        measured.status().state,
        "valid",
        "the measured slot should not have started refreshing yet"
    );
    // `measured` is also due now, so its first `get` below would start its own refresh:
    // measure the other-slot case on a slot that is not due.
    let fresh = slot("fresh");
    runtime.block_on(fresh.get()).expect("first token");
    group.bench_function("other_slot_refreshing", |b| {
        b.iter_custom(|iters| gets(&runtime, &fresh, iters))
    });

    // Now start `measured`'s own background refresh and measure while it hangs.
    runtime.block_on(measured.get()).expect("still valid");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(measured.status().state, "refreshing");
    group.bench_function("same_slot_refreshing", |b| {
        b.iter_custom(|iters| gets(&runtime, &measured, iters))
    });
    assert!(
        issued.elapsed() < LIFETIME * 9 / 10,
        "measurement ran past the token's usable window; the last line is not valid"
    );
    assert_eq!(measured.status().state, "refreshing");
    group.finish();
    waiter.abort();
}

criterion_group!(benches, refresh_in_progress);
criterion_main!(benches);
