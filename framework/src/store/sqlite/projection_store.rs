//! Transactions and the projection side for SQLite (being written).
