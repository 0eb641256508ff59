//! A projection survives its process being killed at random moments: worker
//! processes (`src/bin/projection_worker.rs`) run the `account_balances`
//! projection one after another while events keep being appended, each
//! killed with SIGKILL after a random 50–400 ms of owning the projection (30
//! on PostgreSQL, 20 on a SQLite file shared by the test and the workers). A
//! final worker then catches up, and the table equals a fresh fold of every
//! event in the log — including each account's event count, which would show
//! an event applied twice or never.

use outflow_tests as common;

use outflow::store::Checkpoints;
use outflow::EventLog;
use std::collections::BTreeMap;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use example_accounts::projections::{BalanceRow, Balances, SqliteBalances};
use example_accounts::{BankAccount, BankEvent};
use futures::TryStreamExt;
use outflow::store::projections::UnitRecord;
use outflow::{
    AppendRequest, Backend, Checkpoint, EventStore, LogFilter, NewEvent, PostgresStore, SqliteStore,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const PROJECTION: &str = "account_balances";
const ACCOUNTS: usize = 20;
/// Appends of 10 events before the first worker starts.
const BACKLOG_APPENDS: usize = 1000;
/// The worker's batch size.
const BATCH: u64 = 20;

/// A worker process; killed (SIGKILL) and reaped when dropped, so a failing
/// test leaves none behind. It also exits when its stdin (held here) closes.
struct Worker {
    child: Child,
    node: String,
}

impl Worker {
    fn spawn(url: &str) -> Worker {
        Worker::spawn_with(url, 1)
    }

    /// A worker running the projection in `partitions` partitions.
    fn spawn_with(url: &str, partitions: u32) -> Worker {
        Worker::spawn_timed(
            url,
            partitions,
            Duration::from_secs(1),
            Duration::from_millis(150),
        )
    }

    /// A worker whose lease lives `lease` and is renewed every `heartbeat`.
    fn spawn_timed(url: &str, partitions: u32, lease: Duration, heartbeat: Duration) -> Worker {
        let child = Command::new(env!("CARGO_BIN_EXE_projection_worker"))
            .arg(url)
            .arg(partitions.to_string())
            .env("OUTFLOW_WORKER_LEASE_MS", lease.as_millis().to_string())
            .env(
                "OUTFLOW_WORKER_HEARTBEAT_MS",
                heartbeat.as_millis().to_string(),
            )
            .env_remove("RUST_LOG")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the worker");
        let node = format!("worker-{}", child.id());
        Worker { child, node }
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("poll the worker")
    }

    /// SIGKILL, then waits for the process to be gone.
    fn kill(&mut self) {
        self.child.kill().expect("kill the worker");
        self.child.wait().expect("reap the worker");
    }

    /// Sends `signal` (`-STOP`, `-CONT`) to this worker, by its own PID.
    fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(signal)
            .arg(self.child.id().to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {}", self.node);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The URL of database `name` on the test server.
fn database_url(name: &str) -> String {
    let server = common::server_url();
    let (base, query) = match server.split_once('?') {
        Some((base, query)) => (base, format!("?{query}")),
        None => (server.as_str(), String::new()),
    };
    let authority_start = base.find("://").map_or(0, |i| i + 3);
    let path_start = base[authority_start..]
        .find('/')
        .map_or(base.len(), |i| authority_start + i);
    format!("{}/{name}{query}", &base[..path_start])
}

/// Appends to `ACCOUNTS` accounts, keeping each stream's version.
struct Appender {
    versions: Vec<u64>,
    appended: usize,
    round: usize,
}

impl Appender {
    async fn append<S: EventStore>(&mut self, store: &S, count: usize) {
        let account = self.round % ACCOUNTS;
        let id = format!("acc-{account:02}");
        let events = (0..count)
            .map(|i| {
                let event = if self.versions[account] == 0 && i == 0 {
                    BankEvent::AccountOpened {
                        owner: format!("owner {account}"),
                    }
                } else if (self.round + i) % 4 == 3 {
                    BankEvent::Withdrawn { amount: 2 }
                } else {
                    BankEvent::Deposited {
                        amount: (self.round % 11 + 1) as i64,
                    }
                };
                NewEvent::from_event::<BankAccount>(&id, &event).expect("serialize")
            })
            .collect();
        store
            .append(AppendRequest {
                aggregate_type: "account".into(),
                aggregate_id: id,
                expected_version: self.versions[account],
                events,
            })
            .await
            .expect("append");
        self.versions[account] += count as u64;
        self.appended += count;
        self.round += 1;
    }
}

async fn unit<S: Checkpoints>(store: &S) -> Option<UnitRecord> {
    store
        .units(Some(PROJECTION))
        .await
        .expect("read the projection's state")
        .into_iter()
        .next()
}

/// What the crash test needs of a backend besides the role traits.
#[async_trait::async_trait]
trait Table: Backend {
    /// The rows of `account_balances`.
    async fn balance_rows(&self) -> Vec<BalanceRow>;
    /// The last event written and committed (the readable head may lag
    /// behind it while a transaction is open).
    async fn last_written(&self) -> Checkpoint;
}

#[async_trait::async_trait]
impl Table for PostgresStore {
    async fn balance_rows(&self) -> Vec<BalanceRow> {
        Balances::rows(self.pool()).await.expect("read the table")
    }

    async fn last_written(&self) -> Checkpoint {
        let (txid, position): (String, i64) = sqlx::query_as(
            // Ordered by the columns themselves: a bare `transaction_id` here
            // would sort the text the select list makes of it.
            "SELECT e.transaction_id::text AS txid, e.position FROM events e
              ORDER BY e.transaction_id DESC, e.position DESC LIMIT 1",
        )
        .fetch_one(self.pool())
        .await
        .expect("the last event written");
        Checkpoint::new(
            txid.parse().expect("a transaction id"),
            u64::try_from(position).expect("a position"),
        )
    }
}

#[async_trait::async_trait]
impl Table for SqliteStore {
    async fn balance_rows(&self) -> Vec<BalanceRow> {
        SqliteBalances::rows(self.readers())
            .await
            .expect("read the table")
    }

    async fn last_written(&self) -> Checkpoint {
        // One writer at a time: the head is the last event written.
        self.head().await.expect("head")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_workers_apply_every_event_exactly_once() {
    let db = common::TestDb::new("projection_crash").await;
    let url = database_url(&db.name);
    let store = db.store().await;
    Balances::create_table(store.pool())
        .await
        .expect("create account_balances");
    kill_workers_and_fold(store, &url, 30).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killed_workers_apply_every_event_exactly_once_on_sqlite() {
    let dir = common::TestDir::new("projection_crash_sqlite");
    let path = dir.file("crash.db");
    let store = SqliteStore::open(&path).await.expect("open the file");
    let url = format!("sqlite:{}", path.display());
    kill_workers_and_fold(store, &url, 20).await;
}

/// `workers` workers killed one after another, then a final one; the table
/// must equal the fold of the log.
async fn kill_workers_and_fold<S: Table>(store: S, url: &str, workers: usize) {
    let started = Instant::now();

    // A backlog, so that the first workers are killed while catching up in
    // batches; then appends all along.
    let mut appender = Appender {
        versions: vec![0; ACCOUNTS],
        appended: 0,
        round: 0,
    };
    for _ in 0..BACKLOG_APPENDS {
        appender.append(&store, 10).await;
    }
    let stop_appending = CancellationToken::new();
    let appending = tokio::spawn({
        let store = store.clone();
        let stop = stop_appending.clone();
        async move {
            while !stop.is_cancelled() {
                let count = 1 + appender.round % 3;
                appender.append(&store, count).await;
                tokio::time::sleep(Duration::from_millis(4)).await;
            }
            appender.appended
        }
    });

    let mut last_processed = 0;
    let mut last_checkpoint = Checkpoint::START;
    let mut progressed = 0;
    let mut mid_way = 0;
    let mut mid_catch_up = 0;
    let account_events = LogFilter::aggregate_types(["account"]);
    for round in 0..workers {
        let mut worker = Worker::spawn(url);
        // The previous worker's lease runs out within 1 s; then this one claims.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = worker.exited() {
                panic!("worker {round} exited by itself: {status}");
            }
            let unit = unit(&store).await;
            if unit
                .as_ref()
                .is_some_and(|u| u.lease_valid && u.owner.as_deref() == Some(&worker.node))
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "worker {round} ({}) did not get the projection within 20 s: {unit:?}",
                worker.node
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let lifetime = Duration::from_millis(rand::random_range(50..=400));
        tokio::time::sleep(lifetime).await;
        worker.kill();

        let unit = unit(&store).await.expect("the projection is registered");
        let head = store.head().await.expect("head");
        assert!(
            unit.processed >= last_processed && unit.checkpoint >= last_checkpoint,
            "the projection went backwards: {unit:?}, before: {last_processed} at {last_checkpoint}"
        );
        if unit.processed > last_processed {
            progressed += 1;
            if unit.checkpoint < head {
                mid_way += 1;
            }
            let left = store
                .count_events(&account_events, unit.checkpoint, head, BATCH + 1)
                .await
                .expect("count the events left");
            if left > BATCH {
                mid_catch_up += 1;
            }
        }
        last_processed = unit.processed;
        last_checkpoint = unit.checkpoint;
    }
    stop_appending.cancel();
    let appended = appending.await.expect("the appender failed");
    let head = store.last_written().await;
    println!(
        "{workers} workers killed after {:?}: {progressed} made progress, {mid_way} of them \
         with work left, {mid_catch_up} while catching up (more than a batch behind); \
         {last_processed} of {appended} events processed before the final run",
        started.elapsed()
    );
    assert!(
        mid_way > 0 && mid_catch_up > 0,
        "no worker was killed between making progress and catching up \
         ({mid_way} with work left, {mid_catch_up} more than a batch behind)"
    );

    let mut last = Worker::spawn(url);
    outflow::runner::wait_for(&store, head, &[PROJECTION], Duration::from_secs(60))
        .await
        .expect("the final worker catches up");
    last.kill();
    assert_table_is_the_fold(&store, appended, head).await;
    println!("done after {:?}", started.elapsed());
}

/// The table equals a fresh fold of every account event in the log (each
/// account's event count included, which would show an event applied twice
/// or never), `appended` events in all, counted once by committed batches;
/// nothing parked. `head` is the target the projection was waited for.
async fn assert_table_is_the_fold<S: Table>(store: &S, appended: usize, head: Checkpoint) {
    let account_events = LogFilter::aggregate_types(["account"]);
    let events: Vec<_> = outflow::log::read_log(store, Checkpoint::START, account_events, 1000)
        .try_collect()
        .await
        .expect("read the log");
    assert_eq!(events.len(), appended, "account events in the log");
    let mut expected: BTreeMap<String, BalanceRow> = BTreeMap::new();
    for event in events {
        let id = event.aggregate_id.clone();
        let envelope = event
            .decode::<BankAccount>(&[])
            .expect("decode an account event");
        let row = expected.entry(id.clone()).or_default();
        Balances::fold([&envelope.payload], &id, row);
    }
    let rows = store.balance_rows().await;
    let actual: BTreeMap<String, BalanceRow> = rows
        .into_iter()
        .map(|row| (row.account_id.clone(), row))
        .collect();
    let wrong: Vec<_> = expected
        .keys()
        .chain(actual.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|id| expected.get(*id) != actual.get(*id))
        .map(|id| {
            format!(
                "{id}: table {:?}, fold {:?}",
                actual.get(id),
                expected.get(id)
            )
        })
        .collect();
    let dead_letters = store.dead_letters(PROJECTION).await.expect("dead letters");
    let final_unit = unit(store).await.expect("the projection is registered");
    assert!(
        wrong.is_empty(),
        "account_balances differs from a fold of the log in {} of {} accounts:\n{}\n\
         target {head}, unit {final_unit:?}, parked {dead_letters:#?}",
        wrong.len(),
        expected.len(),
        wrong.join("\n")
    );
    assert_eq!(actual.len(), ACCOUNTS, "accounts in the table");

    let unit = unit(store).await.expect("the projection is registered");
    assert_eq!(
        unit.processed, appended as u64,
        "events counted by committed batches"
    );
    let dead_letters = store.dead_letters(PROJECTION).await.expect("dead letters");
    assert!(dead_letters.is_empty(), "parked: {dead_letters:#?}");
}

/// How many of the projection's units each live owner holds.
async fn owners(store: &PostgresStore) -> std::collections::BTreeMap<String, usize> {
    let mut owners = std::collections::BTreeMap::new();
    for unit in store
        .units(Some(PROJECTION))
        .await
        .expect("read the projection's state")
    {
        if let (Some(owner), true) = (unit.owner, unit.lease_valid) {
            *owners.entry(owner).or_insert(0) += 1;
        }
    }
    owners
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_replacement_of_a_killed_runner_gets_work() {
    let db = common::TestDb::new("projection_replacement").await;
    let url = database_url(&db.name);
    let store = db.store().await;
    Balances::create_table(store.pool())
        .await
        .expect("create account_balances");
    let mut workers: Vec<Worker> = (0..3).map(|_| Worker::spawn_with(&url, 4)).collect();
    let live =
        |workers: &[Worker]| -> Vec<String> { workers.iter().map(|w| w.node.clone()).collect() };

    // Three runners on four partitions: every one of them gets work.
    let expect_all_working = |names: Vec<String>, what: &'static str| {
        let store = store.clone();
        async move {
            common::eventually(what, Duration::from_secs(20), || {
                let store = store.clone();
                let names = names.clone();
                async move {
                    let owners = owners(&store).await;
                    let owned: usize = owners.values().sum();
                    let all_busy = names.iter().all(|n| owners.get(n).is_some_and(|&c| c >= 1));
                    let only_live = owners.keys().all(|n| names.contains(n));
                    if owned == 4 && all_busy && only_live {
                        Ok(owners)
                    } else {
                        Err(format!("{owners:?}"))
                    }
                }
            })
            .await
            .0
        }
    };
    let spread = expect_all_working(live(&workers), "3 workers on 4 partitions all working").await;
    let mut counts: Vec<usize> = spread.values().copied().collect();
    counts.sort();
    assert_eq!(counts, [1, 1, 2], "{spread:?}");

    // SIGKILL the one holding two units, start a replacement: once the dead
    // worker's leases run out, the survivors and the newcomer share the four
    // units, and the newcomer is not left idle.
    let (busiest, _) = spread
        .iter()
        .max_by_key(|(_, &count)| count)
        .expect("an owner");
    let index = workers
        .iter()
        .position(|w| &w.node == busiest)
        .expect("the busiest worker is ours");
    let mut killed = workers.remove(index);
    killed.kill();
    workers.push(Worker::spawn_with(&url, 4));
    let after = expect_all_working(live(&workers), "the replacement gets work").await;
    assert!(!after.contains_key(&killed.node), "{after:?}");
    for worker in &mut workers {
        assert!(worker.exited().is_none(), "{} exited", worker.node);
    }
}

/// A lease long enough that a takeover before it runs out can only come
/// from finding the owner's process gone.
const LONG_LEASE: Duration = Duration::from_secs(60);

/// The projection's lease as the database sees it: its owner, when it
/// ends, and whether that is still ahead of the database's clock.
async fn lease_row(
    store: &PostgresStore,
) -> (Option<String>, Option<chrono::DateTime<chrono::Utc>>, bool) {
    sqlx::query_as(
        "SELECT owner, lease_until, COALESCE(lease_until > now(), false) FROM events_leases
          WHERE projection = $1 AND partition = 0",
    )
    .bind(PROJECTION)
    .fetch_one(store.pool())
    .await
    .expect("read the lease")
}

/// Waits until `node` owns the projection under a valid lease.
async fn wait_for_owner(store: &PostgresStore, node: &str, what: &str) {
    common::eventually(what, Duration::from_secs(30), || async {
        let unit = unit(store).await;
        match &unit {
            Some(u) if u.lease_valid && u.owner.as_deref() == Some(node) => Ok(()),
            _ => Err(format!("{unit:?}")),
        }
    })
    .await;
}

/// Appends in the background until stopped; returns how many events.
fn keep_appending(
    store: &PostgresStore,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<usize> {
    let store = store.clone();
    tokio::spawn(async move {
        let mut appender = Appender {
            versions: vec![0; ACCOUNTS],
            appended: 0,
            round: 0,
        };
        for _ in 0..200 {
            appender.append(&store, 5).await;
        }
        while !stop.is_cancelled() {
            let count = 1 + appender.round % 3;
            appender.append(&store, count).await;
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        appender.appended
    })
}

/// A node killed with SIGKILL loses its units at once: its session, and the
/// presence lock it held, end with the process, and a waiting node claims
/// the projection long before the dead node's 60 s lease would have run out
/// (the database's clock says so, not the test's), five times in a row while
/// events keep coming; the table then equals the fold of the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_node_is_replaced_before_its_lease_runs_out() {
    let db = common::TestDb::new("presence_failover").await;
    let url = database_url(&db.name);
    let store = db.store().await;
    Balances::create_table(store.pool())
        .await
        .expect("create account_balances");
    let stop_appending = CancellationToken::new();
    let appending = keep_appending(&store, stop_appending.clone());
    let heartbeat = Duration::from_millis(200);
    let mut owner = Worker::spawn_timed(&url, 1, LONG_LEASE, heartbeat);
    wait_for_owner(&store, &owner.node, "the first worker owns the projection").await;
    for round in 0..5 {
        // A standby, idle while the owner lives (one unit, two nodes).
        let standby = Worker::spawn_timed(&url, 1, LONG_LEASE, heartbeat);
        common::eventually("the standby beats", Duration::from_secs(30), || async {
            if nodes_alive(&store).await.contains(&standby.node) {
                Ok(())
            } else {
                Err("not yet".to_owned())
            }
        })
        .await;
        let (held_by, lease_until, _) = lease_row(&store).await;
        assert_eq!(
            held_by.as_deref(),
            Some(owner.node.as_str()),
            "round {round}"
        );
        let lease_until = lease_until.expect("a lease");
        owner.kill();
        wait_for_owner(&store, &standby.node, "the standby takes over").await;
        let before_expiry: bool = sqlx::query_scalar("SELECT now() < $1")
            .bind(lease_until)
            .fetch_one(store.pool())
            .await
            .expect("compare with the dead lease");
        assert!(
            before_expiry,
            "round {round}: the standby took over only after the dead node's lease ({lease_until}) ran out"
        );
        assert!(
            !nodes_alive(&store).await.contains(&owner.node),
            "round {round}: the killed node still counts as alive"
        );
        owner = standby;
    }
    stop_appending.cancel();
    let appended = appending.await.expect("the appender failed");
    let head = store.last_written().await;
    outflow::runner::wait_for(&store, head, &[PROJECTION], Duration::from_secs(60))
        .await
        .expect("the last standby catches up");
    owner.kill();
    assert_table_is_the_fold(&store, appended, head).await;
}

/// The nodes the database counts as alive: a recent beat, and no recorded
/// presence lock that no session holds.
async fn nodes_alive(store: &PostgresStore) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT n.node FROM events_nodes n
          WHERE n.last_seen > now() - interval '5 seconds'
            AND (n.presence IS NULL OR EXISTS (
                SELECT 1 FROM pg_locks k
                 WHERE k.locktype = 'advisory' AND k.granted AND k.objsubid = 1
                   AND k.database = (SELECT oid FROM pg_database WHERE datname = current_database())
                   AND k.classid = ((n.presence >> 32) & 4294967295)::oid
                   AND k.objid = (n.presence & 4294967295)::oid))",
    )
    .fetch_all(store.pool())
    .await
    .expect("read the nodes")
}

/// A node that is only silent — stopped with SIGSTOP, its connections and
/// its presence lock still open, as in a network partition — keeps its
/// units until its lease runs out: the standby claims only after the
/// stopped node's last lease has ended (by the database's clock). Woken
/// again, the old owner finds its claim lost and does not take the
/// projection back; the table equals the fold of the log. (The node is
/// stopped between batches: a batch it froze in mid-transaction would keep
/// its unit's row locked, and no one can claim it until the server ends
/// that session, as in a real partition.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_node_keeps_its_units_until_its_lease_runs_out() {
    let db = common::TestDb::new("presence_partition").await;
    let url = database_url(&db.name);
    let store = db.store().await;
    Balances::create_table(store.pool())
        .await
        .expect("create account_balances");
    let mut appender = Appender {
        versions: vec![0; ACCOUNTS],
        appended: 0,
        round: 0,
    };
    for _ in 0..200 {
        appender.append(&store, 5).await;
    }
    let (lease, heartbeat) = (Duration::from_secs(3), Duration::from_millis(200));
    let silent = Worker::spawn_timed(&url, 1, lease, heartbeat);
    wait_for_owner(&store, &silent.node, "the first worker owns the projection").await;
    let standby = Worker::spawn_timed(&url, 1, lease, heartbeat);
    common::eventually("the standby beats", Duration::from_secs(30), || async {
        if nodes_alive(&store).await.contains(&standby.node) {
            Ok(())
        } else {
            Err("not yet".to_owned())
        }
    })
    .await;
    let head = store.last_written().await;
    outflow::runner::wait_for(&store, head, &[PROJECTION], Duration::from_secs(60))
        .await
        .expect("the first worker catches up");
    silent.signal("-STOP");
    // A stopped process renews nothing: its last lease is final once a
    // renewal's time has passed without a change.
    let mut last_lease = lease_row(&store).await.1;
    loop {
        tokio::time::sleep(heartbeat * 2).await;
        let (_, until, _) = lease_row(&store).await;
        if until == last_lease {
            break;
        }
        last_lease = until;
    }
    let last_lease = last_lease.expect("a lease");
    // Watched all along: the standby must not own it while that lease runs.
    common::eventually(
        "the standby takes over",
        Duration::from_secs(30),
        || async {
            let (owner, early): (Option<String>, bool) = sqlx::query_as(
            "SELECT owner, now() < $2 FROM events_leases WHERE projection = $1 AND partition = 0",
        )
        .bind(PROJECTION)
        .bind(last_lease)
        .fetch_one(store.pool())
        .await
        .expect("read the lease");
            if owner.as_deref() == Some(standby.node.as_str()) {
                assert!(
                    !early,
                    "the standby claimed before the silent node's lease ended at {last_lease}"
                );
                Ok(())
            } else {
                Err(format!("{owner:?}"))
            }
        },
    )
    .await;
    silent.signal("-CONT");
    for _ in 0..200 {
        appender.append(&store, 2).await;
    }
    let head = store.last_written().await;
    outflow::runner::wait_for(&store, head, &[PROJECTION], Duration::from_secs(60))
        .await
        .expect("the standby catches up");
    let (held_by, _, valid) = lease_row(&store).await;
    assert!(
        valid && held_by.as_deref() == Some(standby.node.as_str()),
        "the woken node took the projection back: {held_by:?}"
    );
    drop((silent, standby));
    assert_table_is_the_fold(&store, appender.appended, head).await;
}
