//! Figures: sizes of a run, rates and latencies, the machine's and the
//! server's own counters (CPU, statements), and how they are printed.

use std::time::Duration;

use anyhow::Result;
use sqlx::PgPool;

pub(crate) struct Size {
    pub(crate) quick: bool,
    pub(crate) accounts: usize,
    pub(crate) deposits: usize,
    pub(crate) rebuild_events: usize,
    pub(crate) rebuild_accounts: usize,
    pub(crate) replay_events: usize,
    pub(crate) steady_seconds: u64,
    pub(crate) pgbench_seconds: u64,
    pub(crate) loads: usize,
}

impl Size {
    pub(crate) fn new(quick: bool) -> Self {
        if quick {
            Size {
                quick,
                accounts: 200,
                deposits: 10,
                rebuild_events: 200_000,
                rebuild_accounts: 2_000,
                replay_events: 10_000,
                steady_seconds: 5,
                pgbench_seconds: 5,
                loads: 30,
            }
        } else {
            Size {
                quick,
                accounts: 2_000,
                deposits: 10,
                rebuild_events: 1_000_000,
                rebuild_accounts: 10_000,
                replay_events: 100_000,
                steady_seconds: 20,
                pgbench_seconds: 15,
                loads: 100,
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
pub(crate) struct Rate {
    pub(crate) per_second: f64,
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
}

pub(crate) fn rate(latencies: &mut [Duration], elapsed: Duration) -> Rate {
    latencies.sort_unstable();
    let pick = |q: f64| {
        if latencies.is_empty() {
            0.0
        } else {
            let i = ((latencies.len() as f64 - 1.0) * q).round() as usize;
            latencies[i].as_secs_f64() * 1000.0
        }
    };
    Rate {
        per_second: latencies.len() as f64 / elapsed.as_secs_f64(),
        p50_ms: pick(0.50),
        p99_ms: pick(0.99),
    }
}

pub(crate) fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// What a steady phase cost: the server's statements (from
/// `pg_stat_statements`, when the server loads it) and the machine's CPU.
pub(crate) struct Spent {
    pub(crate) commands: u64,
    /// Each statement's text (shortened) and calls, most called first.
    pub(crate) statements: Option<Vec<(String, i64)>>,
    /// CPU seconds of the whole machine (client, server, everything).
    pub(crate) cpu_seconds: f64,
}

impl Spent {
    pub(crate) fn total_statements(&self) -> Option<i64> {
        self.statements
            .as_ref()
            .map(|s| s.iter().map(|(_, calls)| calls).sum())
    }

    pub(crate) fn per_command(&self, calls: i64) -> f64 {
        calls as f64 / self.commands.max(1) as f64
    }

    /// Statements of the projection's batches per batch: everything but the
    /// command's load and append and the waiters' reads, over the batches
    /// (each batch commits once; nothing else here commits explicitly).
    pub(crate) fn per_batch(&self) -> Option<(f64, i64)> {
        let statements = self.statements.as_ref()?;
        let batches: i64 = statements
            .iter()
            .filter(|(q, _)| q.eq_ignore_ascii_case("commit"))
            .map(|(_, c)| c)
            .sum();
        let batch_calls: i64 = statements
            .iter()
            .filter(|(q, _)| !is_command_statement(q) && !is_wait_statement(q))
            .map(|(_, c)| c)
            .sum();
        (batches > 0).then(|| (batch_calls as f64 / batches as f64, batches))
    }

    pub(crate) fn cpu_ms_per_command(&self) -> f64 {
        self.cpu_seconds * 1000.0 / self.commands.max(1) as f64
    }
}

/// A command's own statements: the stream's load and the append.
pub(crate) fn is_command_statement(query: &str) -> bool {
    query.contains("aggregate_id = $2") || query.contains("INSERT INTO events")
}

/// A waiter's statements: the units' checkpoints and dead letters.
pub(crate) fn is_wait_statement(query: &str) -> bool {
    query.starts_with("SELECT p.projection") || query.contains("FROM events_dead_letters")
}

/// Busy CPU seconds of the machine so far (all cores), from `/proc/stat`.
pub(crate) fn machine_busy_seconds() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let Some(line) = stat.lines().next() else {
        return 0.0;
    };
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|t| t.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: busy is all but idle
    // and iowait; USER_HZ is 100 on Linux.
    let busy: f64 = ticks
        .iter()
        .take(8)
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, t)| t)
        .sum();
    busy / 100.0
}

/// Clears the server's statement counts; `false` when the server does not
/// load `pg_stat_statements`.
pub(crate) async fn statements_reset(pool: &PgPool) -> bool {
    if sqlx::query("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .execute(pool)
        .await
        .is_err()
    {
        return false;
    }
    sqlx::query("SELECT pg_stat_statements_reset()")
        .execute(pool)
        .await
        .is_ok()
}

/// The statements run in this database since the reset, most called first.
pub(crate) async fn statements_read(pool: &PgPool) -> Result<Vec<(String, i64)>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT s.query, s.calls FROM pg_stat_statements s \
          WHERE s.dbid = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database()) \
            AND s.query NOT LIKE '%pg_stat_statements%' \
          ORDER BY s.calls DESC",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(query, calls)| (one_line(&query), calls))
        .collect())
}

/// The server's execution time of each statement run in this database since
/// the reset: text (shortened), calls and mean time in µs, the most time
/// first. Execution only: the commit's flush and the round trips are not in it.
pub(crate) async fn statement_times(pool: &PgPool) -> Result<Vec<(String, i64, f64)>> {
    let rows: Vec<(String, i64, f64)> = sqlx::query_as(
        "SELECT s.query, s.calls, s.mean_exec_time FROM pg_stat_statements s \
          WHERE s.dbid = (SELECT d.oid FROM pg_database d WHERE d.datname = current_database()) \
            AND s.query NOT LIKE '%pg_stat_statements%' \
          ORDER BY s.total_exec_time DESC",
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(query, calls, mean_ms)| (one_line(&query), calls, mean_ms * 1000.0))
        .collect())
}

/// A statement's text on one line, without the comment lines of Outflow's
/// query files.
pub(crate) fn one_line(query: &str) -> String {
    let text: String = query
        .lines()
        .filter(|l| !l.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join(" ");
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A result kept for the rest of the run (the report borrows them all).
pub(crate) fn leak(rate: Rate) -> &'static Rate {
    Box::leak(Box::new(rate))
}

pub(crate) fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}×", a / b)
    } else {
        "–".to_owned()
    }
}
