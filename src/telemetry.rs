//! Logging setup: `tracing` with `RUST_LOG` filtering, as text or JSON lines on stderr.

use std::fmt;
use std::io::IsTerminal;

use tracing::field::Field;
use tracing_subscriber::field::MakeExt;
use tracing_subscriber::fmt::format::{debug_fn, Writer};
use tracing_subscriber::EnvFilter;

use crate::access_log;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Installs the global subscriber, writing to stderr (colours only on a terminal, so that
/// files and journald get plain text). `RUST_LOG` overrides the default level (`info`).
///
/// When stderr is not a terminal, the per-request access line takes the access-log thread
/// (`access_log`, same text) and every other line is written after the access lines
/// logged before it.
pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let terminal = std::io::stderr().is_terminal();
    if !terminal {
        access_log::install(match format {
            LogFormat::Text => access_log::LineFormat::Text,
            LogFormat::Json => access_log::LineFormat::Json,
        });
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(terminal)
        .with_writer(|| access_log::FlushingStderr);
    let _ = match format {
        LogFormat::Text => builder.fmt_fields(plain_fields()).try_init(),
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .try_init(),
    };
}

/// `name=value` fields separated by spaces, the message bare: what the default text format
/// prints without colours, minus its per-field styling calls (a measurable share of the cost
/// of every access-log line).
pub(crate) fn plain_fields() -> impl for<'w> tracing_subscriber::fmt::FormatFields<'w> + 'static {
    debug_fn(
        |writer: &mut Writer<'_>, field: &Field, value: &dyn fmt::Debug| {
            if field.name() == "message" {
                write!(writer, "{value:?}")
            } else {
                write!(writer, "{field}={value:?}")
            }
        },
    )
    .delimited(" ")
}
