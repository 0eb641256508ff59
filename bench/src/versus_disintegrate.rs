//! Decisions across aggregates against `disintegrate` (`disintegrate-postgres`),
//! on one PostgreSQL server in the same run: the same numbered tickets,
//! 50 to a counter, each decision reading its counter's tickets and
//! appending the next one on condition that none was issued meanwhile.
//!
//! `disintegrate-postgres` creates its schema with hexadecimal integer
//! literals, which PostgreSQL accepts from version 16: these rows run on a
//! server of that version or later (`OUTFLOW_BENCH_PG16_URL`, started by
//! `scripts/bench.sh`), Outflow's rows too, so both sides share the server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::{bail, Result};
use disintegrate::serde::json::Json;
use disintegrate::{Decision, NoSnapshot, StateMutate, StateQuery as _};
use disintegrate_postgres::PgEventStore;
use serde::{Deserialize, Serialize};

use crate::decisions::{outflow_decisions, rows_table, run, DecisionRow};
use crate::setup::{pool, Server};
use crate::stats::Size;

/// The tickets, as `disintegrate` events: the counter is the domain id the
/// decision's query filters on.
#[derive(Debug, Clone, PartialEq, Eq, disintegrate::Event, Serialize, Deserialize)]
#[stream(TicketEvents, [Issued])]
enum Ticketing {
    Issued {
        #[id]
        counter: String,
        number: i64,
    },
}

/// The state a decision reads: how many tickets its counter has issued.
#[derive(Default, Clone, disintegrate::StateQuery, Serialize, Deserialize)]
#[state_query(TicketEvents)]
struct Counter {
    #[id]
    counter: String,
    issued: i64,
}

impl StateMutate for Counter {
    fn mutate(&mut self, _event: Self::Event) {
        self.issued += 1;
    }
}

#[derive(Debug, thiserror::Error)]
#[error("never")]
struct Never;

/// Issue the next ticket of a counter.
struct Issue {
    counter: String,
}

impl Decision for Issue {
    type Event = Ticketing;
    type StateQuery = Counter;
    type Error = Never;

    fn state_query(&self) -> Counter {
        Counter {
            counter: self.counter.clone(),
            issued: 0,
        }
    }

    fn process(&self, state: &Counter) -> Result<Vec<Ticketing>, Never> {
        Ok(vec![Ticketing::Issued {
            counter: self.counter.clone(),
            number: state.issued + 1,
        }])
    }
}

/// Whether a failed decision lost a race (its query's events changed
/// between the read and the append, found by its check or by the server's
/// serializable isolation before the commit): then it is read and decided
/// again.
fn lost_race(error: &disintegrate::DecisionError<Never>) -> bool {
    let disintegrate::DecisionError::StateStore(inner) = error else {
        return false;
    };
    match inner.downcast_ref::<disintegrate_postgres::Error>() {
        Some(disintegrate_postgres::Error::Concurrency) => true,
        Some(disintegrate_postgres::Error::Database(sqlx::Error::Database(db))) => {
            db.code().as_deref() == Some("40001")
        }
        _ => false,
    }
}

/// The server of version 16 or later that `scripts/bench.sh` started, if
/// any.
pub(crate) fn pg16_server() -> Result<Option<Server>> {
    match std::env::var("OUTFLOW_BENCH_PG16_URL") {
        Ok(url) if !url.is_empty() => Ok(Some(Server {
            admin: url.parse()?,
            counter: Default::default(),
        })),
        _ => Ok(None),
    }
}

/// Outflow's decisions and `disintegrate`'s on `server`, at 1 and 16
/// clients, each client on counters of its own, and 16 clients on one
/// counter at a time.
pub(crate) async fn versus_disintegrate(server: &Server, size: &Size) -> Result<Vec<DecisionRow>> {
    let total = if size.quick { 400 } else { 4_000 };
    let mut rows = Vec::new();
    for (clients, shared) in [(1usize, false), (16, false), (16, true)] {
        let per_client = total / clients;
        let label = if shared {
            "all clients on one counter"
        } else {
            "own counters per client"
        };
        let (rate, retries) = outflow_decisions(server, clients, per_client, shared).await?;
        rows.push(DecisionRow {
            what: format!("Outflow decision, {label}"),
            clients,
            per_second: rate,
            conflicts_per_commit: retries,
        });
        let (rate, retries) = disintegrate_decisions(server, clients, per_client, shared).await?;
        rows.push(DecisionRow {
            what: format!("disintegrate decision, {label}"),
            clients,
            per_second: rate,
            conflicts_per_commit: retries,
        });
    }
    Ok(rows)
}

