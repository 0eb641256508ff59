//! Durable timers on PostgreSQL: how late they fire at a steady 1,000
//! timers a second, how fast a backlog fires, and the scheduler's memory
//! with a million timers pending (in a child process, so that its peak
//! memory is its own).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use example_accounts::{BankAccount, BankCommand};
use outflow::timer::{Timer, Timers};
use outflow::{CommandBus, PostgresStore};
use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, PgPool};
use tokio_util::sync::CancellationToken;

use crate::setup::{pool, Server};
use crate::stats::{peak_rss_mb, Size};

/// Accounts the timers deposit into.
const ACCOUNTS: usize = 10;

/// Lateness of fired timers, from the table: how long after its due time
/// each was recorded fired (its command sent and answered).
#[derive(Debug, Clone, Copy, serde::Serialize, serde::Deserialize)]
pub(crate) struct Lateness {
    pub(crate) fired: i64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    pub(crate) max_ms: f64,
}

/// What the child reports.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct PendingReport {
    pub(crate) pending: u64,
    pub(crate) due: u64,
    pub(crate) insert_seconds: f64,
    pub(crate) window_ms: f64,
    pub(crate) lateness: Lateness,
    pub(crate) peak_rss_mb: f64,
}

pub(crate) struct TimerFigures {
    pub(crate) rate: u32,
    pub(crate) seconds: u64,
    pub(crate) steady: Lateness,
    pub(crate) achieved_per_second: f64,
    pub(crate) backlog: u64,
    pub(crate) backlog_per_second: f64,
    pub(crate) none_pending: PendingReport,
    pub(crate) many_pending: PendingReport,
}

async fn system(
    options: &PgConnectOptions,
) -> Result<(
    PostgresStore,
    Timers<PostgresStore>,
    Arc<CommandBus<BankAccount, PostgresStore>>,
)> {
    let store = PostgresStore::builder(pool(options, 20, false).await?)
        .build()
        .await?;
    let timers = Timers::new(&store).await?;
    let bus = Arc::new(CommandBus::<BankAccount, _>::new(store.clone(), ()));
    for a in 0..ACCOUNTS {
        bus.execute(
            &format!("acc-{a}"),
            BankCommand::Open {
                owner: format!("owner {a}"),
            },
        )
        .await?;
    }
    Ok((store, timers, bus))
}

fn scheduler(
    timers: &Timers<PostgresStore>,
    bus: &Arc<CommandBus<BankAccount, PostgresStore>>,
) -> Result<(
    CancellationToken,
    tokio::task::JoinHandle<Result<(), outflow::StoreError>>,
)> {
    let scheduler = timers.scheduler().command(bus.clone()).build()?;
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { scheduler.run(shutdown).await }
    });
    Ok((shutdown, running))
}

