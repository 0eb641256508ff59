//! `projections …`: the operator's commands, run against the same database
//! as a serving process (which may be running: leases keep them apart).

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use example_accounts::app::{self, App, AppStore};
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
    loop {
        let now = *progress.borrow_and_update();
        bar.set_position(now.done.min(total));
        if now.is_complete() {
            break;
        }
        if progress.changed().await.is_err() {
            break;
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