async fn disintegrate_decisions(
    server: &Server,
    clients: usize,
    per_client: usize,
    shared: bool,
) -> Result<(f64, f64)> {
    let (options, _) = server
        .fresh_db(&format!("dis{clients}{}", u8::from(shared)))
        .await?;
    let store = PgEventStore::try_new(
        pool(&options, 20, false).await?,
        Json::<Ticketing>::default(),
    )
    .await?;
    let maker = Arc::new(disintegrate_postgres::decision_maker(store, NoSnapshot));
    let attempts = Arc::new(AtomicU64::new(0));
    let counted = attempts.clone();
    let issued = Arc::new(AtomicU64::new(0));
    let rate = run(clients, per_client, move |c, i| {
        let maker = maker.clone();
        let counted = counted.clone();
        let issued = issued.clone();
        async move {
            let counter = if shared {
                issued.fetch_add(1, Ordering::Relaxed) / 50
            } else {
                (c * 1_000_000 + i / 50) as u64
            };
            let mut tries = 0u64;
            loop {
                tries += 1;
                match maker
                    .make(Issue {
                        counter: format!("counter-{counter}"),
                    })
                    .await
                {
                    Ok(_) => break,
                    Err(error) if lost_race(&error) && tries < 1_000 => continue,
                    Err(error) => bail!("disintegrate decision failed: {error}"),
                }
            }
            counted.fetch_add(tries, Ordering::Relaxed);
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

/// The comparison's rows, or why it was not run.
pub(crate) enum Versus {
    /// Measured on a server of this version.
    Measured {
        version: String,
        rows: Vec<DecisionRow>,
    },
    /// Not run, and why.
    NotMeasured(String),
}

/// The comparison on the server `scripts/bench.sh` started for it, if any.
pub(crate) async fn versus_scenarios(size: &Size) -> Result<Versus> {
    let Some(server) = pg16_server()? else {
        return Ok(Versus::NotMeasured(
            "no PostgreSQL server of version 16 or later was given (`OUTFLOW_BENCH_PG16_URL`; \
             `scripts/bench.sh` starts one when it can fetch its binaries)"
                .to_owned(),
        ));
    };
    let mut conn = sqlx::ConnectOptions::connect(&server.admin).await?;
    let version: String = sqlx::query_scalar("SHOW server_version")
        .fetch_one(&mut conn)
        .await?;
    let rows = versus_disintegrate(&server, size).await?;
    Ok(Versus::Measured { version, rows })
}

/// The comparison as Markdown.
pub(crate) fn versus_section(versus: &Versus) -> String {
    use std::fmt::Write as _;
    let mut md = String::new();
    let _ = writeln!(md, "### Against disintegrate\n");
    match versus {
        Versus::NotMeasured(why) => {
            let _ = writeln!(md, "Not measured in this run: {why}.\n");
        }
        Versus::Measured { version, rows } => {
            let _ = writeln!(
                md,
                "The same numbered tickets decided by `disintegrate` 4.0 (`disintegrate-postgres` \
                 4.0.1, no snapshots) and by Outflow's `DecisionBus`, on one PostgreSQL {version} \
                 server in this run (its schema needs version 16 or later; the rows above run \
                 on the main server), each side in a database of its own, with the same clients \
                 and counts. A `disintegrate` decision reads the counter's events by a column \
                 holding its id, decides, and appends in a serializable transaction that takes \
                 its shared advisory locks, checks that no event of the query came after the \
                 read, and inserts; a lost race (that check or the server's serialization \
                 failure) is read and decided again by the benchmark's loop. An Outflow \
                 decision also appends to a stream of its own (checked against its version) and \
                 claims a command id, so a repeated command is answered, not applied twice.\n"
            );
            md.push_str(&rows_table("decision", rows));
        }
    }
    md
}
