//! The backends chapter (`docs/src/backends.md`, `docs/src/postgres.md`) and
//! getting started: opening each store. `tests/backends.rs` runs the SQLite
//! and memory parts; the PostgreSQL URLs need a server of your own.

use std::time::Duration;

use outflow::StoreError;

// ANCHOR: choose
use outflow::prelude::*;
use outflow::MemoryStore;

/// The same command bus on each backend: only the store changes.
pub async fn choose(sqlite_file: &std::path::Path) -> Result<(), Box<dyn std::error::Error>> {
    // Unit tests and examples: nothing on disk.
    let memory = MemoryStore::new();
    let _carts = CommandBus::<crate::quickstart::Cart, _>::new(memory, ());
    // One process, one file, no server.
    let sqlite = SqliteStore::open(sqlite_file).await?;
    let _carts = CommandBus::<crate::quickstart::Cart, _>::new(sqlite, ());
    // Several processes or machines: PostgreSQL (creates or upgrades its schema).
    if let Ok(url) = std::env::var("SHOP_DATABASE_URL") {
        let postgres = PostgresStore::connect(&url).await?;
        let _carts = CommandBus::<crate::quickstart::Cart, _>::new(postgres, ());
    }
    Ok(())
}
// ANCHOR_END: choose

// ANCHOR: sqlite
use outflow::store::sqlite::Synchronous;

pub async fn open_sqlite(file: &std::path::Path) -> Result<SqliteStore, StoreError> {
    // The defaults: WAL, `synchronous = FULL` (a commit survives a power cut).
    let _defaults = SqliteStore::open(file).await?;
    SqliteStore::builder(file)
        // Faster on slow disks; a power cut may lose the last commits.
        .synchronous(Synchronous::Normal)
        .busy_timeout(Duration::from_secs(10))
        .poll_interval(Duration::from_millis(50))
        .build()
        .await
}
// ANCHOR_END: sqlite

// ANCHOR: tls
/// Encrypted, the server's certificate not checked (libpq's `require`).
pub async fn encrypted() -> Result<PostgresStore, StoreError> {
    PostgresStore::connect("postgres://app@db.example.com/app?sslmode=require").await
}

/// Encrypted, and the certificate checked against a root and the host name.
pub async fn verified() -> Result<PostgresStore, StoreError> {
    PostgresStore::connect(
        "postgres://app@db.example.com/app?sslmode=verify-full&sslrootcert=/etc/ssl/db-ca.pem",
    )
    .await
}
// ANCHOR_END: tls
