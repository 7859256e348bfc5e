//! The `authrelay` command: parses the command line and calls the library.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use authrelay::authorize::{self, AuthorizeEvent};
use authrelay::commands;
use authrelay::telemetry::{self, LogFormat};
use authrelay::{Config, ProcessEnv, StartOptions, State};

/// jemalloc keeps allocator metadata out of line (size-class slabs), so the 8 KiB buffers
/// hyper reserves for every keep-alive connection cost only the pages actually written:
/// 10 000 idle connections take 74 MB instead of 144 MB with the system allocator. Its
/// thread cache is sized for a proxy's per-request objects in `.cargo/config.toml`.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit code for a config file that was refused.
const EXIT_BAD_CONFIG: u8 = 64;
/// Exit code for other start-up failures (listener, TLS roots).
const EXIT_START_FAILED: u8 = 69;
/// Exit code when a token could not be obtained or a health check failed.
const EXIT_FAILED: u8 = 1;

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
    Check {
        /// Also obtain every credential's token once and report each result.
        #[arg(long)]
        fetch: bool,
    },
    /// Obtain one credential's token and print its header (masked unless --reveal).
    Token {
        /// The credential's name in the config.
        name: String,
        /// Print the full header value (it is a live secret: mind your terminal history).
        #[arg(long)]
        reveal: bool,
    },
    /// Ask a person to consent for an `oauth2_authorization_code` credential (prints the URL
    /// to open, waits for the browser on the loopback redirect_uri) or an
    /// `oauth2_device_code` credential (prints where to enter which code, polls); stores the
    /// tokens.
    Authorize {
        /// The credential's name in the config.
        name: String,
        /// One JSON object per line (`{"open": URL}` or `{"verification_uri": …,
        /// "user_code": …}`, then `{"authorized": NAME}`).
        #[arg(long)]
        json: bool,
    },
    /// Revoke a consented credential's refresh token at the vendor (when `revocation_url` is
    /// set) and delete its stored tokens.
    Revoke {
        /// The credential's name in the config.
        name: String,
    },
    /// Start the proxy in front of a built-in mock API and print commands to try (offline).
    Demo {
        /// The proxy listener.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// The admin listener.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
        /// How long the mock API's tokens live.
        #[arg(long, default_value = "20s")]
        token_lifetime: humantime::Duration,
    },
    /// Ask a running proxy's admin endpoint for /healthz; exit 0 when healthy (for
    /// container health checks without curl).
    Health {
        /// The admin listener's address.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: SocketAddr,
    },
    /// Manage the local CA used for `intercept: true` routes.
    #[command(subcommand)]
    Ca(CaCommand),
}

