//! The plots' figures, kept in memory: every few seconds each projection's
//! lag (events and time) and its events handled so far, and this process's
//! commands, conflicts and (when the console has it) outbox backlog, for
//! the last hour. No external service: the page draws them; a restarted
//! process starts with an empty hour.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, Weak};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use super::Inner;
use crate::port::projections::ProjectionStore;

/// One look at a projection.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: DateTime<Utc>,
    lag_events: u64,
    lag_ms: u64,
    processed: u64,
}

/// One look at this process: its commands and conflicts so far, and the
/// outbox's backlog.
#[derive(Debug, Clone, Copy)]
struct Activity {
    at: DateTime<Utc>,
    commands: u64,
    conflicts: u64,
    outbox_pending: Option<u64>,
    outbox_oldest_ms: Option<u64>,
    outbox_delivered: Option<u64>,
}

/// Samples per projection, and of the process, oldest first, an hour at
/// most.
#[derive(Debug, Default)]
pub(crate) struct Samples {
    by_projection: Mutex<BTreeMap<String, VecDeque<Sample>>>,
    activity: Mutex<VecDeque<Activity>>,
}

/// `(later - earlier) / seconds between`, when both exist and it grew.
fn rate(later: u64, earlier: u64, seconds: f64) -> Option<f64> {
    (seconds > 0.0 && later >= earlier).then(|| (later - earlier) as f64 / seconds)
}

impl Samples {
    fn push(&self, projection: &str, sample: Sample) {
        let Ok(mut all) = self.by_projection.lock() else {
            return;
        };
        let series = all.entry(projection.to_owned()).or_default();
        series.push_back(sample);
        let hour_ago = sample.at - chrono::Duration::hours(1);
        while series.front().is_some_and(|s| s.at < hour_ago) {
            series.pop_front();
        }
    }

    fn push_activity(&self, sample: Activity) {
        let Ok(mut series) = self.activity.lock() else {
            return;
        };
        series.push_back(sample);
        let hour_ago = sample.at - chrono::Duration::hours(1);
        while series.front().is_some_and(|s| s.at < hour_ago) {
            series.pop_front();
        }
    }

    /// `[{at, commands_per_second, conflicts_per_second, outbox_pending,
    /// outbox_oldest_ms, outbox_delivered_per_second}]`, oldest first; the
    /// rates are over the time since the sample before (none for the
    /// first).
    pub(crate) fn activity_json(&self) -> Value {
        let Ok(series) = self.activity.lock() else {
            return json!([]);
        };
        let mut points = Vec::with_capacity(series.len());
        let mut before: Option<&Activity> = None;
        for sample in series.iter() {
            let seconds = before.map_or(0.0, |b| {
                (sample.at - b.at).num_milliseconds() as f64 / 1000.0
            });
            points.push(json!({
                "at": sample.at.to_rfc3339(),
                "commands_per_second": before.and_then(|b| rate(sample.commands, b.commands, seconds)),
                "conflicts_per_second": before.and_then(|b| rate(sample.conflicts, b.conflicts, seconds)),
                "outbox_pending": sample.outbox_pending,
                "outbox_oldest_ms": sample.outbox_oldest_ms,
                "outbox_delivered_per_second": before.and_then(|b| {
                    rate(sample.outbox_delivered?, b.outbox_delivered?, seconds)
                }),
            }));
            before = Some(sample);
        }
        Value::Array(points)
    }

    /// `{projection: [{at, lag_events, lag_ms, processed, events_per_second}]}`;
    /// the rate is over the time since the sample before (none for the
    /// first, and none across a rebuild, whose count starts again).
    pub(crate) fn json(&self) -> Value {
        let Ok(all) = self.by_projection.lock() else {
            return json!({});
        };
        let mut out = serde_json::Map::new();
        for (projection, series) in all.iter() {
            let mut points = Vec::with_capacity(series.len());
            let mut before: Option<&Sample> = None;
            for sample in series {
                let rate = before.and_then(|b| {
                    let seconds = (sample.at - b.at).num_milliseconds() as f64 / 1000.0;
                    (seconds > 0.0 && sample.processed >= b.processed)
                        .then(|| (sample.processed - b.processed) as f64 / seconds)
                });
                points.push(json!({
                    "at": sample.at.to_rfc3339(),
                    "lag_events": sample.lag_events,
                    "lag_ms": sample.lag_ms,
                    "processed": sample.processed,
                    "events_per_second": rate,
                }));
                before = Some(sample);
            }
            out.insert(projection.clone(), Value::Array(points));
        }
        Value::Object(out)
    }
}

/// Takes a sample every `every` while the console exists (outside a Tokio
/// runtime there is nothing to run it on: the plots stay empty, and a
/// warning says why).
pub(crate) fn start<S: ProjectionStore>(inner: Weak<Inner<S>>, every: Duration) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        tracing::warn!(target: "outflow::admin", "the console's router was built outside a Tokio runtime: no samples for the plots");
        return;
    };
    runtime.spawn(async move {
        loop {
            let Some(console) = inner.upgrade() else {
                return;
            };
            if let Ok(units) = console.runner.status().await {
                let at = Utc::now();
                let mut sums: BTreeMap<&str, Sample> = BTreeMap::new();
                for unit in &units {
                    let sum = sums.entry(&unit.projection).or_insert(Sample {
                        at,
                        lag_events: 0,
                        lag_ms: 0,
                        processed: 0,
                    });
                    sum.lag_events += unit.lag_events;
                    sum.lag_ms = sum.lag_ms.max(unit.lag.as_millis() as u64);
                    sum.processed += unit.processed;
                }
                for (projection, sample) in sums {
                    console.samples.push(projection, sample);
                }
            }
            let (commands, conflicts) = crate::command::command_counts();
            let mut activity = Activity {
                at: Utc::now(),
                commands,
                conflicts,
                outbox_pending: None,
                outbox_oldest_ms: None,
                outbox_delivered: None,
            };
            if let Some(outbox) = &console.outbox {
                if let Ok(status) = (outbox.status)().await {
                    activity.outbox_pending = Some(status.pending);
                    activity.outbox_oldest_ms =
                        Some(status.oldest.map_or(0, |age| age.as_millis() as u64));
                    activity.outbox_delivered = Some(status.delivered);
                }
            }
            console.samples.push_activity(activity);
            drop(console);
            tokio::time::sleep(every).await;
        }
    });
}
