//! The metrics Outflow records, through the [`metrics`](https://docs.rs/metrics)
//! facade: install any recorder (Prometheus, StatsD, ...) and call
//! [`describe_metrics`] once, so the exporter shows each metric's unit and
//! meaning.
//!
//! | Metric | Kind | Labels | Meaning |
//! |---|---|---|---|
//! | `outflow_commands_total` | counter | `aggregate_type`, `outcome` | commands executed; `outcome` is `committed`, `rejected`, `conflict` or `failed` |
//! | `outflow_command_seconds` | histogram | `aggregate_type` | time to load, handle and append a command |
//! | `outflow_command_conflicts_total` | counter | `aggregate_type` | commands that lost an optimistic-concurrency race |
//! | `outflow_projection_events_total` | counter | `projection` | events a projection handled |
//! | `outflow_projection_batch_seconds` | histogram | `projection` | time from a batch's effects to its commit |
//! | `outflow_projection_parked_total` | counter | `projection` | events parked as dead letters |
//! | `outflow_projection_position` | gauge | `projection` | global position of the last checkpoint committed |
//! | `outflow_projection_lag_positions` | gauge | `projection` | positions between the log's head and the checkpoint |
//! | `outflow_projection_lag_events` | gauge | `projection` | committed events still to handle (from status, every 15 s by default) |
//! | `outflow_projection_lag_seconds` | gauge | `projection` | age of the oldest committed event still to handle (from status) |
//! | `outflow_projection_dead_letters` | gauge | `projection` | events parked and not yet retried or discarded (from status) |
//! | `outflow_projection_rebuild_progress` | gauge | `projection` | share of a running rebuild replayed, 0 to 1 (1 when none runs) |
//! | `outflow_log_held_back_seconds` | gauge | | age of the open transaction that committed events wait behind (0: none) |
//! | `outflow_relay_published_total` | counter | `relay` | events the JetStream relay published |
//! | `outflow_consumer_parked_total` | counter | `consumer` | JetStream messages parked |
//! | `outflow_outbox_delivered_total` | counter | `outbox` | outbox messages delivered |
//! | `outflow_outbox_delivery_failures_total` | counter | `outbox` | failed outbox deliveries |
//! | `outflow_outbox_deliver_seconds` | histogram | `outbox` | time to deliver one outbox batch |
//! | `outflow_outbox_deleted_total` | counter | `outbox` | delivered outbox rows cleaned up |
//! | `outflow_outbox_pending` | gauge | `outbox` | committed messages not yet delivered (from the outbox's status, every 15 s while a relay runs) |
//! | `outflow_outbox_oldest_pending_seconds` | gauge | `outbox` | age of the oldest of them (0: none) |
//! | `outflow_timers_fired_total` | counter | `timers`, `outcome` | attempts to fire a timer; `outcome` is `fired`, `refused`, `failed` or `retry` |
//! | `outflow_timer_lateness_seconds` | histogram | `timers` | how long after its due time a timer fired |
//! | `outflow_timers_pending` | gauge | `timers` | timers not yet fired or cancelled (from the timers' status, every 15 s on the leading scheduler) |
//! | `outflow_timers_late` | gauge | `timers` | pending timers overdue by more than 5 s |
//! | `outflow_timers_oldest_overdue_seconds` | gauge | `timers` | how long ago the earliest pending timer fell due (0: none due) |
//! | `outflow_timers_refused` | gauge | `timers` | kept timers whose command was refused |
//! | `outflow_decisions_total` | counter | `decision`, `outcome` | decisions run; `outcome` is `committed`, `repeated`, `rejected`, `conflict` or `failed` |
//! | `outflow_decision_seconds` | histogram | `decision` | time to read, decide and append, retries included |
//! | `outflow_decision_conflicts_total` | counter | `decision` | reads and decisions run again after a lost race |
//!
//! The status gauges are set by each runner node for the units it holds
//! (see [`ProjectionRunnerBuilder::status_metrics_every`](crate::runner::ProjectionRunnerBuilder::status_metrics_every)),
//! so a sum over nodes is the whole; [`record_status`] sets them from any
//! status you read yourself.

