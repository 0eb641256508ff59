//! Traces that follow an event, from the command that wrote it to every
//! reaction it caused.
//!
//! An event outlives the request that wrote it: a projection handles it a
//! moment later, a process manager reacts with another command, a relay
//! publishes it to another service. To keep these in one picture, Outflow
//! stores the W3C trace context of the command in each event's metadata
//! (keys [`TRACEPARENT`] and [`TRACESTATE`]) and continues from it wherever
//! the event is handled:
//!
//! | where | span | relation to the events' traces |
//! |---|---|---|
//! | [`CommandBus`](crate::CommandBus) | `outflow.command` | child of the caller's span; its context is stored in the events it writes |
//! | a projection batch (its effects and its transaction) | `outflow.projection.batch` | a trace of its own, **linked** to each event's context |
//! | a process manager's step | `outflow.process.step` | **child** of the event's context: the command it dispatches continues the same trace |
//! | an outbox delivery | `outflow.outbox.deliver` | linked to each message's context (stored in its headers at [`enqueue`](crate::outbox::Outbox::enqueue)) |
//! | the JetStream relay (a projection) | `outflow.projection.batch` | linked to each event's context; each message carries `traceparent` and `tracestate` headers |
//! | a JetStream consumer | `outflow.consumer.handle` | child of the message's `traceparent` (linked to each, for a batch handled together) |
//!
//! So one trace reads: request → command → (events) → process step →
//! follow-up command → …, with the projection batches and deliveries that
//! handled those events linked to it.
//!
//! Spans are [`tracing`] spans. With the `opentelemetry` feature and
//! [`tracing-opentelemetry`](https://docs.rs/tracing-opentelemetry)'s layer
//! installed, they become OpenTelemetry spans with those parents and links,
//! and the trace context is read from the current span when a command
//! appends. Without the feature, the spans are still there for logs, a
//! `traceparent` your code put in a command's metadata is stored as given,
//! and [`follow`] and [`link`] do nothing.
//!
//! Your own effects can join the event's trace the same way:
//!
//! ```
//! use outflow::prelude::*;
//! use tracing::Instrument;
//!
//! async fn send_welcome_mail(event: &RecordedEvent) {
//!     let span = tracing::info_span!("send welcome mail", account = %event.aggregate_id);
//!     outflow::trace::follow(&span, event);
//!     async { /* the mail server call */ }.instrument(span).await
//! }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::str::FromStr;

use crate::event::RecordedEvent;

/// The metadata key (and the message header) of the W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// The metadata key (and the message header) of the W3C vendor trace state.
pub const TRACESTATE: &str = "tracestate";

/// Most links a batch span carries: a batch of a thousand events from one
/// request would otherwise carry a thousand copies of one link.
const MAX_LINKS: usize = 128;

/// A W3C `traceparent`: the trace an event belongs to and the span that
/// wrote it (version `00`).
///
/// ```
/// use outflow::trace::TraceParent;
///
/// let parent: TraceParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse()?;
/// assert_eq!(parent.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
/// assert!(parent.sampled());
/// assert_eq!(parent.to_string(), "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// # Ok::<(), outflow::trace::TraceParentError>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceParent {
    /// The trace's id (never all zeros).
    pub trace_id: [u8; 16],
    /// The id of the span that wrote the event (never all zeros).
    pub span_id: [u8; 8],
    /// Trace flags; bit 0 is "sampled".
    pub flags: u8,
}

/// Why a `traceparent` value was not understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TraceParentError {
    /// Not `version-traceid-spanid-flags` in lower-case hexadecimal.
    #[error("a traceparent is `00-<32 hex>-<16 hex>-<2 hex>`, not {0:?}")]
    Format(String),
    /// Version `ff` is forbidden by the W3C recommendation.
    #[error("traceparent version ff is invalid")]
    Version,
    /// A trace or span id of all zeros.
    #[error("a traceparent's trace id and span id must not be all zeros")]
    ZeroId,
}

/// Where a trace context travels: an event's metadata, an outbox
/// message's headers, a JetStream message's headers.
pub trait TraceCarrier {
    /// The value under `key`, if any.
    fn trace_value(&self, key: &str) -> Option<&str>;
}

