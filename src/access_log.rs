//! The per-request access line, off the request path.
//!
//! Through `tracing`, each request paid for a span (registry slot, fields formatted into a
//! string, enter and exit on every poll), an event formatted through the field visitors, and
//! a `write` to stderr of its own: about 44% more user-space instructions per request than
//! with the line off. Here the line is formatted straight into a shared batch under a mutex
//! (no copy of it is made first), and a writer thread writes the batch to stderr in one `write`
//! (every [`FLUSH_EVERY`], or sooner once [`BATCH`] bytes wait). The text is byte for byte
//! what the `tracing` text or JSON formatter prints for the same line (a test holds them
//! together), so log readers see no difference.
//!
//! A request never waits for stderr: while [`MAX_PENDING`] bytes wait (stderr blocked or far
//! behind), further lines are dropped and counted ([`dropped_lines`], exported as
//! `authrelay_access_log_dropped_total`), and the writer warns about them at most once per
//! [`DROP_WARNING_EVERY`] — a runtime thread parked on a full pipe would stall every
//! connection it serves, which costs more than the lines. Short of that no line is lost:
//! every other log event flushes the batch before its own line (so lines keep their order),
//! and the listener flushes once its requests have drained at shutdown.
//!
//! The path is used only when [`install`] was called (the binary does, when stderr is not a
//! terminal) and the access line is enabled at `info` without `debug`; otherwise, and in
//! tests that capture logs with a `tracing` subscriber, the line goes through `tracing` as
//! before.

use std::fmt::Write as _;
use std::io::Write;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant, SystemTime};

/// How often waiting lines are written when few arrive.
pub const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// Waiting bytes that wake the writer at once. About what a busy proxy logs in
/// [`FLUSH_EVERY`] (~50 000 lines a second of ~250 bytes): each wake-up of the writer is a
/// futex call on the request thread and a context switch on a shared core, so under load
/// the writer should wake about once per interval, not every few hundred lines.
pub const BATCH: usize = 256 * 1024;
/// Waiting bytes past which new lines are dropped (and counted) instead of added.
pub const MAX_PENDING: usize = 1024 * 1024;
/// The writer warns about dropped lines at most this often.
pub const DROP_WARNING_EVERY: Duration = Duration::from_secs(10);

/// The format of the lines, as `--log-format` chose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineFormat {
    /// `tracing`'s text format without colours, with authrelay's plain field style.
    Text,
    /// `tracing`'s JSON format with `flatten_event`, `with_current_span` and the span list.
    Json,
}

/// What the access line says about the request: known before it is forwarded.
pub struct RequestFields<'a> {
    /// The client's address.
    pub client: IpAddr,
    /// The authenticated user, or `-`.
    pub user: &'a str,
    /// The route's name, or `-`.
    pub route: &'a str,
    /// The credential's name, or `-`.
    pub credential: &'a str,
    /// The request method.
    pub method: &'a str,
    /// The host the client asked for.
    pub host: &'a str,
    /// The upstream authority the request went to, or `-`.
    pub upstream: &'a str,
}

/// What the access line says about the answer.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    /// The status answered.
    pub status: u16,
    /// Nanoseconds from the request head to the response head.
    pub latency_nanos: u64,
    /// Whether the request was replayed after a 401/403.
    pub retried: bool,
}

impl Outcome {
    /// The latency the line prints, in milliseconds.
    pub fn latency_ms(&self) -> f64 {
        self.latency_nanos as f64 / 1e6
    }
}

/// The target `tracing` prints for the access line.
const TARGET: &str = "authrelay::proxy::dispatch";

/// Whether the access line is on: `info` for its target, so that `RUST_LOG` can turn the
/// line off by itself (`info,authrelay::proxy::dispatch=warn`), on every path that writes it.
pub fn line_enabled() -> bool {
    tracing::enabled!(target: TARGET, tracing::Level::INFO)
}

