//! The collector binary: read config, start tracing, bind, serve until SIGINT/SIGTERM.
//! `ingest hash-token` prints the SHA-256 of a token read from stdin, for `[[api_tokens]]`.

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Real-time personalization collector.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// TOML configuration file; `INGEST_*` environment variables override it.
    #[arg(long, env = "INGEST_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the SHA-256 of an API token read from stdin (surrounding whitespace removed),
    /// for the `sha256` of an `[[api_tokens]]` entry: `ingest hash-token < token-file`.
    HashToken,
}

fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(Command::HashToken) = args.command {
        return report(hash_token());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| EnvFilter::new("info,tower_http=warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    report(run(args))
}

fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn hash_token() -> anyhow::Result<()> {
    let mut token = String::new();
    std::io::stdin()
        .read_to_string(&mut token)
        .context("reading the token from stdin")?;
    println!("{}", ingest::auth::TokenHash::of_token(&token)?);
    Ok(())
}

#[tokio::main]
async fn run(args: Args) -> anyhow::Result<()> {
    let env: Vec<(String, String)> = std::env::vars().collect();
    let config = ingest::Config::load(args.config.as_deref(), &env).context("configuration")?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding {}", config.listen))?;
    ingest::serve(config, listener, shutdown_signal()).await
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    tracing::info!("shutting down");
}
