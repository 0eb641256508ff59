//! PostgreSQL errors as Outflow errors: the backend classifies its own
//! driver's errors, so the core never reads a SQLSTATE.

use crate::error::{ErrorKind, StoreError};
use crate::store::sql::errors::classify_driver;

/// Maps a sqlx error to [`StoreError::Database`] naming the operation.
pub(crate) fn db(operation: &'static str) -> impl FnOnce(sqlx::Error) -> StoreError {
    move |e| pg_error(operation, e)
}

/// A sqlx error as [`StoreError::Database`], classified by [`classify`].
pub(crate) fn pg_error(operation: &'static str, error: sqlx::Error) -> StoreError {
    StoreError::database(operation, classify(&error), error)
}

pub(crate) use crate::store::sql::to_i64;

/// Whose fault a sqlx error is, from its kind and SQLSTATE class.
///
/// - transient: lost or refused connections, pool timeouts, serialization
///   failures and deadlocks (`40001`, `40P01`), a server shutting down or
///   starting (`57P*`), too many connections and other exhausted resources
///   (`53*`), lock and statement timeouts (`55P03`, `57014`);
/// - infrastructure: what someone must fix: undefined tables and columns,
///   syntax and permission errors (`42*`), unsupported features (`0A*`),
///   authentication (`28*`), unknown database or schema (`3D*`, `3F*`),
///   server-side errors (`58*`, `XX*`), program limits (`54*`), and sqlx's
///   configuration and column-mapping errors;
/// - data: everything else: constraint violations (`23*`), bad values
///   (`22*`), errors raised by triggers, rows that do not decode.
pub(crate) fn classify(error: &sqlx::Error) -> ErrorKind {
    classify_driver(error, ErrorKind::Transient, classify_sqlstate)
}

/// Whose fault a PostgreSQL error is, by its SQLSTATE (see [`classify`]).
pub(crate) fn classify_sqlstate(code: &str) -> ErrorKind {
    let class = code.get(..2).unwrap_or(code);
    match class {
        "08" | "40" | "53" | "57" => ErrorKind::Transient,
        "55" if code == "55P03" => ErrorKind::Transient,
        "42" | "0A" | "28" | "3D" | "3F" | "58" | "XX" | "54" | "0L" | "0P" | "2F" | "39" => {
            ErrorKind::Infrastructure
        }
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

/// Whether the database said a table (or view) does not exist.
pub(crate) fn undefined_table(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.code().as_deref() == Some("42P01"))
}

/// `BEGIN` on `pool`, in a task of its own. The driver sends `BEGIN` and
/// counts the transaction only once the server answered; a caller
/// cancelled in between (a dropped request, an aborted worker) returned the
/// connection to the pool inside a transaction nobody owned, and the next
/// user's autocommit writes — appends among them — were never committed.
/// The task always finishes, and a transaction nobody takes is dropped
/// there, which rolls it back.
pub(crate) async fn begin_owned(
    pool: &sqlx::PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    let pool = pool.clone();
    match tokio::spawn(async move { pool.begin().await }).await {
        Ok(result) => result,
        Err(join) => {
            tracing::error!(error = %join, "the task starting a PostgreSQL transaction failed");
            Err(sqlx::Error::WorkerCrashed)
        }
    }
}
