//! Secrets from a command (`x_command: [program, args…]`): scripts written by each test into
//! a temporary folder run at start, at reload and when the vendor refuses the secret; those
//! that fail, hang or print too much are reported like a bad secret file, naming the field
//! and the program, never what it printed.

use std::collections::{HashMap, HashSet};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use crate::identities::{account_credential, api, token_endpoint, Accounts};
use crate::support::{self, server};

/// Writes an executable `#!/bin/sh` script `name` into `dir`.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// A script that prints `outputs[n]` on its n-th run (the last one after that), counting its
/// runs in `runs` beside it.
fn rotating_script(dir: &Path, outputs: &[&str]) -> PathBuf {
    let mut body = String::from(
        "n=$(cat \"$(dirname \"$0\")/runs\" 2>/dev/null || echo 0)\necho $((n + 1)) > \"$(dirname \"$0\")/runs\"\ncase $n in\n",
    );
    for (i, out) in outputs.iter().enumerate() {
        let pattern = if i + 1 == outputs.len() {
            "*".to_string()
        } else {
            i.to_string()
        };
        body.push_str(&format!("  {pattern}) echo '{out}' ;;\n"));
    }
    body.push_str("esac");
    script(dir, "rotating.sh", &body)
}

fn runs(dir: &Path) -> usize {
    std::fs::read_to_string(dir.join("runs"))
        .map(|t| t.trim().parse().unwrap())
        .unwrap_or(0)
}

fn load(yaml: &str) -> Result<authrelay::Config, String> {
    let env = HashMap::<String, String>::new();
    authrelay::Config::from_yaml(yaml, Path::new("/etc/authrelay/routes.yaml"), &env)
        .map_err(|e| e.to_string())
}

fn static_with_command(argv: &Path) -> String {
    format!(
        "credentials:\n  c:\n    type: static\n    header: X-Api-Key\n    value_command: [\"{}\"]\nroutes: []\n",
        argv.display()
    )
}

#[tokio::test]
async fn a_secret_printed_by_a_command_is_sent_and_rerun_at_reload() {
    let scripts = tempfile::tempdir().unwrap();
    let helper = rotating_script(scripts.path(), &["  key-one  ", "key-two"]);
    let origin = server::echo_origin().await;
    let yaml = format!(
        "credentials:\n  c:\n    type: static\n    header: X-Api-Key\n    value_command: [\"{}\", --field, password]\nroutes:\n  - name: r\n    host: \"{}\"\n    credential: c\n",
        helper.display(),
        origin.addr
    );
    let proxy = support::proxy(&yaml).await;
    let get = || proxy.client().get(format!("{}/x", origin.url())).send();
    assert_eq!(get().await.unwrap().status(), 200);
    assert_eq!(origin.last().header("x-api-key"), "key-one", "trimmed");
    assert_eq!(runs(scripts.path()), 1);
    proxy.state().reload().unwrap();
    assert_eq!(runs(scripts.path()), 2, "a reload runs the command again");
    assert_eq!(get().await.unwrap().status(), 200);
    assert_eq!(origin.last().header("x-api-key"), "key-two");
}

#[test]
fn failing_hanging_and_verbose_commands_are_reported_without_their_output() {
    let scripts = tempfile::tempdir().unwrap();
    let dir = scripts.path();
    let cases = [
        (
            script(
                dir,
                "fails.sh",
                "echo out-secret-1; echo err-secret-1 >&2; exit 3",
            ),
            "failed (exit status: 3)",
        ),
        (
            script(dir, "too-much.sh", "head -c 70000 /dev/zero | tr '\\0' s"),
            "printed more than 64 KiB",
        ),
        (
            script(dir, "binary.sh", "printf 'out-secret-\\377'"),
            "printed text that is not UTF-8",
        ),
        (script(dir, "silent.sh", "exit 0"), "printed nothing"),
        (dir.join("missing.sh"), "cannot be started"),
    ];
    for (path, expected) in &cases {
        let e = load(&static_with_command(path)).unwrap_err();
        let program = path.display().to_string();
        assert!(
            e.contains(&format!(
                "credentials.c.value_command: secret command `{program}` {expected}"
            )),
            "{expected}: {e}"
        );
        assert!(!e.contains("secret-1") && !e.contains("sss"), "{e}");
    }
    let hangs = script(dir, "hangs.sh", "exec sleep 30");
    let yaml = format!(
        "secret_command_timeout: 300ms\n{}",
        static_with_command(&hangs)
    );
    let e = load(&yaml).unwrap_err();
    assert!(
        e.contains("did not finish within 300ms (secret_command_timeout)"),
        "{e}"
    );
}

