//! `outflow timers`: the durable timers as the store records them, and an
//! operator's retry or cancel of one.

use anyhow::bail;
use outflow::timer::{TimerQuery, TimerRecord, TimerState, TimerStore, Timers};
use serde_json::json;

use crate::store::StoreOptions;
use crate::units::{units_store, with_units_store, UnitsStore};
use crate::Output;

/// What `outflow timers` was asked.
#[derive(Debug)]
pub enum Action {
    /// The counts and the timers in one state.
    List {
        /// `pending`, `fired`, `refused`, `cancelled`, `failed` or `all`.
        state: String,
        /// Only keys starting with this.
        prefix: Option<String>,
        /// At most this many.
        limit: usize,
    },
    /// Fire a refused or failed timer again.
    Retry(String),
    /// Cancel a pending timer.
    Cancel(String),
}

pub async fn run(
    url: &str,
    action: Action,
    options: &StoreOptions,
    output: Output,
) -> anyhow::Result<()> {
    let store = units_store(url, options).await?;
    with_units_store!(&store, s => act(s, action, output).await)
}

async fn act<S: TimerStore>(store: &S, action: Action, output: Output) -> anyhow::Result<()> {
    let timers = Timers::new(store).await?;
    match action {
        Action::Retry(key) => {
            if !timers.retry(&key).await? {
                bail!("no refused or failed timer has the key `{key}`");
            }
            match output {
                Output::Json => println!("{}", json!({"key": key, "state": "pending"})),
                Output::Text => println!(
                    "timer `{key}` is pending again, due now (the node holding the timers' \
                     lease fires it at its next look)"
                ),
            }
        }
        Action::Cancel(key) => {
            if !timers.cancel_alone(&key).await? {
                bail!("no pending timer has the key `{key}`");
            }
            match output {
                Output::Json => println!("{}", json!({"key": key, "state": "cancelled"})),
                Output::Text => println!("timer `{key}` cancelled"),
            }
        }
        Action::List {
            state,
            prefix,
            limit,
        } => {
            let state = match state.as_str() {
                "all" => None,
                name => Some(TimerState::parse(name).ok_or_else(|| {
                    anyhow::anyhow!(
                        "--state is pending, fired, refused, cancelled, failed or all, not `{name}`"
                    )
                })?),
            };
            let status = timers.status().await?;
            let listed = timers
                .list(&TimerQuery {
                    state,
                    key_prefix: prefix,
                    limit: limit.clamp(1, 10_000),
                })
                .await?;
            let c = &status.counts;
            match output {
                Output::Json => println!(
                    "{}",
                    json!({
                        "table": status.table,
                        "scheduler": status.scheduler,
                        "last_error": status.last_error,
                        "counts": {
                            "pending": c.pending, "overdue": c.overdue, "late": c.late,
                            "oldest_overdue_seconds": c.oldest_overdue.map(|d| d.as_secs_f64()),
                            "next_due": c.next_due.map(|t| t.to_rfc3339()),
                            "fired": c.fired, "refused": c.refused,
                            "cancelled": c.cancelled, "failed": c.failed,
                        },
                        "timers": listed.iter().map(timer_json).collect::<Vec<_>>(),
                    })
                ),
                Output::Text => {
                    println!(
                        "{}: {} pending ({} overdue, {} late), {} fired, {} refused, {} failed, \
                         {} cancelled; next due {}",
                        status.table,
                        c.pending,
                        c.overdue,
                        c.late,
                        c.fired,
                        c.refused,
                        c.failed,
                        c.cancelled,
                        c.next_due
                            .map_or_else(|| "none".to_owned(), |t| t.to_rfc3339())
                    );
                    println!(
                        "fired by: {}{}",
                        status
                            .scheduler
                            .as_deref()
                            .unwrap_or("no node (none holds the lease)"),
                        status
                            .last_error
                            .as_deref()
                            .map(|e| format!(" — last error: {e}"))
                            .unwrap_or_default()
                    );
                    if listed.is_empty() {
                        println!("no timers in that state");
                    }
                    for t in &listed {
                        println!(
                            "{:<40} {:<9} due {}  {} {}  attempts {}{}",
                            t.key,
                            t.state.as_str(),
                            t.due_at.to_rfc3339(),
                            t.target,
                            t.target_id,
                            t.attempts,
                            t.last_error
                                .as_deref()
                                .map(|e| format!("  ({e})"))
                                .unwrap_or_default()
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

fn timer_json(t: &TimerRecord) -> serde_json::Value {
    json!({
        "key": t.key,
        "state": t.state,
        "due_at": t.due_at.to_rfc3339(),
        "target": t.target,
        "target_id": t.target_id,
        "attempts": t.attempts,
        "last_error": t.last_error,
        "command_id": t.command_id,
        "scheduled_at": t.scheduled_at.to_rfc3339(),
        "finished_at": t.finished_at.map(|f| f.to_rfc3339()),
    })
}