use std::collections::BTreeMap;

use metrics::Unit;

#[cfg(any(feature = "postgres", feature = "sqlite"))]
use crate::outbox::OutboxStatus;
use crate::runner::ProjectionStatus;

/// What kind of metric it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetricKind {
    /// Only grows.
    Counter,
    /// Goes up and down.
    Gauge,
    /// A distribution of observations.
    Histogram,
}

/// Every metric Outflow records: `(name, kind, unit, description)`.
pub const METRICS: &[(&str, MetricKind, Unit, &str)] = &[
    (
        "outflow_commands_total",
        MetricKind::Counter,
        Unit::Count,
        "Commands executed, by aggregate type and outcome (committed, rejected, conflict, failed).",
    ),
    (
        "outflow_command_seconds",
        MetricKind::Histogram,
        Unit::Seconds,
        "Time to load an aggregate, handle a command and append its events.",
    ),
    (
        "outflow_command_conflicts_total",
        MetricKind::Counter,
        Unit::Count,
        "Commands that lost an optimistic-concurrency race on their stream.",
    ),
    (
        "outflow_decisions_total",
        MetricKind::Counter,
        Unit::Count,
        "Decisions run, by decision and outcome (committed, repeated, rejected, conflict, failed).",
    ),
    (
        "outflow_decision_seconds",
        MetricKind::Histogram,
        Unit::Seconds,
        "Time to read a decision's events, decide and append on condition, retries included.",
    ),
    (
        "outflow_decision_conflicts_total",
        MetricKind::Counter,
        Unit::Count,
        "Decisions read and decided again after their condition or stream lost a race.",
    ),
    (
        "outflow_projection_events_total",
        MetricKind::Counter,
        Unit::Count,
        "Events a projection handled and committed.",
    ),
    (
        "outflow_projection_batch_seconds",
        MetricKind::Histogram,
        Unit::Seconds,
        "Time from the start of a projection batch's effects to its commit.",
    ),
    (
        "outflow_projection_parked_total",
        MetricKind::Counter,
        Unit::Count,
        "Events a projection parked as dead letters.",
    ),
    (
        "outflow_projection_position",
        MetricKind::Gauge,
        Unit::Count,
        "Global position of a projection's last committed checkpoint.",
    ),
    (
        "outflow_projection_lag_positions",
        MetricKind::Gauge,
        Unit::Count,
        "Positions between the readable head of the log and a projection's checkpoint.",
    ),
    (
        "outflow_projection_lag_events",
        MetricKind::Gauge,
        Unit::Count,
        "Committed events a projection still has to handle, as its status counted them.",
    ),
    (
        "outflow_projection_lag_seconds",
        MetricKind::Gauge,
        Unit::Seconds,
        "Age of the oldest committed event a projection still has to handle.",
    ),
    (
        "outflow_projection_dead_letters",
        MetricKind::Gauge,
        Unit::Count,
        "Events a projection parked that were not yet retried or discarded.",
    ),
    (
        "outflow_projection_rebuild_progress",
        MetricKind::Gauge,
        Unit::Percent,
        "Share of a running rebuild replayed, from 0 to 1 (1 when none runs).",
    ),
    (
        "outflow_log_held_back_seconds",
        MetricKind::Gauge,
        Unit::Seconds,
        "Age of the open transaction that committed events wait behind (0 when none).",
    ),
    (
        "outflow_relay_published_total",
        MetricKind::Counter,
        Unit::Count,
        "Events the JetStream relay published and had acknowledged.",
    ),
    (
        "outflow_consumer_parked_total",
        MetricKind::Counter,
        Unit::Count,
        "JetStream messages a consumer parked as dead messages.",
    ),
    (
        "outflow_outbox_delivered_total",
        MetricKind::Counter,
        Unit::Count,
        "Outbox messages delivered.",
    ),
    (
        "outflow_outbox_delivery_failures_total",
        MetricKind::Counter,
        Unit::Count,
        "Outbox deliveries that failed and will be retried.",
    ),
    (
        "outflow_outbox_deliver_seconds",
        MetricKind::Histogram,
        Unit::Seconds,
        "Time to deliver one batch of outbox messages.",
    ),
    (
        "outflow_outbox_deleted_total",
        MetricKind::Counter,
        Unit::Count,
        "Delivered outbox rows removed by the cleanup.",
    ),
    (
        "outflow_outbox_pending",
        MetricKind::Gauge,
        Unit::Count,
        "Committed outbox messages not yet delivered.",
    ),
    (
        "outflow_outbox_oldest_pending_seconds",
        MetricKind::Gauge,
        Unit::Seconds,
        "Age of the oldest outbox message not yet delivered (0 when none).",
    ),
    (
        "outflow_timers_fired_total",
        MetricKind::Counter,
        Unit::Count,
        "Attempts to fire a timer, by outcome (fired, refused, failed, retry).",
    ),
    (
        "outflow_timer_lateness_seconds",
        MetricKind::Histogram,
        Unit::Seconds,
        "How long after its due time a timer fired.",
    ),
    (
        "outflow_timers_pending",
        MetricKind::Gauge,
        Unit::Count,
        "Timers scheduled and not yet fired or cancelled.",
    ),
    (
        "outflow_timers_late",
        MetricKind::Gauge,
        Unit::Count,
        "Pending timers overdue by more than 5 seconds.",
    ),
    (
        "outflow_timers_oldest_overdue_seconds",
        MetricKind::Gauge,
        Unit::Seconds,
        "How long ago the earliest pending timer fell due (0 when none is due).",
    ),
    (
        "outflow_timers_refused",
        MetricKind::Gauge,
        Unit::Count,
        "Kept timers whose command was refused.",
    ),
];

