//! Docs that run (issue #25): every fenced code block in `README.md` and `docs/*.md` is run
//! as written, checked, or compared with the tested file it copies — or its info string
//! says it is illustration only. A block the test cannot classify fails, naming its file and
//! line, so a block added later without a marker fails too.
//!
//! | info string           | what the test does                                                   |
//! |-----------------------|----------------------------------------------------------------------|
//! | `yaml`                | `authrelay check` on it, each `${VAR}` it names set to a dummy value |
//! | `LANG run=FAMILY`     | runs it (`sh`, `python`, `js`, `php`) against FAMILY's real binary   |
//! | `LANG from=PATH`      | it must be a verbatim copy of PATH, a file another test runs         |
//! | `text usage`          | each `authrelay SUBCOMMAND` line's options are in its `--help`       |
//! | `LANG illustrative`   | not run: output, diagrams, commands for another machine (JSON and    |
//! |                       | YAML must still parse)                                               |
//!
//! Families (one binary per family, not per block): `ca` makes the interception CA every
//! other family uses; `demo` is `authrelay demo` on free ports (the README's quick start,
//! with the curl lines it prints); `proxy` is a config with a forward route for
//! `api.vendor.example`, an intercepted one for `acme.outseta.com`, a `/outseta` mount and
//! an admin endpoint; `users` is the same with `clients.users`. Only what the docs tell the
//! reader to change is substituted ([`SUBSTITUTIONS`]: ports, `/etc/authrelay` paths, the
//! reader's own app and password, the demo's token lifetime); vendor hosts stay as written
//! and reach local servers through the proxy's routes, so nothing leaves loopback.
//!
//! Each run checks what the block says: every curl answer is 2xx unless the line's comment
//! names another status (`# 401: no token`) or `-i` shows it to the reader; a block that
//! runs no curl must reach the upstream; whatever reaches the upstream carries the
//! credential. Blocks of a family run one after another in file order (the Java trust store
//! of docs/https.md is used by docs/operations.md); blocks that only `export` variables are
//! run first and give their variables to the other blocks of their section.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::client_recipes::{available, node_modules, recipes_dir, Authrelay};
use crate::support::server::{self, Origin};
use crate::support::tls::{https_origin, TestCa, TlsOrigin};

const BIN: &str = env!("CARGO_BIN_EXE_authrelay");
const TOKEN: &str = "Bearer docs-token-7c2e";
const ADMIN_TOKEN: &str = "docs-admin-token-41f0";
const USER_PASSWORD: &str = "docs-user-password-9b3a";
/// Short enough that the demo's "wait for a refresh" line (`sleep 20` in the docs) is quick.
const DEMO_TOKEN_LIFETIME_SECS: u64 = 5;
/// The longest any one block may run (curl is also given `max-time 30`).
const BLOCK_LIMIT: Duration = Duration::from_secs(90);

/// What the docs tell the reader to change, and what the test puts there: (where, text in
/// the docs, text run). `where` is `""` for every block, a family, or a doc file; `{…}` are
/// this run's values (a substitution whose value is unknown in a family is not applied).
const SUBSTITUTIONS: &[(&str, &str, &str)] = &[
    ("", "/etc/authrelay/", "{root}/etc/authrelay/"),
    ("", "/run/secrets/", "{root}/run/secrets/"),
    ("", "127.0.0.1:8080", "{proxy}"),
    ("", "127.0.0.1:3128", "{proxy}"),
    ("", "127.0.0.1:9901", "{admin}"),
    ("", "proxyPort=8080", "proxyPort={port}"),
    ("", "proxyPort=3128", "proxyPort={port}"),
    ("", "port: 8080", "port: {port}"),
    // The test build's binary (on PATH as `authrelay`), not a release build.
    (
        "",
        "cargo run --release -- demo",
        "authrelay demo --listen 127.0.0.1:0 --admin 127.0.0.1:0 --token-lifetime {lifetime}s",
    ),
    ("demo", "127.0.0.1:PORT", "{vendor}"),
    ("demo", "sleep 20", "sleep {lifetime}"),
    ("users", "billing-app:PASSWORD", "billing-app:{password}"),
    // `app.jar` is the reader's application; ours is the Java recipe.
    (
        "docs/operations.md",
        "-jar app.jar",
        "{recipes}/Recipe.java http://api.vendor.example/v1/items",
    ),
    (
        "docs/https.md",
        "-jar app.jar",
        "{recipes}/Recipe.java https://acme.outseta.com/api/v1/profile",
    ),
    // Composer's autoloader; Debian's php-guzzlehttp-guzzle (what .ci/run installs) has its own.
    (
        "",
        "require 'vendor/autoload.php';",
        "require 'GuzzleHttp/autoload.php';",
    ),
];

