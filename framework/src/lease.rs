//! Leases on units of work, shared by every loop that must run somewhere
//! exactly once at a time: projection units, the outbox relay.
//!
//! A node claims a unit and renews its lease on a heartbeat; a claim bumps
//! the unit's epoch unless the claiming node still holds a valid lease on it
//! (so every change of owner does), and writes fenced by the epoch fail for
//! a node that lost its claim. On PostgreSQL renewals never wait for a batch
//! in progress, so a slow batch cannot lose its own lease. On SQLite, which
//! writes one transaction at a time, a renewal waits for the batch; no other
//! node can claim meanwhile either (a claim is a write), and a batch longer
//! than the lease may hand the unit over after it commits, never during it. Work is spread by a pure rule,
//! [`balance`], that every node applies the same way to the live nodes and
//! what each owns.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::error::{ConfigError, ErrorKind, StoreError};
use crate::port::projections::{Checkpoints, Lease, Leases, ProjectionState, UnitError, UnitId};

/// The state last recorded for a leased unit: the store is written only when
/// the state or its error changes.
#[derive(Debug, Default)]
pub(crate) struct RecordedState {
    current: Option<(ProjectionState, Option<(ErrorKind, String)>)>,
}

impl RecordedState {
    /// Records `state` and `error` (its kind and text) for `lease`'s unit
    /// unless they are what was recorded last; a failure is logged and tried
    /// again at the next change.
    pub(crate) async fn set<C: Checkpoints>(
        &mut self,
        store: &C,
        lease: &Lease,
        state: ProjectionState,
        error: Option<(ErrorKind, String)>,
    ) {
        let next = (state, error);
        if self.current.as_ref() == Some(&next) {
            return;
        }
        let recorded = next.1.as_ref().map(|(kind, message)| UnitError {
            kind: *kind,
            message,
        });
        match store.record_state(lease, next.0, recorded).await {
            Ok(()) => self.current = Some(next),
            Err(error) => {
                tracing::debug!(unit = %lease.unit, error = %crate::error::error_chain(&error), "recording the state failed")
            }
        }
    }
}

/// Creates a unit's state rows, waiting out outages with backoff: `Ok(false)`
/// when `shutdown` came first. Configuration the store contradicts fails at
/// once (a backend reports missing tables as
/// [`ConfigError::MissingTable`]); another error the backend blames on the
/// environment (no permission) fails after ten attempts (some twenty
/// seconds), so a service
/// started against a database without its tables stops with that error
/// instead of waiting forever.
pub(crate) async fn register<C: Checkpoints>(
    store: &C,
    name: &str,
    partitions: u32,
    shutdown: &CancellationToken,
) -> Result<bool, StoreError> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        match store.register_projection(name, partitions).await {
            Ok(()) => return Ok(true),
            Err(error @ StoreError::Config(_)) => return Err(error),
            Err(error) => {
                tracing::warn!(unit = name, error = %crate::error::error_chain(&error), "registering failed");
                if error.kind() == ErrorKind::Infrastructure && backoff.failures() >= 10 {
                    return Err(error);
                }
                if !backoff.wait(shutdown).await {
                    return Ok(false);
                }
            }
        }
    }
}

/// Refuses a heartbeat that is not shorter than the lease it renews (the
/// lease would run out between two renewals).
pub(crate) fn check_timing(
    setting: &'static str,
    heartbeat: Duration,
    lease_ttl: Duration,
) -> Result<(), ConfigError> {
    if heartbeat < lease_ttl {
        return Ok(());
    }
    Err(ConfigError::Invalid {
        setting,
        reason: format!("{heartbeat:?} must be shorter than the lease {lease_ttl:?}"),
    })
}

/// What a node should do about its share of the units, decided from the
/// live nodes and how many units each of them owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    /// Claim free units until owning this many.
    ClaimUpTo(usize),
    /// Give one unit back (another node is short of its share).
    GiveOneBack,
    /// Keep what it has.
    Keep,
}

