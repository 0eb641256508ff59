//! The upcaster trait, its error, and running a list of them over one
//! stored event: what the rest of the crate needs to read old events.

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
