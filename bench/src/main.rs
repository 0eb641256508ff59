//! Measures Outflow against postgres-es 0.5 on the same PostgreSQL server, in
//! the same run, with the same bank-account aggregate, and writes the results
//! as Markdown. Run it through `scripts/bench.sh`, which starts the server.
//!
//! ```text
//! outflow-bench [--quick] [--out docs/benchmarks.md]   # all scenarios
//! outflow-bench rebuild-child URL batch|view            # one rebuild, in a child process
//! outflow-bench timers [--quick]                        # the durable timers' section alone
//! outflow-bench decisions [--quick]                     # the decisions' section alone
//! outflow-bench decision-phases                         # a decision's parts timed, 1 client
//! outflow-bench personal [--quick]                      # the personal data's section alone
//! outflow-bench failover [--quick]                      # the failover's section alone
//! outflow-bench failover-child URL NODE                 # one failover node, in a child process
//! outflow-bench scaling [--quick]                       # the scaling model's costs alone
//! outflow-bench scaling-runner URL NAME NODE            # one runner process of the scaling runs
//! ```

use std::fmt::Write as _;
use std::time::Instant;

use anyhow::{bail, Context, Result};

mod copying;
mod decisions;
mod failover;
mod jetstream;
mod noise;
mod personal;
mod reading;
mod rebuild;
mod scaling;
mod scenarios;
mod setup;
mod single;
mod stats;
mod timers;
mod versus_disintegrate;

