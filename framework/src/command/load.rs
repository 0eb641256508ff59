//! Loading an aggregate: from the cache, or a snapshot and the events
//! after it (upcast, decoded), and saving snapshots when due.

use cqrs_es::Aggregate;

use crate::error::{EventRef, StoreError};
use crate::event::{deserialize_payload, Snapshot};
use crate::port::events::EventStore;

use super::bus::*;

impl<A, S> CommandBus<A, S>
where
    A: Aggregate + 'static,
    A::Error: 'static,
    S: EventStore,
{
    /// Loads an aggregate: from its snapshot when snapshots are on and one is
    /// stored, then the events after it. Returns the aggregate and its version.
    ///
    /// # Errors
    ///
    /// [`StoreError`](crate::StoreError) when reading fails or a stored event does not decode.
    pub async fn load(&self, aggregate_id: &str) -> Result<(A, u64), StoreError> {
        let ring = self.store.key_ring();
        let mut loaded = self
            .store
            .load(A::TYPE, aggregate_id, self.snapshot_every.is_some())
            .await?;
        // The keys of the personal values the stream holds, in one read.
        if let Some(ring) = &ring {
            ring.prepare_values(loaded.snapshot.iter().map(|s| &s.state))
                .await?;
            ring.prepare_texts(loaded.events.iter().map(|e| e.payload.as_str()))
                .await?;
        }
        let (mut aggregate, mut version) = match loaded.snapshot.take() {
            Some(snapshot) => {
                match crate::personal::sealing(ring.as_ref(), Some(aggregate_id), false, || {
                    A::deserialize(&snapshot.state)
                })
                .await?
                {
                    Ok(aggregate) => (aggregate, snapshot.version),
                    Err(error) => {
                        // A snapshot of an older shape of the aggregate: fold from the start.
                        tracing::warn!(error = %crate::error::error_chain(&error),
                            aggregate_type = A::TYPE,
                            aggregate_id,
                            version = snapshot.version,
                            "snapshot does not deserialize, replaying all events"
                        );
                        loaded = self.store.load(A::TYPE, aggregate_id, false).await?;
                        if let Some(ring) = &ring {
                            ring.prepare_texts(loaded.events.iter().map(|e| e.payload.as_str()))
                                .await?;
                        }
                        (A::default(), 0)
                    }
                }
            }
            None => (A::default(), 0),
        };
        let events = crate::personal::sealing(ring.as_ref(), Some(aggregate_id), false, || {
            let mut expected = version;
            let mut events = Vec::with_capacity(loaded.events.len());
            for event in &loaded.events {
                if event.sequence != expected + 1 {
                    return Err(StoreError::Corrupt {
                        table: "events".to_owned(),
                        what: format!(
                            "stream {} `{aggregate_id}` jumps from version {expected} to {}",
                            A::TYPE,
                            event.sequence
                        ),
                    });
                }
                expected = event.sequence;
                events.push(self.decode_stream_event(aggregate_id, event)?);
            }
            Ok(events)
        })
        .await??;
        for event in events {
            version += 1;
            aggregate.apply(event);
        }
        Ok((aggregate, version))
    }

    pub(super) fn keep(&self, aggregate_id: &str, aggregate: A, version: u64) {
        if let Some(cache) = &self.cache {
            cache
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .put(aggregate_id, aggregate, version);
        }
    }

    /// Deserializes a loaded event: straight from its JSON text when no
    /// upcaster wants it, through a JSON value and the upcasters otherwise.
    pub(super) fn decode_stream_event(
        &self,
        aggregate_id: &str,
        event: &crate::port::events::StreamEvent,
    ) -> Result<A::Event, StoreError> {
        let event_ref = |event_type: &str, event_version: &str| EventRef {
            aggregate_type: A::TYPE.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            sequence: event.sequence,
            position: Some(event.position),
            event_type: event_type.to_owned(),
            event_version: event_version.to_owned(),
        };
        let wanted = self
            .upcasters
            .iter()
            .any(|u| u.can_upcast(&event.event_type, &event.event_version));
        if !wanted {
            return crate::event::deserialize_payload_str::<A>(&event.payload, || {
                event_ref(&event.event_type, &event.event_version)
            });
        }
        let value: serde_json::Value =
            serde_json::from_str(&event.payload).map_err(|source| StoreError::Deserialize {
                event: Box::new(event_ref(&event.event_type, &event.event_version)),
                source,
            })?;
        let (event_type, event_version, payload) = crate::upcast::upcaster::apply(
            &self.upcasters,
            A::TYPE,
            aggregate_id,
            event.sequence,
            Some(event.position),
            event.event_type.clone(),
            event.event_version.clone(),
            value,
        )?;
        deserialize_payload::<A>(payload, || event_ref(&event_type, &event_version))
    }

    pub(super) async fn snapshot(&self, aggregate_id: &str, aggregate: &A, version: u64) {
        // (kept below the command path: a failed snapshot never fails a command)
        let ring = self.store.key_ring();
        let sealed = crate::personal::sealing(ring.as_ref(), Some(aggregate_id), true, || {
            serde_json::to_value(aggregate).map_err(crate::error::BoxError::from)
        })
        .await
        .map_err(crate::error::BoxError::from)
        .and_then(|sealed| sealed);
        let state = match sealed {
            Ok(state) => state,
            Err(error) => {
                tracing::warn!(error = %crate::error::error_chain(error.as_ref()),
                    aggregate_type = A::TYPE,
                    aggregate_id,
                    "snapshot not serializable"
                );
                return;
            }
        };
        // The events are committed; a failed snapshot only costs a longer load later.
        if let Err(error) = self
            .store
            .save_snapshot(Snapshot {
                aggregate_type: A::TYPE.to_owned(),
                aggregate_id: aggregate_id.to_owned(),
                version,
                state,
            })
            .await
        {
            tracing::warn!(error = %crate::error::error_chain(&error),
                aggregate_type = A::TYPE,
                aggregate_id,
                version,
                "snapshot not saved"
            );
        }
    }
}
