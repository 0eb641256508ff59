//! Wake-ups: readers in this process are woken directly after a commit;
//! other nodes get one coalesced `NOTIFY` per node, sent outside any
//! transaction; a `LISTEN` session per store wakes this node's readers on
//! others' notifications.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::PostgresStore;
use crate::backoff::Backoff;

impl PostgresStore {
    /// Counts an append made inside a caller's transaction (see
    /// [`AppendWakes`](crate::store::sql::wakes::AppendWakes)).
    pub(super) fn appended_in_transaction(&self) {
        self.inner.append_wakes.appended();
    }

    /// After a commit: wakes readers when appends were made in transactions
    /// since the last such wake-up. The driver's transaction type cannot say
    /// whether this very transaction appended; a wake-up that comes early
    /// (another transaction's commit) is followed by the readers' quick
    /// re-checks, so none is lost.
    pub(super) fn appends_committed(&self) {
        if self.inner.append_wakes.committed() {
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
        let inner = Arc::downgrade(&self.inner);
        let instance = self.inner.instance.clone();
        runtime.spawn(async move {
            // This store's own commits woke its readers directly: its
            // notifications carry its `instance` id and are skipped. A
            // (re)connection wakes both signals (anything may have been
            // missed while away).
            let on_signal = |signal: Signal<'_>| {
                let Some(inner) = inner.upgrade() else {
                    return false;
                };
                let from = match signal {
                    Signal::Connected => None,
                    Signal::Notified { payload, .. } if payload == instance => return true,
                    Signal::Notified { channel, .. } => Some(channel),
                };
                if from != Some(checkpoint_channel.as_str()) {
                    inner.wake.wake();
                }
                if from != Some(channel.as_str()) {
                    inner.checkpoint_wake.wake();
                }
                true
            };
            let channels = [channel.as_str(), checkpoint_channel.as_str()];
            listen_until(&pool, &channels, &shutdown, on_signal).await;
        });
    }
}

/// What a `LISTEN` session reports.
#[derive(Debug, Clone, Copy)]
pub(super) enum Signal<'a> {
    /// Connected (or reconnected): notifications sent while away are lost.
    Connected,
    /// A notification.
    Notified {
        /// Its channel.
        channel: &'a str,
        /// Its payload.
        payload: &'a str,
    },
}

/// `LISTEN`s on `channels` until `stop`, its pool closes or `on_signal`
/// returns `false`, reconnecting with backoff after a failure.
pub(super) async fn listen_until(
    pool: &PgPool,
    channels: &[&str],
    stop: &CancellationToken,
    mut on_signal: impl FnMut(Signal<'_>) -> bool + Send,
) {
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
    loop {
        let result = listen_once(pool, channels, stop, &mut on_signal).await;
        // A pool closing with its store is not a failure: stop quietly.
        let ended = matches!(result, Ok(false));
        if stop.is_cancelled() || ended || pool.is_closed() {
            if let Err(error) = result {
                tracing::debug!(error = %crate::error::error_chain(&error), channels = ?channels, "listener stopped with its store");
            }
            return;
        }
        match result {
            Ok(_) => backoff.reset(),
            Err(error) => {
                tracing::warn!(error = %crate::error::error_chain(&error), channels = ?channels, "listener failed, reconnecting");
            }
        }
        if !backoff.wait(stop).await {
            return;
        }
    }
}

/// One `LISTEN` session; `Ok(false)` when `on_signal` asked to stop.
async fn listen_once(
    pool: &PgPool,
    channels: &[&str],
    stop: &CancellationToken,
    on_signal: &mut (impl FnMut(Signal<'_>) -> bool + Send),
) -> Result<bool, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen_all(channels.iter().copied()).await?;
    if !on_signal(Signal::Connected) {
        return Ok(false);
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(true),
            received = listener.try_recv() => {
                // `Ok(None)`: the connection was lost; the next session
                // reconnects and listens again.
                let Some(notification) = received? else {
                    return Ok(true);
                };
                let signal = Signal::Notified {
                    channel: notification.channel(),
                    payload: notification.payload(),
                };
                if !on_signal(signal) {
                    return Ok(false);
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
