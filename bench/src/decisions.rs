//! Decisions across aggregates on PostgreSQL: plain appends with and
//! without tags (what the tags cost a writer that opts in, and that an
//! untagged append runs the statement it ran before), and decisions —
//! read by query, decide, append on condition — at 1 and 16 clients,
//! each client on its own tag (no contention) or all on one (every
//! decision races every other).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Result;
use outflow::cqrs_es::DomainEvent;
use outflow::decision::{Decision, DecisionBus, StreamId};
use outflow::store::ConditionalAppend;
use outflow::tags::{Query, QueryItem, Tagged};
use outflow::{AppendRequest, EventStore, NewEvent, PostgresStore};
use serde::{Deserialize, Serialize};

use crate::setup::{pool, Server};
use crate::stats::Size;

/// One row of the section.
pub(crate) struct DecisionRow {
    pub(crate) what: String,
    pub(crate) clients: usize,
    pub(crate) per_second: f64,
    pub(crate) conflicts_per_commit: f64,
}

/// Numbered tickets, at most 50 per counter: each decision reads its
/// counter's tickets and appends the next one.
struct Ticket;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum TicketEvent {
    Issued { counter: usize, number: u64 },
}

impl DomainEvent for TicketEvent {
    fn event_type(&self) -> String {
        "Issued".into()
    }
    fn event_version(&self) -> String {
        "1".into()
    }
}

impl Tagged for TicketEvent {
    fn tags(&self) -> Vec<String> {
        let TicketEvent::Issued { counter, .. } = self;
        vec![format!("counter:{counter}")]
    }
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

impl Decision for Ticket {
    type Command = (usize, String);
    type Event = TicketEvent;
    type State = u64;
    type Error = Never;

