//! Errors of the NATS client classified as the store reports them, and
//! how long one request may wait.

use std::time::Duration;

use crate::error::{ErrorKind, StoreError};

/// Runs `step` until it succeeds, fails for another reason than an
/// unanswered request, or `deadline` passes (then its last error).
pub(super) async fn until<T, F, Fut>(
    deadline: tokio::time::Instant,
    mut step: F,
) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    let mut pause = Duration::from_millis(50);
    loop {
        match step().await {
            Err(error)
                if error.is_unavailable() && tokio::time::Instant::now() + pause < deadline =>
            {
                tracing::debug!(error = %crate::error::error_chain(&error), "the cluster did not answer; trying again");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
            result => return result,
        }
    }
}

/// A NATS error as a store error: no answer in time, no connection, no
/// leader or quorum is [`StoreError::Unavailable`] (classified by the NATS
/// kit from the client's typed kinds and JetStream's codes), anything else
/// the cluster's refusal.
pub(super) fn nats_error(
    operation: &'static str,
    error: impl Into<crate::error::BoxError>,
) -> StoreError {
    let error: crate::error::BoxError = error.into();
    if crate::nats::errors::is_unavailable(error.as_ref()) {
        StoreError::Unavailable {
            operation,
            source: error,
        }
    } else {
        StoreError::database(operation, ErrorKind::Infrastructure, error)
    }
}

/// How long one request waits for an answer: a quarter of the timeout,
/// between 250 ms and 2 s.
pub(super) fn attempt_timeout(timeout: Duration) -> Duration {
    (timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(2))
}