impl RequestFields<'_> {
    /// The span's part of the text line: `request{client=… upstream="…"}`. The quotes around
    /// each value are part of the literals next to it: two appends a field, not three.
    fn text_span(&self, out: &mut String) {
        out.push_str("request{client=");
        push_ip(self.client, out);
        out.push_str(" user=\"");
        debug_str_inner(self.user, out);
        out.push_str("\" route=\"");
        debug_str_inner(self.route, out);
        out.push_str("\" credential=\"");
        debug_str_inner(self.credential, out);
        out.push_str("\" method=");
        out.push_str(self.method);
        out.push_str(" host=\"");
        debug_str_inner(self.host, out);
        out.push_str("\" upstream=\"");
        debug_str_inner(self.upstream, out);
        out.push_str("\"}");
    }

    /// The span object: its fields in name order (a JSON map), then `name`.
    fn json_span(&self, out: &mut String) {
        out.push_str("{\"client\":\"");
        push_ip(self.client, out);
        out.push_str("\",\"credential\":");
        json_str(self.credential, out);
        out.push_str(",\"host\":");
        json_str(self.host, out);
        out.push_str(",\"method\":");
        json_str(self.method, out);
        out.push_str(",\"route\":");
        json_str(self.route, out);
        out.push_str(",\"upstream\":");
        json_str(self.upstream, out);
        out.push_str(",\"user\":");
        json_str(self.user, out);
        out.push_str(",\"name\":\"request\"}");
    }
}

/// Appends the whole line (with its newline) as `format` prints it at `now`. The fields are
/// formatted straight into `out` (the JSON line names the span twice: formatted once, beside).
pub fn line(
    format: LineFormat,
    now: SystemTime,
    fields: &RequestFields<'_>,
    outcome: Outcome,
    out: &mut String,
) {
    match format {
        LineFormat::Text => {
            timestamp(now, out);
            out.push_str("  INFO ");
            fields.text_span(out);
            out.push_str(": ");
            out.push_str(TARGET);
            out.push_str(": request status=");
            push_u16(outcome.status, out);
            out.push_str(" latency_ms=");
            push_millis(outcome.latency_nanos, out);
            out.push_str(if outcome.retried {
                " retried=true\n"
            } else {
                " retried=false\n"
            });
        }
        LineFormat::Json => {
            out.push_str("{\"timestamp\":\"");
            timestamp(now, out);
            out.push_str("\",\"level\":\"INFO\",\"message\":\"request\",\"status\":");
            push_u16(outcome.status, out);
            out.push_str(",\"latency_ms\":");
            push_millis(outcome.latency_nanos, out);
            out.push_str(",\"retried\":");
            out.push_str(if outcome.retried { "true" } else { "false" });
            out.push_str(",\"target\":\"");
            out.push_str(TARGET);
            // Formatted once into the thread's scratch string, then appended twice.
            thread_local! {
                static SPAN: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
            }
            SPAN.with_borrow_mut(|span| {
                span.clear();
                fields.json_span(span);
                out.push_str("\",\"span\":");
                out.push_str(span);
                out.push_str(",\"spans\":[");
                out.push_str(span);
            });
            out.push_str("]}\n");
        }
    }
}

/// `2026-12-02T01:10:31.357044Z`, as `tracing`'s default timer prints it. The date and time
/// of day are computed once a second per thread.
fn timestamp(now: SystemTime, out: &mut String) {
    thread_local! {
        static SECOND: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((u64::MAX, String::new())) };
    }
    let since = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs();
    SECOND.with(|cached| {
        let mut cached = cached.borrow_mut();
        if cached.0 != secs {
            let t = time::OffsetDateTime::from_unix_timestamp(secs as i64)
                .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
            cached.1.clear();
            let _ = write!(
                cached.1,
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.",
                t.year(),
                u8::from(t.month()),
                t.day(),
                t.hour(),
                t.minute(),
                t.second()
            );
            cached.0 = secs;
        }
        out.push_str(&cached.1);
    });
    push_padded(since.subsec_micros(), 6, out);
    out.push('Z');
}

/// `n` in decimal, with leading zeros to `width` digits (`n` has at most `width`).
fn push_padded(n: u32, width: usize, out: &mut String) {
    let mut buffer = itoa::Buffer::new();
    let digits = buffer.format(n);
    out.push_str(&"000000000"[..width.saturating_sub(digits.len())]);
    out.push_str(digits);
}

