//! Renamed event types: read under their new name, wherever events are
//! read.

use cqrs_es::persist::SerializedEvent;

use super::upcaster::{UpcastError, Upcaster};

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

    /// Renames a stored type and its payload key to the current name (what
    /// [`apply`](Self::apply) does to a read event).
    pub(crate) fn rename_read(&self, event_type: &mut String, payload: &mut serde_json::Value) {
        if let Some(new) = self.renamed(event_type) {
            rename_payload(payload, event_type, &new);
            *event_type = new;
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
        self.rename_read(&mut event.event_type, &mut event.payload);
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
