//! Wake-ups: readers in this process are woken directly after a commit;
//! other nodes get one coalesced `NOTIFY` per node, sent outside any
//! transaction; a `LISTEN` session per store wakes this node's readers on
//! others' notifications.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{Inner, PostgresStore};
use crate::backoff::Backoff;

impl PostgresStore {
    /// Counts an append made inside a caller's transaction, for
    /// [`appends_committed`](Self::appends_committed).
    pub(super) fn appended_in_transaction(&self) {
        self.inner
            .appends_in_transactions
            .fetch_add(1, Ordering::AcqRel);
    }

    /// After a commit: wakes readers when appends were made in transactions
    /// since the last such wake-up. The driver's transaction type cannot say
    /// whether this very transaction appended; a wake-up that comes early
    /// (another transaction's commit) is followed by the readers' quick
    /// re-checks, so none is lost.
    pub(super) fn appends_committed(&self) {
        let appended = self.inner.appends_in_transactions.load(Ordering::Acquire);
        if self.inner.appends_woken.swap(appended, Ordering::AcqRel) != appended {
            self.signal_commit();
        }
    }

    pub(super) fn signal_commit(&self) {
        self.inner.wake.wake();
        if let Some(notify) = &self.inner.notify {
            // Full means a NOTIFY is already pending: this commit rides on it.
            let _ = notify.try_send(());
        }
    }

    pub(super) fn listen(&self) {
        if self.inner.listener_started.set(()).is_err() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::warn!("no tokio runtime: log readers fall back to polling");
            return;
        };
        let pool = self.inner.pool.clone();
        let channel = self.inner.channel.clone();
        let checkpoint_channel = self.inner.checkpoint_channel.clone();
        let shutdown = self.inner.shutdown.clone();
        let wake = Arc::downgrade(&self.inner);
        let instance = self.inner.instance.clone();
        runtime.spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
            loop {
                let channels = [channel.as_str(), checkpoint_channel.as_str()];
                let result = listen_once(&pool, channels, &instance, &shutdown, &wake).await;
                // A store closing (its pool closed, its last handle gone) is
                // not a failure: stop quietly.
                if shutdown.is_cancelled() || wake.strong_count() == 0 || pool.is_closed() {
                    if let Err(error) = result {
                        tracing::debug!(error = %crate::error::error_chain(&error), %channel, "listener stopped with its store");
                    }
                    return;
                }
                if let Err(error) = result {
                    tracing::warn!(error = %crate::error::error_chain(&error), %channel, "listener failed, reconnecting");
                }
                if !backoff.wait(&shutdown).await {
                    return;
                }
            }
        });
    }
}

/// One `LISTEN` session: wakes readers on each notification from another
/// store (this store's own commits woke them directly: its notifications
/// carry its `instance` id and are skipped), and once on connecting
/// (notifications sent while it was away are lost).
async fn listen_once(
    pool: &PgPool,
    [events_channel, checkpoint_channel]: [&str; 2],
    instance: &str,
    shutdown: &CancellationToken,
    inner: &Weak<Inner>,
) -> Result<(), sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener
        .listen_all([events_channel, checkpoint_channel])
        .await?;
    // Which signals to raise: `None` wakes both (after connecting or losing
    // the connection, anything may have been missed).
    let wake = |channel: Option<&str>| match inner.upgrade() {
        Some(inner) => {
            if channel != Some(checkpoint_channel) {
                inner.wake.wake();
            }
            if channel != Some(events_channel) {
                inner.checkpoint_wake.wake();
            }
            true
        }
        None => false,
    };
    if !wake(None) {
        return Ok(());
    }
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            received = listener.try_recv() => {
                // `Ok(None)`: the connection was lost; the next call reconnects
                // and listens again.
                let notification = received?;
                if notification.as_ref().is_some_and(|n| n.payload() == instance) {
                    continue;
                }
                if !wake(notification.as_ref().map(|n| n.channel())) {
                    return Ok(());
                }
            }
        }
    }
}

/// Sends one `NOTIFY` on `channel` per signal received, at most one per
/// `interval` (signals in between share it), always outside any transaction;
/// `payload` lets the sender's own listener ignore it.
pub(crate) fn spawn_notifier(
    pool: PgPool,
    channel: String,
    payload: String,
    interval: Duration,
    shutdown: CancellationToken,
) -> mpsc::Sender<()> {
    let (sender, mut receiver) = mpsc::channel::<()>(1);
    let task = async move {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                signal = receiver.recv() => if signal.is_none() { return },
            }
            if let Err(error) = sqlx::query("SELECT pg_notify($1, $2)")
                .bind(&channel)
                .bind(&payload)
                .execute(&pool)
                .await
            {
                // Readers on other nodes still find the rows at their next poll.
                tracing::debug!(error = %crate::error::error_chain(&error), %channel, "NOTIFY failed");
            }
            tokio::time::sleep(interval).await;
        }
    };
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) => {
            runtime.spawn(task);
        }
        Err(_) => tracing::warn!("no tokio runtime: other nodes will not be notified"),
    }
    sender
}
