//! Statements kept as `.sql` files beside the backend that runs them,
//! rendered once when a store is built: the table placeholders (`{events}`,
//! `{projections}`, …) replaced by the store's quoted names. Nothing is
//! rendered again on a call, except the `{filter}` a log filter gives.

/// The placeholders of one store's statements and what each stands for,
/// replaced in order (a placeholder that is a prefix of another goes last).
#[derive(Debug, Clone)]
pub(crate) struct Placeholders(Vec<(&'static str, String)>);

impl Placeholders {
    pub(crate) fn new(pairs: Vec<(&'static str, String)>) -> Self {
        Placeholders(pairs)
    }

    /// `sql` with every placeholder replaced.
    pub(crate) fn render(&self, sql: &str) -> String {
        self.0
            .iter()
            .fold(sql.to_owned(), |sql, (placeholder, value)| {
                sql.replace(placeholder, value)
            })
    }
}

/// Declares a struct with one `String` per statement, each read from
/// `<dir><field>.sql` (relative to the file that uses the macro) and
/// rendered by the function `new` is given; `statements()` (tests only)
/// lists them for [`assert_rendered`].
macro_rules! sql_statements {
    ($(#[$meta:meta])* $vis:vis struct $name:ident in $dir:literal { $($field:ident),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug)]
        $vis struct $name {
            $(pub(super) $field: String,)+
        }

        impl $name {
            /// Every statement, rendered by `render`.
            $vis fn new(render: impl Fn(&str) -> String) -> Self {
                $name {
                    $($field: render(include_str!(concat!($dir, stringify!($field), ".sql"))),)+
                }
            }

            /// Each statement with its name.
            #[cfg(test)]
            $vis fn statements(&self) -> Vec<(&'static str, &str)> {
                vec![$((stringify!($field), self.$field.as_str()),)+]
            }
        }
    };
}

pub(crate) use sql_statements;

/// Panics unless every statement is there and no placeholder other than
/// those in `kept` (replaced per call) is left in it.
#[cfg(test)]
pub(crate) fn assert_rendered(statements: Vec<(&'static str, &str)>, kept: &[&str]) {
    for (name, sql) in statements {
        assert!(!sql.trim().is_empty(), "statement `{name}` is empty");
        let mut rest = sql;
        while let Some(open) = rest.find('{') {
            let after = &rest[open + 1..];
            let close = after.find('}').map_or(after.len(), |c| c);
            let word = &after[..close];
            let placeholder =
                word.chars().all(|c| c.is_ascii_lowercase() || c == '_') && !word.is_empty();
            assert!(
                !placeholder || kept.contains(&word),
                "statement `{name}` has an unrendered placeholder {{{word}}}: {sql}"
            );
            rest = after;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_replaced_in_order() {
        let placeholders = Placeholders::new(vec![
            ("{events_outbox}", "\"o\"".to_owned()),
            ("{events}", "\"e\"".to_owned()),
        ]);
        assert_eq!(
            placeholders.render("SELECT * FROM {events_outbox}, {events}"),
            "SELECT * FROM \"o\", \"e\""
        );
    }

    #[test]
    fn a_rendered_statement_passes_and_json_braces_are_not_placeholders() {
        assert_rendered(
            vec![("read", "SELECT '{\"a\": 1}' FROM \"e\" WHERE {filter}")],
            &["filter"],
        );
    }

    #[test]
    #[should_panic(expected = "unrendered placeholder {events}")]
    fn a_placeholder_left_fails() {
        assert_rendered(vec![("read", "SELECT * FROM {events}")], &[]);
    }

    #[test]
    #[should_panic(expected = "statement `empty` is empty")]
    fn an_empty_statement_fails() {
        assert_rendered(vec![("empty", "  ")], &[]);
    }
}
