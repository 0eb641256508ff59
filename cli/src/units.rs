//! `outflow status`, `pause`, `resume`, `rebuild`, `retry`, `dead-letters`,
//! `discard`: the projections' units as the store records them, and the
//! operator's actions. Those that need the projection's code (a rebuild, a
//! retry) are asked of the running nodes through the store; the nodes see
//! them, and a pause or a resume, at their next heartbeat.

use anyhow::bail;
use std::time::Duration;

use outflow::store::projections::{Checkpoints, DeadLetters, ProjectionState, UnitRecord};
use outflow::{Checkpoint, EventLog, LogFilter, PostgresStore, SqliteStore};
use serde_json::json;

use crate::store::{Access, Store, StoreOptions};

/// After every event (what a count up to the end of the log needs).
const END: Checkpoint = Checkpoint::new(i64::MAX as u64, i64::MAX as u64);
use crate::Output;

/// A store that keeps projections' units: PostgreSQL or SQLite.
pub(crate) async fn units_store(url: &str, options: &StoreOptions) -> anyhow::Result<UnitsStore> {
    match Store::open(url, options, Access::Existing).await? {
        Store::Postgres(s) => Ok(UnitsStore::Postgres(s)),
        Store::Sqlite(s) => Ok(UnitsStore::Sqlite(s)),
        Store::JetStream(_) => bail!(
            "a JetStream store keeps its projections' checkpoints in the read models' SQL \
             database: give that database's URL"
        ),
    }
}

pub(crate) enum UnitsStore {
    Postgres(PostgresStore),
    Sqlite(SqliteStore),
}

macro_rules! with_units_store {
    ($store:expr, $s:ident => $body:expr) => {
        match $store {
            UnitsStore::Postgres($s) => $body,
            UnitsStore::Sqlite($s) => $body,
        }
    };
}

/// `outflow status`: every unit, with the events after its checkpoint.
pub async fn status(url: &str, options: &StoreOptions, output: Output) -> anyhow::Result<()> {
    let store = units_store(url, options).await?;
    with_units_store!(&store, s => print_status(s, output).await)
}

async fn print_status<S: Checkpoints + DeadLetters + EventLog>(
    store: &S,
    output: Output,
) -> anyhow::Result<()> {
    let units = store.units(None).await?;
    let head = store.head().await?;
    // Parked events per (projection, partition): one read per projection,
    // not one per unit.
    let mut parked_in: std::collections::HashMap<(String, u32), usize> =
        std::collections::HashMap::new();
    let projections: std::collections::BTreeSet<&str> =
        units.iter().map(|u| u.unit.projection.as_str()).collect();
    for projection in projections {
        for letter in store.dead_letters(projection).await? {
            *parked_in
                .entry((projection.to_owned(), letter.unit.partition))
                .or_default() += 1;
        }
    }
    let mut rows = Vec::with_capacity(units.len());
    for unit in &units {
        // The outbox relay's and the timer scheduler's units hold a lease,
        // not a place in the log: nothing is behind.
        let behind = if is_log_reader(&unit.unit.projection) {
            Some(
                store
                    .count_events(&LogFilter::all(), unit.checkpoint, END, 10_000_000)
                    .await?,
            )
        } else {
            None
        };
        let parked = parked_in
            .get(&(unit.unit.projection.clone(), unit.unit.partition))
            .copied()
            .unwrap_or(0);
        rows.push((unit, behind, parked));
    }
    match output {
        Output::Json => {
            let units: Vec<_> = rows
                .iter()
                .map(|(u, behind, parked)| unit_json(u, *behind, *parked))
                .collect();
            println!("{}", json!({"head": head.position, "units": units}));
        }
        Output::Text => {
            if rows.is_empty() {
                println!("no projections registered (no node has run one yet)");
                return Ok(());
            }
            println!(
                "{:<20} {:>4} {:<10} {:>6} {:>9} {:>8} {:>6} {:<16}  last error",
                "projection", "part", "state", "paused", "position", "behind", "parked", "owner"
            );
            for (u, behind, parked) in &rows {
                let error = match (&u.last_error, u.error_kind) {
                    (Some(e), Some(kind)) => format!("{kind}: {e}"),
                    (Some(e), None) => e.clone(),
                    (None, _) => "-".to_owned(),
                };
                println!(
                    "{:<20} {:>4} {:<10} {:>6} {:>9} {:>8} {:>6} {:<16}  {}",
                    u.unit.projection,
                    u.unit.partition,
                    u.state.to_string(),
                    if u.paused { "yes" } else { "no" },
                    u.checkpoint.position,
                    behind.map_or_else(|| "-".to_owned(), |b| b.to_string()),
                    parked,
                    match (&u.owner, u.lease_valid) {
                        (Some(owner), true) => owner.clone(),
                        (Some(owner), false) => format!("({owner}, lapsed)"),
                        (None, _) => "-".to_owned(),
                    },
                    error
                );
            }
            println!(
                "(behind: events of any type after the checkpoint; the projection may filter them. \
                 outbox:… and timers:… are the outbox relay's and the timer scheduler's leases: \
                 see `outflow timers` for the timers)"
            );
        }
    }
    Ok(())
}