/// The fair-share rule every node applies the same way. With `units` units
/// and `n` live nodes, every node is owed at least `units / n` (the floor)
/// and holds at most that plus one (the ceiling). A node below the floor
/// claims up to it; a node above the ceiling, or above the floor while
/// another live node is below its floor, gives one unit back per heartbeat;
/// a node between the two claims free units up to the ceiling only while no
/// other node is short. So no live node stays idle while another holds two
/// more than it (a runner that joins later, or the replacement of one that
/// died, gets work), and nothing moves when the spread is already fair.
///
/// `owned` lists how many units each node owns (nodes missing own none).
///
/// ```
/// use outflow::lease::{balance, Balance};
/// use std::collections::HashMap;
/// let live = ["a", "b", "c"].map(String::from);
/// // 4 units owned 2/2/0: `a` and `b` give one back, and the newcomer `c`
/// // claims what comes free (up to the ceiling of 2).
/// let owned = HashMap::from([("a".to_string(), 2), ("b".to_string(), 2)]);
/// assert_eq!(balance(4, &live, &owned, "c"), Balance::ClaimUpTo(2));
/// assert_eq!(balance(4, &live, &owned, "a"), Balance::GiveOneBack);
/// // 1 unit on 2 nodes: its owner keeps it.
/// let live = ["a", "b"].map(String::from);
/// let owned = HashMap::from([("b".to_string(), 1)]);
/// assert_eq!(balance(1, &live, &owned, "b"), Balance::Keep);
/// ```
pub fn balance(
    units: usize,
    live: &[String],
    owned: &std::collections::HashMap<String, usize>,
    me: &str,
) -> Balance {
    let nodes = live.len() + usize::from(!live.iter().any(|n| n == me));
    let floor = units / nodes.max(1);
    let ceiling = floor + usize::from(!units.is_multiple_of(nodes.max(1)));
    let count = |node: &str| owned.get(node).copied().unwrap_or(0);
    let mine = count(me);
    let others_short = live.iter().any(|n| n != me && count(n) < floor);
    if mine < floor {
        Balance::ClaimUpTo(if others_short { floor } else { ceiling })
    } else if mine > ceiling || (mine > floor && others_short) {
        Balance::GiveOneBack
    } else if mine < ceiling && !others_short {
        Balance::ClaimUpTo(ceiling)
    } else {
        Balance::Keep
    }
}

/// The leases one node holds, kept alive by [`renew`](Self::renew).
#[derive(Debug)]
pub(crate) struct Holder {
    node: String,
    ttl: Duration,
    /// How long a node counts as alive after its last heartbeat.
    liveness: Duration,
    last_renewal: Instant,
}

/// What a renewal found for one held lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Renewed {
    /// Still ours, under the same epoch; carries the fresh lease.
    Held(Lease),
    /// Gone: another node claimed it, or it was reset.
    Lost,
}

impl Holder {
    pub(crate) fn new(node: impl Into<String>, ttl: Duration) -> Self {
        Holder {
            node: node.into(),
            ttl,
            liveness: ttl,
            last_renewal: Instant::now(),
        }
    }

    /// How long after its last heartbeat a node still counts as alive for
    /// the fair share (default: the lease TTL). Liveness follows the
    /// heartbeat: a few missed beats, not a whole lease.
    pub(crate) fn with_liveness(mut self, window: Duration) -> Self {
        self.liveness = window.min(self.ttl);
        self
    }

    pub(crate) fn node(&self) -> &str {
        &self.node
    }

    /// Whether the last successful renewal is older than the lease: other
    /// nodes may own our units now, so their work must stop.
    pub(crate) fn expired(&self) -> bool {
        self.last_renewal.elapsed() > self.ttl
    }

    /// Gives a unit up.
    #[cfg_attr(not(feature = "postgres"), allow(dead_code))]
    pub(crate) async fn release<L: Leases + ?Sized>(
        &self,
        leases: &L,
        lease: &Lease,
    ) -> Result<(), StoreError> {
        leases.release(lease, &self.node).await
    }

    /// Records the node as alive; returns the live nodes' ids in order.
    pub(crate) async fn heartbeat<L: Leases + ?Sized>(
        &self,
        leases: &L,
    ) -> Result<Vec<String>, StoreError> {
        leases.node_heartbeat(&self.node, self.liveness).await
    }

