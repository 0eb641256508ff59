//! A list of upcasters that clones cheaply.

use cqrs_es::persist::SerializedEvent;

use super::aliases::EventAliases;
use super::upcaster::{UpcastError, Upcaster};

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