/// Waits until `count` timers with keys starting with `prefix` fired.
async fn fired(pool: &PgPool, prefix: &str, count: i64, within: Duration) -> Result<()> {
    let deadline = Instant::now() + within;
    loop {
        let done: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM events_timers WHERE state = 'fired' AND starts_with(key, $1)",
        )
        .bind(prefix)
        .fetch_one(pool)
        .await?;
        if done >= count {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {done} of {count} `{prefix}` timers fired within {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn lateness(pool: &PgPool, prefix: &str) -> Result<Lateness> {
    let (fired, p50, p99, max): (i64, Option<f64>, Option<f64>, Option<f64>) = sqlx::query_as(
        "SELECT count(*),
                percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - due_at)),
                percentile_cont(0.99) WITHIN GROUP (ORDER BY extract(epoch FROM finished_at - due_at)),
                max(extract(epoch FROM finished_at - due_at))::float8
         FROM events_timers WHERE state = 'fired' AND starts_with(key, $1)",
    )
    .bind(prefix)
    .fetch_one(pool)
    .await?;
    Ok(Lateness {
        fired,
        p50_ms: p50.unwrap_or_default() * 1000.0,
        p99_ms: p99.unwrap_or_default() * 1000.0,
        max_ms: max.unwrap_or_default() * 1000.0,
    })
}

/// A timer opening a new account: one command per aggregate, as a
/// deadline per transfer or per order would be.
fn deposit(key: String, _i: usize) -> Result<Timer> {
    let id = format!("t-{}", key.replace('/', "-"));
    Ok(Timer::command::<BankAccount>(
        key,
        id,
        &BankCommand::Open {
            owner: "timer".to_owned(),
        },
    )?)
}

/// Timers scheduled at `rate` a second for `seconds`, each due 2 s later;
/// then a backlog of `rate * 10` timers all due at once.
async fn steady(server: &Server, rate: u32, seconds: u64) -> Result<(Lateness, f64, u64, f64)> {
    let (options, _) = server.fresh_db("timers_steady").await?;
    let (store, timers, bus) = system(&options).await?;
    let (shutdown, running) = scheduler(&timers, &bus)?;
    // Ten schedules a transaction, every 10 ms.
    let per_tick = (rate / 100).max(1) as usize;
    let ticks = seconds * 100;
    let started = Instant::now();
    let mut n = 0;
    for tick in 0..ticks {
        let at = started + Duration::from_millis(tick * 10);
        tokio::time::sleep_until(at.into()).await;
        let mut tx = timers.begin().await?;
        for _ in 0..per_tick {
            timers
                .schedule(
                    &mut tx,
                    deposit(format!("steady/{n}"), n)?.after(Duration::from_secs(2)),
                )
                .await?;
            n += 1;
        }
        timers.commit(tx).await?;
    }
    let spent = started.elapsed().as_secs_f64();
    fired(store.pool(), "steady/", n as i64, Duration::from_secs(120)).await?;
    let steady = lateness(store.pool(), "steady/").await?;
    let achieved = n as f64 / spent;

    // A backlog: everything due at once.
    let backlog = (rate as usize * 10).max(1000);
    let mut tx = timers.begin().await?;
    for i in 0..backlog {
        timers
            .schedule(
                &mut tx,
                deposit(format!("backlog/{i}"), i)?.after(Duration::from_secs(1)),
            )
            .await?;
    }
    timers.commit(tx).await?;
    // Due one second after the commit; counted from then.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let from = Instant::now();
    fired(
        store.pool(),
        "backlog/",
        backlog as i64,
        Duration::from_secs(600),
    )
    .await?;
    let backlog_rate = backlog as f64 / from.elapsed().as_secs_f64();
    shutdown.cancel();
    running.await??;
    Ok((steady, achieved, backlog as u64, backlog_rate))
}

/// In a child process: `pending` timers due tomorrow (inserted by the
/// server), then `due` timers due in two seconds, fired by a scheduler;
/// reports the window read's time, the due timers' lateness and the peak
/// memory.
pub(crate) async fn pending_child(url: &str, pending: u64, due: u64) -> Result<()> {
    let options: PgConnectOptions = url.parse()?;
    let (store, timers, bus) = system(&options).await?;
    let started = Instant::now();
    sqlx::query(
        "INSERT INTO events_timers (key, target, target_id, payload, due_at, command_id,
                                    correlation_id, causation_id)
         SELECT 'far/' || g, 'command:account', 'far-' || g,
                '{\"Open\":{\"owner\":\"timer\"}}', now() + interval '1 day' + g * interval '1 ms',
                gen_random_uuid(), gen_random_uuid(), gen_random_uuid()
         FROM generate_series(1, $1) g",
    )
    .bind(pending as i64)
    .execute(store.pool())
    .await?;
    sqlx::query("ANALYZE events_timers")
        .execute(store.pool())
        .await?;
    let insert_seconds = started.elapsed().as_secs_f64();
    let mut tx = timers.begin().await?;
    for i in 0..due as usize {
        timers
            .schedule(
                &mut tx,
                deposit(format!("due/{i}"), i)?.after(Duration::from_secs(2)),
            )
            .await?;
    }
    timers.commit(tx).await?;
    // The window the scheduler reads, timed alone.
    let probes = 20;
    let probe = Instant::now();
    for _ in 0..probes {
        use outflow::timer::TimerStore;
        store
            .due_timers(Duration::ZERO, Duration::from_secs(2), 1000)
            .await?;
    }
    let window_ms = probe.elapsed().as_secs_f64() * 1000.0 / probes as f64;
    let (shutdown, running) = scheduler(&timers, &bus)?;
    fired(store.pool(), "due/", due as i64, Duration::from_secs(300)).await?;
    let lateness = lateness(store.pool(), "due/").await?;
    shutdown.cancel();
    running.await??;
    let report = PendingReport {
        pending,
        due,
        insert_seconds,
        window_ms,
        lateness,
        peak_rss_mb: peak_rss_mb(),
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

async fn run_pending_child(server: &Server, pending: u64, due: u64) -> Result<PendingReport> {
    let (options, _) = server
        .fresh_db(&format!("timers_pending_{pending}"))
        .await?;
    let url = options.to_url_lossy().to_string();
    let exe = std::env::current_exe()?;
    let output = tokio::process::Command::new(exe)
        .args(["timers-child", &url, &pending.to_string(), &due.to_string()])
        .output()
        .await?;
    if !output.status.success() {
        bail!(
            "timers child failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let line = text
        .lines()
        .last()
        .context("no report from the timers child")?;
    Ok(serde_json::from_str(line)?)
}

pub(crate) async fn timer_scenarios(server: &Server, size: &Size) -> Result<TimerFigures> {
    let rate = 1000;
    let seconds = if size.quick { 5 } else { 20 };
    let (steady, achieved, backlog, backlog_per_second) = steady(server, rate, seconds).await?;
    let many = if size.quick { 100_000 } else { 1_000_000 };
    let none_pending = run_pending_child(server, 0, 2000).await?;
    let many_pending = run_pending_child(server, many, 2000).await?;
    Ok(TimerFigures {
        rate,
        seconds,
        steady,
        achieved_per_second: achieved,
        backlog,
        backlog_per_second,
        none_pending,
        many_pending,
    })
}

/// The section of the report.
pub(crate) fn timer_section(figures: &TimerFigures) -> String {
    use std::fmt::Write as _;
    let mut md = String::new();
    let s = &figures.steady;
    let _ = writeln!(md, "\n## Durable timers (PostgreSQL)\n");
    let _ = writeln!(
        md,
        "One scheduler in the benchmark's process fires commands through `execute_once` \
         (each opens an account of its own, as a deadline per transfer or per order \
         would; 16 at once, windows of 1,000, their finishes recorded 16 to a statement). Lateness is measured by the \
         database: the time from a timer's due time to the moment it was recorded fired \
         (its command sent, answered and the timer marked), over every timer of the run.\n"
    );
    let _ = writeln!(
        md,
        "| scenario | timers | lateness p50 | p99 | max | rate |"
    );
    let _ = writeln!(md, "|---|---:|---:|---:|---:|---:|");
    let _ = writeln!(
        md,
        "| {} timers/s scheduled for {} s, each due 2 s later | {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.0} scheduled/s |",
        figures.rate, figures.seconds, s.fired, s.p50_ms, s.p99_ms, s.max_ms, figures.achieved_per_second
    );
    let _ = writeln!(
        md,
        "| a backlog, all due at once | {} | | | | {:.0} fired/s |",
        figures.backlog, figures.backlog_per_second
    );
    for report in [&figures.none_pending, &figures.many_pending] {
        let l = &report.lateness;
        let _ = writeln!(
            md,
            "| a burst: {} scheduled in one transaction, due 2 s later, beside {} pending for tomorrow | {} | {:.1} ms | {:.1} ms | {:.1} ms | |",
            report.due, report.pending, l.fired, l.p50_ms, l.p99_ms, l.max_ms
        );
    }
    let _ = writeln!(
        md,
        "\n**Memory with many pending timers.** A child process schedules {} timers due \
         in two seconds beside {} timers due tomorrow (inserted by the server in {:.1} s), \
         and fires them: its peak RSS was **{:.0} MB**, against {:.0} MB with none pending; \
         one window read (the scheduler's query: pending timers due within the horizon, \
         at most 1,000) took {:.2} ms against {:.2} ms. The scheduler holds at most one \
         window in memory, whatever the number of pending timers; the table and its \
         due-time index hold the rest.\n",
        figures.many_pending.due,
        figures.many_pending.pending,
        figures.many_pending.insert_seconds,
        figures.many_pending.peak_rss_mb,
        figures.none_pending.peak_rss_mb,
        figures.many_pending.window_ms,
        figures.none_pending.window_ms,
    );
    md
}
