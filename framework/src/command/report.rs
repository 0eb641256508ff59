//! What a command's run reports: its span's outcome and event count, the
//! `outflow_commands_total`, `outflow_command_seconds` and
//! `outflow_command_conflicts_total` metrics, and a log line whose level
//! says whether someone should look (a refusal or a lost race is routine; a
//! failure is not).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use cqrs_es::Aggregate;

use super::context::Committed;
use crate::error::{error_chain, CommandError, ErrorKind};

/// Commands run in this process, and those that lost a race: what the
/// console plots as commands/s and conflicts/s.
static COMMANDS: AtomicU64 = AtomicU64::new(0);
static CONFLICTS: AtomicU64 = AtomicU64::new(0);

/// `(commands run, conflicts)` in this process so far.
#[cfg(feature = "admin")]
pub(crate) fn command_counts() -> (u64, u64) {
    (
        COMMANDS.load(Ordering::Relaxed),
        CONFLICTS.load(Ordering::Relaxed),
    )
}

/// Reports the end of one command run under `span`, started at `started`.
pub(super) fn report<A: Aggregate>(
    span: &tracing::Span,
    started: Instant,
    result: &Result<Committed<A>, CommandError<A::Error>>,
) {
    let outcome = match result {
        Ok(committed) if committed.repeated => "repeated",
        Ok(_) => "committed",
        Err(CommandError::Rejected(_) | CommandError::Refused(_)) => "rejected",
        Err(error) if error.is_conflict() => "conflict",
        Err(_) => "failed",
    };
    span.record("outcome", outcome);
    COMMANDS.fetch_add(1, Ordering::Relaxed);
    if let Ok(committed) = result {
        span.record("events", committed.events.len());
    }
    metrics::counter!("outflow_commands_total", "aggregate_type" => A::TYPE, "outcome" => outcome)
        .increment(1);
    metrics::histogram!("outflow_command_seconds", "aggregate_type" => A::TYPE)
        .record(started.elapsed().as_secs_f64());
    if let Err(error) = result {
        match error {
            CommandError::Rejected(_) | CommandError::Refused(_) => {
                tracing::debug!(parent: span, error = %error_chain(error), "command rejected");
            }
            // An inline handler that refused the data (a unique
            // address taken, say) is a business outcome like a
            // rejection, not a failure to look at.
            CommandError::Inline { error: handler, .. }
                if handler.declared_kind() == Some(ErrorKind::Data) =>
            {
                tracing::debug!(parent: span, error = %error_chain(error), "command refused by an inline handler");
            }
            _ if error.is_conflict() => {
                CONFLICTS.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("outflow_command_conflicts_total", "aggregate_type" => A::TYPE)
                    .increment(1);
                tracing::debug!(parent: span, error = %error_chain(error), "command lost a concurrency race");
            }
            _ => {
                tracing::warn!(parent: span, error = %error_chain(error), "command failed");
            }
        }
    }
}
