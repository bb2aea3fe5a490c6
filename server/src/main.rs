//! `rootletd`: config → tracing → serve until SIGTERM/SIGINT → drain (`rootlet_server::runtime`).

use std::{io::IsTerminal, path::PathBuf, process::ExitCode};

use clap::Parser;
use rootlet_server::{
    config::{Config, LogFormat},
    runtime::{self, error_chain},
};
use tracing_subscriber::{EnvFilter, fmt};

const DEFAULT_CONFIG: &str = "/etc/rootlet/rootletd.toml";

/// The Rootlet agent: owns the XDP pipelines of this host and serves the
/// rootlet.v1 gRPC API (TCP with mutual TLS, a local Unix socket), health,
/// reflection and Prometheus metrics. The pinned data path keeps running
/// when rootletd stops; a restart adopts it.
#[derive(Parser)]
#[command(version)]
struct Args {
    /// The configuration file. Default: /etc/rootlet/rootletd.toml, or the
    /// built-in defaults (a local Unix socket only) if that does not exist.
    #[arg(long, value_name = "PATH")]
    config: Option<PathBuf>,
    /// Load and validate the configuration (files exist and parse, TLS,
    /// roles), print a summary, and exit: 0 if it is valid, 1 if not.
    #[arg(long)]
    check_config: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
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