impl TraceCarrier for HashMap<String, String> {
    fn trace_value(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

impl TraceCarrier for BTreeMap<String, String> {
    fn trace_value(&self, key: &str) -> Option<&str> {
        self.get(key).map(String::as_str)
    }
}

#[cfg(feature = "nats")]
impl TraceCarrier for async_nats::HeaderMap {
    fn trace_value(&self, key: &str) -> Option<&str> {
        self.get_last(key).map(|value| value.as_str())
    }
}

impl TraceParent {
    /// The trace context stored in `carrier` (metadata, headers), if any and
    /// valid.
    pub fn from_carrier(carrier: &impl TraceCarrier) -> Option<TraceParent> {
        carrier.trace_value(TRACEPARENT)?.parse().ok()
    }

    /// The trace context stored with `event`, if any and valid.
    pub fn of(event: &RecordedEvent) -> Option<TraceParent> {
        TraceParent::from_carrier(&event.metadata)
    }

    /// The trace id in lower-case hexadecimal (what trace viewers search by).
    pub fn trace_id_hex(&self) -> String {
        hex(&self.trace_id)
    }

    /// The span id in lower-case hexadecimal.
    pub fn span_id_hex(&self) -> String {
        hex(&self.span_id)
    }

    /// Whether the writer sampled the trace.
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "00-{}-{}-{:02x}",
            hex(&self.trace_id),
            hex(&self.span_id),
            self.flags
        )
    }
}

impl FromStr for TraceParent {
    type Err = TraceParentError;

    fn from_str(value: &str) -> Result<Self, Self::Err> {
        let format = || TraceParentError::Format(value.chars().take(80).collect());
        let mut parts = value.trim().split('-');
        let (Some(version), Some(trace), Some(span), Some(flags)) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(format());
        };
        // Version 00 has exactly four parts; a later version may add more.
        let version: [u8; 1] = unhex(version).ok_or_else(format)?;
        if version[0] == 0xff {
            return Err(TraceParentError::Version);
        }
        if version[0] == 0 && parts.next().is_some() {
            return Err(format());
        }
        let trace_id: [u8; 16] = unhex(trace).ok_or_else(format)?;
        let span_id: [u8; 8] = unhex(span).ok_or_else(format)?;
        let [flags] = unhex::<1>(flags).ok_or_else(format)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return Err(TraceParentError::ZeroId);
        }
        Ok(TraceParent {
            trace_id,
            span_id,
            flags,
        })
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `N` bytes from exactly `2N` lower-case hexadecimal digits.
fn unhex<const N: usize>(text: &str) -> Option<[u8; N]> {
    let digits = text.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, pair) in digits.chunks(2).enumerate() {
        out[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(out)
}

/// Makes `span` a child of the trace `event` was written in, so what runs
/// in it (a follow-up command, a call to another service) continues that
/// trace. Does nothing without the `opentelemetry` feature, or when the
/// event carries no valid trace context.
pub fn follow(span: &tracing::Span, event: &RecordedEvent) {
    follow_carrier(span, &event.metadata);
}

/// [`follow`] for a trace context in metadata or message headers.
pub fn follow_carrier(span: &tracing::Span, carrier: &impl TraceCarrier) {
    if let Some(parent) = TraceParent::from_carrier(carrier) {
        otel::set_parent(span, parent, carrier.trace_value(TRACESTATE));
    }
}

/// Links `span` to the trace of each event (each distinct context once, at
/// most 128), for a span that handles many events at once. Does nothing
/// without the `opentelemetry` feature.
pub fn link<'a>(span: &tracing::Span, events: impl IntoIterator<Item = &'a RecordedEvent>) {
    link_carriers(span, events.into_iter().map(|event| &event.metadata));
}

/// [`link`] for trace contexts in metadata or message headers.
pub fn link_carriers<'a, C: TraceCarrier + 'a>(
    span: &tracing::Span,
    carriers: impl IntoIterator<Item = &'a C>,
) {
    if span.is_disabled() || !otel::ENABLED {
        return;
    }
    let mut seen = std::collections::HashSet::new();
    for carrier in carriers {
        if seen.len() == MAX_LINKS {
            break;
        }
        if let Some(parent) = TraceParent::from_carrier(carrier) {
            if seen.insert(parent) {
                otel::add_link(span, parent);
            }
        }
    }
}