#[test]
fn a_secret_comes_from_one_place_and_commands_name_real_secrets() {
    let scripts = tempfile::tempdir().unwrap();
    let ok = script(scripts.path(), "ok.sh", "echo v");
    let both = format!(
        "credentials:\n  c:\n    type: static\n    value: inline\n    value_command: [\"{}\"]\nroutes: []\n",
        ok.display()
    );
    let e = load(&both).unwrap_err();
    assert!(
        e.contains("credentials.c.value: set only one of `value`, `value_file` or `value_command`"),
        "{e}"
    );
    let stray = format!(
        "credentials:\n  c:\n    type: static\n    value: v\n    header_command: [\"{}\"]\nroutes: []\n",
        ok.display()
    );
    let e = load(&stray).unwrap_err();
    assert!(
        e.contains("header_command: `type: static` has no secret `header`"),
        "{e}"
    );
    let e = load("credentials:\n  c:\n    type: static\n    value_command: []\nroutes: []\n")
        .unwrap_err();
    assert!(e.contains("value_command: expected a list"), "{e}");
    let users = format!(
        "clients:\n  users:\n    app:\n      password_command: [\"{}\"]\nadmin_token_command: [\"{}\"]\nroutes: []\n",
        ok.display(),
        ok.display()
    );
    let config = load(&users).unwrap();
    assert!(config.secret_commands && config.clients.users.contains_key("app"));
    assert_eq!(config.admin_token.unwrap().expose(), "v");
}

#[tokio::test]
async fn a_refused_secret_runs_the_command_again_and_the_new_value_is_used() {
    let (logs, _guard) = crate::access::capture_logs();
    let scripts = tempfile::tempdir().unwrap();
    let helper = rotating_script(scripts.path(), &["sec-old", "sec-new"]);
    let accounts = Accounts::new(&[("svc", "sec-new")]);
    let token_server = token_endpoint(&accounts).await;
    let revoked: Arc<Mutex<HashSet<String>>> = Arc::default();
    let api = api(revoked).await;
    let secret_line = format!("client_secret_command: [\"{}\"]", helper.display());
    let yaml = format!(
        "tokens:\n  backoff_initial: 50ms\n  backoff_max: 200ms\ncredentials:\n{}routes:\n  - name: r\n    host: \"{}\"\n    credential: svc\n",
        account_credential("svc", &token_server, "svc", &secret_line),
        api.addr
    );
    let proxy = support::proxy(&yaml).await;
    let url = format!("{}/x", api.url());
    let first = proxy.client().get(&url).send().await.unwrap();
    assert_eq!(first.status(), 502, "the vendor refused the first value");
    let body = first.text().await.unwrap();
    assert!(!body.contains("sec-old"), "{body}");
    // The command runs again in the background once the refusal is seen; bounded polling.
    let mut answer = None;
    for _ in 0..100 {
        let response = proxy.client().get(&url).send().await.unwrap();
        if response.status() == 200 {
            answer = Some(response.text().await.unwrap());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(answer.as_deref(), Some("Bearer tok-svc-1"));
    assert_eq!(
        runs(scripts.path()),
        2,
        "at start, and once after the refusal"
    );
    assert_eq!(accounts.refusals(), 1);
    assert_eq!(accounts.issued("svc"), 1);
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("running the secret commands again"), "{text}");
    assert!(
        !text.contains("sec-old") && !text.contains("sec-new"),
        "{text}"
    );
}

/// A fixed value (`static`, `basic`, a signing key) has no token endpoint: the upstream's
/// refusal is what says it was rotated.
#[tokio::test]
async fn a_fixed_value_the_upstream_refuses_runs_the_command_again() {
    let scripts = tempfile::tempdir().unwrap();
    let helper = rotating_script(scripts.path(), &["key-old", "key-new"]);
    let origin = server::serve(|seen| async move {
        let status = if seen.header("x-api-key") == "key-new" {
            200
        } else {
            401
        };
        server::respond(status, "")
    })
    .await;
    let yaml = format!(
        "tokens:\n  backoff_initial: 50ms\n  backoff_max: 200ms\ncredentials:\n  c:\n    type: static\n    header: X-Api-Key\n    value_command: [\"{}\"]\nroutes:\n  - name: r\n    host: \"{}\"\n    credential: c\n",
        helper.display(),
        origin.addr
    );
    let proxy = support::proxy(&yaml).await;
    let url = format!("{}/x", origin.url());
    let first = proxy.client().get(&url).send().await.unwrap();
    assert_eq!(first.status(), 401, "the upstream refused the old key");
    let mut status = 0;
    for _ in 0..100 {
        status = proxy
            .client()
            .get(&url)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(status, 200);
    assert_eq!(origin.last().header("x-api-key"), "key-new");
    assert_eq!(
        runs(scripts.path()),
        2,
        "at start, and once after the refusal"
    );
}