/// `nanos` in milliseconds as `{:?}` prints `nanos as f64 / 1e6` (what `tracing` and
/// serde_json print for the latency), without the float formatter (a sixth of the line's
/// cost). The quotient of two exact integers is the double nearest to the decimal
/// `nanos / 10^6`; with at most 15 significant digits that decimal is the only one of its
/// length or shorter to round to that double, so it is the shortest round-trip form — its
/// digits, trailing zeros dropped. Outside 1 µs–11 days, the formatter (exponent form below
/// 1e-4).
fn push_millis(nanos: u64, out: &mut String) {
    if !(1_000..1_000_000_000_000_000).contains(&nanos) {
        let _ = write!(out, "{:?}", nanos as f64 / 1e6);
        return;
    }
    out.push_str(itoa::Buffer::new().format(nanos / 1_000_000));
    out.push('.');
    // Below 10^6: fits. Six digits less the trailing zeros, at least one.
    let (mut fraction, mut width) = ((nanos % 1_000_000) as u32, 6);
    while width > 1 && fraction % 10 == 0 {
        fraction /= 10;
        width -= 1;
    }
    push_padded(fraction, width, out);
}

/// An address as `Display` prints it. The text of the last address seen is kept per thread:
/// a proxy's clients are a handful of applications, so the same address comes again and
/// again, and four numbers formatted per line were a twelfth of the line's cost.
fn push_ip(ip: IpAddr, out: &mut String) {
    thread_local! {
        static LAST: std::cell::RefCell<(Option<IpAddr>, String)> = const { std::cell::RefCell::new((None, String::new())) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        if last.0 != Some(ip) {
            last.1.clear();
            format_ip(ip, &mut last.1);
            last.0 = Some(ip);
        }
        out.push_str(&last.1);
    });
}

/// An address as `Display` prints it; IPv4 without the formatting machinery.
fn format_ip(ip: IpAddr, out: &mut String) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                push_u16(u16::from(octet), out);
            }
        }
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

fn push_u16(n: u16, out: &mut String) {
    out.push_str(itoa::Buffer::new().format(n));
}

/// The bytes `{:?}` does not print as they are in a string: quotes, backslashes, control
/// and non-ASCII bytes (the latter may still print unescaped; the formatter decides).
const ESCAPED_BY_DEBUG: [bool; 256] = {
    let mut table = [true; 256];
    let mut b = 0x20;
    while b < 0x7f {
        table[b] = false;
        b += 1;
    }
    table[b'"' as usize] = true;
    table[b'\\' as usize] = true;
    table
};

/// A string as `{:?}` prints it between its quotes: quotes, backslashes and control or
/// non-printable characters escaped.
fn debug_str_inner(s: &str, out: &mut String) {
    // One table look-up a byte: the names here are a few bytes long, too short for the
    // vectorised loop a range check compiles to (its scalar tail ran instead).
    if !s.bytes().any(|b| ESCAPED_BY_DEBUG[usize::from(b)]) {
        out.push_str(s);
    } else {
        let quoted = format!("{s:?}");
        out.push_str(&quoted[1..quoted.len() - 1]);
    }
}

/// A JSON string, as serde_json writes it.
fn json_str(s: &str, out: &mut String) {
    out.push('"');
    // Most values need no escape: appended whole, not a character at a time.
    if !s.bytes().any(|b| b < 0x20 || b == b'"' || b == b'\\') {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Lines waiting for the writer, and where they go.
pub struct AccessLog {
    format: LineFormat,
    pending: Mutex<String>,
    /// Wakes the writer: lines arrived in an empty batch, or the batch is large.
    arrived: Condvar,
    /// Lines dropped because [`MAX_PENDING`] bytes were waiting.
    dropped: AtomicU64,
    /// Held while a batch is written, so that batches reach the output in order.
    output: Mutex<Box<dyn Write + Send>>,
}

/// `None` inside when the writer thread could not start: lines then go through `tracing`
/// (a log without its writer would drop every line once the batch is full).
static INSTALLED: OnceLock<Option<&'static AccessLog>> = OnceLock::new();

/// Sends access lines to stderr through a writer thread from now on (once per process).
pub fn install(format: LineFormat) {
    INSTALLED.get_or_init(|| {
        let log = AccessLog::leaked(format, Box::new(std::io::stderr()));
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || log.run_writer())
            .ok()
            .map(|_| log)
    });
}

/// The installed access log, if any.
pub fn installed() -> Option<&'static AccessLog> {
    INSTALLED.get().copied().flatten()
}

/// Access lines dropped so far by the installed access log (0 when none is installed).
pub fn dropped_lines() -> u64 {
    installed().map_or(0, AccessLog::dropped)
}

/// Writes every waiting line now (shutdown, or before another log line).
pub fn flush() {
    if let Some(log) = installed() {
        log.flush();
    }
}