/// Stores the current span's trace context in `metadata` (the span of the
/// command being run, or the caller's), unless there is none: then a
/// `traceparent` already there stays as it is.
pub(crate) fn stamp(metadata: &mut HashMap<String, String>) {
    if let Some((parent, state)) = otel::current() {
        metadata.insert(TRACEPARENT.to_owned(), parent.to_string());
        match state {
            Some(state) => metadata.insert(TRACESTATE.to_owned(), state),
            None => metadata.remove(TRACESTATE),
        };
    }
}

/// [`stamp`] for an outbox message's headers.
#[cfg(any(feature = "postgres", feature = "sqlite"))]
pub(crate) fn stamp_headers(headers: &mut BTreeMap<String, String>) {
    if let Some((parent, state)) = otel::current() {
        headers.insert(TRACEPARENT.to_owned(), parent.to_string());
        match state {
            Some(state) => headers.insert(TRACESTATE.to_owned(), state),
            None => headers.remove(TRACESTATE),
        };
    }
}

#[cfg(feature = "opentelemetry")]
mod otel {
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState,
    };
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::TraceParent;

    pub(super) const ENABLED: bool = true;

    fn span_context(parent: TraceParent, state: Option<&str>) -> SpanContext {
        let state = state
            .and_then(|state| state.parse::<TraceState>().ok())
            .unwrap_or_default();
        SpanContext::new(
            TraceId::from_bytes(parent.trace_id),
            SpanId::from_bytes(parent.span_id),
            TraceFlags::new(parent.flags),
            true,
            state,
        )
    }

    pub(super) fn set_parent(span: &tracing::Span, parent: TraceParent, state: Option<&str>) {
        let context =
            opentelemetry::Context::new().with_remote_span_context(span_context(parent, state));
        // Refused only for a span already started by the layer: it keeps the
        // parent it has.
        let _ = span.set_parent(context);
    }

    pub(super) fn add_link(span: &tracing::Span, parent: TraceParent) {
        span.add_link(span_context(parent, None));
    }

    pub(super) fn current() -> Option<(TraceParent, Option<String>)> {
        let context = tracing::Span::current().context();
        let span = context.span();
        let span_context = span.span_context();
        if !span_context.is_valid() {
            return None;
        }
        let state = span_context.trace_state().header();
        Some((
            TraceParent {
                trace_id: span_context.trace_id().to_bytes(),
                span_id: span_context.span_id().to_bytes(),
                flags: span_context.trace_flags().to_u8(),
            },
            (!state.is_empty()).then_some(state),
        ))
    }
}

#[cfg(not(feature = "opentelemetry"))]
mod otel {
    use super::TraceParent;

    pub(super) const ENABLED: bool = false;

    pub(super) fn set_parent(_: &tracing::Span, _: TraceParent, _: Option<&str>) {}

    pub(super) fn add_link(_: &tracing::Span, _: TraceParent) {}

    pub(super) fn current() -> Option<(TraceParent, Option<String>)> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_round_trips_and_bad_ones_are_typed_errors() {
        let text = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let parent: TraceParent = text.parse().expect("valid");
        assert_eq!(parent.to_string(), text);
        assert!(!parent.sampled());
        assert_eq!(parent.span_id_hex(), "00f067aa0ba902b7");
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902bé-01",
        ] {
            assert!(
                matches!(bad.parse::<TraceParent>(), Err(TraceParentError::Format(_))),
                "{bad:?}"
            );
        }
        assert_eq!(
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".parse::<TraceParent>(),
            Err(TraceParentError::Version)
        );
        assert_eq!(
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01".parse::<TraceParent>(),
            Err(TraceParentError::ZeroId)
        );
        // A later version may carry more parts; the first four are read.
        assert!(
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-what"
                .parse::<TraceParent>()
                .is_ok()
        );
    }

    #[test]
    fn without_a_current_trace_a_given_traceparent_is_kept() {
        let mut metadata = crate::event::Metadata::new();
        metadata.insert(
            TRACEPARENT.to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        );
        let before = metadata.clone();
        stamp(&mut metadata);
        assert_eq!(metadata, before);
    }
}