    /// Frees a lease of this node whatever its epoch.
    pub(crate) async fn give_up<L: Leases + ?Sized>(
        &self,
        leases: &L,
        unit: &UnitId,
    ) -> Result<(), StoreError> {
        leases.give_up(unit, &self.node).await
    }

    /// Frees every lease of this node and forgets it (a clean stop).
    pub(crate) async fn deregister<L: Leases + ?Sized>(
        &self,
        leases: &L,
    ) -> Result<(), StoreError> {
        leases.deregister(&self.node).await
    }

    /// Claims a unit for this node.
    pub(crate) async fn claim<L: Leases + ?Sized>(
        &self,
        leases: &L,
        unit: &UnitId,
    ) -> Result<Option<Lease>, StoreError> {
        leases.claim(unit, &self.node, self.ttl).await
    }

    /// Renews every lease of this node and tells, for each of `held`,
    /// whether it is still ours under the same epoch; also returns the
    /// leases it renewed that match none of `held` (a unit whose epoch an
    /// operator moved, one left from before a restart under the same node
    /// id): the caller gives those up.
    pub(crate) async fn renew<'a, L, I>(
        &mut self,
        leases: &L,
        held: I,
    ) -> Result<(Vec<(&'a UnitId, Renewed)>, Vec<UnitId>), StoreError>
    where
        L: Leases + ?Sized,
        I: IntoIterator<Item = &'a Lease> + Clone,
    {
        let renewed = leases.renew(&self.node, self.ttl).await?;
        self.last_renewal = Instant::now();
        let strays = renewed
            .iter()
            .filter(|r| {
                !held
                    .clone()
                    .into_iter()
                    .any(|h| h.unit == r.unit && h.epoch == r.epoch)
            })
            .map(|r| r.unit.clone())
            .collect();
        let outcomes = held
            .into_iter()
            .map(|lease| {
                let found = renewed
                    .iter()
                    .find(|r| r.unit == lease.unit && r.epoch == lease.epoch);
                let outcome = match found {
                    Some(current) => Renewed::Held(current.clone()),
                    None => Renewed::Lost,
                };
                (&lease.unit, outcome)
            })
            .collect();
        Ok((outcomes, strays))
    }
}

/// A lease as a single-leader loop (the outbox relay, the timer scheduler)
/// keeps it while it works.
pub(crate) struct Held {
    pub(crate) lease: Lease,
    /// Until when the lease is surely valid: the start of the last successful
    /// renewal (or claim) plus the time to live.
    valid_until: std::sync::Mutex<Instant>,
    /// Cancelled when the lease is lost.
    pub(crate) lost: CancellationToken,
}

impl Held {
    /// A lease claimed at `claimed` (before the claim was sent).
    pub(crate) fn new(lease: Lease, claimed: Instant, ttl: Duration) -> Self {
        Held {
            lease,
            valid_until: std::sync::Mutex::new(claimed + ttl),
            lost: CancellationToken::new(),
        }
    }

    pub(crate) fn valid_until(&self) -> Instant {
        match self.valid_until.lock() {
            Ok(guard) => *guard,
            Err(poisoned) => *poisoned.into_inner(),
        }
    }

    fn extend(&self, until: Instant) {
        match self.valid_until.lock() {
            Ok(mut guard) => *guard = until,
            Err(poisoned) => *poisoned.into_inner() = until,
        }
    }
}

/// Renews `held` every heartbeat until `done`; cancels `held.lost` (and
/// returns) once it is gone: taken by another node, or not renewed within
/// its time to live. `timing` is (time to live, heartbeat); `what` names
/// the loop in the logs.
pub(crate) async fn keep_lease<L: Leases + ?Sized>(
    holder: &mut Holder,
    store: &L,
    held: &Held,
    (ttl, heartbeat): (Duration, Duration),
    done: &CancellationToken,
    what: &str,
) {
    loop {
        tokio::select! {
            _ = done.cancelled() => return,
            _ = tokio::time::sleep(heartbeat) => {}
        }
        let started = Instant::now();
        let renewed =
            tokio::time::timeout(ttl, holder.renew(store, std::iter::once(&held.lease))).await;
        match renewed {
            Ok(Ok((outcomes, _))) => match outcomes.first() {
                Some((_, Renewed::Held(_))) => held.extend(started + ttl),
                _ => {
                    held.lost.cancel();
                    return;
                }
            },
            Ok(Err(error)) => {
                tracing::warn!(error = %crate::error::error_chain(&error), "renewing the {what} lease failed")
            }
            Err(_) => tracing::warn!("renewing the {what} lease timed out"),
        }
        if Instant::now() >= held.valid_until() {
            held.lost.cancel();
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|n| n.to_string()).collect()
    }

    /// Applies the rule round by round, as the nodes' heartbeats do, from
    /// `owned`, until nothing changes; returns the final counts.
    fn settle(units: usize, live: &[String], mut owned: HashMap<String, usize>) -> Vec<usize> {
        for _ in 0..100 {
            let mut changed = false;
            for me in live {
                let free = units - owned.values().sum::<usize>();
                match balance(units, live, &owned, me) {
                    Balance::ClaimUpTo(n) => {
                        let mine = owned.entry(me.clone()).or_default();
                        let take = n.saturating_sub(*mine).min(free);
                        *mine += take;
                        changed |= take > 0;
                    }
                    Balance::GiveOneBack => {
                        *owned.entry(me.clone()).or_default() -= 1;
                        changed = true;
                    }
                    Balance::Keep => {}
                }
            }
            if !changed {
                break;
            }
        }
        live.iter()
            .map(|n| owned.get(n).copied().unwrap_or(0))
            .collect()
    }

    #[test]
    fn three_runners_on_four_partitions_all_get_work() {
        let live = ids(&["a", "b", "c"]);
        let mut counts = settle(4, &live, HashMap::new());
        counts.sort();
        assert_eq!(counts, [1, 1, 2]);
        // From the stuck 2/2/0 spread as well.
        let owned = HashMap::from([("a".to_string(), 2), ("b".to_string(), 2)]);
        let mut counts = settle(4, &live, owned);
        counts.sort();
        assert_eq!(counts, [1, 1, 2]);
    }

    #[test]
    fn a_late_joiner_and_a_replacement_get_work() {
        let owned = HashMap::from([
            ("a".to_string(), 2),
            ("b".to_string(), 1),
            ("c".to_string(), 1),
        ]);
        assert_eq!(settle(4, &ids(&["a", "b", "c", "d"]), owned), [1, 1, 1, 1]);
        // `b` died and `e` replaced it: b's unit is free.
        let owned = HashMap::from([("a".to_string(), 2), ("c".to_string(), 1)]);
        let counts = settle(4, &ids(&["a", "c", "e"]), owned);
        assert!(counts.iter().all(|&c| c >= 1), "{counts:?}");
    }

    #[test]
    fn shares_stay_within_one_and_cover_every_unit() {
        for units in 0..12 {
            for nodes in 1..6 {
                let live: Vec<String> = (0..nodes).map(|i| format!("n{i}")).collect();
                let counts = settle(units, &live, HashMap::new());
                assert_eq!(counts.iter().sum::<usize>(), units, "{units} on {nodes}");
                let (min, max) = (counts.iter().min(), counts.iter().max());
                assert!(max.zip(min).is_some_and(|(a, b)| a - b <= 1), "{counts:?}");
            }
        }
    }

    #[test]
    fn a_fair_spread_does_not_move() {
        let live = ids(&["a", "b"]);
        // `a` may take a unit only if one comes free; `b` keeps its own.
        let owned = HashMap::from([("b".to_string(), 1)]);
        assert_eq!(balance(1, &live, &owned, "a"), Balance::ClaimUpTo(1));
        assert_eq!(balance(1, &live, &owned, "b"), Balance::Keep);
        assert_eq!(settle(1, &live, owned), [0, 1]);
        let owned = HashMap::from([("a".to_string(), 1), ("b".to_string(), 2)]);
        assert_eq!(balance(3, &live, &owned, "a"), Balance::ClaimUpTo(2));
        assert_eq!(balance(3, &live, &owned, "b"), Balance::Keep);
        assert_eq!(settle(3, &live, owned), [1, 2]);
    }
}