use copying::*;
use decisions::*;
use failover::*;
use jetstream::*;
use noise::*;
use personal::*;
use reading::*;
use rebuild::*;
use scaling::*;
use scenarios::*;
use setup::*;
use single::*;
use stats::*;
use timers::*;
use versus_disintegrate::*;

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if single_scenario(&args).await? {
        return Ok(());
    }
    // outflow-bench <section> [--quick]: one section of the report alone,
    // printed.
    let section = match args.first().map(String::as_str) {
        Some(name @ ("timers" | "decisions" | "personal" | "failover" | "scaling")) => Some(name),
        _ => None,
    };
    if let Some(name) = section {
        let url = std::env::var("DATABASE_URL").context("DATABASE_URL is not set")?;
        let server = Server {
            admin: url.parse()?,
            counter: Default::default(),
        };
        let size = Size::new(args.iter().any(|a| a == "--quick"));
        let md = match name {
            "timers" => timer_section(&timer_scenarios(&server, &size).await?),
            "decisions" => {
                let mut md = decision_section(&decision_scenarios(&server, &size).await?);
                md.push_str(&versus_section(&versus_scenarios(&size).await?));
                md
            }
            "personal" => personal_section(&personal_scenarios(&server, &size).await?),
            "failover" => failover_section(&failover_scenarios(&server, &size).await?),
            _ => scaling_section(&scaling_scenarios(&server, &size).await?),
        };
        print!("{md}");
        return Ok(());
    }
    if args.first().map(String::as_str) == Some("decision-phases") {
        let url = std::env::var("DATABASE_URL").context("DATABASE_URL is not set")?;
        let server = Server {
            admin: url.parse()?,
            counter: Default::default(),
        };
        return decision_phases(&server).await;
    }
    if args.first().map(String::as_str) == Some("scaling-runner") {
        let (Some(url), Some(name), Some(node)) = (args.get(1), args.get(2), args.get(3)) else {
            bail!("usage: outflow-bench scaling-runner URL NAME NODE");
        };
        return scaling_runner_child(url, name, node).await;
    }
    if args.first().map(String::as_str) == Some("failover-child") {
        let (Some(url), Some(node)) = (args.get(1), args.get(2)) else {
            bail!("usage: outflow-bench failover-child URL NODE");
        };
        return failover_child(url, node).await;
    }
    if args.first().map(String::as_str) == Some("timers-child") {
        let (Some(url), Some(pending), Some(due)) = (args.get(1), args.get(2), args.get(3)) else {
            bail!("usage: outflow-bench timers-child URL PENDING DUE");
        };
        return pending_child(url, pending.parse()?, due.parse()?).await;
    }
    if args.first().map(String::as_str) == Some("rebuild-child") {
        let (Some(url), Some(kind)) = (args.get(1), args.get(2)) else {
            bail!("usage: outflow-bench rebuild-child URL batch|view [BATCH_SIZE]");
        };
        let batch = args.get(3).and_then(|b| b.parse().ok()).unwrap_or(2_000);
        return rebuild_child(url, kind, batch).await;
    }
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| "docs/benchmarks.md".to_owned());
    let url =
        std::env::var("DATABASE_URL").context("DATABASE_URL is not set (run scripts/bench.sh)")?;
    let server = Server {
        admin: url.parse()?,
        counter: Default::default(),
    };
    let size = Size::new(quick);
    let started = Instant::now();

    let mut floor = Floor::default();
    floor.probe(&server, &size, "start").await?;
    // The 1-client rows depend most on the commit: taken again (up to three
    // times in all) while the floor moves under them.
    let mut repeats = Vec::new();
    let mut attempt = 0;
    let (o1, outflow_times, oc1, p1, pt1, pges_times, s1, s1n, one_client) = loop {
        attempt += 1;
        eprintln!("1/7 commands, 1 client (attempt {attempt})");
        let before = floor.last();
        let (outflow, store) = outflow_system(&server, "c1").await?;
        let counted = statements_reset(store.pool()).await;
        let o1 = commands(&outflow, size.accounts, size.deposits, 1).await?;
        let outflow_times = if counted {
            statement_times(store.pool()).await?
        } else {
            Vec::new()
        };
        let (outflow, _) = outflow_system_with(&server, "c1c", 100_000).await?;
        let oc1 = commands(&outflow, size.accounts, size.deposits, 1).await?;
        let (pges, _) = postgres_es_system(&server, "c1", false, true).await?;
        let p1 = commands(&pges, size.accounts, size.deposits, 1).await?;
        let (pges, pges_pool) = postgres_es_system(&server, "c1t", false, false).await?;
        let counted = statements_reset(&pges_pool).await;
        let pt1 = commands(&pges, size.accounts, size.deposits, 1).await?;
        let pges_times = if counted {
            statement_times(&pges_pool).await?
        } else {
            Vec::new()
        };
        let (sqlite, _) = sqlite_system(&format!("c1_{attempt}")).await?;
        let s1 = commands(&sqlite, size.accounts, size.deposits, 1).await?;
        let (sqlite, _) = sqlite_system(&format!("c1_{attempt}_normal")).await?;
        let s1n = commands(&sqlite, size.accounts, size.deposits, 1).await?;
        let after = floor
            .probe(
                &server,
                &size,
                &format!("after the 1-client rows (attempt {attempt})"),
            )
            .await?;
        let window = Window { before, after };
        if floor.disturbed(window) && attempt < 3 {
            let note = format!(
                "The 1-client rows were taken again after attempt {attempt}: the floor moved \
                 {:.0} % under them.",
                100.0 * floor.moved(window)
            );
            eprintln!("   {note}");
            repeats.push(note);
            continue;
        }
        break (o1, outflow_times, oc1, p1, pt1, pges_times, s1, s1n, window);
    };

    eprintln!("2/7 commands, 16 clients");
    let (outflow, _) = outflow_system(&server, "c16").await?;
    let o16 = commands(&outflow, size.accounts, size.deposits, 16).await?;
    let (outflow, _) = outflow_system_with(&server, "c16c", 100_000).await?;
    let oc16 = commands(&outflow, size.accounts, size.deposits, 16).await?;
    let (pges, _) = postgres_es_system(&server, "c16", false, true).await?;
    let p16 = commands(&pges, size.accounts, size.deposits, 16).await?;
    let (pges, _) = postgres_es_system(&server, "c16t", false, false).await?;
    let pt16 = commands(&pges, size.accounts, size.deposits, 16).await?;
    let (sqlite, _) = sqlite_system("c16").await?;
    let s16 = commands(&sqlite, size.accounts, size.deposits, 16).await?;

    let sixteen = Window {
        before: floor.last(),
        after: floor
            .probe(&server, &size, "after the 16-client rows")
            .await?,
    };

    eprintln!("2b/7 commands on JetStream");
    let js = jetstream_scenarios(&server, &size).await?;

    let jetstream = Window {
        before: floor.last(),
        after: floor.probe(&server, &size, "after JetStream").await?,
    };

    eprintln!("3/7 commands with a read model");
    let rm = commands_with_read_model(&server, &size).await?;

    eprintln!("4/7 rebuilds");
    let rb = rebuilds(&server, &size).await?;

    let rebuilding = Window {
        before: floor.last(),
        after: floor
            .probe(&server, &size, "after the read model and the rebuilds")
            .await?,
    };

    eprintln!("5/7 append → visible latency");
    let (l500, spent500) =
        visible_latency(&server, 500, size.steady_seconds, Flush::Waited).await?;
    let (l500a, spent500a) =
        visible_latency(&server, 500, size.steady_seconds, Flush::NotWaited).await?;
    let (l2000, spent2000) =
        visible_latency(&server, 2000, size.steady_seconds, Flush::Waited).await?;

    let visible = Window {
        before: floor.last(),
        after: floor
            .probe(&server, &size, "after the latency runs")
            .await?,
    };

    eprintln!("6/7 aggregate loads");
    let loads = aggregate_loads(&server, &size).await?;

    eprintln!("7/7 pgbench");
    let raw1 = pgbench(&server, 1, size.pgbench_seconds).await?;
    let raw16 = pgbench(&server, 16, size.pgbench_seconds).await?;

    eprintln!("7b/7 log copies between backends");
    let copies = log_copies(&server, &size).await?;

    eprintln!("7c/7 durable timers");
    let timer_figures = timer_scenarios(&server, &size).await?;

    eprintln!("7d/7 decisions across aggregates");
    let decision_rows = decision_scenarios(&server, &size).await?;
    eprintln!("7d/7 decisions against disintegrate");
    let versus = versus_scenarios(&size).await?;
    eprintln!("7e/7 personal data");
    let personal_rows = personal_scenarios(&server, &size).await?;
    eprintln!("7f/7 failover");
    let failover = failover_scenarios(&server, &size).await?;
    eprintln!("7g/7 costs for the scaling model");
    let scaling = scaling_scenarios(&server, &size).await?;

    let rest = Window {
        before: floor.last(),
        after: floor.probe(&server, &size, "end").await?,
    };

    let facts = server_facts(&server).await?;
    let mut md = String::new();
    let _ = writeln!(md, "# Benchmarks\n");
    let _ = writeln!(
        md,
        "Outflow and postgres-es 0.5 on the same PostgreSQL server in the same run \
         (`scripts/bench.sh{}`, {:.0} s), with the bank-account aggregate of \
         `example-accounts`. Release build; the server runs with its default settings \
         (fsync on, `pg_stat_statements` loaded to count statements) in a throwaway \
         cluster on this machine. postgres-es runs twice: with its own defaults (sqlx's \
         pool, which pings the server on each checkout) and tuned (no ping); ratios are \
         against the better of the two. Outflow uses `PostgresStore::connect`'s pool \
         settings. The decisions' comparison with disintegrate runs on a second throwaway \
         server, PostgreSQL 16 or later, as its section says.\n",
        if size.quick { " --quick" } else { "" },
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(md, "## Machine\n\n| | |\n|---|---|");
    for (k, v) in &facts {
        let _ = writeln!(md, "| {k} | {v} |");
    }
    let _ = writeln!(md);
    md.push_str(&floor.section(&repeats));
    let better =
        |a: &'static Rate, b: &'static Rate| if a.per_second >= b.per_second { a } else { b };
    let (p1, pt1, p16, pt16) = (leak(p1), leak(pt1), leak(p16), leak(pt16));
    let best1 = better(p1, pt1);
    let best16 = better(p16, pt16);
    let batch_rate = |runs: &[(usize, RebuildReport)]| {
        runs.iter()
            .map(|(size, r)| (r.events as f64 / r.seconds, *size))
            .fold(
                (0.0, 0),
                |best, run| if run.0 > best.0 { run } else { best },
            )
    };
    let (batch_best, batch_best_size) = batch_rate(&rb.batch);
    let (view_best, view_best_size) = batch_rate(&rb.view);
    let peak_rss = rb
        .batch
        .iter()
        .chain(rb.view.iter())
        .map(|(_, r)| r.peak_rss_mb)
        .fold(0.0, f64::max);
    let per_batch = spent500.per_batch().map(|(p, _)| p);
    let _ = writeln!(
        md,
        "## Targets\n\nEach target of this work, what this run measured, and whether it \
         is met; the sections below have the figures and *Reading these numbers* what stands \
         in the way of those not met.\n\n| target | goal | measured | met |\n|---|---|---|---|"
    );
    let js16 = js
        .commands
        .iter()
        .find(|(p, c, cache, _)| *p == 4 && *c == 16 && !*cache)
        .map_or(0.0, |(_, _, _, r)| r.per_second);
    let (_, failover_max) = median_and_max(&failover.killed);
    let floor1 = floor.beside(one_client);
    let per_command500 = spent500.total_statements().map(|t| spent500.per_command(t));
    let js_window = Window {
        before: sixteen.before,
        after: jetstream.after,
    };
    let targets: [(&str, &str, String, bool, Option<Window>); 19] = [
        (
            "commands, 1 client, no cache, vs the better postgres-es",
            "≥ 1.50×",
            ratio(o1.per_second, best1.per_second),
            o1.per_second >= 1.5 * best1.per_second,
            Some(one_client),
        ),
        (
            "commands, 16 clients, no cache, vs the better postgres-es",
            "≥ 1.50×",
            ratio(o16.per_second, best16.per_second),
            o16.per_second >= 1.5 * best16.per_second,
            Some(sixteen),
        ),
        (
            "commands, 1 client, aggregate cache, vs the better postgres-es",
            "≥ 2.50×",
            ratio(oc1.per_second, best1.per_second),
            oc1.per_second >= 2.5 * best1.per_second,
            Some(one_client),
        ),
        (
            "commands, 16 clients, aggregate cache, vs the better postgres-es",
            "≥ 2.50×",
            ratio(oc16.per_second, best16.per_second),
            oc16.per_second >= 2.5 * best16.per_second,
            Some(sixteen),
        ),
        (
            "commands, 16 clients, aggregate cache, vs pgbench's single-row insert",
            "≥ 70 %",
            format!("{:.0} %", 100.0 * oc16.per_second / raw16.max(1.0)),
            oc16.per_second >= 0.7 * raw16,
            Some(sixteen),
        ),
        (
            "statements per live projection batch (500 cmd/s)",
            "≤ 3",
            per_batch.map_or("–".to_owned(), |p| format!("{p:.2}")),
            per_batch.is_some_and(|p| p <= 3.0),
            Some(visible),
        ),
        (
            "append → visible p99 at 500 cmd/s",
            "≤ 10 ms",
            format!("{:.2} ms", l500.p99_ms),
            l500.p99_ms <= 10.0,
            Some(visible),
        ),
        (
            "append → visible p99 at 2,000 cmd/s",
            "≤ 25 ms",
            format!("{:.2} ms", l2000.p99_ms),
            l2000.p99_ms <= 25.0,
            Some(visible),
        ),
        (
            "rebuild, batch projection",
            "≥ 300,000 events/s",
            format!("{batch_best:.0} (batches of {batch_best_size})"),
            batch_best >= 300_000.0,
            Some(rebuilding),
        ),
        (
            "rebuild, View adapter",
            "≥ 200,000 events/s",
            format!("{view_best:.0} (batches of {view_best_size})"),
            view_best >= 200_000.0,
            Some(rebuilding),
        ),
        (
            "JetStream, 4 partitions, 16 clients, vs the PostgreSQL store (no cache either)",
            "≥ 1.00×",
            ratio(js16, o16.per_second),
            js16 >= o16.per_second,
            Some(js_window),
        ),
        (
            "SQLite (`synchronous = FULL`), 16 clients vs 1 client",
            "≥ 3.00×",
            ratio(s16.per_second, s1.per_second),
            s16.per_second >= 3.0 * s1.per_second,
            Some(Window {
                before: one_client.before,
                after: sixteen.after,
            }),
        ),
        (
            "timers: lateness p99 at 1,000 timers/s",
            "< 1 s",
            format!("{:.0} ms", timer_figures.steady.p99_ms),
            timer_figures.steady.p99_ms < 1000.0,
            Some(rest),
        ),
        (
            "failover after a SIGKILL of the owner, max over the kills",
            "≤ 2 s",
            format!("{failover_max:.2} s ({} kills)", failover.killed.len()),
            !failover.killed.is_empty() && failover_max <= 2.0,
            Some(rest),
        ),
        (
            "commands, 1 client, no cache, vs pgbench's single-row insert beside them",
            "≥ 75 %",
            format!(
                "{:.0} % (of {floor1:.0}/s)",
                100.0 * o1.per_second / floor1.max(1.0)
            ),
            o1.per_second >= 0.75 * floor1,
            Some(one_client),
        ),
        (
            "commands, 1 client, aggregate cache, vs pgbench's single-row insert beside them",
            "≥ 90 %",
            format!(
                "{:.0} % (of {floor1:.0}/s)",
                100.0 * oc1.per_second / floor1.max(1.0)
            ),
            oc1.per_second >= 0.9 * floor1,
            Some(one_client),
        ),
        (
            "statements per command in all, live projection at 500 cmd/s",
            "≤ 6",
            per_command500.map_or("–".to_owned(), |p| format!("{p:.2}")),
            per_command500.is_some_and(|p| p <= 6.0),
            Some(visible),
        ),
        (
            "append → visible p99 at 500 cmd/s (the live batch's target)",
            "≤ 5 ms",
            format!("{:.2} ms", l500.p99_ms),
            l500.p99_ms <= 5.0,
            Some(visible),
        ),
        (
            "rebuild, peak RSS (any run)",
            "< 100 MB",
            format!("{peak_rss:.0} MB"),
            peak_rss < 100.0,
            None,
        ),
    ];
    for (target, goal, measured, met, window) in targets {
        let met = match window {
            Some(window) => floor.met(met, window),
            None => (if met { "yes" } else { "**no**" }).to_owned(),
        };
        let _ = writeln!(md, "| {target} | {goal} | {measured} | {met} |");
    }
    let _ = writeln!(md, "\n## Commands (load + handle + append)\n");
    md.push_str(&floor.flag("the 1-client rows", one_client));
    md.push_str(&floor.flag("the 16-client rows", sixteen));
    let _ = writeln!(
        md,
        "{} accounts × {} deposits. postgres-es's row is the better of its two pools \
         (the other is in the next table).\n\n| scenario | Outflow cmd/s | postgres-es cmd/s | ratio | Outflow p50 / p99 ms | postgres-es p50 / p99 ms |\n|---|---|---|---|---|---|",
        size.accounts, size.deposits
    );
    for (label, o, p) in [
        ("1 client", &o1, best1),
        ("1 client, Outflow with its aggregate cache", &oc1, best1),
        ("16 clients", &o16, best16),
        (
            "16 clients, Outflow with its aggregate cache",
            &oc16,
            best16,
        ),
        (
            "1 client, with read model (postgres-es: synchronous view; Outflow: async projection)",
            &rm.outflow,
            &rm.postgres_es,
        ),
    ] {
        let _ = writeln!(
            md,
            "| {label} | {:.0} | {:.0} | {} | {:.2} / {:.2} | {:.2} / {:.2} |",
            o.per_second,
            p.per_second,
            ratio(o.per_second, p.per_second),
            o.p50_ms,
            o.p99_ms,
            p.p50_ms,
            p.p99_ms
        );
    }
    let _ = writeln!(
        md,
        "\npostgres-es's two pools:\n\n| clients | sqlx's default pool (ping on checkout) cmd/s | tuned pool (no ping) cmd/s |\n|---|---|---|\n| 1 | {:.0} | {:.0} |\n| 16 | {:.0} | {:.0} |",
        p1.per_second, pt1.per_second, p16.per_second, pt16.per_second
    );
    if !outflow_times.is_empty() && !pges_times.is_empty() {
        let _ = writeln!(
            md,
            "\nThe server's execution time per statement in the 1-client runs (Outflow without \
             its cache, tuned postgres-es; `pg_stat_statements`, so the commit's flush and the \
             round trips are not in it), the statements that took the most time:\n\n\
             | system | statement | calls | mean µs |\n|---|---|---|---|"
        );
        for (system, times) in [("Outflow", &outflow_times), ("postgres-es", &pges_times)] {
            for (query, calls, mean_us) in times.iter().take(4) {
                let short: String = query.chars().take(80).collect();
                let _ = writeln!(
                    md,
                    "| {system} | `{}…` | {calls} | {mean_us:.1} |",
                    short.replace('|', "\\|")
                );
            }
        }
    }
    let _ = writeln!(
        md,
        "\nOutflow's asynchronous read model had caught up {:.1} ms after the last command returned.\n",
        rm.outflow_caught_up_ms
    );
    let _ = writeln!(md, "## Commands on SQLite\n");
    md.push_str(&floor.flag("the 1-client rows", one_client));
    md.push_str(&floor.flag("the 16-client row", sixteen));
    let _ = writeln!(
        md,
        "Outflow's `SqliteStore` with its defaults (one file in WAL mode, `synchronous = FULL`: \
         each command is on disk when it returns, and survives a power cut), and with \
         `synchronous = NORMAL` (survives a crash of the process; a power cut may lose the \
         last commits), the same workload, in the same run; the PostgreSQL store's figures \
         from above for comparison. A command is two statements on SQLite's thread (the \
         stream's load, and the append as one statement that is its own transaction); with \
         `FULL` the append waits for SQLite's sync of its WAL. SQLite has one writer: \
         appends that arrive while one is written wait and go together as one transaction \
         with one sync (group commit), each still checked and answered on its own.\n\n\
         | scenario | SQLite cmd/s | PostgreSQL cmd/s | ratio | SQLite p50 / p99 ms |\n|---|---|---|---|---|"
    );
    for (label, sq, pg) in [
        ("1 client", &s1, &o1),
        ("1 client, `synchronous = NORMAL`", &s1n, &o1),
        ("16 clients", &s16, &o16),
    ] {
        let _ = writeln!(
            md,
            "| {label} | {:.0} | {:.0} | {} | {:.2} / {:.2} |",
            sq.per_second,
            pg.per_second,
            ratio(sq.per_second, pg.per_second),
            sq.p50_ms,
            sq.p99_ms
        );
    }
    let _ = writeln!(md);
    let _ = writeln!(md, "## Commands on JetStream\n");
    md.push_str(&floor.flag("JetStream's rows", jetstream));
    let _ = writeln!(
        md,
        "Outflow's `JetStreamStore` on a 3-node nats-server {} cluster on this same machine \
         (every stream and the snapshot bucket with 3 replicas), the same workload, in the \
         same run; the PostgreSQL store's figures from above for comparison (without the \
         cache against the rows without it, with it against those with it). An append is \
         acknowledged once a majority of the stream's replicas has it: JetStream's durability \
         is replication, and nats-server writes its files without an fsync per message \
         (PostgreSQL syncs each commit). A load reads the aggregate's messages after those the \
         store keeps in memory (one round trip when it wrote or read them last), an append is \
         one publish. Each partition is its own stream with its own leader and Raft group; on \
         one machine of 2 cores, more groups share the same CPU, so partitions add overhead \
         here rather than write capacity: they pay off when the streams' leaders are on \
         different machines.\n\n\
         | scenario | JetStream cmd/s | PostgreSQL cmd/s | ratio | JetStream p50 / p99 ms |\n|---|---|---|---|---|",
        nats_version()
    );
    for (partitions, clients, cache, rate) in &js.commands {
        let pg = match (clients, cache) {
            (1, false) => &o1,
            (1, true) => &oc1,
            (_, false) => &o16,
            (_, true) => &oc16,
        };
        let _ = writeln!(
            md,
            "| {partitions} partition{}, {clients} client{}{} | {:.0} | {:.0} | {} | {:.2} / {:.2} |",
            if *partitions == 1 { "" } else { "s" },
            if *clients == 1 { "" } else { "s" },
            if *cache { ", aggregate cache" } else { "" },
            rate.per_second,
            pg.per_second,
            ratio(rate.per_second, pg.per_second),
            rate.p50_ms,
            rate.p99_ms
        );
    }
    let _ = writeln!(
        md,
        "\nRebuild from JetStream: `Balances` (read model and checkpoints in PostgreSQL, \
         batches of 2,000) over a log seeded with appends of 100 events, from a fresh \
         projection until every partition's unit reached its stream's head; one unit per \
         partition.\n\n| partitions | events | events/s |\n|---|---|---|"
    );
    for (partitions, events, per_second) in &js.rebuilds {
        let _ = writeln!(md, "| {partitions} | {events} | {per_second:.0} |");
    }
    let _ = writeln!(md);
    let _ = writeln!(md, "## Projection rebuild\n");
    md.push_str(&floor.flag("the rebuilds and the read model's row", rebuilding));
    let _ = writeln!(
        md,
        "Replay of the whole log from the start in a fresh process (peak RSS is that process's).\n\n| what | events | events/s | peak RSS MB |\n|---|---|---|---|"
    );
    for (size, report) in &rb.batch {
        let _ = writeln!(
            md,
            "| Outflow, hand-written batch projection (`Balances`), batches of {size} | {} | {:.0} | {:.0} |",
            report.events,
            report.events as f64 / report.seconds,
            report.peak_rss_mb
        );
    }
    let _ = writeln!(
        md,
        "| Outflow on SQLite, hand-written batch projection (`SqliteBalances`), batches of 2000 | {} | {:.0} | {:.0} |",
        rb.sqlite_batch.events,
        rb.sqlite_batch.events as f64 / rb.sqlite_batch.seconds,
        rb.sqlite_batch.peak_rss_mb
    );
    for (size, report) in &rb.view {
        let _ = writeln!(
            md,
            "| Outflow, cqrs-es `View` through `ViewProjection`, batches of {size} | {} | {:.0} | {:.0} |",
            report.events,
            report.events as f64 / report.seconds,
            report.peak_rss_mb
        );
    }
    let _ = writeln!(
        md,
        "| postgres-es `QueryReplay::replay_all` into `GenericQuery` | {} | {:.0} | – |",
        rb.replay_events, rb.replay_per_second
    );
    let _ = writeln!(md, "\n## Append → read model visible (Outflow)\n");
    md.push_str(&floor.flag("the latency runs", visible));
    let _ = writeln!(
        md,
        "Deposits at a steady rate for {} s each, 1,000 accounts, a `ViewProjection` of the \
         balances; latency from sending the command until `wait_for` sees the projection past \
         it. Statements are counted by the server (`pg_stat_statements`, every statement \
         including `BEGIN` and `COMMIT`); a batch's are all but the command's two and the \
         waiters'. CPU is the whole machine's (client and server) over the run, per command. \
         The row *without the WAL flush* runs the same load with \
         `PostgresStoreBuilder::synchronous_projection_commits(false)`: each batch's own \
         transaction commits without waiting for its WAL record to reach the disk (the \
         commands' appends still wait).\n\n\
         | rate | achieved cmd/s | p50 ms | p99 ms | statements per command | batches | statements per batch | CPU ms per command |\n|---|---|---|---|---|---|---|---|",
        size.steady_seconds
    );
    for (label, l, spent) in [
        ("500 cmd/s", &l500, &spent500),
        (
            "500 cmd/s, batches commit without the WAL flush",
            &l500a,
            &spent500a,
        ),
        ("2,000 cmd/s", &l2000, &spent2000),
    ] {
        let per_command = spent
            .total_statements()
            .map_or("–".to_owned(), |t| format!("{:.2}", spent.per_command(t)));
        let (per_batch, batches) = spent
            .per_batch()
            .map_or(("–".to_owned(), "–".to_owned()), |(p, b)| {
                (format!("{p:.2}"), b.to_string())
            });
        let _ = writeln!(
            md,
            "| {label} | {:.0} | {:.2} | {:.2} | {per_command} | {batches} | {per_batch} | {:.3} |",
            l.per_second,
            l.p50_ms,
            l.p99_ms,
            spent.cpu_ms_per_command()
        );
    }
    if let Some(statements) = &spent500.statements {
        let _ = writeln!(
            md,
            "\nThe statements of the 500 cmd/s run, per command:\n\n| per command | statement |\n|---|---|"
        );
        for (query, calls) in statements.iter().filter(|(_, c)| *c > 0).take(12) {
            let short: String = query.chars().take(90).collect();
            let _ = writeln!(
                md,
                "| {:.3} | `{}…` |",
                spent500.per_command(*calls),
                short.replace('|', "\\|")
            );
        }
    }
    let _ = writeln!(md, "\n## Aggregate load, 1,000 events\n");
    md.push_str(&floor.flag(
        "this section and the ones after it, up to *Reading these numbers*",
        rest,
    ));
    let _ = writeln!(
        md,
        "| | Outflow ms | postgres-es ms | ratio (postgres-es / Outflow) |\n|---|---|---|---|\n| from events | {:.3} | {:.3} | {} |\n| with a snapshot | {:.3} | {:.3} | {} |",
        loads.outflow_events_ms,
        loads.postgres_es_events_ms,
        ratio(loads.postgres_es_events_ms, loads.outflow_events_ms),
        loads.outflow_snapshot_ms,
        loads.postgres_es_snapshot_ms,
        ratio(loads.postgres_es_snapshot_ms, loads.outflow_snapshot_ms)
    );
    let _ = writeln!(md, "\n## The server's own limit (pgbench)\n");
    let _ = writeln!(
        md,
        "Single-row autocommit inserts, {} s each.\n\n| clients | inserts/s |\n|---|---|\n| 1 | {raw1:.0} |\n| 16 | {raw16:.0} |",
        size.pgbench_seconds
    );
    md.push_str(&copies);
    md.push_str(&timer_section(&timer_figures));
    md.push_str(&decision_section(&decision_rows));
    md.push_str(&versus_section(&versus));
    md.push_str(&personal_section(&personal_rows));
    md.push_str(&failover_section(&failover));
    md.push_str(&scaling_section(&scaling));
    md.push_str(READING);
    let _ = writeln!(
        md,
        "\n**This run's ceiling at 1 client.** pgbench committed {floor1:.0} single-row \
         inserts/s on one connection beside the 1-client rows (the mean of the probes before \
         and after them; {raw1:.0} in its own section) and the better postgres-es ran {:.0} \
         commands/s: no system that commits each command durably can pass {} of postgres-es \
         here. Outflow reached {} without its cache and {} with it, that is {:.0} % and \
         {:.0} % of pgbench's rate beside them.",
        best1.per_second,
        ratio(floor1, best1.per_second),
        ratio(o1.per_second, best1.per_second),
        ratio(oc1.per_second, best1.per_second),
        100.0 * o1.per_second / floor1.max(1.0),
        100.0 * oc1.per_second / floor1.max(1.0),
    );
    let _ = std::fs::remove_dir_all(sqlite_dir());
    std::fs::write(&out, md).with_context(|| format!("writing {out}"))?;
    eprintln!("wrote {out} in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}
