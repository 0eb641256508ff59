//! `outflow-bench <scenario> …`: one scenario alone (`latency`, `jetstream`,
//! `sqlite`, `commands`, `rebuild`), printed rather than written to the
//! report, for measuring one change.

use outflow::EventLog;

use std::time::Instant;

use anyhow::{Context, Result};
use outflow::{PostgresStore, SqliteStore};
use sqlx::ConnectOptions;

use crate::jetstream::*;

use crate::rebuild::*;
use crate::scenarios::*;
use crate::setup::*;
use crate::stats::*;

/// Runs the scenario `args` name, if they name one.
pub(crate) async fn single_scenario(args: &[String]) -> Result<bool> {
    if args.first().map(String::as_str) == Some("latency") {
        // outflow-bench latency RATE SECONDS: one scenario, split into the
        // command's own time and the wait for the projection.
        let rate: u32 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(500);
        let seconds: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(10);
        let url = std::env::var("DATABASE_URL").context("DATABASE_URL is not set")?;
        let server = Server {
            admin: url.parse()?,
            counter: Default::default(),
        };
        // `--no-flush`: the projection's batches commit without waiting
        // for the WAL flush.
        let flush = if args.iter().any(|a| a == "--no-flush") {
            Flush::NotWaited
        } else {
            Flush::Waited
        };
        let (total, command, wait, spent) =
            visible_latency_split(&server, rate, seconds, flush).await?;
        for (label, r) in [("total", total), ("command", command), ("wait", wait)] {
            println!("{label:>8}: p50 {:.2} ms  p99 {:.2} ms", r.p50_ms, r.p99_ms);
        }
        println!(
            "CPU per command (whole machine): {:.3} ms",
            spent.cpu_ms_per_command()
        );
        if let Some(total) = spent.total_statements() {
            println!("statements per command: {:.2}", spent.per_command(total));
        }
        if let Some((per_batch, batches)) = spent.per_batch() {
            println!("projection batches: {batches}, statements per batch: {per_batch:.2}");
        }
        for (query, calls) in spent.statements.iter().flatten().take(14) {
            let short: String = query.chars().take(110).collect();
            println!("{:>7.3}/cmd  {short}", spent.per_command(*calls));
        }
        return Ok(true);
    }
    if args.first().map(String::as_str) == Some("jetstream") {
        // outflow-bench jetstream [--quick]: the JetStream scenarios alone,
        // printed, with the PostgreSQL store's commands for comparison.
        let size = Size::new(args.iter().any(|a| a == "--quick"));
        let url = std::env::var("DATABASE_URL").context("DATABASE_URL is not set")?;
        let server = Server {
            admin: url.parse()?,
            counter: Default::default(),
        };
        let (outflow, _) = outflow_system(&server, "jc16").await?;
        let o16 = commands(&outflow, size.accounts, size.deposits, 16).await?;
        println!("PostgreSQL store, 16 clients: {:.0} cmd/s", o16.per_second);
        let (outflow, _) = outflow_system_with(&server, "jc16c", 100_000).await?;
        let oc16 = commands(&outflow, size.accounts, size.deposits, 16).await?;
        println!(
            "PostgreSQL store, 16 clients, cache: {:.0} cmd/s",
            oc16.per_second
        );
        let js = jetstream_scenarios(&server, &size).await?;
        for (partitions, clients, cache, rate) in &js.commands {
            println!(
                "JetStream, {partitions} partition(s), {clients} client(s), cache {cache}: {:.0} cmd/s (p50 {:.2} ms, p99 {:.2} ms)",
                rate.per_second, rate.p50_ms, rate.p99_ms
            );
        }
        for (partitions, events, per_second) in &js.rebuilds {
            println!("JetStream rebuild, {partitions} partition(s): {events} events, {per_second:.0} events/s");
        }
        return Ok(true);
    }
    if args.first().map(String::as_str) == Some("sqlite") {
        // outflow-bench sqlite: the SQLite scenarios alone, printed (the
        // full run's sizes with OUTFLOW_BENCH_FULL set).
        let size = Size::new(std::env::var_os("OUTFLOW_BENCH_FULL").is_none());
        for label in ["probe_c1", "probe_c1_normal"] {
            let (sqlite, _) = sqlite_system(label).await?;
            let s1 = commands(&sqlite, size.accounts, size.deposits, 1).await?;
            println!(
                "commands, 1 client ({label}): {:.0}/s  p50 {:.2} ms  p99 {:.2} ms",
                s1.per_second, s1.p50_ms, s1.p99_ms
            );
        }
        let (sqlite, _) = sqlite_system("probe_c16").await?;
        let s16 = commands(&sqlite, size.accounts, size.deposits, 16).await?;
        println!(
            "commands, 16 clients: {:.0}/s  p50 {:.2} ms  p99 {:.2} ms",
            s16.per_second, s16.p50_ms, s16.p99_ms
        );
        if std::env::var_os("OUTFLOW_BENCH_COMMANDS_ONLY").is_some() {
            let _ = std::fs::remove_dir_all(sqlite_dir());
            return Ok(true);
        }
        let dir = sqlite_dir();
        let path = dir.join("probe_rebuild.db");
        seed_sqlite(&path, size.rebuild_events, size.rebuild_accounts).await?;
        {
            let store = SqliteStore::open(&path).await?;
            let started = Instant::now();
            let mut after = outflow::Checkpoint::START;
            let mut n = 0usize;
            loop {
                let batch = store
                    .read_log(
                        after,
                        &outflow::LogFilter::aggregate_types(["account"]),
                        2001,
                    )
                    .await?;
                if batch.is_empty() {
                    break;
                }
                n += batch.len();
                after = batch.last().map(|e| e.checkpoint()).unwrap_or(after);
            }
            println!(
                "read_log alone: {n} events, {:.0}/s",
                n as f64 / started.elapsed().as_secs_f64()
            );
        }
        let rebuilt =
            run_rebuild_child(&format!("sqlite:{}", path.display()), "batch", 2_000).await?;
        println!(
            "rebuild: {} events, {:.0}/s, peak RSS {:.0} MB",
            rebuilt.events,
            rebuilt.events as f64 / rebuilt.seconds,
            rebuilt.peak_rss_mb
        );
        let _ = std::fs::remove_dir_all(dir);
        return Ok(true);
    }
    if args.first().map(String::as_str) == Some("commands") {
        // outflow-bench commands [CLIENTS...]: the command scenarios alone
        // (the quick run's sizes; the full run's with OUTFLOW_BENCH_FULL).
        let size = Size::new(std::env::var_os("OUTFLOW_BENCH_FULL").is_none());
        let url = std::env::var("DATABASE_URL").context("DATABASE_URL is not set")?;
        let server = Server {
            admin: url.parse()?,
            counter: Default::default(),
        };
        let clients: Vec<usize> = match args.get(1..) {
            Some(rest) if !rest.is_empty() => rest.iter().filter_map(|c| c.parse().ok()).collect(),
            _ => vec![1, 16],
        };
        let only_outflow = std::env::var_os("OUTFLOW_BENCH_ONLY_OUTFLOW").is_some();
        for c in clients {
            if only_outflow {
                let (o, _) = outflow_system(&server, "probe").await?;
                let r = commands(&o, size.accounts, size.deposits, c).await?;
                println!("{c:>2} clients  outflow {:>7.0}/s", r.per_second);
                continue;
            }
            let (o, _) = outflow_system(&server, "probe").await?;
            let (oc, _) = outflow_system_with(&server, "probe_c", 100_000).await?;
            let (p, _) = postgres_es_system(&server, "probe", false, true).await?;
            let (pt, _) = postgres_es_system(&server, "probe_t", false, false).await?;
            for (label, system) in [
                ("outflow", &o),
                ("outflow+cache", &oc),
                ("postgres-es", &p),
                ("postgres-es tuned", &pt),
            ] {
                let r = commands(system, size.accounts, size.deposits, c).await?;
                println!(
                    "{c:>2} clients  {label:<18} {:>7.0}/s  p50 {:.2} ms  p99 {:.2} ms",
                    r.per_second, r.p50_ms, r.p99_ms
                );
            }
        }
        return Ok(true);
    }
    if args.first().map(String::as_str) == Some("rebuild") {
        // outflow-bench rebuild EVENTS [KIND...]: seeds a fresh database and
        // prints each kind's replay (batch, view); the database is kept and
        // its URL printed, for profiling `rebuild-child` on it.
        let events: usize = args
            .get(1)
            .and_then(|a| a.parse().ok())
            .unwrap_or(1_000_000);
        let kinds: Vec<&str> = match args.get(2..) {
            Some(rest) if !rest.is_empty() => rest.iter().map(String::as_str).collect(),
            _ => vec!["batch", "view"],
        };
        let url = std::env::var("DATABASE_URL").context("DATABASE_URL is not set")?;
        let server = Server {
            admin: url.parse()?,
            counter: Default::default(),
        };
        let (options, _) = server.fresh_db("rebuild_probe").await?;
        let url = options.to_url_lossy().to_string();
        {
            let store = PostgresStore::builder(pool(&options, 4, false).await?)
                .build()
                .await?;
            seed_events(store.pool(), events, events / 500).await?;
        }
        println!("database: {url}");
        for kind in kinds {
            for batch in REBUILD_BATCHES {
                let report = run_rebuild_child(&url, kind, batch).await?;
                println!(
                    "{kind}, batches of {batch}: {} events, {:.0}/s, peak RSS {:.0} MB",
                    report.events,
                    report.events as f64 / report.seconds,
                    report.peak_rss_mb
                );
            }
        }
        return Ok(true);
    }
    Ok(false)
}
