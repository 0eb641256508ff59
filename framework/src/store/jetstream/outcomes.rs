//! Remembered command outcomes (see [`crate::outcome`]) in the store's
//! key-value bucket, one key per command: `outcome.<type>.<id>.<command id>`.
//!
//! A stream append and a key cannot be written atomically, so the claim of
//! an accepted command is written just after its events, and an append
//! first checks that no refusal is stored; two sends of one command that
//! decide differently at the same instant can both stand. The SQL backends
//! close that window with the claim in the append's transaction.

use chrono::{DateTime, Utc};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use super::codec::stream_token;
use super::errors::nats_error;
use super::state::JetStreamStore;
use crate::error::StoreError;
use crate::event::{AppendRequest, RecordedEvent};
use crate::outcome::{CommandOutcome, RefusalRecord};
use async_nats::jetstream::kv;

/// The prefix of outcome keys in the bucket.
const PREFIX: &str = "outcome.";

#[derive(Serialize, Deserialize)]
struct StoredOutcome {
    version: u64,
    refusal: Option<String>,
    refusal_json: Option<serde_json::Value>,
    recorded_at: DateTime<Utc>,
}

fn outcome_key(aggregate_type: &str, aggregate_id: &str, command_id: Uuid) -> String {
    format!(
        "{PREFIX}{}.{}.{}",
        stream_token(aggregate_type),
        stream_token(aggregate_id),
        command_id.simple()
    )
}

impl JetStreamStore {
    pub(super) async fn outcome_once(
        &self,
        aggregate_type: &str,
        aggregate_id: &str,
        command_id: Uuid,
    ) -> Result<Option<CommandOutcome>, StoreError> {
        let key = outcome_key(aggregate_type, aggregate_id, command_id);
        let entry = self
            .inner
            .kv
            .entry(key)
            .await
            .map_err(|e| nats_error("read a command's outcome", e))?;
        match entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let stored: StoredOutcome =
                    serde_json::from_slice(&entry.value).map_err(|e| StoreError::Corrupt {
                        table: format!("{} bucket", self.inner.prefix),
                        what: format!("the outcome of command {command_id} does not decode: {e}"),
                    })?;
                Ok(Some(CommandOutcome {
                    aggregate_type: aggregate_type.to_owned(),
                    aggregate_id: aggregate_id.to_owned(),
                    command_id,
                    version: stored.version,
                    recorded_at: stored.recorded_at,
                    refusal: stored.refusal.map(|message| RefusalRecord {
                        message,
                        error: stored.refusal_json,
                    }),
                }))
            }
            _ => Ok(None),
        }
    }

    /// Creates the outcome's key unless it exists; returns what is stored.
    pub(super) async fn record_outcome_once(
        &self,
        outcome: &CommandOutcome,
    ) -> Result<CommandOutcome, StoreError> {
        let key = outcome_key(
            &outcome.aggregate_type,
            &outcome.aggregate_id,
            outcome.command_id,
        );
        let value = serde_json::to_vec(&StoredOutcome {
            version: outcome.version,
            refusal: outcome.refusal.as_ref().map(|r| r.message.clone()),
            refusal_json: outcome.refusal.as_ref().and_then(|r| r.error.clone()),
            recorded_at: outcome.recorded_at,
        })
        .map_err(|source| StoreError::Serialize {
            what: "command outcome",
            aggregate_type: outcome.aggregate_type.clone(),
            aggregate_id: outcome.aggregate_id.clone(),
            source,
        })?;
        match self.inner.kv.create(&key, value.into()).await {
            Ok(_) => Ok(outcome.clone()),
            Err(error) if error.kind() == kv::CreateErrorKind::AlreadyExists => self
                .outcome_once(
                    &outcome.aggregate_type,
                    &outcome.aggregate_id,
                    outcome.command_id,
                )
                .await?
                .ok_or_else(|| StoreError::Corrupt {
                    table: format!("{} bucket", self.inner.prefix),
                    what: format!(
                        "the outcome of command {} exists and cannot be read",
                        outcome.command_id
                    ),
                }),
            Err(error) => Err(nats_error("store a command's outcome", error)),
        }
    }

    /// Appends a command's events unless an outcome is stored for it, then
    /// claims it.
    pub(super) async fn append_claiming(
        &self,
        request: AppendRequest,
        command_id: Uuid,
    ) -> Result<Vec<RecordedEvent>, StoreError> {
        use crate::port::events::EventStore;
        let (aggregate_type, aggregate_id) =
            (request.aggregate_type.clone(), request.aggregate_id.clone());
        let version = request
            .expected_version
            .saturating_add(request.events.len() as u64);
        if let Some(stored) = self
            .patiently(|| self.outcome_once(&aggregate_type, &aggregate_id, command_id))
            .await?
        {
            return Err(StoreError::Conflict {
                aggregate_type,
                aggregate_id,
                expected: stored.version,
                actual: None,
            });
        }
        let written = self.append(request).await?;
        if !written.is_empty() {
            let claim = CommandOutcome {
                aggregate_type,
                aggregate_id,
                command_id,
                version,
                recorded_at: Utc::now(),
                refusal: None,
            };
            // The events are the outcome; the claim only makes a later
            // refusal of the same command lose. A failure here is logged.
            if let Err(error) = self.patiently(|| self.record_outcome_once(&claim)).await {
                tracing::warn!(error = %crate::error::error_chain(&error), %command_id, "the claim of an accepted command was not stored");
            }
        }
        Ok(written)
    }

    pub(super) async fn prune_outcomes_once(
        &self,
        before: DateTime<Utc>,
    ) -> Result<u64, StoreError> {
        let mut keys = self
            .inner
            .kv
            .keys()
            .await
            .map_err(|e| nats_error("list command outcomes", e))?;
        let mut outcomes = Vec::new();
        while let Some(key) = keys.next().await {
            let key = key.map_err(|e| nats_error("list command outcomes", e))?;
            if key.starts_with(PREFIX) {
                outcomes.push(key);
            }
        }
        let mut pruned = 0;
        for key in outcomes {
            let Some(value) = self
                .inner
                .kv
                .get(&key)
                .await
                .map_err(|e| nats_error("read a command's outcome", e))?
            else {
                continue;
            };
            let old = serde_json::from_slice::<StoredOutcome>(&value)
                .map(|stored| stored.recorded_at < before)
                .unwrap_or(false);
            if old {
                self.inner
                    .kv
                    .purge(&key)
                    .await
                    .map_err(|e| nats_error("prune a command's outcome", e))?;
                pruned += 1;
            }
        }
        Ok(pruned)
    }
}