/// Files the docs' examples name, as the reader's machine would have them (beside the CA
/// that the `ca` family's block makes and the bundle docs/https.md says to build).
const MACHINE_FILES: &[&str] = &[
    "etc/authrelay/secrets/outseta_api_secret",
    "etc/authrelay/secrets/fleet_password",
    "run/secrets/itsyou_client_secret",
    "run/secrets/billing_app_proxy_password",
    "etc/authrelay/billing-app.pw",
];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// One fenced code block.
struct Block {
    /// Relative to the repository: `README.md`, `docs/https.md`.
    file: String,
    /// The line of the opening fence.
    line: usize,
    info: String,
    text: String,
    /// The heading it is under.
    section: String,
}

impl Block {
    fn at(&self) -> String {
        format!("{}:{} (```{})", self.file, self.line, self.info)
    }

    fn stem(&self) -> String {
        let file = self.file.trim_end_matches(".md").replace('/', "-");
        format!("{file}-{}", self.line)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Family {
    Ca,
    Demo,
    Proxy,
    Users,
}

impl Family {
    fn name(self) -> &'static str {
        match self {
            Family::Ca => "ca",
            Family::Demo => "demo",
            Family::Proxy => "proxy",
            Family::Users => "users",
        }
    }
}

enum Kind {
    Illustrative,
    Check,
    Usage,
    CopyOf(String),
    Run(Family),
}

/// What the info string asks for, or why the block cannot be handled.
fn kind(block: &Block) -> Result<Kind, String> {
    let mut words = block.info.split_whitespace();
    let lang = words.next().unwrap_or("");
    let rest: Vec<&str> = words.collect();
    let family = |name: &str| {
        [Family::Ca, Family::Demo, Family::Proxy, Family::Users]
            .into_iter()
            .find(|f| f.name() == name)
    };
    match (lang, rest.as_slice()) {
        ("", _) => {}
        (_, ["illustrative"]) => return Ok(Kind::Illustrative),
        ("yaml", []) => return Ok(Kind::Check),
        ("text", ["usage"]) => return Ok(Kind::Usage),
        (_, [from]) if from.starts_with("from=") => {
            return Ok(Kind::CopyOf(from["from=".len()..].to_string()))
        }
        ("sh" | "python" | "js" | "php", [run]) if run.starts_with("run=") => {
            if let Some(f) = family(&run["run=".len()..]) {
                return Ok(Kind::Run(f));
            }
        }
        _ => {}
    }
    Err(format!(
        "{}: the test cannot run this block. Mark it `LANG illustrative` if it is not meant \
         to be run, `sh|python|js|php run=FAMILY` (ca, demo, proxy, users) to run it, \
         `LANG from=PATH` if it copies a tested file, or `yaml` for an authrelay config",
        block.at()
    ))
}

/// The blocks of one markdown file, or why it cannot be read.
fn parse(file: &str, source: &str) -> Result<Vec<Block>, String> {
    let mut blocks = Vec::new();
    let mut section = String::new();
    let mut open: Option<(usize, String, Vec<&str>)> = None;
    for (index, line) in source.lines().enumerate() {
        let fence = line.trim_start().strip_prefix("```");
        match (&mut open, fence) {
            (None, Some(info)) => open = Some((index + 1, info.trim().to_string(), Vec::new())),
            (None, None) if line.starts_with('#') => {
                section = line.trim_start_matches('#').trim().to_string();
            }
            (None, None) => {}
            (Some(_), Some(_)) => {
                if let Some((line, info, body)) = open.take() {
                    let mut text = body.join("\n");
                    text.push('\n');
                    blocks.push(Block {
                        file: file.to_string(),
                        line,
                        info,
                        text,
                        section: section.clone(),
                    });
                }
            }
            (Some((_, _, body)), None) => body.push(line),
        }
    }
    match open {
        Some((line, _, _)) => Err(format!("{file}:{line}: code block never closed")),
        None => Ok(blocks),
    }
}

/// Every block of `README.md` and `docs/*.md`, in file order.
fn all_blocks() -> Vec<Block> {
    let mut files = vec!["README.md".to_string()];
    let mut docs: Vec<String> = std::fs::read_dir(repo().join("docs"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".md"))
        .map(|name| format!("docs/{name}"))
        .collect();
    docs.sort();
    files.extend(docs);
    let mut blocks = Vec::new();
    for file in files {
        let source = std::fs::read_to_string(repo().join(&file)).unwrap();
        blocks.extend(parse(&file, &source).unwrap_or_else(|e| panic!("{e}")));
    }
    blocks
}

fn family_blocks(family: Family) -> Vec<Block> {
    all_blocks()
        .into_iter()
        .filter(|b| matches!(kind(b), Ok(Kind::Run(f)) if f == family))
        .collect()
}

/// `template` with every `{name}` replaced, or `None` when a name has no value here.
fn fill(template: &str, values: &BTreeMap<&str, String>) -> Option<String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(start) = rest.find('{') {
        out.push_str(&rest[..start]);
        let end = start + rest[start..].find('}')?;
        out.push_str(values.get(&rest[start + 1..end])?);
        rest = &rest[end + 1..];
    }
    out.push_str(rest);
    Some(out)
}

