//! The `authrelay` command: parses the command line and calls the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use authrelay::telemetry::{self, LogFormat};
use authrelay::{Config, ProcessEnv, StartOptions};

/// Exit code for a config file that was refused.
const EXIT_BAD_CONFIG: u8 = 64;
/// Exit code for other start-up failures (listener, TLS roots).
const EXIT_START_FAILED: u8 = 69;

#[derive(Parser)]
#[command(
    name = "authrelay",
    version,
    about = "Outbound authenticating proxy: injects and refreshes API credentials for legacy apps"
)]
struct Cli {
    /// The routes file.
    #[arg(
        long,
        short,
        global = true,
        env = "AUTHRELAY_CONFIG",
        default_value = "routes.yaml"
    )]
    config: PathBuf,
    /// Log format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy (the default).
    Run,
    /// Validate the config file and exit (non-zero with the error when it is refused).
    Check,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let runtime = match runtime_for_this_machine().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("authrelay: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_START_FAILED);
        }
    };
    runtime.block_on(async_main(cli))
}

/// One thread when the process may use one CPU (a pinned or small container): a
/// multi-thread scheduler would only add cross-thread wake-ups. Otherwise one worker per CPU.
fn runtime_for_this_machine() -> tokio::runtime::Builder {
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    if cpus == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    }
}

async fn async_main(cli: Cli) -> ExitCode {
    let config = match Config::load(&cli.config, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("authrelay: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::Check => {
            println!(
                "{}: ok ({} routes, {} credentials)",
                cli.config.display(),
                config.routes.len(),
                config.credentials.len()
            );
            ExitCode::SUCCESS
        }
        Command::Run => run(cli.config, config).await,
    }
}

async fn run(path: PathBuf, config: Config) -> ExitCode {
    let options = StartOptions {
        config_path: Some(path),
        env: Arc::new(ProcessEnv),
        watch: true,
    };
    let running = match authrelay::start(config, options).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("authrelay: {e}");
            return ExitCode::from(EXIT_START_FAILED);
        }
    };
    wait_for_signal().await;
    tracing::info!("shutting down: draining requests in flight");
    running.shutdown().await;
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