impl AccessLog {
    /// An access log writing `format` lines to `output`; its writer thread is
    /// [`AccessLog::run_writer`].
    pub fn leaked(format: LineFormat, output: Box<dyn Write + Send>) -> &'static AccessLog {
        Box::leak(Box::new(AccessLog {
            format,
            pending: Mutex::new(String::with_capacity(BATCH)),
            arrived: Condvar::new(),
            dropped: AtomicU64::new(0),
            output: Mutex::new(output),
        }))
    }

    /// The line format.
    pub fn format(&self) -> LineFormat {
        self.format
    }

    /// Adds the line of the request `fields` describes to the batch, formatted in place (no
    /// copy of the line is made elsewhere first).
    pub fn log(&self, fields: &RequestFields<'_>, outcome: Outcome) {
        self.append(|pending| line(self.format, SystemTime::now(), fields, outcome, pending));
    }

    /// Adds one finished line to the batch.
    pub fn push(&self, line: &str) {
        self.append(|pending| pending.push_str(line));
    }

    /// Lines dropped so far because the batch was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn append(&self, write: impl FnOnce(&mut String)) {
        let mut pending = self.lock_pending();
        if pending.len() >= MAX_PENDING {
            drop(pending);
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let before = pending.len();
        write(&mut pending);
        if before == 0 || (before < BATCH && pending.len() >= BATCH) {
            self.arrived.notify_one();
        }
    }

    /// Writes every waiting line now, from the caller's thread.
    pub fn flush(&self) {
        let mut output = self.output.lock().unwrap_or_else(PoisonError::into_inner);
        let batch = std::mem::take(&mut *self.lock_pending());
        if !batch.is_empty() {
            let _ = output.write_all(batch.as_bytes());
        }
        let _ = output.flush();
    }

    /// The writer thread's loop: waits for lines, gives more of them [`FLUSH_EVERY`] to
    /// arrive unless the batch is already large, then writes the batch in one go; and says
    /// when lines were dropped. The warning is logged here, not where a line is dropped: a
    /// request thread would block on the same stderr that made the batch full.
    pub fn run_writer(&self) {
        let mut spare = String::with_capacity(BATCH);
        let mut drops = DropWarning::default();
        loop {
            let mut pending = self.lock_pending();
            if pending.is_empty() {
                // Woken now and then even without lines, to report drops not yet reported.
                pending = self
                    .arrived
                    .wait_timeout(pending, DROP_WARNING_EVERY)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            if !pending.is_empty() && pending.len() < BATCH {
                pending = self
                    .arrived
                    .wait_timeout(pending, FLUSH_EVERY)
                    .unwrap_or_else(PoisonError::into_inner)
                    .0;
            }
            drop(pending);
            let mut output = self.output.lock().unwrap_or_else(PoisonError::into_inner);
            std::mem::swap(&mut *self.lock_pending(), &mut spare);
            if !spare.is_empty() {
                let _ = output.write_all(spare.as_bytes());
                let _ = output.flush();
            }
            drop(output);
            spare.clear();
            spare.shrink_to(MAX_PENDING / 4);
            drops.report(self.dropped());
        }
    }

    fn lock_pending(&self) -> MutexGuard<'_, String> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What the writer has said about dropped lines.
#[derive(Default)]
struct DropWarning {
    reported: u64,
    last: Option<Instant>,
}

impl DropWarning {
    /// Warns about the lines dropped since the last warning, unless one was logged less than
    /// [`DROP_WARNING_EVERY`] ago (those are reported by the next one).
    fn report(&mut self, dropped: u64) {
        if dropped == self.reported || self.last.is_some_and(|t| t.elapsed() < DROP_WARNING_EVERY) {
            return;
        }
        tracing::warn!(
            dropped = dropped - self.reported,
            max_pending_bytes = MAX_PENDING,
            "access log lines dropped: stderr did not keep up"
        );
        self.reported = dropped;
        self.last = Some(Instant::now());
    }
}

/// A `tracing` writer for every other log line: it writes the waiting access lines first,
/// so that lines reach stderr in the order they were logged.
pub struct FlushingStderr;

impl Write for FlushingStderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match installed() {
            Some(log) => {
                let mut output = log.output.lock().unwrap_or_else(PoisonError::into_inner);
                let batch = std::mem::take(&mut *log.lock_pending());
                if !batch.is_empty() {
                    output.write_all(batch.as_bytes())?;
                }
                output.write_all(buf)?;
                Ok(buf.len())
            }
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn fields(user: &str) -> RequestFields<'_> {
        RequestFields {
            client: "127.0.0.1".parse().unwrap(),
            user,
            route: "bench-forward",
            credential: "bench",
            method: "GET",
            host: "api.example.com",
            upstream: "127.0.0.1:18391",
        }
    }

    #[test]
    fn lines_logged_before_a_flush_all_arrive_in_order() {
        let out = Shared::default();
        let log = AccessLog::leaked(LineFormat::Text, Box::new(out.clone()));
        std::thread::spawn(move || log.run_writer());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for i in 0..5000 {
                        log.push(&format!("t{t} {i}\n"));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        log.flush();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        for t in 0..4 {
            let seen: Vec<usize> = text
                .lines()
                .filter_map(|l| l.strip_prefix(&format!("t{t} ")))
                .map(|n| n.parse().unwrap())
                .collect();
            assert_eq!(seen, (0..5000).collect::<Vec<_>>(), "thread {t}");
        }
    }

    /// An output that blocks every write until the test opens it, like a stderr pipe whose
    /// reader stopped reading.
    struct Blocked {
        open: Arc<(Mutex<bool>, Condvar)>,
        out: Shared,
    }

    impl Write for Blocked {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (open, opened) = &*self.open;
            let mut is_open = open.lock().unwrap();
            while !*is_open {
                is_open = opened.wait(is_open).unwrap();
            }
            self.out.write(buf)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_full_batch_drops_and_counts_lines_instead_of_blocking_the_caller() {
        let out = Shared::default();
        let open = Arc::new((Mutex::new(false), Condvar::new()));
        let log = AccessLog::leaked(
            LineFormat::Text,
            Box::new(Blocked {
                open: Arc::clone(&open),
                out: out.clone(),
            }),
        );
        std::thread::spawn(move || log.run_writer());
        let line = format!("{}\n", "x".repeat(1023));
        let lines = 4 * MAX_PENDING / 1024;
        // Pushed from another thread: with the old waiting behaviour this never finishes,
        // and the generous limit below turns that into a failure instead of a hung test.
        let (done, finished) = std::sync::mpsc::channel();
        let pusher = line.clone();
        std::thread::spawn(move || {
            for _ in 0..lines {
                log.push(&pusher);
            }
            let _ = done.send(());
        });
        finished
            .recv_timeout(Duration::from_secs(60))
            .expect("pushing lines returned while the output was blocked");
        // The writer holds at most one batch it could not write, plus at most MAX_PENDING
        // bytes (and one line) waiting: everything else was dropped and counted.
        let waiting = log.lock_pending().len();
        assert!(
            waiting < MAX_PENDING + line.len(),
            "{waiting} bytes waiting"
        );
        let dropped = usize::try_from(log.dropped()).unwrap();
        assert!(
            dropped >= lines - 2 * MAX_PENDING / 1024 - 2,
            "{dropped} dropped"
        );

        *open.0.lock().unwrap() = true;
        open.1.notify_all();
        log.flush();
        let written = out.0.lock().unwrap().len();
        assert_eq!(written + dropped * line.len(), lines * line.len());
    }

    #[test]
    fn dropped_lines_are_reported_once_per_interval_not_per_line() {
        let out = Shared::default();
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || sink.clone())
            .finish();
        let mut drops = DropWarning::default();
        tracing::subscriber::with_default(subscriber, || {
            drops.report(0);
            drops.report(3);
            drops.report(7);
            drops.report(9);
            // As if the interval had passed: the lines dropped since the warning are reported.
            drops.last = Instant::now().checked_sub(DROP_WARNING_EVERY);
            drops.report(9);
            drops.report(9);
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let warnings: Vec<&str> = text.lines().collect();
        assert_eq!(warnings.len(), 2, "{text}");
        assert!(warnings[0].contains("dropped=3"), "{text}");
        assert!(warnings[1].contains("dropped=6"), "{text}");
    }

    /// The line `tracing` prints for the same request, through a subscriber set up as
    /// `telemetry::init` sets up the binary's (text: plain fields, no colours).
    fn through_tracing(json: bool, r: &RequestFields<'_>, outcome: Outcome) -> String {
        let out = Shared::default();
        let sink = out.clone();
        let builder = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || sink.clone());
        let dispatch = if json {
            tracing::Dispatch::new(
                builder
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .finish(),
            )
        } else {
            tracing::Dispatch::new(
                builder
                    .fmt_fields(crate::telemetry::plain_fields())
                    .finish(),
            )
        };
        tracing::dispatcher::with_default(&dispatch, || {
            crate::proxy::dispatch::access_line_through_tracing(r, outcome);
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        text
    }

    #[test]
    fn the_line_is_the_one_tracing_prints() {
        let outcomes = [
            Outcome {
                status: 200,
                latency_nanos: 780_238,
                retried: false,
            },
            Outcome {
                status: 502,
                latency_nanos: 1_500_000_000,
                retried: true,
            },
        ];
        for (user, outcome) in [("-", outcomes[0]), ("billing \"ops\"\\\u{1}é", outcomes[1])] {
            let r = fields(user);
            for (json, format) in [(false, LineFormat::Text), (true, LineFormat::Json)] {
                let expected = through_tracing(json, &r, outcome);
                let mut ours = String::new();
                line(format, SystemTime::now(), &r, outcome, &mut ours);
                // The timestamps differ (two clock readings); everything after them must not.
                let cut = |s: &str| s[s.find('Z').unwrap()..].to_string();
                assert_eq!(cut(&ours), cut(&expected), "json: {json}");
                assert_eq!(ours.len(), expected.len(), "{ours}{expected}");
            }
        }
    }

    #[test]
    fn latencies_read_as_the_float_formatter_prints_them() {
        let mut samples: Vec<u64> = (0..20_000).collect();
        // Every power of ten and its neighbours, and a spread of values up to ~300 years.
        let mut p = 1u64;
        while let Some(next) = p.checked_mul(10) {
            samples.extend([p - 1, p, p + 1, p * 7 + 3]);
            p = next;
        }
        let mut x = 0x9e37_79b9_7f4a_7c15_u64;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            samples.push(x >> (x % 64));
        }
        samples.extend([u64::MAX, 999_999_999_999_999, 1_000_000_000_000_000]);
        let mut ours = String::new();
        for nanos in samples {
            ours.clear();
            push_millis(nanos, &mut ours);
            let outcome = Outcome {
                status: 200,
                latency_nanos: nanos,
                retried: false,
            };
            assert_eq!(ours, format!("{:?}", outcome.latency_ms()), "{nanos} ns");
        }
    }

    #[test]
    fn debug_quoting_matches_the_formatter() {
        for s in [
            "",
            "-",
            "bench",
            "a\"b",
            "back\\slash",
            "tab\t",
            "é",
            "\u{7f}",
            "x\u{1}y",
        ] {
            let mut ours = String::from("\"");
            debug_str_inner(s, &mut ours);
            ours.push('"');
            assert_eq!(ours, format!("{s:?}"));
        }
        // Every ASCII character, alone and between others (the table decides for each).
        for b in 0u8..0x80 {
            let s = format!("a{}b", char::from(b));
            let mut ours = String::from("\"");
            debug_str_inner(&s, &mut ours);
            ours.push('"');
            assert_eq!(ours, format!("{s:?}"), "byte {b:#x}");
        }
    }

    #[test]
    fn json_strings_read_as_serde_json_writes_them() {
        for b in 0u8..0x80 {
            let s = format!("a{}b", char::from(b));
            let mut ours = String::new();
            json_str(&s, &mut ours);
            assert_eq!(ours, serde_json::to_string(&s).unwrap(), "byte {b:#x}");
        }
        for s in ["", "bench", "é\u{7f}", "billing \"ops\"\\\u{1}é"] {
            let mut ours = String::new();
            json_str(s, &mut ours);
            assert_eq!(ours, serde_json::to_string(s).unwrap());
        }
    }

    #[test]
    fn addresses_read_as_display_prints_them() {
        for ip in [
            "127.0.0.1",
            "0.0.0.0",
            "255.255.255.255",
            "10.20.3.104",
            "::1",
            "fe80::1",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            // Twice: formatted, then from the thread's copy.
            for _ in 0..2 {
                let mut out = String::new();
                push_ip(ip, &mut out);
                assert_eq!(out, ip.to_string());
            }
        }
    }

    #[test]
    fn timestamps_read_as_tracing_writes_them() {
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_764_637_831, 357_044_999);
        let mut out = String::new();
        timestamp(t, &mut out);
        assert_eq!(out, "2025-12-02T01:10:31.357044Z");
        out.clear();
        timestamp(t + Duration::from_secs(86_400 * 31), &mut out);
        assert_eq!(out, "2026-01-02T01:10:31.357044Z");
    }
}
