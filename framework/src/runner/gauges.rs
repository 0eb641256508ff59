//! The status gauges a node exports for the units it holds (see
//! [`crate::telemetry`]).

use std::collections::BTreeSet;

use tokio_util::sync::CancellationToken;

use super::ProjectionRunner;
use crate::port::projections::ProjectionStore;

impl<S: ProjectionStore> ProjectionRunner<S> {
    /// Every `status_metrics_every`, reads the status and sets the gauges
    /// of the units this node holds, until `stop`. Apart from the node loop:
    /// counting a long lag never delays a heartbeat.
    pub(super) async fn export_status_gauges(&self, stop: &CancellationToken) {
        let every = self.shared.status_metrics;
        if every.is_zero() {
            return;
        }
        let node = self.shared.node_id.as_str();
        let mut exported: BTreeSet<String> = BTreeSet::new();
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            let units = tokio::select! {
                _ = stop.cancelled() => return,
                units = self.status() => units,
            };
            let units = match units {
                Ok(units) => units,
                Err(error) => {
                    tracing::debug!(error = %crate::error::error_chain(&error), "reading the status for the gauges failed");
                    continue;
                }
            };
            let held = units
                .iter()
                .filter(|unit| unit.owner.as_deref() == Some(node));
            let now: BTreeSet<String> = crate::telemetry::record_status(held).into_iter().collect();
            for gone in exported.difference(&now) {
                crate::telemetry::clear_status(gone);
            }
            exported = now;
        }
    }
}
