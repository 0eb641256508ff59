//! Operators' requests made through the store by a process without the
//! projections' code (the `outflow` command): a rebuild, a retry of a dead
//! letter. A node serves them at each heartbeat, each in a task of its own:
//! the rebuild by the node that holds the projection's first partition, a
//! retry by the node that holds the unit that parked the event. The work
//! clears the request in its own transaction (a reset takes the rebuild
//! request, a retry's attempt ends the retry request), so a node that dies
//! half-way leaves the request for the next one.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use crate::port::projections::{ProjectionStore, UnitId};

use super::status::RetryError;
use super::ProjectionRunner;

/// The requests this node is serving now, so a heartbeat does not start one
/// twice.
#[derive(Debug, Default, Clone)]
pub(super) struct Serving {
    rebuilds: Arc<Mutex<HashSet<String>>>,
    retries: Arc<Mutex<HashSet<u64>>>,
}

/// Marks `key` served in `set`; `false` when it already is.
fn start<T: Eq + std::hash::Hash>(set: &Mutex<HashSet<T>>, key: T) -> bool {
    set.lock().map(|mut s| s.insert(key)).unwrap_or(false)
}

fn finish<T: Eq + std::hash::Hash>(set: &Mutex<HashSet<T>>, key: &T) {
    if let Ok(mut s) = set.lock() {
        s.remove(key);
    }
}

impl<S: ProjectionStore> ProjectionRunner<S> {
    /// Starts what operators asked for of the units in `held` (this node's).
    pub(super) async fn serve_requests(&self, held: &HashSet<UnitId>, serving: &Serving) {
        let shared = &self.shared;
        match shared.store.rebuild_requests().await {
            Ok(names) => {
                for name in names {
                    let first = UnitId {
                        projection: name.clone(),
                        partition: 0,
                    };
                    if !held.contains(&first) || !start(&serving.rebuilds, name.clone()) {
                        continue;
                    }
                    let runner = self.clone();
                    let serving = serving.clone();
                    tokio::spawn(async move {
                        match runner.rebuild_taking(&name, true).await {
                            Ok(Some(_)) => {
                                tracing::info!(node = %runner.shared.node_id, projection = %name, "rebuild asked for through the store: started");
                            }
                            Ok(None) => {}
                            Err(error) => {
                                tracing::warn!(node = %runner.shared.node_id, projection = %name, error = %crate::error::error_chain(&error), "a rebuild asked for through the store failed to start; it is tried again at the next heartbeat");
                            }
                        }
                        finish(&serving.rebuilds, &name);
                    });
                }
            }
            Err(error) => {
                tracing::debug!(error = %crate::error::error_chain(&error), "reading the rebuilds asked for failed");
            }
        }
        match shared.store.retry_requests().await {
            Ok(requests) => {
                for (unit, id) in requests {
                    if !held.contains(&unit) || !start(&serving.retries, id) {
                        continue;
                    }
                    let runner = self.clone();
                    let serving = serving.clone();
                    tokio::spawn(async move {
                        let name = unit.projection;
                        match runner.retry_dead_letter(&name, id).await {
                            Ok(()) => {
                                tracing::info!(projection = %name, id, "dead letter retried as asked through the store: handled");
                            }
                            Err(RetryError::Handler(error)) => {
                                tracing::warn!(projection = %name, id, error = %error.chain(), "dead letter retried as asked through the store: failed again");
                            }
                            Err(RetryError::NotFound { .. }) => {}
                            Err(RetryError::Store(error)) => {
                                tracing::warn!(projection = %name, id, error = %crate::error::error_chain(&error), "retrying a dead letter as asked through the store failed; it is tried again at the next heartbeat");
                            }
                        }
                        finish(&serving.retries, &id);
                    });
                }
            }
            Err(error) => {
                tracing::debug!(error = %crate::error::error_chain(&error), "reading the retries asked for failed");
            }
        }
    }
}
