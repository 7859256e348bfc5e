//! Secrets from a command (`x_command: [program, args…]`), in the manner of AWS's
//! `credential_process`: the bridge to Vault, 1Password, cloud secret managers. The program
//! runs without a shell (a relative path is the config file folder's), with no input; its standard output,
//! trimmed, is the secret. Standard error is discarded (a helper may print the secret there
//! while debugging), and failures are described without the output or the arguments (which
//! may name a vault path or carry a token): only the program's name.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::secret::Secret;

/// The most a secret command may print; more is an error (a command printing a log or a
/// whole file by mistake must not become a header value).
pub const MAX_OUTPUT: usize = 64 * 1024;

/// How long a secret command may run when `secret_command_timeout` is not set.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `secret_command_timeout` accepted: a secret that takes longer to fetch is a
/// hung helper, and a larger value would overflow the clock arithmetic of the wait.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(600);

/// How often a running command is checked for exit.
const POLL: Duration = Duration::from_millis(10);

/// A command's argv for `Debug` output: the program and how many arguments follow, never the
/// arguments themselves (`["vault", "read", "-token=s.xyz"]` prints `vault (+2 arguments)`).
pub struct ArgvSummary<'a>(pub &'a [String]);

impl std::fmt::Debug for ArgvSummary<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0.split_first() {
            Some((program, args)) => write!(f, "{program:?} (+{} arguments)", args.len()),
            None => f.write_str("[]"),
        }
    }
}

/// Runs `argv` (a relative program path is taken from `dir`) and returns its trimmed standard output, or why it cannot be used
/// (it did not start, exited non-zero, ran past `timeout`, printed more than [`MAX_OUTPUT`],
/// printed nothing, or printed something that is not UTF-8).
pub fn run(argv: &[String], dir: &Path, timeout: Duration) -> Result<Secret, String> {
    let Some((program, args)) = argv.split_first().filter(|(p, _)| !p.is_empty()) else {
        return Err("must name a program to run: [program, args…]".into());
    };
    let fail = |what: String| format!("secret command `{program}` {what}");
    // A path is relative to the config file's folder, as `*_file` secrets are; a bare name
    // is looked up in `PATH`.
    let path = if program.contains('/') {
        dir.join(program)
    } else {
        program.into()
    };
    // A group of its own, so that on a timeout the helpers it started (a `sh -c` wrapper's
    // children) are killed with it rather than left holding its output open.
    let mut child = Command::new(path)
        .process_group(0)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| fail(format!("cannot be started: {e}")))?;
    let (sender, output) = mpsc::channel();
    if let Some(stdout) = child.stdout.take() {
        // Read on a thread of its own so that a command printing more than a pipe holds is
        // not stuck while it is waited for; one byte past the limit tells "too much".
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let read = stdout.take(MAX_OUTPUT as u64 + 1).read_to_end(&mut buf);
            let _ = sender.send(read.map(|_| buf));
        });
    }
    let deadline = Instant::now() + timeout.min(MAX_TIMEOUT);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(POLL),
            Ok(None) => {
                kill_group(&child);
                let _ = child.kill();
                let _ = child.wait();
                return Err(fail(format!(
                    "did not finish within {} (secret_command_timeout)",
                    humantime::format_duration(timeout)
                )));
            }
            Err(e) => return Err(fail(format!("could not be waited for: {e}"))),
        }
    };
    // A process the command left behind may hold its output open: wait no longer than the
    // time left. A failed command's output is read too, though never shown.
    let remaining = deadline.saturating_duration_since(Instant::now());
    let bytes = match output.recv_timeout(remaining.max(POLL)) {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(e)) => return Err(fail(format!("output could not be read: {e}"))),
        Err(_) => {
            kill_group(&child);
            return Err(fail(
                "exited but its output stayed open (a process it started still holds it)".into(),
            ));
        }
    };
    if bytes.len() > MAX_OUTPUT {
        return Err(fail(format!("printed more than {} KiB", MAX_OUTPUT / 1024)));
    }
    // Checked after the size: output past the limit is cut, which ends a command still
    // writing with SIGPIPE.
    if !status.success() {
        return Err(fail(format!("failed ({status})")));
    }
    let text =
        String::from_utf8(bytes).map_err(|_| fail("printed text that is not UTF-8".into()))?;
    let value = text.trim();
    if value.is_empty() {
        return Err(fail("printed nothing".into()));
    }
    Ok(Secret::new(value))
}

