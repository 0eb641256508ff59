//! SQLite under SIGKILL: an appender process (`src/bin/sqlite_appender.rs`)
//! is killed at a random moment of a stream of appends, 10 times on one
//! file. Every time, the file opens, every command the store acknowledged is
//! there exactly once, streams are contiguous, and positions are gap-free:
//! nothing half-written.

use outflow_tests as common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use futures::TryStreamExt;
use outflow::{Checkpoint, LogFilter, SqliteStore};

const KILLS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_appends_survive_sigkill() {
    let dir = common::TestDir::new("sqlite_kill");
    let path = dir.file("appends.db");
    // The highest version acknowledged per account, over every run.
    let mut acknowledged: BTreeMap<String, u64> = BTreeMap::new();
    let mut total_acks = 0usize;
    for kill in 0..KILLS {
        let mut child = Command::new(env!("CARGO_BIN_EXE_sqlite_appender"))
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the appender");
        let stdout = child.stdout.take().expect("stdout");
        let (first, acked) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut acks = Vec::new();
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some((id, version)) = line.split_once(' ') {
                    if let Ok(version) = version.parse::<u64>() {
                        acks.push((id.to_owned(), version));
                        let _ = first.send(());
                    }
                }
            }
            acks
        });
        // The kill comes at a random moment after the first acknowledgement
        // (a busy machine may take long to start the process).
        let _ =
            tokio::task::spawn_blocking(move || acked.recv_timeout(Duration::from_secs(60))).await;
        let lifetime = Duration::from_millis(rand::random_range(150..=600));
        tokio::time::sleep(lifetime).await;
        child.kill().expect("SIGKILL the appender");
        child.wait().expect("reap the appender");
        let acks = reader.join().expect("the reader thread");
        assert!(
            !acks.is_empty(),
            "run {kill}: the appender acknowledged nothing"
        );
        total_acks += acks.len();
        for (id, version) in acks {
            let entry = acknowledged.entry(id).or_default();
            *entry = (*entry).max(version);
        }

        // The file opens; every acknowledged append is there, once.
        let store = SqliteStore::open(&path).await.expect("the file opens");
        let events: Vec<_> =
            outflow::log::read_log(&store, Checkpoint::START, LogFilter::all(), 500)
                .try_collect()
                .await
                .expect("read the log");
        let positions: Vec<u64> = events.iter().map(|e| e.position).collect();
        assert_eq!(
            positions,
            (1..=events.len() as u64).collect::<Vec<_>>(),
            "run {kill}: positions are not gap-free"
        );
        let mut streams: BTreeMap<String, Vec<u64>> = BTreeMap::new();
        for event in &events {
            streams
                .entry(event.aggregate_id.clone())
                .or_default()
                .push(event.sequence);
        }
        for (id, sequences) in &streams {
            assert_eq!(
                sequences,
                &(1..=sequences.len() as u64).collect::<Vec<_>>(),
                "run {kill}: `{id}` is not contiguous"
            );
        }
        for (id, &version) in &acknowledged {
            let stored = streams.get(id).map_or(0, Vec::len) as u64;
            // At most one append per run was in flight when it died: it may
            // have committed without its acknowledgement being printed.
            assert!(
                stored >= version,
                "run {kill}: `{id}` acknowledged up to {version}, the file has {stored}"
            );
        }
        store.close().await;
    }
    println!("{KILLS} SIGKILLs, {total_acks} acknowledged appends, none lost");
}
