//! Prometheus metrics. Per-route handles are resolved once when a route table is built, so
//! counting a request is a few atomic additions: no label hashing or allocation per request.

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: String,
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CredentialLabels {
    credential: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CredentialNameLabels {
    credential: String,
}

/// A gauge holding seconds (fractional, possibly `+Inf`).
type SecondsGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    route: String,
    credential: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// A counter kept by a module below this one (which cannot import the registry without an
/// import circle), read when `/metrics` is scraped.
#[derive(Debug)]
struct ReadAtScrape(fn() -> u64);

impl EncodeMetric for ReadAtScrape {
    fn encode(&self, encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        ConstCounter::new((self.0)()).encode(encoder)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AdminActionLabels {
    action: &'static str,
    outcome: &'static str,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Token endpoint calls take from milliseconds up to `fetch_timeout` (default 15 s).
fn fetch_duration_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 14))
}

/// A credential's state as the per-credential gauges show it, read from its slot at scrape
/// time (seconds tick on without traffic, so they cannot be pushed on events).
#[derive(Clone, Debug, PartialEq)]
pub struct CredentialGauges {
    /// Whether a token that may be sent now is held.
    pub usable: bool,
    /// Seconds until the held token stops being sent (0 without one, `+Inf` if it never
    /// expires).
    pub expires_in_seconds: f64,
    /// Seconds since the last successful fetch (`+Inf` before the first).
    pub since_last_fetch_seconds: f64,
    /// Failed fetches in a row.
    pub consecutive_failures: u32,
    /// Whether the last failure was the token endpoint refusing the configured secret.
    pub refused: bool,
    /// Whether only a person's consent (`authrelay authorize`) can bring the credential back.
    pub needs_consent: bool,
}

/// The per-credential gauge families.
struct CredentialGaugeFamilies {
    usable: Family<CredentialNameLabels, Gauge>,
    expires_in: Family<CredentialNameLabels, SecondsGauge>,
    since_last_fetch: Family<CredentialNameLabels, SecondsGauge>,
    failures: Family<CredentialNameLabels, Gauge>,
    refused: Family<CredentialNameLabels, Gauge>,
    needs_consent: Family<CredentialNameLabels, Gauge>,
}

/// Every metric the proxy exports.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    upstream_latency: Family<RouteLabels, Histogram, fn() -> Histogram>,
    token_fetches: Family<CredentialLabels, Counter>,
    token_fetch_duration: Family<CredentialNameLabels, Histogram, fn() -> Histogram>,
    credential_gauges: CredentialGaugeFamilies,
    retries: Family<RetryLabels, Counter>,
    reloads: Family<OutcomeLabels, Counter>,
    admin_actions: Family<AdminActionLabels, Counter>,
    /// Client connections currently open.
    pub client_connections: Gauge,
    /// CONNECT tunnels currently open.
    pub tunnels: Gauge,
    /// Client connections switched to another protocol (WebSocket) and spliced upstream.
    pub upgraded_connections: Gauge,
    /// Connections closed unread because the client's address is outside `clients.allow_from`.
    pub refused_clients: Counter,
    /// Failed proxy logins (a wrong or malformed `Proxy-Authorization`).
    pub proxy_auth_failures: Counter,
    /// 1 while the token cache is usable (always for `memory`), 0 while Redis is unreachable.
    pub token_cache_up: Gauge,
    /// Token fetches this replica made without the shared cache because Redis was down or slow.
    pub token_cache_fallbacks: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Status classes counted per route; index 0 is for requests answered by the proxy itself
/// without any upstream status (never happens for counted classes; kept for clarity).
const CLASSES: [&str; 6] = ["other", "1xx", "2xx", "3xx", "4xx", "5xx"];

/// Outcomes of a replay after 401/403, in `RouteMetrics::retry` order.
const RETRY_OUTCOMES: [&str; 3] = ["success", "failed", "unavailable"];

/// Outcomes of a token endpoint call: success first.
const FETCH_OUTCOMES: [&str; 2] = ["success", "failure"];

impl Metrics {
    /// Creates and registers every metric family.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("authrelay");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by route and status class",
            requests.clone(),
        );
        let upstream_latency =
            Family::<RouteLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "upstream_latency_seconds",
            "Time from sending a request upstream to its response head, by route",
            upstream_latency.clone(),
        );
        let token_fetches = Family::<CredentialLabels, Counter>::default();
        registry.register(
            "token_fetches",
            "Token endpoint calls, by credential and outcome",
            token_fetches.clone(),
        );
        let token_fetch_duration =
            Family::<CredentialNameLabels, Histogram, fn() -> Histogram>::new_with_constructor(
                fetch_duration_histogram,
            );
        registry.register(
            "token_fetch_duration_seconds",
            "Duration of token endpoint calls (successful or not), by credential",
            token_fetch_duration.clone(),
        );
        let credential_gauges = CredentialGaugeFamilies {
            usable: Family::default(),
            expires_in: Family::default(),
            since_last_fetch: Family::default(),
            failures: Family::default(),
            refused: Family::default(),
            needs_consent: Family::default(),
        };
        registry.register(
            "credential_token_usable",
            "1 when the credential holds a token that may be sent now, else 0",
            credential_gauges.usable.clone(),
        );
        registry.register(
            "credential_token_expires_in_seconds",
            "Seconds until the cached token stops being sent (0 without one, +Inf if it never expires)",
            credential_gauges.expires_in.clone(),
        );
        registry.register(
            "credential_seconds_since_last_fetch",
            "Seconds since the last successful token fetch (+Inf before the first)",
            credential_gauges.since_last_fetch.clone(),
        );
        registry.register(
            "credential_consecutive_failures",
            "Failed token fetches in a row (0 after a success)",
            credential_gauges.failures.clone(),
        );
        registry.register(
            "credential_refused",
            "1 when the token endpoint refused the configured secret (state `rejected`), else 0",
            credential_gauges.refused.clone(),
        );
        registry.register(
            "credential_needs_consent",
            "1 when a person must consent again (`authrelay authorize NAME`; state `needs_consent`), else 0",
            credential_gauges.needs_consent.clone(),
        );
        let retries = Family::<RetryLabels, Counter>::default();
        registry.register(
            "unauthorized_retries",
            "Replays after a 401/403, by route, credential and outcome",
            retries.clone(),
        );
        let reloads = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "config_reloads",
            "Config reloads, by outcome",
            reloads.clone(),
        );
        let client_connections = Gauge::default();
        registry.register(
            "client_connections",
            "Client connections open",
            client_connections.clone(),
        );
        let tunnels = Gauge::default();
        registry.register("tunnels", "CONNECT tunnels open", tunnels.clone());
        let upgraded_connections = Gauge::default();
        registry.register(
            "upgraded_connections",
            "Client connections switched to another protocol (WebSocket) and spliced upstream",
            upgraded_connections.clone(),
        );
        let refused_clients = Counter::default();
        registry.register(
            "refused_client_connections",
            "Connections closed unread because the client address is outside clients.allow_from",
            refused_clients.clone(),
        );
        let proxy_auth_failures = Counter::default();
        registry.register(
            "proxy_auth_failures",
            "Failed proxy logins: a wrong or malformed Proxy-Authorization",
            proxy_auth_failures.clone(),
        );
        let token_cache_up = Gauge::default();
        token_cache_up.set(1);
        registry.register(
            "token_cache_up",
            "1 while the token cache is usable, 0 while its Redis is unreachable",
            token_cache_up.clone(),
        );
        let token_cache_fallbacks = Counter::default();
        registry.register(
            "token_cache_fallbacks",
            "Token fetches made without the shared cache because Redis was down or slow",
            token_cache_fallbacks.clone(),
        );
        let admin_actions = Family::<AdminActionLabels, Counter>::default();
        registry.register(
            "admin_actions",
            "Admin actions asked for (refresh, invalidate), by action and outcome",
            admin_actions.clone(),
        );
        registry.register(
            "access_log_dropped",
            "Access log lines dropped because stderr did not keep up (1 MiB of lines waiting)",
            ReadAtScrape(crate::access_log::dropped_lines),
        );
        Self {
            token_cache_up,
            token_cache_fallbacks,
            registry,
            requests,
            upstream_latency,
            token_fetches,
            token_fetch_duration,
            credential_gauges,
            retries,
            reloads,
            admin_actions,
            client_connections,
            tunnels,
            upgraded_connections,
            refused_clients,
            proxy_auth_failures,
        }
    }

    /// Handles for one route (or `unmatched`) and the `credentials` it may inject (one, or
    /// one per client), resolved once per route table.
    pub fn for_route(&self, route: &str, credentials: &[&str]) -> RouteMetrics {
        let requests = CLASSES.map(|class| {
            self.requests
                .get_or_create(&RequestLabels {
                    route: route.to_string(),
                    class,
                })
                .clone()
        });
        let latency = self
            .upstream_latency
            .get_or_create(&RouteLabels {
                route: route.to_string(),
            })
            .clone();
        let retry = credentials
            .iter()
            .map(|credential| {
                let counters = RETRY_OUTCOMES.map(|outcome| {
                    self.retries
                        .get_or_create(&RetryLabels {
                            route: route.to_string(),
                            credential: credential.to_string(),
                            outcome,
                        })
                        .clone()
                });
                (credential.to_string(), counters)
            })
            .collect();
        RouteMetrics {
            requests,
            latency,
            retry,
        }
    }

    /// Drops every series of a route removed by a reload, so `/metrics` shows only routes
    /// that exist (and a removed route's old counts do not linger forever).
    pub fn drop_route(&self, route: &str) {
        for class in CLASSES {
            self.requests.remove(&RequestLabels {
                route: route.to_string(),
                class,
            });
        }
        self.upstream_latency.remove(&RouteLabels {
            route: route.to_string(),
        });
    }

    /// Drops the replay series of `credential` on `route`, when a reload removed the route
    /// or took that credential off it.
    pub fn drop_replays(&self, route: &str, credential: &str) {
        for outcome in RETRY_OUTCOMES {
            self.retries.remove(&RetryLabels {
                route: route.to_string(),
                credential: credential.to_string(),
                outcome,
            });
        }
    }

    /// Drops the token series of a credential removed by a reload.
    pub fn drop_credential(&self, credential: &str) {
        for outcome in FETCH_OUTCOMES {
            self.token_fetches.remove(&CredentialLabels {
                credential: credential.to_string(),
                outcome,
            });
        }
        self.token_fetch_duration.remove(&CredentialNameLabels {
            credential: credential.to_string(),
        });
    }

    /// Counts a token endpoint call (rare: labels are built here).
    pub fn token_fetch(&self, credential: &str, ok: bool, took: Duration) {
        let outcome = FETCH_OUTCOMES[usize::from(!ok)];
        self.token_fetches
            .get_or_create(&CredentialLabels {
                credential: credential.to_string(),
                outcome,
            })
            .inc();
        self.token_fetch_duration
            .get_or_create(&CredentialNameLabels {
                credential: credential.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// Replaces every per-credential gauge with `credentials` (called at scrape time with
    /// the current snapshot's credentials, so removed ones disappear).
    pub fn set_credential_gauges<'a>(
        &self,
        credentials: impl IntoIterator<Item = (&'a str, CredentialGauges)>,
    ) {
        let g = &self.credential_gauges;
        g.usable.clear();
        g.expires_in.clear();
        g.since_last_fetch.clear();
        g.failures.clear();
        g.refused.clear();
        g.needs_consent.clear();
        for (name, values) in credentials {
            let labels = CredentialNameLabels {
                credential: name.to_string(),
            };
            g.usable
                .get_or_create(&labels)
                .set(i64::from(values.usable));
            g.expires_in
                .get_or_create(&labels)
                .set(values.expires_in_seconds);
            g.since_last_fetch
                .get_or_create(&labels)
                .set(values.since_last_fetch_seconds);
            g.failures
                .get_or_create(&labels)
                .set(i64::from(values.consecutive_failures));
            g.refused
                .get_or_create(&labels)
                .set(i64::from(values.refused));
            g.needs_consent
                .get_or_create(&labels)
                .set(i64::from(values.needs_consent));
        }
    }

    /// Counts a config reload.
    pub fn reload(&self, ok: bool) {
        let outcome = if ok { "success" } else { "failure" };
        self.reloads.get_or_create(&OutcomeLabels { outcome }).inc();
    }

    /// Counts an admin action by what came of it (both labels are fixed words, never a
    /// credential name a client made up).
    pub fn admin_action(&self, action: &'static str, outcome: &'static str) {
        self.admin_actions
            .get_or_create(&AdminActionLabels { action, outcome })
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Pre-resolved metric handles of one route.
#[derive(Clone, Debug)]
pub struct RouteMetrics {
    requests: [Counter; 6],
    latency: Histogram,
    /// Replay counters by credential name.
    retry: std::collections::HashMap<String, [Counter; 3]>,
}

/// How a replay after 401/403 ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryOutcome {
    /// The replay got a non-401/403 answer.
    Success,
    /// The replay was refused again.
    Failed,
    /// No new token could be obtained.
    Unavailable,
}

impl RouteMetrics {
    /// Counts an answer by status class.
    pub fn answered(&self, status: u16) {
        let idx = match status {
            100..=599 => (status / 100) as usize,
            _ => 0,
        };
        self.requests[idx].inc();
    }

    /// Records the time to an upstream's response head.
    pub fn upstream_latency(&self, took: Duration) {
        self.latency.observe(took.as_secs_f64());
    }

    /// Counts a replay after 401/403 with `credential`'s token.
    pub fn retried(&self, credential: &str, outcome: RetryOutcome) {
        let idx = match outcome {
            RetryOutcome::Success => 0,
            RetryOutcome::Failed => 1,
            RetryOutcome::Unavailable => 2,
        };
        if let Some(counters) = self.retry.get(credential) {
            counters[idx].inc();
        }
    }
}