/// Describes every metric of [`METRICS`] to the installed recorder. Call it
/// once after installing the recorder; recording works without it.
///
/// ```
/// outflow::telemetry::describe_metrics();
/// ```
pub fn describe_metrics() {
    for &(name, kind, unit, description) in METRICS {
        match kind {
            MetricKind::Counter => metrics::describe_counter!(name, unit, description),
            MetricKind::Gauge => metrics::describe_gauge!(name, unit, description),
            MetricKind::Histogram => metrics::describe_histogram!(name, unit, description),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::METRICS;
    use std::path::Path;

    fn sources(dir: &Path, found: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                sources(&path, found);
            } else if path.extension().is_some_and(|e| e == "rs") {
                if let Ok(text) = std::fs::read_to_string(&path) {
                    found.push(text);
                }
            }
        }
    }

    #[test]
    fn every_recorded_metric_is_described() {
        let mut texts = Vec::new();
        sources(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
            &mut texts,
        );
        let mut recorded = Vec::new();
        for text in &texts {
            for macro_name in ["counter!(", "gauge!(", "histogram!("] {
                for (at, _) in text.match_indices(macro_name) {
                    let rest = text[at + macro_name.len()..].trim_start();
                    if let Some(name) = rest.strip_prefix('"').and_then(|r| r.split('"').next()) {
                        if name.starts_with("outflow_") {
                            recorded.push(name.to_owned());
                        }
                    }
                }
            }
        }
        assert!(recorded.len() >= 10, "found {recorded:?}");
        for name in recorded {
            assert!(
                METRICS.iter().any(|(described, ..)| *described == name),
                "`{name}` is recorded but not described"
            );
        }
    }
}

/// What one projection's units add up to, for its gauges.
#[derive(Debug, Default)]
struct Summed {
    lag_events: u64,
    lag_seconds: f64,
    dead_letters: u64,
    rebuild_done: u64,
    rebuild_total: u64,
}

