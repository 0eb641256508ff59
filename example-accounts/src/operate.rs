//! `projections …`: the operator's commands, run against the same database
//! as a serving process (which may be running: leases keep them apart).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use example_accounts::app::{self, App, AppStore};
use outflow::store::projections::ProjectionState;
use outflow::CancellationToken;

pub async fn status<S: AppStore>(app: &App<S>) -> anyhow::Result<()> {
    println!(
        "{:<18} {:>4} {:<10} {:>9} {:>6} {:>7}  last error",
        "projection", "part", "state", "position", "lag", "parked"
    );
    for s in app.runner.status().await? {
        println!(
            "{:<18} {:>4} {:<10} {:>9} {:>6} {:>7}  {}",
            s.projection,
            s.partition,
            s.state.to_string(),
            s.checkpoint.position,
            s.lag_events,
            s.parked,
            s.last_error.as_deref().unwrap_or("-")
        );
        if let Some(holder) = s.held_back_by {
            println!(
                "    held back by transaction of pid {} ({}), open {:?}",
                holder.pid,
                holder.state.as_deref().unwrap_or("?"),
                holder.age
            );
        }
    }
    Ok(())
}

/// Resets one projection and replays the log into it, showing progress; the
/// projections run in this process until the replay is done.
pub async fn rebuild<S: AppStore>(app: &Arc<App<S>>, name: &str) -> anyhow::Result<()> {
    if !app::PROJECTIONS.contains(&name) {
        bail!(
            "no projection `{name}`; the projections are {}",
            app::PROJECTIONS.join(", ")
        );
    }
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let runner = app.runner.clone();
        let shutdown = shutdown.clone();
        async move { runner.run(shutdown).await }
    });
    let mut progress = app.runner.rebuild(name).await?;
    let total = progress.borrow().total;
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} {msg} [{bar:40}] {pos}/{len} events ({per_sec}, {eta} left)",
        )
        .context("the progress bar's template")?
        .progress_chars("=> "),
    );
    bar.set_message(format!("rebuilding {name}"));
    // Progress, or — when there is none for a while — why not: a unit
    // stopped on an error ends the rebuild at once; one retrying on an
    // error is shown, and ends it after STALLED without progress.
    const LOOK: Duration = Duration::from_secs(5);
    const STALLED: Duration = Duration::from_secs(120);
    let mut last_moved = tokio::time::Instant::now();
    loop {
        let now = *progress.borrow_and_update();
        bar.set_position(now.done.min(total));
        if now.is_complete() {
            break;
        }
        tokio::select! {
            changed = progress.changed() => {
                if changed.is_err() {
                    break;
                }
                last_moved = tokio::time::Instant::now();
            }
            _ = tokio::time::sleep(LOOK) => {
                let statuses = app.runner.status().await?;
                let units: Vec<_> = statuses.iter().filter(|s| s.projection == name).collect();
                if let Some(stopped) = units.iter().find(|s| s.state == ProjectionState::Stopped) {
                    bar.abandon_with_message(format!("rebuilding {name} stopped"));
                    bail!(
                        "the rebuild of {name} stopped on an error: {} (fix it, then `projections restart {name}`)",
                        stopped.last_error.as_deref().unwrap_or("no error recorded")
                    );
                }
                let error = units.iter().find_map(|s| s.last_error.clone());
                if let Some(error) = &error {
                    bar.set_message(format!("rebuilding {name}, retrying: {error}"));
                }
                if last_moved.elapsed() >= STALLED {
                    bar.abandon_with_message(format!("rebuilding {name} made no progress"));
                    bail!(
                        "the rebuild of {name} made no progress for {} s: {}",
                        STALLED.as_secs(),
                        error.unwrap_or_else(|| format!("its units: {units:?}"))
                    );
                }
            }
        }
    }
    let head = app.store.head().await?;
    app.runner
        .wait_for(head, &[name], Duration::from_secs(60))
        .await
        .with_context(|| format!("waiting for {name} to catch up"))?;
    bar.finish_with_message(format!("rebuilt {name}"));
    shutdown.cancel();
    running.await??;
    Ok(())
}

pub async fn dead_letters<S: AppStore>(app: &App<S>) -> anyhow::Result<()> {
    let letters = app.dead_letters().await?;
    for (name, letter) in &letters {
        println!(
            "#{:<4} {:<16} {} {} `{}` at position {} after {} attempts: {}",
            letter.id,
            name,
            letter.event.event_type,
            letter.event.aggregate_type,
            letter.event.aggregate_id,
            letter.checkpoint.position,
            letter.attempts,
            letter.error
        );
    }
    if letters.is_empty() {
        println!("no parked events");
    }
    Ok(())
}

pub async fn retry<S: AppStore>(app: &App<S>, id: u64) -> anyhow::Result<()> {
    match app
        .retry_dead_letter(id)
        .await
        .with_context(|| format!("retrying #{id}"))?
    {
        Some(name) => {
            println!("dead letter #{id} of {name} handled; it is no longer parked");
            Ok(())
        }
        None => bail!("no dead letter #{id}"),
    }
}
