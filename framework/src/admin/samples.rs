//! The plots' figures, kept in memory: every few seconds each projection's
//! lag (events and time) and its events handled so far, for the last hour.
//! No external service: the page draws them; a restarted process starts
//! with an empty hour.

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

/// Samples per projection, oldest first, an hour at most.
#[derive(Debug, Default)]
pub(crate) struct Samples {
    by_projection: Mutex<BTreeMap<String, VecDeque<Sample>>>,
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
            drop(console);
            tokio::time::sleep(every).await;
        }
    });
}
