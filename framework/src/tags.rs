//! Tags and queries: what a [decision](crate::decision) reads, and the
//! condition its append is checked against.
//!
//! An event may carry **tags** (`student:42`, `course:7`, `email:ann@example.com`),
//! declared by the event itself through [`Tagged`]. A [`Query`] is a list
//! of [`QueryItem`]s; an event matches an item when its type is among the
//! item's types (any type when the item names none) and it carries every
//! one of the item's tags; it matches the query when it matches any item.
//! An empty query matches nothing.
//!
//! Every event appended through a [`DecisionBus`](crate::decision::DecisionBus),
//! or through a [`CommandBus`](crate::CommandBus) built with
//! [`tag_events`](crate::CommandBusBuilder::tag_events), also carries its
//! stream's tag ([`stream_tag`]: `<aggregate type>:<aggregate id>`), so an
//! aggregate's stream is one query among others ([`QueryItem::stream`]).
//!
//! ```
//! use outflow::tags::{Query, QueryItem};
//! let query = Query::new()
//!     .with(QueryItem::tags(["course:7"]).with_types(["CourseDefined", "StudentSubscribed"]))
//!     .with(QueryItem::tags(["student:42"]).with_types(["StudentSubscribed"]));
//! assert!(query.matches("StudentSubscribed", &["course:7".into(), "student:1".into()]));
//! assert!(query.matches("StudentSubscribed", &["course:3".into(), "student:42".into()]));
//! assert!(!query.matches("CourseDefined", &["course:3".into()]));
//! # assert!(query.validate().is_ok());
//! ```

use serde::{Deserialize, Serialize};

use crate::error::StoreError;

/// The longest tag, in bytes.
pub const MAX_TAG_BYTES: usize = 512;
/// The most tags one event may carry.
pub const MAX_TAGS_PER_EVENT: usize = 64;
/// The most items in one query.
pub const MAX_QUERY_ITEMS: usize = 64;

/// An event type that declares its tags.
///
/// ```
/// use outflow::tags::Tagged;
/// # #[derive(Debug)]
/// enum CourseEvent { StudentSubscribed { student: u32, course: u32 } }
/// impl Tagged for CourseEvent {
///     fn tags(&self) -> Vec<String> {
///         match self {
///             CourseEvent::StudentSubscribed { student, course } => {
///                 vec![format!("student:{student}"), format!("course:{course}")]
///             }
///         }
///     }
/// }
/// let event = CourseEvent::StudentSubscribed { student: 42, course: 7 };
/// assert_eq!(event.tags(), ["student:42", "course:7"]);
/// ```
pub trait Tagged {
    /// The event's tags (each at most [`MAX_TAG_BYTES`], not empty, no NUL).
    fn tags(&self) -> Vec<String>;
}

/// The tag every event of stream `aggregate_type`/`aggregate_id` carries
/// when it was appended with tags: `<aggregate type>:<aggregate id>`.
///
/// ```
/// assert_eq!(outflow::tags::stream_tag("user", "u-1"), "user:u-1");
/// ```
pub fn stream_tag(aggregate_type: &str, aggregate_id: &str) -> String {
    format!("{aggregate_type}:{aggregate_id}")
}

/// One item of a [`Query`]: event types (any when empty) and tags that a
/// matching event carries all of.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct QueryItem {
    /// Event types; an event matches when its type is one of them, or when
    /// there are none.
    pub types: Vec<String>,
    /// Tags; a matching event carries every one of them.
    pub tags: Vec<String>,
}

impl QueryItem {
    /// Events of any of `types`, whatever their tags.
    pub fn types<I, T>(types: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        QueryItem {
            types: types.into_iter().map(Into::into).collect(),
            tags: Vec::new(),
        }
    }

    /// Events carrying every one of `tags`, whatever their type.
    pub fn tags<I, T>(tags: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        QueryItem {
            types: Vec::new(),
            tags: tags.into_iter().map(Into::into).collect(),
        }
    }

    /// Every event of one aggregate's stream appended with tags (see
    /// [`stream_tag`]).
    pub fn stream(aggregate_type: &str, aggregate_id: &str) -> Self {
        Self::tags([stream_tag(aggregate_type, aggregate_id)])
    }

    /// The same item, restricted to `types`.
    pub fn with_types<I, T>(mut self, types: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<String>,
    {
        self.types = types.into_iter().map(Into::into).collect();
        self
    }

    /// The same item, also requiring `tag`.
    pub fn with_tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }

    /// Whether an event of `event_type` carrying `tags` matches.
    pub fn matches(&self, event_type: &str, tags: &[String]) -> bool {
        (self.types.is_empty() || self.types.iter().any(|t| t == event_type))
            && self.tags.iter().all(|t| tags.contains(t))
    }
}