/// Sets the status gauges (`outflow_projection_lag_events`,
/// `outflow_projection_lag_seconds`, `outflow_projection_dead_letters`,
/// `outflow_projection_rebuild_progress`) from `units`, summed per
/// projection (the lag in time is the largest of its units'). Returns the
/// projections it set.
///
/// ```no_run
/// # async fn demo(runner: outflow::runner::ProjectionRunner<outflow::PostgresStore>) -> Result<(), outflow::StoreError> {
/// outflow::telemetry::record_status(&runner.status().await?);
/// # Ok(()) }
/// ```
pub fn record_status<'a>(units: impl IntoIterator<Item = &'a ProjectionStatus>) -> Vec<String> {
    let mut sums: BTreeMap<&str, Summed> = BTreeMap::new();
    for unit in units {
        let sum = sums.entry(&unit.projection).or_default();
        sum.lag_events += unit.lag_events;
        sum.lag_seconds = sum.lag_seconds.max(unit.lag.as_secs_f64());
        sum.dead_letters += unit.parked as u64;
        if let Some(rebuild) = &unit.rebuild {
            sum.rebuild_done += rebuild.done.min(rebuild.total);
            sum.rebuild_total += rebuild.total;
        }
    }
    for (projection, sum) in &sums {
        let projection = projection.to_string();
        let progress = if sum.rebuild_total == 0 {
            1.0
        } else {
            sum.rebuild_done as f64 / sum.rebuild_total as f64
        };
        metrics::gauge!("outflow_projection_lag_events", "projection" => projection.clone())
            .set(sum.lag_events as f64);
        metrics::gauge!("outflow_projection_lag_seconds", "projection" => projection.clone())
            .set(sum.lag_seconds);
        metrics::gauge!("outflow_projection_dead_letters", "projection" => projection.clone())
            .set(sum.dead_letters as f64);
        metrics::gauge!("outflow_projection_rebuild_progress", "projection" => projection)
            .set(progress);
    }
    sums.into_keys().map(str::to_owned).collect()
}

/// Sets the status gauges of `projection` to "nothing to do here" (no lag,
/// no dead letters, no rebuild): for a node that no longer holds any of its
/// units.
pub fn clear_status(projection: &str) {
    let projection = projection.to_owned();
    metrics::gauge!("outflow_projection_lag_events", "projection" => projection.clone()).set(0.0);
    metrics::gauge!("outflow_projection_lag_seconds", "projection" => projection.clone()).set(0.0);
    metrics::gauge!("outflow_projection_dead_letters", "projection" => projection.clone()).set(0.0);
    metrics::gauge!("outflow_projection_rebuild_progress", "projection" => projection).set(1.0);
}

/// Sets the timer gauges (`outflow_timers_pending`, `outflow_timers_late`,
/// `outflow_timers_oldest_overdue_seconds`, `outflow_timers_refused`) from
/// a status of the timers.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub fn record_timer_status(status: &crate::timer::TimerStatus) {
    let table = status.table.clone();
    let counts = &status.counts;
    metrics::gauge!("outflow_timers_pending", "timers" => table.clone()).set(counts.pending as f64);
    metrics::gauge!("outflow_timers_late", "timers" => table.clone()).set(counts.late as f64);
    metrics::gauge!("outflow_timers_oldest_overdue_seconds", "timers" => table.clone())
        .set(counts.oldest_overdue.map_or(0.0, |age| age.as_secs_f64()));
    metrics::gauge!("outflow_timers_refused", "timers" => table).set(counts.refused as f64);
}

/// Sets the timer gauges of the timers `table` to zero (a scheduler that
/// stops leading: the next leader sets them).
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub fn clear_timer_status(table: &str) {
    for gauge in [
        "outflow_timers_pending",
        "outflow_timers_late",
        "outflow_timers_oldest_overdue_seconds",
        "outflow_timers_refused",
    ] {
        metrics::gauge!(gauge, "timers" => table.to_owned()).set(0.0);
    }
}

/// Sets `outflow_outbox_pending` and `outflow_outbox_oldest_pending_seconds`
/// of the outbox `table` from its status.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub fn record_outbox_status(table: &str, status: &OutboxStatus) {
    let table = table.to_owned();
    metrics::gauge!("outflow_outbox_pending", "outbox" => table.clone()).set(status.pending as f64);
    metrics::gauge!("outflow_outbox_oldest_pending_seconds", "outbox" => table).set(
        status
            .oldest_pending_age
            .map_or(0.0, |age| age.as_secs_f64()),
    );
}
