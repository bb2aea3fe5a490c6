//! `rootletd`: config → tracing → serve until SIGTERM/SIGINT → drain (`rootlet_server::runtime`).

use std::{io::IsTerminal, path::PathBuf, process::ExitCode};

use clap::Parser;
use rootlet_server::{
    config::{Config, LogFormat},
    memory,
    runtime::{self, error_chain},
};
use tracing_subscriber::{EnvFilter, fmt};

const DEFAULT_CONFIG: &str = "/etc/rootlet/rootletd.toml";

/// The Rootlet agent: owns the XDP pipelines of this host and serves the
/// rootlet.v1 gRPC API (TCP with mutual TLS, a local Unix socket), health,
/// reflection and Prometheus metrics. The pinned data path keeps running
/// when rootletd stops; a restart adopts it.
#[derive(Parser)]
#[command(name = "rootletd", version)]
struct Args {
    /// The configuration file. Default: /etc/rootlet/rootletd.toml, or the
    /// built-in defaults (a local Unix socket only) if that does not exist.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Load and validate the configuration (files exist and parse, TLS,
    /// roles), print a summary, and exit: 0 if it is valid, 1 if not.
    #[arg(long)]
    check_config: bool,
    /// Print a shell's completion script for rootletd, and exit.
    #[arg(long, value_name = "SHELL", exclusive = true)]
    completions: Option<clap_complete::Shell>,
    /// Write rootletd's manual page (rootletd.8) into DIR, and exit.
    #[arg(long, value_name = "DIR", exclusive = true)]
    man: Option<PathBuf>,
}

/// `--completions` and `--man`: generated from the clap definitions above
/// (clap_complete, clap_mangen), so they never disagree with `--help`.
fn generate(args: &Args) -> Option<ExitCode> {
    use clap::CommandFactory;
    if let Some(shell) = args.completions {
        clap_complete::generate(
            shell,
            &mut Args::command(),
            "rootletd",
            &mut std::io::stdout(),
        );
        return Some(ExitCode::SUCCESS);
    }
    let dir = args.man.as_ref()?;
    let mut page = vec![];
    let written = std::fs::create_dir_all(dir)
        .and_then(|()| {
            clap_mangen::Man::new(Args::command())
                .section("8")
                .render(&mut page)
        })
        .and_then(|()| std::fs::write(dir.join("rootletd.8"), &page));
    Some(match written {
        Ok(()) => {
            println!("{}", dir.join("rootletd.8").display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("rootletd: {}: {e}", dir.display());
            ExitCode::FAILURE
        }
    })
}

/// Async workers: they only accept connections, run h2 and the metrics
/// endpoint, and hand every RPC to a blocking thread; one per core (the
/// default) would give a large host dozens of idle threads and arenas.
const MAX_WORKERS: usize = 2;
/// How long an idle blocking thread (the RPCs run on them) is kept.
const BLOCKING_KEEP_ALIVE: std::time::Duration = std::time::Duration::from_secs(2);
fn main() -> ExitCode {
    memory::limit_arenas();
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_WORKERS));
    match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .thread_keep_alive(BLOCKING_KEEP_ALIVE)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(rootletd()),
        Err(e) => {
            eprintln!("rootletd: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn rootletd() -> ExitCode {
    let args = Args::parse();
    if let Some(code) = generate(&args) {
        return code;
    }
    let path = args.config.clone().unwrap_or_else(|| DEFAULT_CONFIG.into());
    let (config, origin) = match Config::load_or_default(&path, args.config.is_none()) {
        Ok(loaded) => loaded,
        Err(e) => {
            eprintln!("rootletd: {}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    if args.check_config {
        let report = config.check(&origin);
        match &report {
            Ok(text) => print!("{text}"),
            Err(text) => eprint!("{text}"),
        }
        return ExitCode::from(u8::from(report.is_err()));
    }
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&config.log.level));
    let ansi = std::io::stderr().is_terminal();
    let logs = fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Text => logs.init(),
        LogFormat::Json => logs.json().init(),
    }
    tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %origin, "rootletd starting");
    if let Err(e) = runtime::run(config, shutdown_signal()).await {
        tracing::error!(error = %error_chain(&e), "rootletd failed");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).ok();
    let signal = tokio::select! {
        Some(_) = async { term.as_mut()?.recv().await } => "SIGTERM",
        _ = tokio::signal::ctrl_c() => "SIGINT",
    };
    tracing::info!("{signal}: shutting down");
}
