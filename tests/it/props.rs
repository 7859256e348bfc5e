//! Property tests: route matching and path checks never panic on any input, a credential
//! route matches exactly its host and whole-segment prefix, and no path that reaches a
//! route escapes its prefix once an upstream resolves dot segments and decodes it.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use authrelay::proxy::{admission, target};
use authrelay::routes::{path_has_prefix, HostPattern};
use authrelay::state::Snapshot;
use authrelay::{Config, State};
use http::{Method, Uri};
use proptest::prelude::*;

const YAML: &str = "listen: 127.0.0.1:0
unmatched: deny
credentials:
  c:
    type: static
    value: \"Bearer prop\"
routes:
  - name: api
    host: api.example.com
    path_prefix: /v1/
    credential: c
  - name: wild
    host: \"*.example.org\"
    methods: [GET]
    credential: c
  - name: mounted
    mount: /m
    upstream: https://up.example.net/base
    credential: c
";

fn snapshot() -> Arc<Snapshot> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let env: HashMap<String, String> = HashMap::new();
        let config = Config::from_yaml(YAML, Path::new("props.yaml"), &env).unwrap();
        let state = State::new(config, None, Arc::new(env)).unwrap();
        state.snapshot()
    })
}

/// Path segments an attacker would try: dot segments plain and encoded, encoded slashes and
/// backslashes, and ordinary names.
fn segment() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(".".to_string()),
        Just("..".to_string()),
        Just("%2e".to_string()),
        Just("%2E%2e".to_string()),
        Just(".%2e".to_string()),
        Just("%2f".to_string()),
        Just("a%2Fb".to_string()),
        Just("%5c".to_string()),
        Just("v1".to_string()),
        Just("admin".to_string()),
        Just("".to_string()),
        "[a-z0-9._~%-]{0,6}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(segment(), 0..6).prop_map(|s| format!("/{}", s.join("/")))
}

/// What an upstream that decodes `%2e` and resolves dot segments (RFC 3986 §5.2.4) serves.
fn as_resolved(path: &str) -> String {
    let decoded = path.replace("%2e", ".").replace("%2E", ".");
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/').skip(1) {
        match seg {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn routing_any_bytes_never_panics(host in "\\PC{0,40}", path in "\\PC{0,60}", port in any::<u16>(), method in "[A-Z]{1,8}") {
        let snap = snapshot_once();
        let method = Method::from_bytes(method.as_bytes()).unwrap();
        let _ = snap.routes.find(&host, port, 443, &path, &method);
        let _ = snap.routes.find_mount(&path, &method);
        let _ = HostPattern::parse(&host);
        let _ = path_has_prefix(&path, &host);
        for text in [format!("http://{host}{path}"), path.clone(), format!("https://{host}:{port}/{path}")] {
            if let Ok(uri) = text.parse::<Uri>() {
                let _ = target::resolve(snap, &method, &uri);
            }
        }
    }

    #[test]
    fn a_credential_route_matches_exactly_its_host_and_prefix(
        host in prop_oneof![Just("api.example.com".to_string()), Just("API.Example.COM".to_string()), Just("api.example.com.evil.test".to_string()), Just("xapi.example.com".to_string()), "[a-z]{1,8}(\\.[a-z]{1,8}){0,3}"],
        path in path(),
    ) {
        let snap = snapshot_once();
        let found = snap.routes.find(&host, 443, 443, &path, &Method::GET).map(|r| r.name.to_string());
        let host_ok = host.eq_ignore_ascii_case("api.example.com");
        let prefix_ok = path == "/v1" || path.starts_with("/v1/");
        prop_assert_eq!(found.as_deref() == Some("api"), host_ok && prefix_ok, "{} {}", host, path);
    }

    #[test]
    fn no_routed_path_escapes_its_prefix(path in path()) {
        let snap = snapshot_once();
        let uri: Uri = match format!("https://api.example.com{path}").parse() {
            Ok(u) => u,
            Err(_) => return Ok(()),
        };
        if let Ok(t) = admission::resolve(snap, &Method::GET, &uri) {
            let route = t.route.map(|r| r.name.to_string());
            prop_assert_eq!(route.as_deref(), Some("api"));
            let served = as_resolved(t.uri.path());
            prop_assert!(served == "/v1" || served.starts_with("/v1/"), "{} is served as {}", path, served);
            prop_assert!(!t.uri.path().to_ascii_lowercase().contains("%2f"));
        }
        let mounted: Uri = match format!("/m{path}").parse() {
            Ok(u) => u,
            Err(_) => return Ok(()),
        };
        if let Ok(t) = admission::resolve(snap, &Method::GET, &mounted) {
            let served = as_resolved(t.uri.path());
            prop_assert!(served.starts_with("/base"), "/m{} is served as {}", path, served);
        }
    }
}

/// One snapshot for every case (building a State per case would dominate the run time).
fn snapshot_once() -> &'static Snapshot {
    static SNAPSHOT: std::sync::OnceLock<Arc<Snapshot>> = std::sync::OnceLock::new();
    SNAPSHOT.get_or_init(snapshot)
}
