//! The driver's own errors classified once for both SQL backends; each
//! backend classifies its database's codes (SQLSTATE, result codes).

use crate::error::ErrorKind;

/// Whose fault a sqlx error is: a lost pool or worker is transient; sqlx's
/// configuration and column-mapping errors are infrastructure; a broken
/// connection (I/O, TLS, protocol) is `connection`'s kind (transient for a
/// server, infrastructure for a file); a database error is what `by_code`
/// says of its code (data when it has none); anything else is data.
pub(crate) fn classify_driver(
    error: &sqlx::Error,
    connection: ErrorKind,
    by_code: impl Fn(&str) -> ErrorKind,
) -> ErrorKind {
    match error {
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed => {
            ErrorKind::Transient
        }
        sqlx::Error::Io(_) | sqlx::Error::Protocol(_) | sqlx::Error::Tls(_) => connection,
        sqlx::Error::Configuration(_)
        | sqlx::Error::ColumnNotFound(_)
        | sqlx::Error::ColumnIndexOutOfBounds { .. }
        | sqlx::Error::TypeNotFound { .. }
        | sqlx::Error::Migrate(_) => ErrorKind::Infrastructure,
        sqlx::Error::Database(db) => db.code().map_or(ErrorKind::Data, |code| by_code(&code)),
        _ => ErrorKind::Data,
    }
}
