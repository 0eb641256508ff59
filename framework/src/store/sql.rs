//! What the PostgreSQL and SQLite backends share, written once: the wake-up
//! accounting of appends made in callers' transactions, the decoding of
//! integer columns and event rows, statements kept as `.sql` files and
//! rendered once, and the `Transactional` and `AppendInTransaction`
//! implementations (a macro: the two differ only in their driver's types).
//!
//! Each backend keeps what differs in its own folder (its SQL, its error
//! classification, how it begins a write transaction); this module holds
//! no SQL and names neither backend.

pub(crate) mod errors;
pub(crate) mod rows;
pub(crate) mod statements;
pub(crate) mod timers;
pub(crate) mod transactions;
pub(crate) mod wakes;

/// Values above `i64::MAX` are clamped: both databases' integers are signed
/// 64-bit, and callers validate sequences before they get here.
pub(crate) fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
