//! A node's sign of life that the server takes away when the node's
//! connection ends: a session-level advisory lock held on a connection of
//! its own.
//!
//! A node that is SIGKILLed (or crashes, or its machine goes away cleanly
//! enough for its sockets to close) loses its sessions at once, and with them
//! the lock. Its heartbeat records the lock's key in the nodes table; the
//! other nodes' claims treat a lease whose owner recorded a key that no
//! session holds any more as expired, so they take its units at their next
//! heartbeat instead of after the lease's time to live. A node that is only
//! silent (a network partition, a stopped process) keeps its session and its
//! lock: its leases run out after their time to live as before, and the
//! epoch still fences a late commit. A node whose lock cannot be held (the
//! connection failed, a pooler that does not keep sessions) records no key
//! and is judged by its lease alone.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnection;
use sqlx::{ConnectOptions, Connection, PgPool};

/// How long a node waits before it tries again to hold its lock after
/// failing to: the heartbeat goes on meanwhile, without a key.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// The locks of the nodes that run on one store (usually one).
#[derive(Default)]
pub(super) struct Presences {
    held: tokio::sync::Mutex<HashMap<String, Slot>>,
}

impl std::fmt::Debug for Presences {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Presences").finish_non_exhaustive()
    }
}

enum Slot {
    Held {
        key: i64,
        connection: PgConnection,
    },
    /// Holding failed at this instant; tried again after [`RETRY_AFTER`].
    Failed(Instant),
}

impl Presences {
    /// The key of `node`'s lock, taking the lock on a new connection first
    /// when the node holds none; `None` when it cannot be held (the failure
    /// is logged, and tried again later).
    pub(super) async fn key(&self, pool: &PgPool, node: &str) -> Option<i64> {
        let mut held = self.held.lock().await;
        match held.get(node) {
            Some(Slot::Held { key, .. }) => return Some(*key),
            Some(Slot::Failed(at)) if at.elapsed() < RETRY_AFTER => return None,
            _ => {}
        }
        match hold(pool, node).await {
            Ok((key, connection)) => {
                held.insert(node.to_owned(), Slot::Held { key, connection });
                Some(key)
            }
            Err(error) => {
                tracing::warn!(%node, error = %error, "holding the node's presence lock failed; other nodes will find it dead by its lease's time to live only");
                held.insert(node.to_owned(), Slot::Failed(Instant::now()));
                None
            }
        }
    }

    /// The heartbeat found `key` held by no session: the lock's connection
    /// is gone. Drops it, so the next heartbeat holds a new one.
    pub(super) async fn lost(&self, node: &str, key: i64) {
        let mut held = self.held.lock().await;
        if matches!(held.get(node), Some(Slot::Held { key: k, .. }) if *k == key) {
            tracing::info!(%node, "the node's presence lock was lost; holding it again");
            held.remove(node);
        }
    }

    /// Lets `node`'s lock go (a clean stop): its connection is closed.
    pub(super) async fn release(&self, node: &str) {
        let slot = self.held.lock().await.remove(node);
        if let Some(Slot::Held { connection, .. }) = slot {
            if let Err(error) = connection.close().await {
                tracing::debug!(%node, %error, "closing the presence connection failed");
            }
        }
    }
}

/// Opens a connection of its own for `node` and takes a fresh lock on it.
async fn hold(pool: &PgPool, node: &str) -> Result<(i64, PgConnection), sqlx::Error> {
    let options = (*pool.connect_options())
        .clone()
        .application_name(&format!("outflow node {node}"));
    let mut connection = options.connect().await?;
    for _ in 0..4 {
        // A new key each time: a process restarted under the same node id
        // never takes its predecessor's lock for its own.
        let key = rand::random_range(1..i64::MAX);
        let taken: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut connection)
            .await?;
        if taken {
            return Ok((key, connection));
        }
    }
    Err(sqlx::Error::Protocol(
        "every key tried was locked by another session".into(),
    ))
}
