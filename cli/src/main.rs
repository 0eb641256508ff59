//! `outflow`: operate an Outflow event store from a shell, against its URL
//! (`sqlite://FILE`, `postgres://…`, `nats://…`), without the application's
//! code: see the projections' state, pause and resume them, ask the running
//! nodes to rebuild them or retry dead letters, list and discard dead
//! letters, browse and follow the log, see and act on durable timers, apply
//! migrations, and copy the log from one backend to another.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

mod copy;
mod events;
mod store;
mod timers;
mod units;

/// Operate an Outflow event store from a shell.
#[derive(Debug, Parser)]
#[command(
    name = "outflow",
    version,
    after_help = "STORES: sqlite://FILE, postgres://USER:PASSWORD@HOST:PORT/DB, nats://HOST:PORT\n\
                  (JetStream stores keep their projections' checkpoints in the read models' \
                  SQL database: give that URL to status, pause, resume, dead-letters, discard).\n\n\
                  EXIT CODES: 0 done; 1 failed (the message says why: a retried event that \
                  failed again, no node running the projection, …); 2 bad arguments; \
                  3 refused: a copy whose target differs from its source.\n\n\
                  EXAMPLES:\n  \
                  outflow status sqlite://bank.db\n  \
                  outflow events sqlite://bank.db --stream account/a-1 --json\n  \
                  outflow events postgres://app@db/bank --follow\n  \
                  outflow copy --from sqlite://bank.db --to postgres://app@db/bank\n  \
                  outflow pause postgres://app@db/bank balances\n  \
                  outflow rebuild postgres://app@db/bank balances\n  \
                  outflow retry postgres://app@db/bank balances --all\n  \
                  outflow timers postgres://app@db/bank --state refused"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// JSON output (one document, or JSON lines for lists) for scripts.
    #[arg(long, global = true)]
    json: bool,
    #[command(flatten)]
    options: store::StoreOptions,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every projection's units: state, checkpoint, events behind, parked,
    /// owner, last error.
    Status {
        /// The store (PostgreSQL or SQLite).
        url: String,
    },
    /// Pauses a projection on every node, and waits until the nodes holding
    /// it have paused.
    Pause {
        /// The store (PostgreSQL or SQLite).
        url: String,
        /// The projection.
        projection: String,
        /// How long to wait for the nodes holding it to follow (they see
        /// the flag at their next heartbeat).
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        wait: Duration,
    },
    /// Resumes a paused projection.
    Resume {
        /// The store (PostgreSQL or SQLite).
        url: String,
        /// The projection.
        projection: String,
        /// How long to wait for the nodes holding it to follow (they see
        /// the flag at their next heartbeat).
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        wait: Duration,
    },
    /// Asks the nodes running a projection to rebuild it (reset, replay the
    /// log), and shows the replay until it caught up.
    Rebuild {
        /// The store (PostgreSQL or SQLite).
        url: String,
        /// The projection.
        projection: String,
        /// How long to wait for a node to start it.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        wait: Duration,
        /// Return once the rebuild started.
        #[arg(long)]
        detach: bool,
    },
    /// Moves a projection to a checkpoint, its read model kept: the running
    /// nodes handle the events after it (again, or never for those skipped)
    /// from their next heartbeat. For idempotent projections and effects,
    /// or a read model repaired by hand; `rebuild` starts over instead.
    Reset {
        /// The store (PostgreSQL or SQLite).
        url: String,
        /// The projection.
        projection: String,
        /// The checkpoint, TRANSACTION.POSITION (`outflow events --json`
        /// shows each event's), or `start`.
        #[arg(long)]
        to: String,
    },
    /// The durable timers: counts (pending, overdue, late, fired, refused,
    /// cancelled, failed), the node firing them, and the timers in one state
    /// by due time; or an operator's retry of a refused or failed timer, or
    /// cancel of a pending one.
    Timers {
        /// The store (PostgreSQL or SQLite).
        url: String,
        /// Which timers to list: pending, fired, refused, cancelled, failed
        /// or all.
        #[arg(long, default_value = "pending")]
        state: String,
        /// Only keys starting with this.
        #[arg(long)]
        prefix: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Fires this refused or failed timer again, now.
        #[arg(long, conflicts_with = "cancel")]
        retry: Option<String>,
        /// Cancels this pending timer.
        #[arg(long)]
        cancel: Option<String>,
    },
    /// Asks the nodes running a projection to retry dead letters (by id, or
    /// --all), and says which were handled and which failed again.
    Retry {
        /// The store (PostgreSQL or SQLite).
        url: String,
        /// The projection.
        projection: String,
        /// The dead letters' ids (see `dead-letters`).
        ids: Vec<u64>,
        /// Every dead letter of the projection.
        #[arg(long, conflicts_with = "ids")]
        all: bool,
        /// How long to wait for the nodes to retry them.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        wait: Duration,
    },
    /// A projection's dead letters: the events it parked, with their errors.
    DeadLetters {
        /// The store (PostgreSQL or SQLite).
        url: String,
        /// The projection.
        projection: String,
    },
    /// Discards a dead letter (its event stays skipped).
    Discard {
        /// The store (PostgreSQL or SQLite).
        url: String,
        /// The dead letter's id (see `dead-letters`).
        id: u64,
    },
    /// Browses the log, a stream or a correlation; `--follow` tails it.
    Events(events::EventsArgs),
    /// Applies the store's migrations (creates its tables or streams; turns
    /// a postgres-es database into an Outflow one in place).
    Migrate {
        /// The store.
        url: String,
    },
    /// Copies the log into another store: resumable after a kill (run the
    /// same command again), idempotent, verified by count and checksum.
    Copy(copy::CopyArgs),
}

