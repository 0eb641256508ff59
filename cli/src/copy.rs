//! `outflow copy`: the log of one store into another, resumable from a
//! state file that records the last source event copied after each batch.
//! The state file is written after the target committed the batch, so a
//! kill between the two repeats at most one batch, which the copy finds in
//! the target and skips.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use outflow::copy::{CopyError, CopyProgress, CopyReport, LogCopy};
use outflow::{CancellationToken, Checkpoint};
use serde_json::json;

use crate::store::{with_store, Access, Location, Store, StoreOptions};
use crate::Output;

/// `outflow copy` arguments.
#[derive(Debug, clap::Args)]
pub struct CopyArgs {
    /// The store to copy from (read only: nothing is created or migrated).
    #[arg(long)]
    pub from: String,
    /// The store to copy into (its tables or streams are created if
    /// missing).
    #[arg(long)]
    pub to: String,
    /// Where the copy keeps its place (default: a file in the working
    /// directory named after the two stores). Run the same command again to
    /// resume after a kill.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// Events read and appended at a time.
    #[arg(long, default_value_t = outflow::copy::DEFAULT_BATCH)]
    pub batch: usize,
    /// Once caught up, keep following the source until Ctrl-C (SIGINT) or
    /// SIGTERM, then verify: for a cut-over with little downtime.
    #[arg(long)]
    pub follow: bool,
    /// Skip the count and checksum of both logs at the end.
    #[arg(long)]
    pub no_verify: bool,
}

/// What the state file holds.
fn state_json(from: &str, to: &str, progress: &CopyProgress) -> serde_json::Value {
    let checkpoints: Vec<_> = progress
        .checkpoints
        .iter()
        .map(|c| json!({"transaction_id": c.transaction_id, "position": c.position}))
        .collect();
    json!({
        "from": from,
        "to": to,
        "checkpoints": checkpoints,
        "copied": progress.copied,
    })
}

/// A store as a copy's state names it: its URL without a password, and
/// the options that say which log in it.
fn identity(location: &Location, options: &StoreOptions) -> String {
    match location {
        Location::Nats(_) => format!(
            "{} prefix {} partitions {}",
            location.shown(),
            options.nats_prefix,
            options.nats_partitions
        ),
        _ => format!("{} table {}", location.shown(), options.events_table),
    }
}

/// The default state file: `outflow-copy-<hash of both stores>.json`.
fn default_state(from: &str, to: &str) -> PathBuf {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in format!("{from}\n{to}").bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    PathBuf::from(format!("outflow-copy-{hash:016x}.json"))
}

/// Reads where a previous run stopped, if it did: one checkpoint per
/// source partition.
fn resume_point(path: &Path, from: &str, to: &str) -> anyhow::Result<Option<Vec<Checkpoint>>> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let not_state = || format!("{} is not a copy's state file", path.display());
    let state: serde_json::Value = serde_json::from_str(&text).with_context(not_state)?;
    let named = |key: &str| state.get(key).and_then(serde_json::Value::as_str);
    if named("from") != Some(from) || named("to") != Some(to) {
        bail!(
            "{} is the state of another copy (from {} to {}): give this copy its own --state",
            path.display(),
            named("from").unwrap_or("?"),
            named("to").unwrap_or("?")
        );
    }
    let list = state
        .get("checkpoints")
        .and_then(serde_json::Value::as_array)
        .with_context(not_state)?;
    let mut checkpoints = Vec::with_capacity(list.len());
    for checkpoint in list {
        let field = |name: &str| {
            checkpoint
                .get(name)
                .and_then(serde_json::Value::as_u64)
                .with_context(not_state)
        };
        checkpoints.push(Checkpoint {
            transaction_id: field("transaction_id")?,
            position: field("position")?,
        });
    }
    Ok(Some(checkpoints))
}

/// Writes the state file whole or not at all (a new file renamed over it).
fn keep(path: &Path, state: &serde_json::Value) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, state.to_string())?;
    std::fs::rename(&tmp, path)
}

/// Runs `outflow copy`.
pub async fn run(args: CopyArgs, options: &StoreOptions, output: Output) -> anyhow::Result<()> {
    let from_location = Location::parse(&args.from)?;
    let to_location = Location::parse(&args.to)?;
    if from_location == to_location {
        bail!("--from and --to name the same store");
    }
    let (from_id, to_id) = (
        identity(&from_location, options),
        identity(&to_location, options),
    );
    let state_path = args
        .state
        .clone()
        .unwrap_or_else(|| default_state(&from_id, &to_id));
    let resume = resume_point(&state_path, &from_id, &to_id)?;
    let from = Store::open(&args.from, options, Access::Existing).await?;
    let to = Store::open(&args.to, options, Access::Create).await?;

    let stop = CancellationToken::new();
    if args.follow {
        let stop = stop.clone();
        tokio::spawn(async move {
            crate::shutdown_signal().await;
            stop.cancel();
        });
    }
    let bar = match output {
        Output::Text => Some(crate::progress_bar("copying")),
        Output::Json => None,
    };
    let mut write_error: Option<std::io::Error> = None;
    let on_progress = |progress: &CopyProgress| {
        if write_error.is_none() {
            if let Err(e) = keep(&state_path, &state_json(&from_id, &to_id, progress)) {
                write_error = Some(e);
            }
        }
        if let Some(bar) = &bar {
            bar.set_length(progress.total.max(progress.copied + progress.already_there));
            bar.set_position(progress.copied + progress.already_there);
            if progress.live {
                bar.set_message("following the source (Ctrl-C to stop and verify)");
            }
        }
    };
    let result = with_store!(&from, f => {
        with_store!(&to, t => {
            let mut copy = LogCopy::new(f, t)
                .batch(args.batch)
                .verify(!args.no_verify);
            if let Some(checkpoints) = resume.clone() {
                copy = copy.resume_after(checkpoints);
            }
            if args.follow {
                copy = copy.follow(stop.clone());
            }
            copy.run(on_progress).await
        })
    });
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    if let Some(e) = write_error {
        return Err(e).with_context(|| format!("writing the state file {}", state_path.display()));
    }
    let report = result.map_err(|e| match e {
        CopyError::Diverged { .. } | CopyError::Mismatch { .. } => {
            anyhow::Error::new(crate::Refused(e.to_string()))
        }
        other => anyhow::Error::new(other),
    })?;
    print_report(&report, resume, &state_path, output);
    Ok(())
}

fn print_report(
    report: &CopyReport,
    resumed: Option<Vec<Checkpoint>>,
    state: &Path,
    output: Output,
) {
    match output {
        Output::Json => println!(
            "{}",
            json!({
                "copied": report.copied,
                "already_there": report.already_there,
                "resumed": resumed.is_some(),
                "last_positions": report.checkpoints.iter().map(|c| c.position).collect::<Vec<_>>(),
                "source": {"events": report.source.events, "checksum": format!("{:016x}", report.source.checksum)},
                "target": {"events": report.target.events, "checksum": format!("{:016x}", report.target.checksum)},
                "state": state.display().to_string(),
            })
        ),
        Output::Text => {
            if let Some(after) = resumed {
                let positions: Vec<String> = after.iter().map(|c| c.position.to_string()).collect();
                println!("resumed after position {}", positions.join(", "));
            }
            println!(
                "copied {} events ({} were there already)",
                report.copied, report.already_there
            );
            if report.source.events > 0 || report.target.events > 0 {
                println!(
                    "verified: source {}, target {}",
                    report.source, report.target
                );
            }
            println!("state kept in {}", state.display());
        }
    }
}
