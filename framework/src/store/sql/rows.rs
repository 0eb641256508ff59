//! Integer columns as Outflow's unsigned values, and the error for a stored
//! value Outflow cannot represent.

use sqlx::{ColumnIndex, Decode, Row, Type};

use crate::error::StoreError;

/// A non-negative integer column; a negative value is a corrupt row of
/// `table`, a column that cannot be read is `failed`'s database error.
pub(crate) fn u64_column<R>(
    row: &R,
    column: &'static str,
    table: &str,
    failed: impl FnOnce(sqlx::Error) -> StoreError,
) -> Result<u64, StoreError>
where
    R: Row,
    for<'r> i64: Decode<'r, R::Database> + Type<R::Database>,
    &'static str: ColumnIndex<R>,
{
    let value: i64 = row.try_get(column).map_err(failed)?;
    u64::try_from(value).map_err(|_| corrupt(table, &format!("negative {column} {value}")))
}

/// A stored value of `table` that Outflow cannot represent.
pub(crate) fn corrupt(table: &str, what: &str) -> StoreError {
    StoreError::Corrupt {
        table: table.to_owned(),
        what: what.to_owned(),
    }
}
