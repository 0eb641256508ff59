//! The operations chapter (`docs/src/operations.md`): a health report from
//! the runner's status, a rebuild with its progress, and the dead letters.
//! `tests/operations.rs` runs it on SQLite.

// ANCHOR: health
use std::time::Duration;

use outflow::runner::ProjectionRunner;
use outflow::store::projections::ProjectionState;
use outflow::store::ProjectionStore;

/// One line per projection unit, and whether any needs an operator: stopped,
/// parked events, or more than `max_lag` behind.
pub async fn health<S: ProjectionStore + Clone>(
    runner: &ProjectionRunner<S>,
    max_lag: Duration,
) -> Result<(Vec<String>, bool), outflow::StoreError> {
    let mut lines = Vec::new();
    let mut alarm = false;
    for unit in runner.status().await? {
        let mut line = format!(
            "{}[{}/{}] {:?} on {}: {} events / {:?} behind, {} parked",
            unit.projection,
            unit.partition,
            unit.partitions,
            unit.state,
            unit.owner.as_deref().unwrap_or("no node"),
            unit.lag_events,
            unit.lag,
            unit.parked,
        );
        if let Some(error) = &unit.last_error {
            line.push_str(&format!(", last error: {error}"));
        }
        // PostgreSQL only: an open transaction that holds every reader back.
        if let Some(holder) = &unit.held_back_by {
            line.push_str(&format!(
                ", held back by pid {} open for {:?}",
                holder.pid, holder.age
            ));
        }
        alarm |= unit.state == ProjectionState::Stopped || unit.parked > 0 || unit.lag > max_lag;
        lines.push(line);
    }
    Ok((lines, alarm))
}
// ANCHOR_END: health

// ANCHOR: rebuild
/// Empties a projection's read model and replays the log into it, printing
/// progress; the projection's units on every node take part.
pub async fn rebuild<S: ProjectionStore + Clone>(
    runner: &ProjectionRunner<S>,
    name: &str,
) -> Result<u64, outflow::StoreError> {
    let mut progress = runner.rebuild(name).await?;
    let mut done = progress.borrow().done;
    // The channel closes once the replay has caught up.
    while progress.changed().await.is_ok() {
        let now = *progress.borrow();
        println!("{name}: {} of {} events", now.done, now.total);
        done = now.done;
    }
    Ok(done)
}
// ANCHOR_END: rebuild

// ANCHOR: dead_letters
/// After fixing what made events fail: retries each parked event of a
/// projection; one that fails again is parked again.
pub async fn retry_parked<S: ProjectionStore + Clone>(
    runner: &ProjectionRunner<S>,
    name: &str,
) -> Result<usize, Box<dyn std::error::Error>> {
    let parked = runner.dead_letters(name).await?;
    for letter in &parked {
        println!(
            "retrying {} ({} at {}): {}",
            letter.event_id, letter.event, letter.checkpoint, letter.error
        );
        runner.retry_dead_letter(name, letter.id).await?;
    }
    Ok(parked.len())
}
// ANCHOR_END: dead_letters