/// The block's text as it is run: [`SUBSTITUTIONS`] for its file and family applied.
fn substituted(block: &Block, family: &str, values: &BTreeMap<&str, String>) -> String {
    let mut text = block.text.clone();
    for (scope, from, to) in SUBSTITUTIONS {
        if !scope.is_empty() && *scope != family && *scope != block.file {
            continue;
        }
        if let Some(to) = fill(to, values) {
            text = text.replace(from, &to);
        }
    }
    text
}

/// Shell lines with their `\` continuations joined.
fn logical_lines(script: &str) -> Vec<String> {
    let mut lines = Vec::new();
    let mut current = String::new();
    for line in script.lines() {
        match line.trim_end().strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(line);
                lines.push(std::mem::take(&mut current));
            }
        }
    }
    if !current.is_empty() {
        lines.push(current);
    }
    lines
}

/// (command, comment) of a shell line; `None` for blank and comment-only lines.
fn command_and_comment(line: &str) -> Option<(String, String)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let (code, comment) = line.split_once(" #").unwrap_or((line, ""));
    let code = code.split_whitespace().collect::<Vec<_>>().join(" ");
    Some((code, comment.trim().to_string()))
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    Success,
    Status(u16),
    Shown,
}

impl Expect {
    fn allows(self, status: u16) -> bool {
        match self {
            Expect::Success => (200..300).contains(&status),
            Expect::Status(s) => s == status,
            Expect::Shown => status != 0,
        }
    }
}

/// What each curl of `script` should get, in order.
fn expected_statuses(script: &str) -> Vec<Expect> {
    let mut expected = Vec::new();
    for line in logical_lines(script) {
        let Some((code, comment)) = command_and_comment(&line) else {
            continue;
        };
        let words: Vec<&str> = code.split_whitespace().collect();
        let stated = comment
            .get(..3)
            .and_then(|s| s.parse().ok())
            .map(Expect::Status);
        let expect = stated.unwrap_or(if words.contains(&"-i") {
            Expect::Shown
        } else {
            Expect::Success
        });
        let curls = words.iter().filter(|w| **w == "curl").count();
        expected.extend(std::iter::repeat_n(expect, curls));
    }
    expected
}

/// A child killed on drop.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Ran {
    stdout: String,
    stderr: String,
}

