//! Upcasters: rewrite stored events of an old shape into the current one
//! while they are read, so old events never need to be migrated in place.
//!
//! Outflow's [`Upcaster`] is fallible: a failure becomes
//! [`StoreError::Upcast`] naming the event. Existing
//! `cqrs-es` upcasters (for example `SemanticVersionEventUpcaster`) keep
//! working through [`from_cqrs`]; if one panics, the panic is caught and
//! reported as the same typed error.

use std::panic::{catch_unwind, AssertUnwindSafe};

use cqrs_es::persist::{EventUpcaster, SerializedEvent};

use crate::error::{EventRef, StoreError};

/// Rewrites stored events of one type and version into a newer shape.
///
/// ```
/// use outflow::upcast::{Upcaster, UpcastError};
/// use cqrs_es::persist::SerializedEvent;
///
/// /// `Deposited` v1 stored `amount` as a string; v2 stores a number.
/// struct DepositedV2;
///
/// impl Upcaster for DepositedV2 {
///     fn can_upcast(&self, event_type: &str, event_version: &str) -> bool {
///         event_type == "Deposited" && event_version == "1"
///     }
///     fn upcast(&self, mut event: SerializedEvent) -> Result<SerializedEvent, UpcastError> {
///         let amount = event.payload["Deposited"]["amount"]
///             .as_str()
///             .and_then(|s| s.parse::<i64>().ok())
///             .ok_or_else(|| UpcastError::new("`amount` is not a numeric string"))?;
///         event.payload["Deposited"]["amount"] = amount.into();
///         event.event_version = "2".into();
///         Ok(event)
///     }
/// }
/// ```
pub trait Upcaster: Send + Sync {
    /// A name for error messages.
    fn name(&self) -> &str {
        std::any::type_name::<Self>()
    }

    /// Whether this upcaster rewrites events of this type and version.
    fn can_upcast(&self, event_type: &str, event_version: &str) -> bool;

    /// Rewrites the event.
    ///
    /// # Errors
    ///
    /// An [`UpcastError`] saying why the event could not be rewritten.
    fn upcast(&self, event: SerializedEvent) -> Result<SerializedEvent, UpcastError>;
}

/// Why an upcaster could not rewrite an event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UpcastError(String);

impl UpcastError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        UpcastError(message.into())
    }
}

/// Wraps a `cqrs-es` upcaster; a panic inside it becomes an [`UpcastError`].
///
/// ```
/// use cqrs_es::persist::SemanticVersionEventUpcaster;
/// let upcaster = outflow::upcast::from_cqrs(Box::new(SemanticVersionEventUpcaster::new(
///     "Deposited",
///     "2.0.0",
///     Box::new(|payload| payload),
/// )));
/// assert!(upcaster.can_upcast("Deposited", "1.0"));
/// ```
pub fn from_cqrs(upcaster: Box<dyn EventUpcaster>) -> Box<dyn Upcaster> {
    Box::new(CqrsUpcaster(upcaster))
}

struct CqrsUpcaster(Box<dyn EventUpcaster>);

impl Upcaster for CqrsUpcaster {
    fn name(&self) -> &str {
        "cqrs-es upcaster"
    }

    fn can_upcast(&self, event_type: &str, event_version: &str) -> bool {
        catch_unwind(AssertUnwindSafe(|| {
            self.0.can_upcast(event_type, event_version)
        }))
        .unwrap_or(false)
    }

    fn upcast(&self, event: SerializedEvent) -> Result<SerializedEvent, UpcastError> {
        catch_unwind(AssertUnwindSafe(|| self.0.upcast(event))).map_err(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "the upcaster panicked".to_owned());
            UpcastError::new(format!("panicked: {message}"))
        })
    }
}

/// A list of upcasters, applied in order, that clones cheaply (the list is
/// shared): declare it once, next to the aggregate and its events, and give
/// the same value to everything that reads them — the command bus
/// ([`CommandBusBuilder::upcasters`](crate::CommandBusBuilder::upcasters)),
/// views, typed and query projections (`.upcasters(..)`), and hand-written
/// projections ([`RecordedEvent::decode_payload_with`](crate::RecordedEvent::decode_payload_with),
/// through `&upcasters`). Put [`EventAliases`] first, so the upcasters
/// after them see current names.
///
/// ```
/// use outflow::upcast::{EventAliases, Upcaster, UpcastError, Upcasters};
/// use cqrs_es::persist::SerializedEvent;
///
/// struct DepositedV2;
/// impl Upcaster for DepositedV2 {
///     fn can_upcast(&self, event_type: &str, event_version: &str) -> bool {
///         event_type == "Deposited" && event_version == "1"
///     }
///     fn upcast(&self, mut event: SerializedEvent) -> Result<SerializedEvent, UpcastError> {
///         event.event_version = "2".into();
///         Ok(event)
///     }
/// }
///
/// let upcasters = Upcasters::new()
///     .with(EventAliases::new().rename("AccountCredited", "Deposited"))
///     .with(DepositedV2);
/// let for_the_views = upcasters.clone(); // cheap: the same list
/// assert_eq!(for_the_views.len(), 2);
/// assert!(upcasters.can_upcast("AccountCredited", "1"));
/// ```
#[derive(Clone, Default)]
pub struct Upcasters {
    list: std::sync::Arc<Vec<Box<dyn Upcaster>>>,
}

