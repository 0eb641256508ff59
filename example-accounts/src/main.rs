//! `example-accounts`: a small bank on Outflow — a scripted demo, and an
//! HTTP API with a live page and the operators' console (`/admin`); the
//! workspace's `outflow` command does an operator's work from a shell.
//! Runs on SQLite (`accounts.db` in the working directory) unless given a
//! `postgres://` URL. See `docs/src/example.md`.

mod demo;
mod serve;
mod traces;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use example_accounts::app::{App, AppStore, Settings};
use outflow::{PostgresStore, SqliteStore};

/// A bank on Outflow: users, accounts, transfers, read models.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Where the data lives: `sqlite:FILE` or `postgres://…`.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite:accounts.db",
        global = true
    )]
    database_url: String,

    /// How long a transfer may take before it is cancelled and its debit
    /// refunded: `250ms`, `30s`, `5m`, `1h` (a bare number is seconds).
    #[arg(
        long,
        env = "OUTFLOW_TRANSFER_TIMEOUT",
        default_value = "60s",
        value_parser = parse_duration,
        global = true
    )]
    transfer_timeout: Duration,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Runs a scripted scenario and prints the read models (the default).
    Demo,
    /// Serves the HTTP API, `/metrics` and the live page.
    Serve {
        /// The address to listen on.
        #[arg(long, default_value = "127.0.0.1:8080")]
        bind: SocketAddr,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let default_filter = match cli.command {
        Some(Command::Serve { .. }) => "info",
        _ => "warn",
    };
    let provider = traces::init(default_filter)?;
    let settings = Settings {
        transfer_timeout: cli.transfer_timeout,
        ..Settings::default()
    };
    let result = open_and_run(&cli.database_url, settings, cli.command).await;
    traces::shutdown(provider);
    result
}

async fn open_and_run(
    url: &str,
    settings: Settings,
    command: Option<Command>,
) -> anyhow::Result<()> {
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let store = PostgresStore::connect(url)
            .await
            .context("connecting to PostgreSQL")?;
        let result = run(store.clone(), settings, command).await;
        store.pool().close().await;
        result
    } else {
        let path = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
            .unwrap_or(url);
        let store = SqliteStore::open(path)
            .await
            .with_context(|| format!("opening {path}"))?;
        let result = run(store.clone(), settings, command).await;
        // Leaves one file: the last connection folds the WAL into it.
        store.close().await;
        result
    }
}

async fn run<S: AppStore>(
    store: S,
    settings: Settings,
    command: Option<Command>,
) -> anyhow::Result<()> {
    let app = Arc::new(
        App::with_settings(store, settings)
            .await
            .context("starting the application")?,
    );
    match command.unwrap_or(Command::Demo) {
        Command::Demo => demo::run(app).await,
        Command::Serve { bind } => serve::run(app, bind).await,
    }
}

/// A duration as `250ms`, `30s`, `5m` or `1h`; a bare number is seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (say 250ms, 30s, 5m or 1h)"))?;
    let seconds = match unit.trim() {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        other => return Err(format!("unknown unit `{other}` (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(seconds)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("`{text}` is not a positive duration"))
}