/// Whether a unit reads the log (a projection's), rather than holding the
/// outbox relay's or the timer scheduler's lease.
fn is_log_reader(name: &str) -> bool {
    !(name.starts_with("outbox:") || name.starts_with("timers:"))
}

fn unit_json(u: &UnitRecord, behind: Option<u64>, parked: usize) -> serde_json::Value {
    json!({
        "projection": u.unit.projection,
        "partition": u.unit.partition,
        "partitions": u.partitions,
        "state": u.state.to_string(),
        "paused": u.paused,
        "checkpoint": {"transaction_id": u.checkpoint.transaction_id, "position": u.checkpoint.position},
        "events_behind": behind,
        "parked": parked,
        "owner": u.owner,
        "lease_valid": u.lease_valid,
        "epoch": u.epoch,
        "processed": u.processed,
        "rebuild_total": u.rebuild_total,
        "last_error": u.last_error,
        "error_kind": u.error_kind.map(|k| k.to_string()),
        "updated_at": u.updated_at.to_rfc3339(),
    })
}

/// `outflow pause` / `outflow resume`: sets the flag, then waits (up to
/// `wait`) until every unit a node holds says it paused (or no longer says
/// so): a node learns of the flag at its next heartbeat.
pub async fn set_paused(
    url: &str,
    projection: &str,
    paused: bool,
    wait: Duration,
    options: &StoreOptions,
) -> anyhow::Result<()> {
    let store = units_store(url, options).await?;
    let held = with_units_store!(&store, s => {
        known(s, projection).await?;
        s.set_paused(projection, paused).await?;
        settle(s, projection, paused, wait).await?
    });
    let done = if paused { "paused" } else { "resumed" };
    if held == 0 {
        println!(
            "{projection}: {done} (no node holds it now; a node that starts follows the flag)"
        );
    } else {
        println!("{projection}: {done} on the {held} unit(s) nodes hold");
    }
    Ok(())
}

