//! Waiting between attempts: one policy type and one helper for every loop
//! that retries (projection batches, reconnects, relays, leases).
//!
//! Each wait doubles from the policy's first backoff up to its longest, and
//! is drawn at random from the upper half of that value ("equal jitter"), so
//! runners that failed together do not retry together. Kept in-house rather
//! than taken from a crate: the policy is part of the public configuration,
//! and every loop also has to stop at once when it is cancelled.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often and how patiently a failing operation is retried.
///
/// ```
/// use outflow::projection::RetryPolicy;
/// use std::time::Duration;
/// let policy = RetryPolicy { max_attempts: 3, ..RetryPolicy::default() };
/// let wait = policy.backoff(2);
/// assert!(wait >= Duration::from_millis(100) && wait <= Duration::from_millis(200));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts in all before the event counts as poison (at least 1).
    pub max_attempts: u32,
    /// Wait after the first failure; doubles after each further one.
    pub initial_backoff: Duration,
    /// The longest wait.
    pub max_backoff: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_attempts: 5,
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl RetryPolicy {
    /// The wait after failure number `attempt` (1-based), with jitter in the
    /// upper half: between half and all of `initial_backoff * 2^(attempt-1)`,
    /// capped at `max_backoff`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        jittered(ceiling(self.initial_backoff, self.max_backoff, attempt))
    }
}

/// The un-jittered wait after failure number `attempt` (1-based).
fn ceiling(initial: Duration, max: Duration, attempt: u32) -> Duration {
    let doublings = attempt.saturating_sub(1).min(31);
    initial.saturating_mul(1u32 << doublings).min(max)
}

fn jittered(ceiling: Duration) -> Duration {
    let half = ceiling / 2;
    half + half.mul_f64(rand::random::<f64>())
}

/// A running count of failures with the wait that goes with it: the one
/// backoff loop of the crate.
#[derive(Debug, Clone)]
pub(crate) struct Backoff {
    initial: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    /// Waits that start at `initial` and double up to `max`.
    pub(crate) fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial,
            max: max.max(initial),
            failures: 0,
        }
    }

    /// The waits of a [`RetryPolicy`].
    pub(crate) fn from_policy(policy: &RetryPolicy) -> Self {
        Backoff::new(policy.initial_backoff, policy.max_backoff)
    }

    /// Failures counted since the last [`reset`](Self::reset).
    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    /// Counts a failure and returns the wait that follows it.
    pub(crate) fn next_delay(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        jittered(ceiling(self.initial, self.max, self.failures))
    }

    /// Forgets the failures (after a success).
    pub(crate) fn reset(&mut self) {
        self.failures = 0;
    }

    /// Counts a failure and sleeps its wait, unless `stop` is cancelled
    /// first; `false` when cancelled.
    pub(crate) async fn wait(&mut self, stop: &CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            _ = stop.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_and_caps() {
        let (i, m) = (Duration::from_millis(100), Duration::from_secs(1));
        assert_eq!(ceiling(i, m, 0), i);
        assert_eq!(ceiling(i, m, 1), i);
        assert_eq!(ceiling(i, m, 2), Duration::from_millis(200));
        assert_eq!(ceiling(i, m, 4), Duration::from_millis(800));
        assert_eq!(ceiling(i, m, 5), m);
        assert_eq!(ceiling(i, m, u32::MAX), m);
    }

    #[test]
    fn jitter_stays_in_the_upper_half() {
        let policy = RetryPolicy::default();
        for attempt in 1..12 {
            let top = ceiling(policy.initial_backoff, policy.max_backoff, attempt);
            for _ in 0..50 {
                let wait = policy.backoff(attempt);
                assert!(wait >= top / 2 && wait <= top, "{wait:?} outside {top:?}");
            }
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_sleeps_unless_cancelled() {
        let mut backoff = Backoff::new(Duration::from_millis(8), Duration::from_millis(8));
        let stop = CancellationToken::new();
        let started = tokio::time::Instant::now();
        assert!(backoff.wait(&stop).await);
        let waited = started.elapsed();
        assert!(waited >= Duration::from_millis(4) && waited <= Duration::from_millis(8));
        stop.cancel();
        assert!(!backoff.wait(&stop).await);
        assert_eq!(backoff.failures(), 2);
    }

    #[test]
    fn backoff_counts_and_resets() {
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_millis(40));
        let delays: Vec<_> = (0..4).map(|_| backoff.next_delay()).collect();
        assert_eq!(backoff.failures(), 4);
        assert!(delays[3] >= Duration::from_millis(20) && delays[3] <= Duration::from_millis(40));
        backoff.reset();
        assert_eq!(backoff.failures(), 0);
        assert!(backoff.next_delay() <= Duration::from_millis(10));
    }
}