/// `30s`, `500ms`, `2m`, or seconds alone.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let value: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (30s, 500ms, 2m)"))?;
    let seconds = match unit {
        "ms" => value / 1000.0,
        "s" => value,
        "m" => value * 60.0,
        _ => return Err(format!("`{text}`: the unit is ms, s or m")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("`{text}`: {e}"))
}

/// How results are printed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// For people.
    Text,
    /// For scripts.
    Json,
}

/// A refusal that is not a failure of the tool: exit code 3.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// Waits for Ctrl-C (SIGINT) or SIGTERM.
pub async fn shutdown_signal() {
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

/// A progress bar on standard error (hidden when it is not a terminal).
pub fn progress_bar(what: &str) -> indicatif::ProgressBar {
    let bar =
        indicatif::ProgressBar::with_draw_target(None, indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{msg} [{bar:40}] {pos}/{len} events ({per_sec}, {eta} left)",
    ) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_message(what.to_owned());
    bar
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let output = if cli.json { Output::Json } else { Output::Text };
    let options = &cli.options;
    match cli.command {
        Command::Status { url } => units::status(&url, options, output).await,
        Command::Pause {
            url,
            projection,
            wait,
        } => units::set_paused(&url, &projection, true, wait, options).await,
        Command::Resume {
            url,
            projection,
            wait,
        } => units::set_paused(&url, &projection, false, wait, options).await,
        Command::DeadLetters { url, projection } => {
            units::dead_letters(&url, &projection, options, output).await
        }
        Command::Discard { url, id } => units::discard(&url, id, options).await,
        Command::Rebuild {
            url,
            projection,
            wait,
            detach,
        } => units::rebuild(&url, &projection, wait, detach, options, output).await,
        Command::Reset {
            url,
            projection,
            to,
        } => units::reset(&url, &projection, &to, options, output).await,
        Command::Timers {
            url,
            state,
            prefix,
            limit,
            retry,
            cancel,
        } => {
            let action = match (retry, cancel) {
                (Some(key), _) => timers::Action::Retry(key),
                (None, Some(key)) => timers::Action::Cancel(key),
                (None, None) => timers::Action::List {
                    state,
                    prefix,
                    limit,
                },
            };
            timers::run(&url, action, options, output).await
        }
        Command::Retry {
            url,
            projection,
            ids,
            all,
            wait,
        } => units::retry(&url, &projection, &ids, all, wait, options, output).await,
        Command::Events(args) => events::run(args, options, output).await,
        Command::Migrate { url } => {
            let shown = store::Location::parse(&url)?.shown();
            store::Store::open(&url, options, store::Access::Create).await?;
            println!("{shown}: migrations applied");
            Ok(())
        }
        Command::Copy(args) => copy::run(args, options, output).await,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("outflow: {}", chain(&error));
            if error.downcast_ref::<Refused>().is_some() {
                ExitCode::from(3)
            } else {
                ExitCode::from(1)
            }
        }
    }
}

/// An error with its causes, each once (a cause whose text the previous
/// one already ends with is not repeated).
fn chain(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let part = cause.to_string();
        if text.ends_with(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_read_as_an_operator_writes_them() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("5"), Ok(Duration::from_secs(5)));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("soon").is_err());
    }
}