impl std::fmt::Debug for Upcasters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.list.iter().map(|u| u.name()))
            .finish()
    }
}

impl Upcasters {
    /// No upcasters.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds an upcaster at the end of the list.
    pub fn with(self, upcaster: impl Upcaster + 'static) -> Self {
        self.with_boxed(Box::new(upcaster))
    }

    /// Adds a boxed upcaster at the end of the list.
    pub fn with_boxed(mut self, upcaster: Box<dyn Upcaster>) -> Self {
        match std::sync::Arc::get_mut(&mut self.list) {
            Some(list) => {
                list.push(upcaster);
                self
            }
            // Shared already: the shared list runs first, as one upcaster.
            None => Upcasters {
                list: std::sync::Arc::new(vec![Box::new(self), upcaster]),
            },
        }
    }
}

impl std::ops::Deref for Upcasters {
    type Target = [Box<dyn Upcaster>];

    fn deref(&self) -> &Self::Target {
        &self.list
    }
}

impl From<Vec<Box<dyn Upcaster>>> for Upcasters {
    fn from(list: Vec<Box<dyn Upcaster>>) -> Self {
        Upcasters {
            list: std::sync::Arc::new(list),
        }
    }
}

impl From<EventAliases> for Upcasters {
    fn from(aliases: EventAliases) -> Self {
        Upcasters::new().with(aliases)
    }
}

/// The list as one upcaster: each of its upcasters that applies, in order.
impl Upcaster for Upcasters {
    fn name(&self) -> &str {
        "upcasters"
    }

    fn can_upcast(&self, event_type: &str, event_version: &str) -> bool {
        self.list
            .iter()
            .any(|u| u.can_upcast(event_type, event_version))
    }

    fn upcast(&self, mut event: SerializedEvent) -> Result<SerializedEvent, UpcastError> {
        for upcaster in self.list.iter() {
            if upcaster.can_upcast(&event.event_type, &event.event_version) {
                event = upcaster
                    .upcast(event)
                    .map_err(|e| UpcastError::new(format!("{}: {e}", upcaster.name())))?;
            }
        }
        Ok(event)
    }
}