#[derive(Subcommand)]
enum CaCommand {
    /// Create a CA: DIR/ca.pem (give it to clients) and DIR/ca-key.pem (mode 0600).
    Init {
        /// The folder to write to (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

/// Exit code for a failed `ca` command.
const EXIT_CA_FAILED: u8 = 73;

fn ca(command: CaCommand) -> ExitCode {
    let CaCommand::Init { out, force } = command;
    match authrelay::intercept::init_ca(&out, force) {
        Ok(files) => {
            println!(
                "wrote {} (certificate: trust it in clients) and {} (private key)",
                files.cert.display(),
                files.key.display()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("authrelay: {e}");
            ExitCode::from(EXIT_CA_FAILED)
        }
    }
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
    let command = cli.command.unwrap_or(Command::Run);
    match command {
        Command::Demo {
            listen,
            admin,
            token_lifetime,
        } => return demo(listen, admin, token_lifetime.into()).await,
        Command::Health { admin } => {
            return match commands::health(admin).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("authrelay: unhealthy: {e}");
                    ExitCode::from(EXIT_FAILED)
                }
            }
        }
        Command::Ca(command) => return ca(command),
        _ => {}
    }
    let config = match Config::load(&cli.config, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("authrelay: {e}");
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    match command {
        Command::Check { fetch } => {
            println!(
                "{}: ok ({} routes, {} credentials)",
                cli.config.display(),
                config.routes.len(),
                config.credentials.len()
            );
            let notes = commands::access_notes(&config);
            println!("{}", notes.unmatched);
            if let Some(line) = notes.open_credentials {
                println!("{line}");
            }
            for line in &notes.exposed_keys {
                println!("warning: {line}");
            }
            for line in &notes.route_credentials {
                println!("{line}");
            }
            if !fetch {
                return ExitCode::SUCCESS;
            }
            let Some(state) = offline_state(config) else {
                return ExitCode::from(EXIT_START_FAILED);
            };
            let cache_ok = match commands::check_token_cache(&state).await {
                None => true,
                Some(Ok(line)) => {
                    println!("{line}");
                    true
                }
                Some(Err(line)) => {
                    println!("{line}");
                    false
                }
            };
            let reports = commands::fetch_all(&state).await;
            for report in &reports {
                println!("{report}");
            }
            if cache_ok && reports.iter().all(|r| r.outcome.is_ok()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILED)
            }
        }
        Command::Token { name, reveal } => {
            let Some(state) = offline_state(config) else {
                return ExitCode::from(EXIT_START_FAILED);
            };
            match commands::fetch_header(&state, &name).await {
                Ok((header, value)) => {
                    let shown = if reveal {
                        value.expose().to_string()
                    } else {
                        commands::mask(value.expose())
                    };
                    println!("{header}: {shown}");
                    ExitCode::SUCCESS
                }
                Err(e @ commands::TokenCommandError::Unknown(..)) => {
                    eprintln!("authrelay: {e}");
                    ExitCode::from(EXIT_BAD_CONFIG)
                }
                Err(e) => {
                    eprintln!("authrelay: {e}");
                    ExitCode::from(EXIT_FAILED)
                }
            }
        }
        Command::Authorize { name, json } => {
            let Some(state) = offline_state(config) else {
                return ExitCode::from(EXIT_START_FAILED);
            };
            let tell = |event: AuthorizeEvent| {
                if json {
                    println!("{}", event.to_json());
                    return;
                }
                match event {
                    AuthorizeEvent::Open(url) => {
                        eprintln!("Open this URL in a browser and consent:");
                        println!("{url}");
                    }
                    AuthorizeEvent::EnterCode {
                        verification_uri,
                        user_code,
                        verification_uri_complete,
                    } => {
                        eprintln!("On any device, open the first URL and enter the code:");
                        println!("{verification_uri}");
                        println!("{user_code}");
                        if let Some(complete) = verification_uri_complete {
                            eprintln!("or open this URL, which carries the code:");
                            println!("{complete}");
                        }
                        eprintln!("Waiting for consent…");
                    }
                    AuthorizeEvent::Authorized(name) => println!("authorized {name}"),
                }
            };
            consent_exit(authorize::authorize(&state, &name, tell).await)
        }
        Command::Revoke { name } => {
            let Some(state) = offline_state(config) else {
                return ExitCode::from(EXIT_START_FAILED);
            };
            let outcome = authorize::revoke(&state, &name).await;
            if let Ok(revoked) = &outcome {
                match &revoked.at_vendor {
                    Some(Ok(())) => println!("{name}: revoked at the vendor"),
                    Some(Err(e)) => eprintln!("authrelay: {name}: the vendor did not revoke: {e}"),
                    None => println!("{name}: no revocation_url; the vendor was not asked"),
                }
                if revoked.deleted {
                    println!("{name}: stored tokens deleted");
                } else {
                    println!("{name}: no tokens were stored");
                }
            }
            let vendor_failed = outcome
                .as_ref()
                .is_ok_and(|r| matches!(r.at_vendor, Some(Err(_))));
            let code = consent_exit(outcome.map(|_| ()));
            if vendor_failed {
                ExitCode::from(EXIT_FAILED)
            } else {
                code
            }
        }
        _ => run(cli.config, config).await,
    }
}

/// The exit code of `authorize` or `revoke`, its error printed.
fn consent_exit(outcome: Result<(), authorize::ConsentCommandError>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(
            e @ (authorize::ConsentCommandError::Unknown(..)
            | authorize::ConsentCommandError::NotConsent(..)),
        ) => {
            eprintln!("authrelay: {e}");
            ExitCode::from(EXIT_BAD_CONFIG)
        }
        Err(e) => {
            eprintln!("authrelay: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// The proxy's state without its listeners, for commands that only fetch tokens.
fn offline_state(config: Config) -> Option<Arc<State>> {
    match State::new(config, None, Arc::new(ProcessEnv)) {
        Ok(state) => Some(state),
        Err(e) => {
            eprintln!("authrelay: {e}");
            None
        }
    }
}

async fn demo(
    listen: SocketAddr,
    admin: SocketAddr,
    token_lifetime: std::time::Duration,
) -> ExitCode {
    let options = authrelay::demo::DemoOptions {
        listen,
        admin,
        token_lifetime,
    };
    let demo = match authrelay::demo::start(options).await {
        Ok(d) => d,
        Err(e) => {
            eprintln!("authrelay: cannot start the demo: {e}");
            eprintln!("(another program may use the port; try --listen 127.0.0.1:18080 --admin 127.0.0.1:19901)");
            return ExitCode::from(EXIT_START_FAILED);
        }
    };
    println!("{}", demo.instructions());
    wait_for_signal().await;
    println!("stopping the demo");
    demo.running.shutdown().await;
    ExitCode::SUCCESS
}

async fn run(path: PathBuf, config: Config) -> ExitCode {
    // Idle client sockets must not be what runs the process out of descriptors: use all the
    // hard limit allows (as nginx's `worker_rlimit_nofile`); `max_connections` derives from it.
    let fd_limit = authrelay::proxy::limits::raise_fd_limit();
    tracing::info!(fd_limit, "file-descriptor limit");
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
