//! Validation of configurable SQL identifiers (table names).
//!
//! Names from configuration are the only text Outflow formats into SQL; they
//! are checked here and quoted, so nothing a user supplies reaches a query
//! unchecked.

use crate::error::StoreError;

/// A validated, possibly schema-qualified, lower-case SQL identifier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identifier {
    schema: Option<String>,
    name: String,
}

impl Identifier {
    /// Parses `name` or `schema.name`. Each part starts with a lower-case
    /// ASCII letter or `_`, continues with lower-case letters, digits or `_`,
    /// and is at most 63 bytes (PostgreSQL's limit).
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidIdentifier`] naming `what` and the reason.
    ///
    /// ```
    /// use outflow::names::Identifier;
    /// assert!(Identifier::parse("events", "events table").is_ok());
    /// assert!(Identifier::parse("app.events", "events table").is_ok());
    /// assert!(Identifier::parse("events; drop table x", "events table").is_err());
    /// ```
    pub fn parse(text: &str, what: &'static str) -> Result<Self, StoreError> {
        let invalid = |reason| StoreError::InvalidIdentifier {
            what,
            name: text.to_owned(),
            reason,
        };
        let mut parts = text.split('.');
        let first = parts.next().unwrap_or_default();
        let second = parts.next();
        if parts.next().is_some() {
            return Err(invalid("at most one `.` (schema.table) is allowed"));
        }
        for part in [Some(first), second].into_iter().flatten() {
            check_part(part).map_err(invalid)?;
        }
        Ok(match second {
            Some(name) => Identifier {
                schema: Some(first.to_owned()),
                name: name.to_owned(),
            },
            None => Identifier {
                schema: None,
                name: first.to_owned(),
            },
        })
    }

    /// The unqualified name (used to derive index names).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The identifier quoted for SQL, e.g. `"app"."events"`.
    pub fn quoted(&self) -> String {
        match &self.schema {
            Some(schema) => format!("\"{schema}\".\"{}\"", self.name),
            None => format!("\"{}\"", self.name),
        }
    }

    /// A derived identifier in the same schema: `<name>_<suffix>`, for indexes
    /// and companion tables.
    ///
    /// # Errors
    ///
    /// [`StoreError::InvalidIdentifier`] when the result is longer than 63 bytes.
    pub fn derived(&self, suffix: &str, what: &'static str) -> Result<Identifier, StoreError> {
        let name = format!("{}_{suffix}", self.name);
        check_part(&name).map_err(|reason| StoreError::InvalidIdentifier {
            what,
            name: name.clone(),
            reason,
        })?;
        Ok(Identifier {
            schema: self.schema.clone(),
            name,
        })
    }
}

impl std::fmt::Display for Identifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.schema {
            Some(schema) => write!(f, "{schema}.{}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

fn check_part(part: &str) -> Result<(), &'static str> {
    let mut chars = part.chars();
    match chars.next() {
        None => return Err("empty name"),
        Some(c) if c.is_ascii_lowercase() || c == '_' => {}
        Some(_) => return Err("must start with a lower-case ASCII letter or `_`"),
    }
    if !chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
        return Err("only lower-case ASCII letters, digits and `_` are allowed");
    }
    if part.len() > 63 {
        return Err("longer than 63 bytes");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_and_qualified_names() {
        assert_eq!(
            Identifier::parse("events", "t").map(|i| i.quoted()).ok(),
            Some("\"events\"".to_owned())
        );
        assert_eq!(
            Identifier::parse("app_1.my_events", "t")
                .map(|i| i.quoted())
                .ok(),
            Some("\"app_1\".\"my_events\"".to_owned())
        );
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "",
            "Events",
            "1events",
            "ev ents",
            "events;drop",
            "a.b.c",
            "\"events\"",
            "ev-ents",
            ".events",
            "events.",
            &"x".repeat(64),
        ] {
            match Identifier::parse(bad, "events table") {
                Err(StoreError::InvalidIdentifier { what, name, .. }) => {
                    assert_eq!(what, "events table");
                    assert_eq!(name, bad);
                }
                other => panic!("`{bad}` was not rejected: {other:?}"),
            }
        }
    }

    #[test]
    fn derived_names_are_checked() {
        let id = Identifier::parse("s.events", "t").expect("valid");
        assert_eq!(
            id.derived("log_idx", "index").map(|i| i.quoted()).ok(),
            Some("\"s\".\"events_log_idx\"".to_owned())
        );
        let long = Identifier::parse(&"e".repeat(60), "t").expect("valid");
        assert!(long.derived("log_idx", "index").is_err());
    }
}