/// Kills what is left of the command's process group (its own and its children's), which
/// also ends the thread reading its output.
fn kill_group(child: &std::process::Child) {
    let group = i32::try_from(child.id())
        .ok()
        .and_then(rustix::process::Pid::from_raw);
    if let Some(group) = group {
        let _ = rustix::process::kill_process_group(group, rustix::process::Signal::KILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Vec<String> {
        vec!["/bin/sh".into(), "-c".into(), script.into()]
    }

    #[test]
    fn output_is_trimmed_and_failures_never_show_it() {
        let dir = std::env::temp_dir();
        let ok = run(&sh("printf '  s3cr3t-1 \\n'"), &dir, DEFAULT_TIMEOUT).unwrap();
        assert_eq!(ok.expose(), "s3cr3t-1");
        let e = run(
            &sh("echo s3cr3t-2; echo s3cr3t-3 >&2; exit 3"),
            &dir,
            DEFAULT_TIMEOUT,
        )
        .unwrap_err();
        assert!(e.contains("`/bin/sh` failed") && e.contains('3'), "{e}");
        assert!(!e.contains("s3cr3t") && !e.contains("echo"), "{e}");
        let e = run(
            &sh("head -c 70000 /dev/zero | tr '\\0' a"),
            &dir,
            DEFAULT_TIMEOUT,
        )
        .unwrap_err();
        assert!(e.contains("more than 64 KiB"), "{e}");
        let e = run(&sh("printf '\\377\\376'"), &dir, DEFAULT_TIMEOUT).unwrap_err();
        assert!(e.contains("not UTF-8"), "{e}");
        let e = run(&sh("true"), &dir, DEFAULT_TIMEOUT).unwrap_err();
        assert!(e.contains("printed nothing"), "{e}");
        let e = run(&sh("exec sleep 30"), &dir, Duration::from_millis(200)).unwrap_err();
        assert!(e.contains("did not finish within 200ms"), "{e}");
        let e = run(&["/nonexistent/helper".into()], &dir, DEFAULT_TIMEOUT).unwrap_err();
        assert!(e.contains("cannot be started"), "{e}");
        assert!(run(&[], &dir, DEFAULT_TIMEOUT).is_err());
    }

    /// What a command started and left running is killed with it: on a timeout (a wrapper
    /// waiting on a hung helper) and when a helper keeps its output open after it exited.
    #[test]
    fn helpers_a_command_started_are_killed_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let alive = |pid_file: &Path| {
            let pid = std::fs::read_to_string(pid_file).unwrap();
            let pid = rustix::process::Pid::from_raw(pid.trim().parse().unwrap()).unwrap();
            // Killed and reaped by init, or a zombie not yet reaped: either way not running.
            rustix::process::test_kill_process(pid).is_ok()
                && !std::fs::read_to_string(format!("/proc/{}/stat", pid.as_raw_nonzero()))
                    .unwrap_or_default()
                    .contains(") Z ")
        };
        let hung = dir.path().join("hung.pid");
        let script = format!("sleep 30 & echo $! > {}; wait", hung.display());
        let e = run(&sh(&script), dir.path(), Duration::from_millis(300)).unwrap_err();
        assert!(e.contains("did not finish within 300ms"), "{e}");
        let kept_open = dir.path().join("open.pid");
        let script = format!("sleep 30 & echo $! > {}; echo s3cr3t", kept_open.display());
        let e = run(&sh(&script), dir.path(), Duration::from_millis(300)).unwrap_err();
        assert!(e.contains("output stayed open"), "{e}");
        std::thread::sleep(Duration::from_millis(100));
        assert!(!alive(&hung), "the hung helper still runs");
        assert!(
            !alive(&kept_open),
            "the helper holding the output still runs"
        );
    }
}