/// Runs every applicable upcaster in order; returns the final type, version
/// and payload.
#[allow(clippy::too_many_arguments)]
pub(crate) fn apply(
    upcasters: &[Box<dyn Upcaster>],
    aggregate_type: &str,
    aggregate_id: &str,
    sequence: u64,
    position: Option<u64>,
    event_type: String,
    event_version: String,
    payload: serde_json::Value,
) -> Result<(String, String, serde_json::Value), StoreError> {
    if !upcasters
        .iter()
        .any(|u| u.can_upcast(&event_type, &event_version))
    {
        return Ok((event_type, event_version, payload));
    }
    let mut event = SerializedEvent {
        aggregate_id: aggregate_id.to_owned(),
        sequence: usize::try_from(sequence).unwrap_or(usize::MAX),
        aggregate_type: aggregate_type.to_owned(),
        event_type,
        event_version,
        payload,
        metadata: serde_json::Value::Null,
    };
    for upcaster in upcasters {
        if !upcaster.can_upcast(&event.event_type, &event.event_version) {
            continue;
        }
        let before = EventRef {
            aggregate_type: aggregate_type.to_owned(),
            aggregate_id: aggregate_id.to_owned(),
            sequence,
            position,
            event_type: event.event_type.clone(),
            event_version: event.event_version.clone(),
        };
        event = upcaster.upcast(event).map_err(|error| StoreError::Upcast {
            event: Box::new(before),
            upcaster: upcaster.name().to_owned(),
            message: error.to_string(),
        })?;
    }
    Ok((event.event_type, event.event_version, event.payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use cqrs_es::persist::SemanticVersionEventUpcaster;
    use serde_json::json;

    #[test]
    fn cqrs_upcaster_runs_and_panics_become_errors() {
        let ok = from_cqrs(Box::new(SemanticVersionEventUpcaster::new(
            "Deposited",
            "2.0.0",
            Box::new(|mut p| {
                p["Deposited"]["note"] = json!("upcast");
                p
            }),
        )));
        let panicking = from_cqrs(Box::new(SemanticVersionEventUpcaster::new(
            "Withdrawn",
            "2.0.0",
            Box::new(|_| panic!("no amount")),
        )));
        let chain = vec![ok, panicking];
        let (t, v, p) = apply(
            &chain,
            "account",
            "a-1",
            1,
            Some(5),
            "Deposited".into(),
            "1.0".into(),
            json!({"Deposited": {}}),
        )
        .expect("upcasts");
        assert_eq!((t.as_str(), v.as_str()), ("Deposited", "2.0.0"));
        assert_eq!(p["Deposited"]["note"], "upcast");

        let err = apply(
            &chain,
            "account",
            "a-1",
            2,
            Some(6),
            "Withdrawn".into(),
            "1.0".into(),
            json!({"Withdrawn": {}}),
        )
        .expect_err("panic is an error");
        let text = err.to_string();
        assert!(
            text.contains("Withdrawn") && text.contains("a-1") && text.contains("#2"),
            "{text}"
        );
        assert!(text.contains("no amount"), "{text}");
    }
}

/// Renamed event types, declared once and applied wherever events are
/// read: give the same value to the [`CommandBus`](crate::CommandBus)
/// ([`CommandBusBuilder::event_aliases`](crate::CommandBusBuilder::event_aliases))
/// and to the [`ProjectionRunner`](crate::runner::ProjectionRunner)
/// ([`ProjectionRunnerBuilder::event_aliases`](crate::runner::ProjectionRunnerBuilder::event_aliases)).
/// Events stored under an old name are then read under the new one —
/// their `event_type` and the payload's variant key (`{"Old": {…}}` becomes
/// `{"New": {…}}`, the shape of a serde enum) — so loads, typed and batch
/// projections, views and process managers see the new name, and a
/// projection filtered with the new name also reads the stored events of
/// the old one. Nothing stored changes. Cloning is cheap (shared).
///
/// ```
/// use outflow::upcast::EventAliases;
/// let aliases = EventAliases::new().rename("AccountCredited", "Deposited");
/// assert_eq!(aliases.current("AccountCredited"), "Deposited");
/// assert_eq!(aliases.names_of("Deposited"), ["AccountCredited", "Deposited"]);
/// ```
#[derive(Debug, Clone, Default)]
pub struct EventAliases {
    /// Old name → new name.
    renames: std::sync::Arc<std::collections::BTreeMap<String, String>>,
}

impl EventAliases {
    /// No renames.
    pub fn new() -> Self {
        Self::default()
    }

    /// Events stored as `old` are read as `new` (chains follow: a rename of
    /// `new` later applies too).
    pub fn rename(mut self, old: impl Into<String>, new: impl Into<String>) -> Self {
        std::sync::Arc::make_mut(&mut self.renames).insert(old.into(), new.into());
        self
    }

    /// `true` when nothing is renamed.
    pub fn is_empty(&self) -> bool {
        self.renames.is_empty()
    }

    /// The name `name` is read under now.
    pub fn current<'a>(&'a self, name: &'a str) -> &'a str {
        let mut name = name;
        // A cycle (a → b → a) stops after as many steps as renames.
        for _ in 0..=self.renames.len() {
            match self.renames.get(name) {
                Some(next) if next != name => name = next,
                _ => break,
            }
        }
        name
    }

    /// Every stored name read as `name` (its old names and itself), sorted.
    pub fn names_of(&self, name: &str) -> Vec<String> {
        let current = self.current(name).to_owned();
        let mut names: Vec<String> = self
            .renames
            .keys()
            .filter(|old| self.current(old) == current)
            .cloned()
            .collect();
        names.push(current);
        names.sort();
        names.dedup();
        names
    }

    /// `filter` with the old names of the event types it asks for added.
    pub fn widen(&self, filter: crate::log::LogFilter) -> crate::log::LogFilter {
        if self.is_empty() || filter.event_type_list().is_empty() {
            return filter;
        }
        let mut types: Vec<String> = filter
            .event_type_list()
            .iter()
            .flat_map(|name| self.names_of(name))
            .collect();
        types.sort();
        types.dedup();
        filter.with_event_types(types)
    }

    /// Reads `event` under its current name (its type and payload key).
    pub fn apply(&self, event: &mut crate::event::RecordedEvent) {
        if let Some(new) = self.renamed(&event.event_type) {
            rename_payload(&mut event.payload, &event.event_type, &new);
            event.event_type = new;
        }
    }

    fn renamed(&self, name: &str) -> Option<String> {
        let current = self.current(name);
        (current != name).then(|| current.to_owned())
    }

    /// The renames as an [`Upcaster`] (what a command bus loads with).
    pub fn upcaster(&self) -> Box<dyn Upcaster> {
        Box::new(self.clone())
    }
}

impl Upcaster for EventAliases {
    fn name(&self) -> &str {
        "event type aliases"
    }

    fn can_upcast(&self, event_type: &str, _event_version: &str) -> bool {
        self.renamed(event_type).is_some()
    }

    fn upcast(&self, mut event: SerializedEvent) -> Result<SerializedEvent, UpcastError> {
        if let Some(new) = self.renamed(&event.event_type) {
            rename_payload(&mut event.payload, &event.event_type, &new);
            event.event_type = new;
        }
        Ok(event)
    }
}

/// A serde enum's payload `{"old": {…}}` as `{"new": {…}}`; other shapes
/// are left alone.
fn rename_payload(payload: &mut serde_json::Value, old: &str, new: &str) {
    if let Some(object) = payload.as_object_mut() {
        if object.len() == 1 {
            if let Some(body) = object.remove(old) {
                object.insert(new.to_owned(), body);
            }
        }
    }
}