/// Runs `cmd` to its end (at most [`BLOCK_LIMIT`]); an error unless it exits 0.
fn run(mut cmd: Command) -> Result<Ran, String> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = Killed(cmd.spawn().map_err(|e| format!("cannot start: {e}"))?);
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = drain(child.0.stdout.take().map(|p| Box::new(p) as _));
    let stderr = drain(child.0.stderr.take().map(|p| Box::new(p) as _));
    let deadline = Instant::now() + BLOCK_LIMIT;
    let status = loop {
        if let Some(status) = child.0.try_wait().map_err(|e| e.to_string())? {
            break Some(status);
        }
        if Instant::now() > deadline {
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    drop(child);
    let ran = Ran {
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    match status {
        Some(s) if s.success() => Ok(ran),
        Some(s) => Err(format!(
            "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            s.code(),
            ran.stdout,
            ran.stderr
        )),
        None => Err(format!(
            "still running after {BLOCK_LIMIT:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            ran.stdout, ran.stderr
        )),
    }
}

/// A scratch file system laid out as the docs assume (`/etc/authrelay/…`,
/// `/run/secrets/…`), the environment blocks run with, and the upstream CA.
struct Machine {
    dir: tempfile::TempDir,
    upstream_ca: TestCa,
}

impl Machine {
    /// Runs the `ca` family's blocks (they make `/etc/authrelay/ca`), then adds the files
    /// the other examples name.
    fn new() -> Machine {
        let machine = Machine {
            dir: tempfile::tempdir().unwrap(),
            upstream_ca: TestCa::new(),
        };
        let root = machine.root();
        for dir in [
            "work",
            "home",
            "curl",
            "etc/authrelay/secrets",
            "run/secrets",
        ] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        // Every curl reports its status on stderr (the blocks' own output is untouched)
        // and gives up in time.
        std::fs::write(
            root.join("curl/.curlrc"),
            "silent\nshow-error\nmax-time = 30\nwrite-out = \"%{stderr}curl-status %{http_code}\\n\"\n",
        )
        .unwrap();
        for file in MACHINE_FILES {
            std::fs::write(root.join(file), "docs-dummy-secret\n").unwrap();
        }
        // README: the client certificate a `tls_client_cert` example names (checked at load:
        // real PEM, a key that matches).
        let bank = root.join("etc/authrelay/bank");
        std::fs::create_dir_all(&bank).unwrap();
        machine
            .upstream_ca
            .client_files(&bank, "client", "docs-app");
        // The secret command the README's `x_command` example runs (a vault client's wrapper).
        let read_secret = root.join("etc/authrelay/bin/read-secret");
        std::fs::create_dir_all(read_secret.parent().unwrap()).unwrap();
        std::fs::write(&read_secret, "#!/bin/sh\necho docs-dummy-secret\n").unwrap();
        let executable = std::os::unix::fs::PermissionsExt::from_mode(0o755);
        std::fs::set_permissions(&read_secret, executable).unwrap();
        std::fs::copy(
            repo().join("tests/it/fixtures/outreach_app_key.pem"),
            root.join("run/secrets/outreach_app_key.pem"),
        )
        .unwrap();
        for name in ["corporate-root.pem", "private-ca.pem"] {
            machine.upstream_ca.write(&root.join("etc/authrelay"), name);
        }

        let values = machine.values();
        for block in family_blocks(Family::Ca) {
            let text = substituted(&block, "ca", &values);
            if let Err(e) = run(machine.shell(&text, &[])) {
                panic!("{}: {e}\n--- block as run ---\n{text}", block.at());
            }
        }
        let ca = root.join("etc/authrelay/ca/ca.pem");
        assert!(
            ca.exists(),
            "the `ca` family's blocks must create {}",
            ca.display()
        );
        // docs/https.md: system roots + ca.pem > bundle.pem.
        let mut bundle = std::fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
        bundle.extend(std::fs::read(&ca).unwrap());
        std::fs::write(root.join("etc/authrelay/bundle.pem"), bundle).unwrap();
        machine
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn values(&self) -> BTreeMap<&'static str, String> {
        BTreeMap::from([
            ("root", self.root().display().to_string()),
            ("recipes", recipes_dir().display().to_string()),
            ("lifetime", DEMO_TOKEN_LIFETIME_SECS.to_string()),
            ("password", USER_PASSWORD.to_string()),
        ])
    }

    /// A clean environment: the test binary first on PATH, a private HOME and curl
    /// config, and no JAVA_HOME (the Java recipe must work without it).
    fn command(&self, program: &str, env: &[(String, String)]) -> Command {
        let bin_dir = Path::new(BIN).parent().unwrap();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut cmd = Command::new(program);
        cmd.env_clear()
            .current_dir(self.root().join("work"))
            .env("PATH", path)
            .env("HOME", self.root().join("home"))
            .env("CURL_HOME", self.root().join("curl"));
        for keep in ["LANG", "PYENV_ROOT", "PYENV_VERSION"] {
            if let Ok(v) = std::env::var(keep) {
                cmd.env(keep, v);
            }
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        cmd
    }

    fn shell(&self, script: &str, env: &[(String, String)]) -> Command {
        let mut cmd = self.command("sh", env);
        cmd.arg("-ec").arg(script);
        cmd
    }
}

fn curl_statuses(stderr: &str) -> Vec<u16> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("curl-status "))
        .map(|s| s.trim().parse().unwrap_or(0))
        .collect()
}

/// Runs a shell script and checks each curl's status against `expected`; returns how
/// many curls ran.
fn run_script(
    machine: &Machine,
    script: &str,
    expected: &[Expect],
    env: &[(String, String)],
) -> Result<usize, String> {
    let ran = run(machine.shell(script, env))?;
    let statuses = curl_statuses(&ran.stderr);
    let matches = statuses.len() == expected.len()
        && statuses.iter().zip(expected).all(|(s, e)| e.allows(*s));
    if !matches {
        return Err(format!(
            "curl statuses {statuses:?}, expected {expected:?} (2xx unless the line's comment \
             names a status)\n--- stdout ---\n{}\n--- stderr ---\n{}",
            ran.stdout, ran.stderr
        ));
    }
    Ok(statuses.len())
}

fn is_export_only(text: &str) -> bool {
    let commands: Vec<_> = logical_lines(text)
        .iter()
        .filter_map(|l| command_and_comment(l))
        .collect();
    !commands.is_empty() && commands.iter().all(|(c, _)| c.starts_with("export "))
}

/// Sources an `export` block and checks what it sets: a URL must be this family's proxy,
/// a path must exist. Returns the variables.
fn run_exports(
    machine: &Machine,
    text: &str,
    proxy: &str,
) -> Result<Vec<(String, String)>, String> {
    let ran = run(machine.shell(&format!("{text}\nenv"), &[]))?;
    let env: BTreeMap<&str, &str> = ran
        .stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .collect();
    let mut exported = Vec::new();
    for (code, _) in logical_lines(text)
        .iter()
        .filter_map(|l| command_and_comment(l))
    {
        let name = code["export ".len()..].split('=').next().unwrap_or("");
        let value = env.get(name).copied().unwrap_or("");
        if value.starts_with("http://") && value != proxy {
            return Err(format!("{name}={value} is not the proxy ({proxy})"));
        }
        if value.starts_with('/') && !Path::new(value).exists() {
            return Err(format!("{name}={value}: no such file"));
        }
        exported.push((name.to_string(), value.to_string()));
    }
    Ok(exported)
}

/// Modules a snippet imports (`import a, b` / `from x import` in Python; `from "x"` and
/// `require("x")` in JavaScript).
fn imports(block: &Block) -> Vec<String> {
    let mut modules = Vec::new();
    for line in block.text.lines().map(str::trim) {
        if block.info.starts_with("python") {
            if let Some(names) = line.strip_prefix("import ") {
                modules.extend(names.split(',').map(|n| n.trim().to_string()));
            } else if let Some(rest) = line.strip_prefix("from ") {
                modules.extend(rest.split_whitespace().next().map(str::to_string));
            }
        } else {
            for marker in ["from \"", "require(\""] {
                if let Some(start) = line.find(marker) {
                    let rest = &line[start + marker.len()..];
                    modules.extend(rest.split('"').next().map(str::to_string));
                }
            }
        }
    }
    modules
}

/// Why `block` cannot run on this machine (a runtime or package missing), if so.
fn missing_runtime(block: &Block) -> Option<String> {
    let lang = block.info.split_whitespace().next().unwrap_or("");
    let modules = imports(block);
    match lang {
        "python" => {
            let check = format!("import {}", modules.join(", "));
            (!available("python3", &["-c", &check]))
                .then(|| format!("python3 with {} not installed", modules.join(", ")))
        }
        "php" => {
            let mut probe = "curl_init();".to_string();
            if block.text.contains("vendor/autoload.php") {
                probe.push_str("require 'GuzzleHttp/autoload.php';");
            }
            (!available("php", &["-r", &probe]))
                .then(|| "php with curl and Guzzle (php-guzzlehttp-guzzle) not installed".into())
        }
        "js" => {
            if !available("node", &["--version"]) {
                return Some("node not installed".into());
            }
            let absent: Vec<_> = modules
                .iter()
                .filter(|m| !node_modules().join(m).exists())
                .collect();
            (!absent.is_empty()).then(|| {
                format!(
                    "npm packages {absent:?} not in {} (.ci/run installs them)",
                    node_modules().display()
                )
            })
        }
        _ => {
            let words: Vec<_> = block.text.split_whitespace().collect();
            let java = words.contains(&"java") || words.contains(&"keytool");
            (java && !available("java", &["-version"])).then(|| "no JDK installed".into())
        }
    }
}

/// Runs a Python, PHP or JavaScript snippet as a file saved by the reader.
fn run_snippet(
    machine: &Machine,
    block: &Block,
    text: &str,
    env: &[(String, String)],
) -> Result<Ran, String> {
    if block.info.starts_with("python") {
        let file = machine.root().join(format!("work/{}.py", block.stem()));
        std::fs::write(&file, text).unwrap();
        // httpx's deprecated `verify=<str>` (issue #25) and the like fail the block.
        let mut cmd = machine.command("python3", env);
        cmd.arg("-W").arg("error::DeprecationWarning").arg(&file);
        run(cmd)
    } else if block.info.starts_with("php") {
        let file = machine.root().join(format!("work/{}.php", block.stem()));
        std::fs::write(&file, text).unwrap();
        let mut cmd = machine.command("php", env);
        cmd.arg(&file);
        run(cmd)
    } else {
        // An ES module finds its packages beside it (NODE_PATH does not apply).
        let dir = node_modules().parent().unwrap().to_path_buf();
        let file = dir.join(format!("docs-{}.mjs", block.stem()));
        std::fs::write(&file, text).unwrap();
        let mut cmd = machine.command("node", env);
        cmd.arg(&file);
        let result = run(cmd);
        let _ = std::fs::remove_file(&file);
        result
    }
}

#[test]
fn every_doc_block_is_run_checked_copied_or_marked_illustrative() {
    let blocks = all_blocks();
    let mut failures = Vec::new();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for block in &blocks {
        match kind(block) {
            Err(e) => failures.push(e),
            Ok(Kind::Illustrative) => {
                *counts.entry("illustrative").or_default() += 1;
                failures.extend(illustration_syntax(block).err());
            }
            Ok(Kind::Check) => *counts.entry("checked by authrelay check").or_default() += 1,
            Ok(Kind::Usage) => {
                *counts.entry("usage checked against --help").or_default() += 1;
                failures.extend(usage_matches_help(block).err());
            }
            Ok(Kind::Run(_)) => *counts.entry("run").or_default() += 1,
            Ok(Kind::CopyOf(path)) => {
                *counts.entry("copies of a tested file").or_default() += 1;
                let copied = std::fs::read_to_string(repo().join(&path)).unwrap_or_default();
                if copied.is_empty() || copied != block.text {
                    failures.push(format!(
                        "{}: must be a verbatim copy of {path}, the file the tests run",
                        block.at()
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    eprintln!("docs: {} blocks: {counts:?}", blocks.len());
}

/// An illustrative JSON or YAML block still has to parse: a JSON example is one document
/// or one document per line (log lines, error bodies).
fn illustration_syntax(block: &Block) -> Result<(), String> {
    let parses = match block.info.split_whitespace().next() {
        Some("json") => {
            serde_json::from_str::<serde_json::Value>(&block.text).is_ok()
                || block
                    .text
                    .lines()
                    .all(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
        }
        Some("yaml") => serde_yaml::from_str::<serde_yaml::Value>(&block.text).is_ok(),
        _ => true,
    };
    parses
        .then_some(())
        .ok_or_else(|| format!("{}: does not parse", block.at()))
}

/// Each `authrelay [SUBCOMMAND…] …` line of a usage block: the subcommand exists and every
/// `--option` the line names (comment included) is in its `--help`.
fn usage_matches_help(block: &Block) -> Result<(), String> {
    for line in block.text.lines().filter(|l| !l.trim().is_empty()) {
        let (code, _) = line.split_once(" #").unwrap_or((line, ""));
        let subcommand: Vec<&str> = code
            .split_whitespace()
            .skip(1)
            .filter(|w| w.chars().all(|c| c.is_ascii_lowercase()))
            .collect();
        let options: Vec<String> = line
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .map(str::to_string)
            .collect();
        let help = Command::new(BIN)
            .args(&subcommand)
            .arg("--help")
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&help.stdout);
        let unknown: Vec<_> = options
            .iter()
            .filter(|o| !text.contains(o.as_str()))
            .collect();
        if !help.status.success() || !unknown.is_empty() {
            return Err(format!(
                "{}: `{}`: `authrelay {} --help` does not know {unknown:?} (exit {:?})",
                block.at(),
                line.trim(),
                subcommand.join(" "),
                help.status.code()
            ));
        }
    }
    Ok(())
}

#[test]
fn a_block_without_a_marker_is_named_with_its_file_and_line() {
    let blocks = parse(
        "docs/new.md",
        "# New\n\n```sh\ncurl http://example.invalid/\n```\n\n```yaml illustrative\na: b\n```\n",
    )
    .unwrap();
    let err = kind(&blocks[0]).err().unwrap();
    assert!(err.starts_with("docs/new.md:3 (```sh)"), "{err}");
    assert!(matches!(kind(&blocks[1]), Ok(Kind::Illustrative)));
    let unclosed = parse("docs/new.md", "text\n```js run=proxy\nx\n")
        .err()
        .unwrap();
    assert_eq!(unclosed, "docs/new.md:2: code block never closed");
}

#[test]
fn statuses_expected_by_a_shell_block() {
    let script = "curl -i http://x/    # 401: no token\n\
                  curl -x http://p http://x/ \\\n  --fail   # 200: injected\n\
                  # curl in a comment\n\
                  sleep 5; curl http://p/y\n\
                  curl -i http://p/z\n";
    assert_eq!(
        expected_statuses(script),
        [
            Expect::Status(401),
            Expect::Status(200),
            Expect::Success,
            Expect::Shown
        ]
    );
}

#[test]
fn every_doc_yaml_passes_authrelay_check() {
    let machine = Machine::new();
    let values = machine.values();
    let mut failures = Vec::new();
    let mut checked = 0;
    for block in all_blocks()
        .into_iter()
        .filter(|b| matches!(kind(b), Ok(Kind::Check)))
    {
        let text = substituted(&block, "", &values);
        // Beside the files it names relatively (`ca/ca.pem`, `secrets/…`).
        let config = machine
            .root()
            .join(format!("etc/authrelay/{}.yaml", block.stem()));
        std::fs::write(&config, &text).unwrap();
        let mut cmd = machine.command(BIN, &dummy_env(&text));
        cmd.arg("check").arg("--config").arg(&config);
        if let Err(e) = run(cmd) {
            failures.push(format!("{}: authrelay check refused it: {e}", block.at()));
        }
        checked += 1;
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    assert!(checked > 0);
    eprintln!("docs: {checked} YAML blocks pass authrelay check");
}

/// Every `${VAR}` of a config set to a dummy value of the shape it needs.
fn dummy_env(text: &str) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for piece in text.split("${").skip(1) {
        let name: String = piece
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let value = match name.as_str() {
            // 32 bytes, base64.
            "AUTHRELAY_CACHE_KEY" => "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=".to_string(),
            _ => format!("docs-dummy-{}", name.to_lowercase()),
        };
        env.push((name, value));
    }
    env
}

/// The demo's instructions on stdout, up to "Press Ctrl-C to stop.".
fn demo_instructions(child: &mut Child) -> String {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut text = String::new();
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            text.push_str(&line);
            text.push('\n');
            if line.contains("Press Ctrl-C to stop.") {
                let _ = tx.send(text);
                return;
            }
        }
        let _ = tx.send(text);
    });
    rx.recv_timeout(Duration::from_secs(30))
        .expect("the demo printed its instructions")
}

#[test]
fn readme_quick_start_runs_against_the_real_demo() {
    let machine = Machine::new();
    let mut values = machine.values();
    let blocks = family_blocks(Family::Demo);
    let (launchers, blocks): (Vec<_>, Vec<_>) = blocks
        .into_iter()
        .partition(|b| b.text.contains("cargo run --release -- demo"));
    let commands: Vec<String> = launchers
        .iter()
        .map(|b| substituted(b, "demo", &values).trim().to_string())
        .collect();
    assert!(!commands.is_empty(), "no block starts the demo");
    assert!(
        commands.iter().all(|c| *c == commands[0]),
        "the demo is started differently: {commands:?}"
    );
    let words: Vec<&str> = commands[0].split_whitespace().collect();
    assert_eq!(words[0], "authrelay", "{}", commands[0]);
    let mut demo = Killed(
        machine
            .command(BIN, &[])
            .args(&words[1..])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let printed = demo_instructions(&mut demo.0);
    let addr_after = |label: &str| -> String {
        let start = printed
            .find(label)
            .unwrap_or_else(|| panic!("{label}: {printed}"))
            + label.len();
        printed[start..]
            .trim_start_matches("http://")
            .chars()
            .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
            .collect()
    };
    let proxy = addr_after("proxy listening on ");
    values.insert("vendor", addr_after("mock vendor at "));
    values.insert("admin", addr_after("admin at "));
    values.insert("port", proxy.rsplit(':').next().unwrap().to_string());
    values.insert("proxy", proxy);

    let mut failures = Vec::new();
    // The commands it prints, as printed.
    let printed_commands: Vec<String> = printed
        .lines()
        .filter_map(command_and_comment)
        .map(|(code, _)| code)
        .filter(|c| c.starts_with("curl ") || c.starts_with("sleep "))
        .collect();
    let script = printed_commands.join("\n");
    if let Err(e) = run_script(&machine, &script, &expected_statuses(&script), &[]) {
        failures.push(format!(
            "the commands `authrelay demo` prints: {e}\n{script}"
        ));
    }
    // The docs' copies of them: the same commands, and they work as the docs say.
    for block in &blocks {
        let text = substituted(block, "demo", &values);
        for line in logical_lines(&text) {
            if let Some((code, _)) = command_and_comment(&line) {
                if !printed_commands.contains(&code) {
                    failures.push(format!(
                        "{}: `{code}` is not among the commands the demo prints:\n{}",
                        block.at(),
                        printed_commands.join("\n")
                    ));
                }
            }
        }
        if let Err(e) = run_script(&machine, &text, &expected_statuses(&text), &[]) {
            failures.push(format!("{}: {e}\n--- block as run ---\n{text}", block.at()));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
    eprintln!(
        "docs: the demo's {} printed commands and {} demo blocks ran",
        printed_commands.len(),
        blocks.len()
    );
}

/// The config a family's proxy runs with; `users` adds `clients.users`.
fn family_config(family: Family, plain: &Origin, secure: &TlsOrigin) -> String {
    let users = match family {
        Family::Users => {
            format!("clients:\n  users:\n    billing-app:\n      password: \"{USER_PASSWORD}\"\n")
        }
        _ => String::new(),
    };
    format!(
        "listen: 127.0.0.1:0\n\
         admin: 127.0.0.1:0\n\
         admin_token: \"{ADMIN_TOKEN}\"\n\
         unmatched: deny\n\
         tls:\n  ca_file: corporate-root.pem\n\
         intercept_ca:\n  cert_file: ca/ca.pem\n  key_file: ca/ca-key.pem\n\
         {users}\
         credentials:\n  outseta_admin:\n    type: static\n    value: \"{TOKEN}\"\n\
         routes:\n\
         \x20 - name: vendor\n    host: api.vendor.example\n    upstream: {}\n    credential: outseta_admin\n\
         \x20 - name: outseta\n    host: acme.outseta.com\n    upstream: {}\n    credential: outseta_admin\n    intercept: true\n\
         \x20 - name: outseta-mount\n    mount: /outseta\n    upstream: {}\n    credential: outseta_admin\n",
        plain.url(),
        secure.url(),
        secure.url(),
    )
}

/// Authorization headers the upstreams saw after (`plain`, `secure`) requests.
fn seen_since(plain: &Origin, secure: &TlsOrigin, since: (usize, usize)) -> Vec<String> {
    let mut seen: Vec<String> = plain.requests()[since.0..]
        .iter()
        .map(|s| s.header("authorization"))
        .collect();
    seen.extend(secure.requests()[since.1..].iter().map(|s| {
        s.headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }));
    seen
}

/// Runs a family's blocks against its own proxy; returns the failures.
async fn run_proxy_family(family: Family) -> Vec<String> {
    let machine = Machine::new();
    let plain = server::serve(|_| async { server::respond(200, "plain ok") }).await;
    let secure = https_origin(&machine.upstream_ca, &["127.0.0.1"], &["h2", "http/1.1"]).await;
    let config = machine.root().join("etc/authrelay/routes.yaml");
    std::fs::write(&config, family_config(family, &plain, &secure)).unwrap();
    let (proxy, proxy_url) = Authrelay::start(&config);
    let admin = proxy
        .logged_url("admin endpoint listening")
        .expect("admin address");
    let mut values = machine.values();
    let addr = proxy_url.trim_start_matches("http://").to_string();
    values.insert("port", addr.rsplit(':').next().unwrap().to_string());
    values.insert("proxy", addr);
    values.insert("admin", admin.trim_start_matches("http://").to_string());

    tokio::task::block_in_place(|| {
        let blocks = family_blocks(family);
        let mut failures = Vec::new();
        let mut section_env: BTreeMap<(String, String), Vec<(String, String)>> = BTreeMap::new();
        let (exports, others): (Vec<_>, Vec<_>) =
            blocks.iter().partition(|b| is_export_only(&b.text));
        for block in exports {
            let text = substituted(block, family.name(), &values);
            match run_exports(&machine, &text, &proxy_url) {
                Ok(env) => section_env
                    .entry((block.file.clone(), block.section.clone()))
                    .or_default()
                    .extend(env),
                Err(e) => {
                    failures.push(format!("{}: {e}\n--- block as run ---\n{text}", block.at()))
                }
            }
        }
        let mut ran = 0;
        for block in others {
            if let Some(why) = missing_runtime(block) {
                eprintln!("docs: skipping {}: {why}", block.at());
                continue;
            }
            let text = substituted(block, family.name(), &values);
            let mut env = vec![("AUTHRELAY_ADMIN_TOKEN".to_string(), ADMIN_TOKEN.to_string())];
            env.extend(
                section_env
                    .get(&(block.file.clone(), block.section.clone()))
                    .cloned()
                    .unwrap_or_default(),
            );
            let before = (plain.count(), secure.count());
            let result = if block.info.starts_with("sh") {
                run_script(&machine, &text, &expected_statuses(&text), &env)
            } else {
                run_snippet(&machine, block, &text, &env).map(|_| 0)
            };
            let seen = seen_since(&plain, &secure, before);
            let outcome = result.and_then(|curls| {
                if curls == 0 && seen.is_empty() {
                    Err("it reached no upstream".to_string())
                } else if seen.iter().any(|a| a != TOKEN) {
                    Err(format!("the upstream saw authorization {seen:?}"))
                } else {
                    Ok(())
                }
            });
            if let Err(e) = outcome {
                failures.push(format!(
                    "{}: {e}\n--- block as run ---\n{text}\n--- authrelay log ---\n{}",
                    block.at(),
                    proxy.output()
                ));
            }
            ran += 1;
        }
        eprintln!("docs: {ran} `run={}` blocks ran", family.name());
        failures
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doc_commands_and_snippets_reach_the_upstream_with_the_credential() {
    let failures = run_proxy_family(Family::Proxy).await;
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn doc_commands_for_named_clients_reach_the_upstream_with_the_credential() {
    let failures = run_proxy_family(Family::Users).await;
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}
