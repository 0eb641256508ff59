//! Opening a store from a URL: `sqlite://FILE`, `postgres://…`
//! (`postgresql://…`), `nats://HOST:PORT`. A store the command only reads
//! is opened as it is: no migration runs on it, and a SQLite file that does
//! not exist is an error rather than a new empty database.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use outflow::store::jetstream::JetStreamStore;
use outflow::{PostgresStore, SqliteStore};

/// Options that say how to open a store besides its URL.
#[derive(Debug, Clone, clap::Args)]
pub struct StoreOptions {
    /// The events table (SQL stores).
    #[arg(long, default_value = "events", global = true)]
    pub events_table: String,
    /// The subjects' and streams' prefix (JetStream stores).
    #[arg(long, default_value = "outflow", global = true)]
    pub nats_prefix: String,
    /// The partition count (JetStream stores; must match the store's).
    #[arg(long, default_value_t = 1, global = true)]
    pub nats_partitions: u32,
}

/// Whether the command may create what is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Read (and operate) an existing store: nothing is created or migrated.
    Existing,
    /// Write into the store: its tables or streams are created if missing.
    Create,
}

/// One of Outflow's stores.
#[derive(Debug, Clone)]
pub enum Store {
    /// A SQLite file.
    Sqlite(SqliteStore),
    /// A PostgreSQL database.
    Postgres(PostgresStore),
    /// A JetStream store.
    JetStream(JetStreamStore),
}

/// What a URL names, before anything is opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL URL.
    Postgres(String),
    /// A NATS URL.
    Nats(String),
}

impl Location {
    /// Reads a store URL.
    pub fn parse(url: &str) -> anyhow::Result<Location> {
        if let Some(path) = url
            .strip_prefix("sqlite://")
            .or_else(|| url.strip_prefix("sqlite:"))
        {
            let path = path.split('?').next().unwrap_or(path);
            if path.is_empty() {
                bail!("`{url}` names no file: write sqlite://FILE (sqlite://app.db)");
            }
            return Ok(Location::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            return Ok(Location::Postgres(url.to_owned()));
        }
        if url.starts_with("nats://") {
            return Ok(Location::Nats(url.to_owned()));
        }
        bail!(
            "`{}` is not a store URL: use sqlite://FILE, postgres://USER@HOST/DB or nats://HOST:PORT",
            redact(url)
        )
    }

    /// The URL as it may be printed: without a password.
    pub fn shown(&self) -> String {
        match self {
            Location::Sqlite(path) => format!("sqlite://{}", path.display()),
            Location::Postgres(url) | Location::Nats(url) => redact(url),
        }
    }
}

/// `url` with the password of its user part replaced by `***`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((user_part, host_part)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match user_part.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host_part}"),
        None => url.to_owned(),
    }
}

impl Store {
    /// Opens the store `url` names.
    pub async fn open(url: &str, options: &StoreOptions, access: Access) -> anyhow::Result<Store> {
        let location = Location::parse(url)?;
        let shown = location.shown();
        let migrate = access == Access::Create;
        let store = match location {
            Location::Sqlite(path) => {
                if access == Access::Existing && !path.exists() {
                    bail!("{shown}: no such file");
                }
                let store = SqliteStore::builder(&path)
                    .events_table(options.events_table.clone())
                    .migrate(migrate)
                    .build()
                    .await
                    .with_context(|| format!("opening {shown}"))?;
                Store::Sqlite(store)
            }
            Location::Postgres(url) => {
                let pool = sqlx::postgres::PgPoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect(&url)
                    .await
                    .with_context(|| format!("connecting to {shown}"))?;
                let store = PostgresStore::builder(pool)
                    .events_table(options.events_table.clone())
                    .migrate(migrate)
                    .build()
                    .await
                    .with_context(|| format!("opening {shown}"))?;
                Store::Postgres(store)
            }
            Location::Nats(url) => {
                let client = async_nats::ConnectOptions::new()
                    .connection_timeout(Duration::from_secs(10))
                    .connect(url.as_str())
                    .await
                    .with_context(|| format!("connecting to {shown}"))?;
                let store = JetStreamStore::builder(client)
                    .prefix(options.nats_prefix.clone())
                    .partitions(options.nats_partitions)
                    .build()
                    .await
                    .with_context(|| format!("opening {shown}"))?;
                Store::JetStream(store)
            }
        };
        Ok(store)
    }
}

/// Runs `$body` with `$s` bound to the concrete store inside `$store`.
macro_rules! with_store {
    ($store:expr, $s:ident => $body:expr) => {
        match $store {
            $crate::store::Store::Sqlite($s) => $body,
            $crate::store::Store::Postgres($s) => $body,
            $crate::store::Store::JetStream($s) => $body,
        }
    };
}

pub(crate) use with_store;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_their_backend() {
        assert_eq!(
            Location::parse("sqlite://app.db").ok(),
            Some(Location::Sqlite(PathBuf::from("app.db")))
        );
        assert_eq!(
            Location::parse("sqlite:/var/lib/app.db?mode=rwc").ok(),
            Some(Location::Sqlite(PathBuf::from("/var/lib/app.db")))
        );
        assert!(matches!(
            Location::parse("postgresql://u@h/db"),
            Ok(Location::Postgres(_))
        ));
        assert!(matches!(
            Location::parse("nats://127.0.0.1:4222"),
            Ok(Location::Nats(_))
        ));
        assert!(Location::parse("sqlite://").is_err());
        assert!(Location::parse("mysql://u:secret@h/db")
            .err()
            .is_some_and(|e| !e.to_string().contains("secret")));
    }

    #[test]
    fn passwords_are_not_shown() {
        assert_eq!(
            redact("postgres://ann:s3cret@db:5432/app"),
            "postgres://ann:***@db:5432/app"
        );
        assert_eq!(redact("postgres://ann@db/app"), "postgres://ann@db/app");
        assert_eq!(redact("nats://127.0.0.1:4222"), "nats://127.0.0.1:4222");
    }
}