/// Waits until each held unit's recorded state agrees with `paused`;
/// returns how many units nodes hold.
async fn settle<S: Checkpoints>(
    store: &S,
    projection: &str,
    paused: bool,
    wait: Duration,
) -> anyhow::Result<usize> {
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let units = store.units(Some(projection)).await?;
        let held: Vec<&UnitRecord> = units.iter().filter(|u| u.lease_valid).collect();
        let waiting: Vec<String> = held
            .iter()
            .filter(|u| (u.state == ProjectionState::Paused) != paused)
            .map(|u| {
                format!(
                    "partition {} on {}",
                    u.unit.partition,
                    u.owner.as_deref().unwrap_or("?")
                )
            })
            .collect();
        if waiting.is_empty() {
            return Ok(held.len());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!(
                "the flag is set, but after {wait:?} {} still {} (a node sees the flag at its \
                 next heartbeat: is it stuck in a long batch?)",
                waiting.join(", "),
                if paused { "runs" } else { "is paused" }
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Fails unless `projection` has units in the store.
/// `reset`: moves every unit of `projection` to the checkpoint `to`.
pub async fn reset(
    url: &str,
    projection: &str,
    to: &str,
    options: &StoreOptions,
    output: Output,
) -> anyhow::Result<()> {
    let to = checkpoint_of(to)?;
    let store = units_store(url, options).await?;
    with_units_store!(&store, s => reset_on(s, projection, to, output).await)
}

/// `TRANSACTION.POSITION`, or `start`.
fn checkpoint_of(text: &str) -> anyhow::Result<Checkpoint> {
    if text.trim().eq_ignore_ascii_case("start") {
        return Ok(Checkpoint::START);
    }
    match text.trim().split_once('.') {
        Some((tx, position)) => match (tx.parse(), position.parse()) {
            (Ok(tx), Ok(position)) => Ok(Checkpoint::new(tx, position)),
            _ => bail!("--to is TRANSACTION.POSITION (as `outflow events --json` shows) or `start`, not `{text}`"),
        },
        None => bail!("--to is TRANSACTION.POSITION (as `outflow events --json` shows) or `start`, not `{text}`"),
    }
}

async fn reset_on<S: Checkpoints + DeadLetters + EventLog>(
    store: &S,
    projection: &str,
    to: Checkpoint,
    output: Output,
) -> anyhow::Result<()> {
    known(store, projection).await?;
    let head = store.committed_head().await?;
    if to > head {
        bail!("checkpoint {to} is past the log's head {head}");
    }
    let left = store
        .count_events(&LogFilter::all(), to, END, i64::MAX as u64)
        .await?;
    let mut tx = store.begin().await?;
    store
        .reset_projection_to(&mut tx, projection, to, left)
        .await?;
    store.commit(tx).await?;
    store.signal_checkpoints();
    match output {
        Output::Json => println!(
            "{}",
            json!({
                "projection": projection,
                "to": format!("{}.{}", to.transaction_id, to.position),
                "events": left,
            })
        ),
        Output::Text => println!(
            "{projection}: reset to {to}; {left} events after it (the running nodes take it up at their next heartbeat)"
        ),
    }
    Ok(())
}

async fn known<S: Checkpoints>(store: &S, projection: &str) -> anyhow::Result<()> {
    if store.units(Some(projection)).await?.is_empty() {
        let names: std::collections::BTreeSet<String> = store
            .units(None)
            .await?
            .into_iter()
            .map(|u| u.unit.projection)
            .collect();
        bail!(
            "no projection `{projection}` in this store; it has {}",
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.into_iter().collect::<Vec<_>>().join(", ")
            }
        );
    }
    Ok(())
}

/// `outflow dead-letters`.
pub async fn dead_letters(
    url: &str,
    projection: &str,
    options: &StoreOptions,
    output: Output,
) -> anyhow::Result<()> {
    let store = units_store(url, options).await?;
    let letters = with_units_store!(&store, s => {
        known(s, projection).await?;
        s.dead_letters(projection).await?
    });
    match output {
        Output::Json => {
            for d in &letters {
                println!(
                    "{}",
                    json!({
                        "id": d.id,
                        "projection": d.unit.projection,
                        "partition": d.unit.partition,
                        "event_id": d.event_id,
                        "position": d.checkpoint.position,
                        "aggregate_type": d.event.aggregate_type,
                        "aggregate_id": d.event.aggregate_id,
                        "sequence": d.event.sequence,
                        "event_type": d.event.event_type,
                        "error": d.error,
                        "attempts": d.attempts,
                        "first_failed_at": d.first_failed_at.to_rfc3339(),
                        "last_failed_at": d.last_failed_at.to_rfc3339(),
                    })
                );
            }
        }
        Output::Text => {
            if letters.is_empty() {
                println!("{projection}: no dead letters");
            }
            for d in &letters {
                println!(
                    "#{} position {} {}/{} seq {} {} ({} attempts): {}",
                    d.id,
                    d.checkpoint.position,
                    d.event.aggregate_type,
                    d.event.aggregate_id,
                    d.event.sequence,
                    d.event.event_type,
                    d.attempts,
                    d.error
                );
            }
        }
    }
    Ok(())
}

/// `outflow discard`: drops a dead letter; its event stays skipped.
pub async fn discard(url: &str, id: u64, options: &StoreOptions) -> anyhow::Result<()> {
    let store = units_store(url, options).await?;
    let gone = with_units_store!(&store, s => s.discard_dead_letter(id).await?);
    if !gone {
        bail!("no dead letter #{id}");
    }
    println!("dead letter #{id} discarded");
    Ok(())
}

/// Fails unless a node holds a unit of `projection` now: what a request
/// that needs the projection's code waits for.
fn running_somewhere(units: &[UnitRecord], projection: &str, what: &str) -> anyhow::Result<()> {
    if units.iter().any(|u| u.lease_valid) {
        return Ok(());
    }
    bail!(
        "no node is running `{projection}` (no unit of it has a live lease): {what} needs the \
         projection's code; start the application, or do it from there"
    )
}

/// `outflow rebuild`: asks the nodes running the projection to rebuild it,
/// waits until one started, then shows the replay until it caught up (or
/// returns at once with `detach`).
pub async fn rebuild(
    url: &str,
    projection: &str,
    wait: Duration,
    detach: bool,
    options: &StoreOptions,
    output: Output,
) -> anyhow::Result<()> {
    let store = units_store(url, options).await?;
    with_units_store!(&store, s => rebuild_on(s, projection, wait, detach, output).await)
}

async fn rebuild_on<S: Checkpoints>(
    store: &S,
    projection: &str,
    wait: Duration,
    detach: bool,
    output: Output,
) -> anyhow::Result<()> {
    known(store, projection).await?;
    running_somewhere(
        &store.units(Some(projection)).await?,
        projection,
        "a rebuild",
    )?;
    store.request_rebuild(projection).await?;
    let deadline = tokio::time::Instant::now() + wait;
    while store
        .rebuild_requests()
        .await?
        .iter()
        .any(|n| n == projection)
    {
        if tokio::time::Instant::now() >= deadline {
            // Withdrawn, so that it does not start later unasked.
            let mut tx = store.begin().await?;
            store.take_rebuild_request(&mut tx, projection).await?;
            store.commit(tx).await?;
            bail!(
                "no node started the rebuild of `{projection}` within {wait:?} (the node holding \
                 its first partition serves it at its next heartbeat); the request is withdrawn"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if output == Output::Text {
        println!("{projection}: rebuild started");
    }
    if detach {
        return Ok(());
    }
    let bar = (output == Output::Text).then(|| crate::progress_bar("replaying"));
    let (done, total) = loop {
        let units = store.units(Some(projection)).await?;
        let total: u64 = units.iter().filter_map(|u| u.rebuild_total).sum();
        let done: u64 = units.iter().map(|u| u.processed).sum::<u64>().min(total);
        if let Some(bar) = &bar {
            bar.set_length(total);
            bar.set_position(done);
        }
        if done >= total {
            break (done, total);
        }
        if let Some(stopped) = units.iter().find(|u| u.state == ProjectionState::Stopped) {
            bail!(
                "the rebuild of `{projection}` stopped at position {}: {}",
                stopped.checkpoint.position,
                stopped
                    .last_error
                    .as_deref()
                    .unwrap_or("(no error recorded)")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    match output {
        Output::Json => println!(
            "{}",
            json!({"projection": projection, "replayed": done, "total": total})
        ),
        Output::Text => println!("{projection}: rebuilt, {done} events replayed"),
    }
    Ok(())
}

/// `outflow retry`: asks the nodes running the projection to retry dead
/// letters, and reports each: handled (gone) or failed again (its error).
pub async fn retry(
    url: &str,
    projection: &str,
    ids: &[u64],
    all: bool,
    wait: Duration,
    options: &StoreOptions,
    output: Output,
) -> anyhow::Result<()> {
    let store = units_store(url, options).await?;
    with_units_store!(&store, s => retry_on(s, projection, ids, all, wait, output).await)
}

async fn retry_on<S: Checkpoints + DeadLetters>(
    store: &S,
    projection: &str,
    ids: &[u64],
    all: bool,
    wait: Duration,
    output: Output,
) -> anyhow::Result<()> {
    known(store, projection).await?;
    let letters = store.dead_letters(projection).await?;
    let chosen: Vec<_> = if all {
        letters.clone()
    } else {
        if ids.is_empty() {
            bail!("name the dead letters to retry (their ids, see `dead-letters`), or --all");
        }
        let mut chosen = Vec::new();
        for id in ids {
            match letters.iter().find(|d| d.id == *id) {
                Some(d) => chosen.push(d.clone()),
                None => bail!("`{projection}` has no dead letter #{id}"),
            }
        }
        chosen
    };
    if chosen.is_empty() {
        println!("{projection}: no dead letters");
        return Ok(());
    }
    let units = store.units(Some(projection)).await?;
    for d in &chosen {
        let held = units.iter().any(|u| u.unit == d.unit && u.lease_valid);
        if !held {
            bail!(
                "no node holds partition {} of `{projection}`, which parked #{}: a retry needs \
                 the projection's code; start the application",
                d.unit.partition,
                d.id
            );
        }
    }
    for d in &chosen {
        store.request_retry(d.id).await?;
    }
    let deadline = tokio::time::Instant::now() + wait;
    let mut pending: Vec<_> = chosen;
    let mut handled = Vec::new();
    let mut failed = Vec::new();
    while !pending.is_empty() {
        let now = store.dead_letters(projection).await?;
        pending.retain(|d| match now.iter().find(|n| n.id == d.id) {
            None => {
                handled.push(d.id);
                false
            }
            Some(n) if n.attempts > d.attempts => {
                failed.push((d.id, n.error.clone()));
                false
            }
            Some(_) => true,
        });
        if pending.is_empty() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            let ids: Vec<String> = pending.iter().map(|d| format!("#{}", d.id)).collect();
            bail!(
                "no node retried {} within {wait:?} (the node holding the unit serves a retry at its next heartbeat)",
                ids.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    match output {
        Output::Json => println!(
            "{}",
            json!({
                "handled": handled,
                "failed": failed.iter().map(|(id, e)| json!({"id": id, "error": e})).collect::<Vec<_>>(),
            })
        ),
        Output::Text => {
            for id in &handled {
                println!("#{id}: handled, no longer parked");
            }
            for (id, error) in &failed {
                println!("#{id}: failed again: {error}");
            }
        }
    }
    if !failed.is_empty() {
        bail!("{} of the retried dead letters failed again", failed.len());
    }
    Ok(())
}

pub(crate) use with_units_store;
