//! SQLite errors as Outflow errors, classified by SQLite's result codes.

use crate::error::{ErrorKind, StoreError};
use crate::store::sql::errors::classify_driver;

/// Maps a sqlx error to [`StoreError::Database`] naming the operation.
pub(crate) fn db(operation: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| sqlite_error(operation, e)
}

/// A sqlx error as [`StoreError::Database`], classified by [`classify`].
pub(crate) fn sqlite_error(operation: &'static str, error: sqlx::Error) -> StoreError {
    StoreError::database(operation, classify(&error), error)
}

pub(crate) use crate::store::sql::to_i64;

/// Whose fault a sqlx error is, by SQLite's primary result code.
///
/// - transient: `SQLITE_BUSY` and `SQLITE_LOCKED` (another writer holds the
///   file longer than the busy timeout), pool timeouts, I/O interrupted;
/// - infrastructure: `SQLITE_ERROR` (no such table or column, a syntax
///   error), read-only or unopenable files, a full disk, a file that is not a
///   database or is corrupt, permission and authorization errors, and sqlx's
///   configuration errors;
/// - data: constraint violations, type mismatches, and everything else.
pub(crate) fn classify(error: &sqlx::Error) -> ErrorKind {
    classify_driver(error, ErrorKind::Infrastructure, |code| {
        code.parse::<i32>().map_or(ErrorKind::Data, classify_code)
    })
}

/// Whose fault a SQLite result code (primary or extended) is.
pub(crate) fn classify_code(code: i32) -> ErrorKind {
    match code & 0xff {
        // BUSY, LOCKED, INTERRUPT, PROTOCOL
        5 | 6 | 9 | 15 => ErrorKind::Transient,
        // ERROR, INTERNAL, PERM, NOMEM, READONLY, IOERR, CORRUPT, FULL,
        // CANTOPEN, SCHEMA, NOLFS, AUTH, NOTADB
        1 | 2 | 3 | 7 | 8 | 10 | 11 | 13 | 14 | 17 | 22 | 23 | 26 => ErrorKind::Infrastructure,
        _ => ErrorKind::Data,
    }
}

/// As [`db`], except that a missing table is named as a set-up to fix:
/// [`ConfigError::MissingTable`](crate::error::ConfigError::MissingTable)
/// with `table` and `hint` (how to create it).
pub(crate) fn db_or_missing(
    operation: &'static str,
    table: String,
    hint: &'static str,
) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |error| {
        if undefined_table(&error) {
            crate::error::ConfigError::MissingTable { table, hint }.into()
        } else {
            db(operation)(error)
        }
    }
}

/// Whether SQLite said a table does not exist.
pub(crate) fn undefined_table(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e)
        if e.code().and_then(|c| c.parse::<i32>().ok()).is_some_and(|c| c & 0xff == 1)
            && e.message().starts_with("no such table"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_and_locked_are_transient_missing_tables_infrastructure_constraints_data() {
        assert_eq!(classify_code(5), ErrorKind::Transient);
        assert_eq!(classify_code(517), ErrorKind::Transient); // BUSY_SNAPSHOT
        assert_eq!(classify_code(6), ErrorKind::Transient);
        assert_eq!(classify_code(1), ErrorKind::Infrastructure);
        assert_eq!(classify_code(8), ErrorKind::Infrastructure);
        assert_eq!(classify_code(2067), ErrorKind::Data); // CONSTRAINT_UNIQUE
        assert_eq!(classify_code(19), ErrorKind::Data);
    }
}
