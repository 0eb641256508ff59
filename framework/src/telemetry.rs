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
//! | `outflow_log_held_back_seconds` | gauge | | age of the open transaction that committed events wait behind (0: none) |
//! | `outflow_relay_published_total` | counter | `relay` | events the JetStream relay published |
//! | `outflow_consumer_parked_total` | counter | `consumer` | JetStream messages parked |
//! | `outflow_outbox_delivered_total` | counter | `outbox` | outbox messages delivered |
//! | `outflow_outbox_delivery_failures_total` | counter | `outbox` | failed outbox deliveries |
//! | `outflow_outbox_deliver_seconds` | histogram | `outbox` | time to deliver one outbox batch |
//! | `outflow_outbox_deleted_total` | counter | `outbox` | delivered outbox rows cleaned up |

use metrics::Unit;

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