    fn query((counter, _): &(usize, String)) -> Query {
        Query::new().with(QueryItem::tags([format!("counter:{counter}")]))
    }
    fn stream((_, id): &(usize, String)) -> StreamId {
        StreamId::new("ticket", id.clone())
    }
    fn evolve(state: &mut u64, _: TicketEvent) {
        *state += 1;
    }
    fn decide(issued: &u64, (counter, _): &(usize, String)) -> Result<Vec<TicketEvent>, Never> {
        Ok(vec![TicketEvent::Issued {
            counter: *counter,
            number: issued + 1,
        }])
    }
}

async fn store(server: &Server, label: &str) -> Result<PostgresStore> {
    let (options, _) = server.fresh_db(label).await?;
    Ok(PostgresStore::builder(pool(&options, 20, false).await?)
        .build()
        .await?)
}

/// Runs `clients` tasks each doing `per_client` operations; returns the
/// operations per second.
pub(crate) async fn run<F, Fut>(clients: usize, per_client: usize, op: F) -> Result<f64>
where
    F: Fn(usize, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<()>> + Send,
{
    let op = Arc::new(op);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..clients {
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_client {
                op(client, i).await?;
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok((clients * per_client) as f64 / started.elapsed().as_secs_f64())
}

fn event() -> NewEvent {
    NewEvent::new("Deposited", serde_json::json!({"Deposited": {"amount": 1}}))
}

pub(crate) async fn decision_scenarios(server: &Server, size: &Size) -> Result<Vec<DecisionRow>> {
    let total = if size.quick { 400 } else { 4_000 };
    let mut rows = Vec::new();
    for clients in [1usize, 16] {
        let per_client = total / clients;
        // Aggregate commands (load the account, decide, append), for scale.
        let (system, _) = crate::setup::outflow_system(server, &format!("da{clients}")).await?;
        let accounts = (size.accounts / 4).max(clients);
        let deposits = (total / accounts).max(1);
        let command = crate::scenarios::commands(&system, accounts, deposits, clients).await?;
        rows.push(DecisionRow {
            what: "aggregate command (load, decide, append)".to_owned(),
            clients,
            per_second: command.per_second,
            conflicts_per_commit: 0.0,
        });
        // Plain appends, one event to a new stream each, without tags.
        let plain = store(server, &format!("dp{clients}")).await?;
        let rate = run(clients, per_client, move |c, i| {
            let plain = plain.clone();
            async move {
                plain
                    .append(AppendRequest::new(
                        "a",
                        format!("{c}-{i}"),
                        0,
                        vec![event()],
                    ))
                    .await?;
                Ok(())
            }
        })
        .await?;
        rows.push(DecisionRow {
            what: "plain append, no tags".to_owned(),
            clients,
            per_second: rate,
            conflicts_per_commit: 0.0,
        });
        // The same beside a tags table of 200,000 rows: an untagged append
        // never touches it.
        let beside = store(server, &format!("dq{clients}")).await?;
        sqlx::query(
            "INSERT INTO events_tags (tag, transaction_id, position) \
             SELECT 'bulk:' || i, '1'::xid8, i FROM generate_series(1, 200000) i",
        )
        .execute(beside.pool())
        .await?;
        let rate = run(clients, per_client, move |c, i| {
            let beside = beside.clone();
            async move {
                beside
                    .append(AppendRequest::new(
                        "a",
                        format!("{c}-{i}"),
                        0,
                        vec![event()],
                    ))
                    .await?;
                Ok(())
            }
        })
        .await?;
        rows.push(DecisionRow {
            what: "plain append, no tags, 200,000 tag rows in the table".to_owned(),
            clients,
            per_second: rate,
            conflicts_per_commit: 0.0,
        });
        // The same with two tags each (and the stream's): the tags' rows
        // and shared locks.
        let tagged = store(server, &format!("dt{clients}")).await?;
        let rate = run(clients, per_client, move |c, i| {
            let tagged = tagged.clone();
            async move {
                tagged
                    .append_if(
                        AppendRequest::new("a", format!("{c}-{i}"), 0, vec![event()]),
                        vec![vec![format!("client:{c}"), format!("item:{i}")]],
                        None,
                    )
                    .await?;
                Ok(())
            }
        })
        .await?;
        rows.push(DecisionRow {
            what: "plain append, 2 tags".to_owned(),
            clients,
            per_second: rate,
            conflicts_per_commit: 0.0,
        });
        for (what, shared) in [
            ("decision, own tags per client", false),
            ("decision, all clients on one tag", true),
        ] {
            if clients == 1 && shared {
                continue;
            }
            let (rate, retries) = outflow_decisions(server, clients, per_client, shared).await?;
            rows.push(DecisionRow {
                what: what.to_owned(),
                clients,
                per_second: rate,
                conflicts_per_commit: retries,
            });
        }
    }
    Ok(rows)
}

/// `clients` tasks each making `per_client` decisions, on tags of their own
/// or all on one tag at a time (`shared`), in a database of their own on
/// `server`; the decisions per second and the retries per commit.
pub(crate) async fn outflow_decisions(
    server: &Server,
    clients: usize,
    per_client: usize,
    shared: bool,
) -> Result<(f64, f64)> {
    let store = store(server, &format!("dd{clients}{}", u8::from(shared))).await?;
    let bus = Arc::new(DecisionBus::<Ticket, _>::new(store).max_attempts(1_000));
    let attempts = Arc::new(AtomicU64::new(0));
    let counted = attempts.clone();
    let issued = Arc::new(AtomicU64::new(0));
    let rate = run(clients, per_client, move |c, i| {
        let bus = bus.clone();
        let counted = counted.clone();
        let issued = issued.clone();
        async move {
            // 50 tickets per counter: a client's own counters, or
            // counters every client draws from at once.
            let counter = if shared {
                issued.fetch_add(1, Ordering::Relaxed) as usize / 50
            } else {
                c * 1_000_000 + i / 50
            };
            let done = bus.execute((counter, format!("{c}-{i}"))).await?;
            counted.fetch_add(u64::from(done.attempts), Ordering::Relaxed);
            Ok(())
        }
    })
    .await?;
    let commits = (clients * per_client) as f64;
    Ok((
        rate,
        (attempts.load(Ordering::Relaxed) as f64 - commits) / commits,
    ))
}

pub(crate) fn decision_section(rows: &[DecisionRow]) -> String {
    let mut md = String::new();
    let _ = writeln!(md, "## Decisions across aggregates\n");
    let _ = writeln!(
        md,
        "Appends and decisions on PostgreSQL, each row in a database of its own. A plain \
         append writes one event to a new stream; with tags it also writes a row per tag \
         (two, and the stream's) and takes a shared advisory lock per tag. An untagged append \
         runs the same single statement as before tags existed and writes nothing to the \
         tags table. A decision reads the events of its tag (with the stream's version), \
         decides, and appends on condition in a transaction that locks the tag, then checks, \
         inserts and claims the command id in one statement: numbered tickets, 50 to a \
         tag (each decision reads at most 49 events). With every client on one tag at a \
         time, every decision races the 15 others: a lost race reads and decides again. \
         For comparison, an aggregate command (load, decide, append) is the first rows \
         of this page.\n"
    );
    md.push_str(&rows_table("operation", rows));
    md
}

/// `rows` as a Markdown table whose first column is headed `first`.
pub(crate) fn rows_table(first: &str, rows: &[DecisionRow]) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "| {first} | clients | per second | retries per commit |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|");
    for row in rows {
        let _ = writeln!(
            md,
            "| {} | {} | {:.0} | {:.2} |",
            row.what, row.clients, row.per_second, row.conflicts_per_commit
        );
    }
    md.push('\n');
    md
}

/// `outflow-bench decision-phases`: a decision's parts timed one after
/// another at 1 client (1,000 of each, mean per call), printed: what a
/// decision spends where, for the section's reading.
pub(crate) async fn decision_phases(server: &Server) -> Result<()> {
    use outflow::{AppendInTransaction, Transactional};
    let n = 1000usize;
    let store = store(server, "probe").await?;
    let bus = DecisionBus::<Ticket, _>::new(store.clone());
    let t = Instant::now();
    for i in 0..n {
        bus.execute((i / 50, format!("p-{i}"))).await?;
    }
    eprintln!(
        "decision execute: {:.3} ms",
        t.elapsed().as_secs_f64() * 1000.0 / n as f64
    );
    let q = Ticket::query(&(7usize, String::new()));
    let t = Instant::now();
    for i in 0..n {
        store
            .read_query(&q, Some(("ticket", &format!("p-{i}"))))
            .await?;
    }
    eprintln!(
        "read_query: {:.3} ms",
        t.elapsed().as_secs_f64() * 1000.0 / n as f64
    );
    let empty = Ticket::query(&(999_999usize, String::new()));
    let t = Instant::now();
    for i in 0..n {
        store
            .read_query(&empty, Some(("ticket", &format!("p-{i}"))))
            .await?;
    }
    eprintln!(
        "read_query, no events: {:.3} ms",
        t.elapsed().as_secs_f64() * 1000.0 / n as f64
    );
    let t = Instant::now();
    for _ in 0..n {
        store.read_stream("a", "a-0", 0, 1000).await?;
    }
    eprintln!(
        "read_stream 0 events: {:.3} ms",
        t.elapsed().as_secs_f64() * 1000.0 / n as f64
    );
    let t = Instant::now();
    for i in 0..n {
        store
            .command_outcome("ticket", &format!("p-{i}"), uuid::Uuid::new_v4())
            .await?;
    }
    eprintln!(
        "command_outcome: {:.3} ms",
        t.elapsed().as_secs_f64() * 1000.0 / n as f64
    );
    let t = Instant::now();
    for i in 0..n {
        let id = format!("p-{i}");
        let (a, b) = tokio::join!(
            store.command_outcome("ticket", &id, uuid::Uuid::new_v4()),
            store.read_query(&q, Some(("ticket", &id)))
        );
        a?;
        b?;
    }
    eprintln!(
        "joined outcome+read: {:.3} ms",
        t.elapsed().as_secs_f64() * 1000.0 / n as f64
    );
    let t = Instant::now();
    for _ in 0..n {
        let tx = store.begin().await?;
        store.commit(tx).await?;
    }
    eprintln!(
        "begin+commit (empty): {:.3} ms",
        t.elapsed().as_secs_f64() * 1000.0 / n as f64
    );
    let t = Instant::now();
    for i in 0..n {
        let mut tx = store.begin().await?;
        store
            .claim_command_in(&mut tx, "x", &format!("x-{i}"), uuid::Uuid::new_v4(), 1)
            .await?;
        store.commit(tx).await?;
    }
    eprintln!(
        "begin+claim+commit: {:.3} ms",
        t.elapsed().as_secs_f64() * 1000.0 / n as f64
    );
    let t = Instant::now();
    for i in 0..n {
        store
            .append_if(
                AppendRequest::new("a", format!("t-{i}"), 0, vec![event()]),
                vec![vec![format!("counter:{}", 100 + i / 50)]],
                None,
            )
            .await?;
    }
    eprintln!(
        "append_if tagged no condition: {:.3} ms",
        t.elapsed().as_secs_f64() * 1000.0 / n as f64
    );
    let t = Instant::now();
    for i in 0..n {
        store
            .append(AppendRequest::new("a", format!("u-{i}"), 0, vec![event()]))
            .await?;
    }
    eprintln!(
        "plain append: {:.3} ms",
        t.elapsed().as_secs_f64() * 1000.0 / n as f64
    );
    Ok(())
}