/// Events matching any of its items: what a decision reads, and what its
/// append is conditional on. An empty query matches nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Query {
    /// The items; an event matches the query when it matches one.
    pub items: Vec<QueryItem>,
}

impl Query {
    /// A query with no item (matching nothing yet).
    pub fn new() -> Self {
        Query::default()
    }

    /// The same query with one more item.
    pub fn with(mut self, item: QueryItem) -> Self {
        self.items.push(item);
        self
    }

    /// Every event, whatever its type and tags. A condition on it conflicts
    /// with every append: on PostgreSQL it serializes with every writer of
    /// the events table.
    pub fn all() -> Self {
        Query::new().with(QueryItem::default())
    }

    /// Whether the query matches no event at all.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether an event of `event_type` carrying `tags` matches.
    pub fn matches(&self, event_type: &str, tags: &[String]) -> bool {
        self.items.iter().any(|item| item.matches(event_type, tags))
    }

    /// Checks the query's size and its tags.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidQuery`] naming what is wrong.
    pub fn validate(&self) -> Result<(), StoreError> {
        if self.items.len() > MAX_QUERY_ITEMS {
            return Err(invalid_query(format!(
                "{} items; at most {MAX_QUERY_ITEMS}",
                self.items.len()
            )));
        }
        for item in &self.items {
            for tag in &item.tags {
                check_tag(tag).map_err(invalid_query)?;
            }
            if item.types.iter().any(|t| t.is_empty() || t.contains('\0')) {
                return Err(invalid_query(
                    "an event type is empty or holds a NUL character".into(),
                ));
            }
        }
        Ok(())
    }
}

impl std::fmt::Display for Query {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.items.is_empty() {
            return f.write_str("(nothing)");
        }
        for (i, item) in self.items.iter().enumerate() {
            if i > 0 {
                f.write_str(" or ")?;
            }
            let types = if item.types.is_empty() {
                "any type".to_owned()
            } else {
                item.types.join("|")
            };
            if item.tags.is_empty() {
                write!(f, "[{types}]")?;
            } else {
                write!(f, "[{types} tagged {}]", item.tags.join(" & "))?;
            }
        }
        Ok(())
    }
}

fn invalid_query(reason: String) -> StoreError {
    StoreError::InvalidQuery { reason }
}

/// Why `tag` cannot be stored, if it cannot.
pub(crate) fn check_tag(tag: &str) -> Result<(), String> {
    if tag.is_empty() {
        return Err("a tag is empty".into());
    }
    if tag.len() > MAX_TAG_BYTES {
        return Err(format!(
            "a tag is {} bytes long; at most {MAX_TAG_BYTES}",
            tag.len()
        ));
    }
    if tag.contains('\0') {
        return Err("a tag holds a NUL character".into());
    }
    Ok(())
}

/// An event's tags checked, sorted and without repeats.
pub(crate) fn normalized_tags(mut tags: Vec<String>) -> Result<Vec<String>, String> {
    for tag in &tags {
        check_tag(tag)?;
    }
    tags.sort();
    tags.dedup();
    if tags.len() > MAX_TAGS_PER_EVENT {
        return Err(format!(
            "an event carries {} tags; at most {MAX_TAGS_PER_EVENT}",
            tags.len()
        ));
    }
    Ok(tags)
}

/// A 64-bit lock key for `tag` in the log `table` (FNV-1a): two deciders
/// whose conditions share a tag, and every writer of an event carrying it,
/// meet on the same key. A collision only serializes more than needed.
pub(crate) fn lock_key(table: &str, tag: &str) -> i64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in table.bytes().chain([0u8]).chain(tag.bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_match_types_and_every_tag() {
        let item = QueryItem::tags(["a", "b"]).with_types(["T"]);
        assert!(item.matches("T", &["b".into(), "a".into(), "c".into()]));
        assert!(!item.matches("T", &["a".into()]));
        assert!(!item.matches("U", &["a".into(), "b".into()]));
        assert!(QueryItem::default().matches("X", &[]));
        assert!(!Query::new().matches("X", &[]));
        assert!(Query::all().matches("X", &[]));
    }

    #[test]
    fn bad_tags_are_refused() {
        assert!(Query::new().with(QueryItem::tags([""])).validate().is_err());
        assert!(Query::new()
            .with(QueryItem::tags(["x".repeat(MAX_TAG_BYTES + 1)]))
            .validate()
            .is_err());
        assert!(normalized_tags(vec!["a\0".into()]).is_err());
        assert_eq!(
            normalized_tags(vec!["b".into(), "a".into(), "b".into()]).unwrap(),
            ["a", "b"]
        );
        assert_ne!(lock_key("events", "a"), lock_key("events", "b"));
        assert_ne!(lock_key("events", "a"), lock_key("other", "a"));
    }
}
