//! A lost COMMIT acknowledgement, for real: the projection runner talks to
//! PostgreSQL through a TCP proxy in this test. When the runner commits a
//! batch (a transaction that wrote the read model), the proxy forwards the
//! `COMMIT`, waits for the server's reply — the batch is committed — and
//! then cuts both connections instead of passing the reply on. The runner
//! sees a broken connection, reconnects and retries the batch; the
//! checkpoint's compare-and-set must refuse the retry, or the read model, a
//! running sum updated with `+=`, counts the batch twice. 50 cuts; the sums
//! must equal the fold of the log.

use outflow_tests as common;

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use outflow::projection::{ProjectionOptions, RetryPolicy};
use outflow::runner::ProjectionRunner;
use outflow::{
    AppendRequest, Checkpoint, EventLog, EventStore, LogFilter, NewEvent, PostgresStore,
};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use uuid::Uuid;

/// Acknowledgements to cut.
const CUTS: usize = 50;
/// Events appended, one per append, over `ACCOUNTS` accounts.
const EVENTS: usize = 600;
const ACCOUNTS: usize = 10;

/// What the proxy shares between its connections.
#[derive(Default)]
struct Cuts {
    /// Acknowledgements cut so far.
    done: AtomicUsize,
    /// Batch commits seen (cut or not).
    batch_commits: AtomicUsize,
}

/// One protocol message: its type byte (0 for the start-up message) and body.
async fn read_message(
    reader: &mut (impl AsyncReadExt + Unpin),
    startup: bool,
) -> std::io::Result<(u8, Vec<u8>)> {
    let kind = if startup { 0 } else { reader.read_u8().await? };
    let length = reader.read_u32().await? as usize;
    let mut body = vec![0; length.saturating_sub(4)];
    reader.read_exact(&mut body).await?;
    Ok((kind, body))
}

async fn write_message(
    writer: &mut (impl AsyncWriteExt + Unpin),
    kind: u8,
    body: &[u8],
) -> std::io::Result<()> {
    let mut frame = Vec::with_capacity(body.len() + 5);
    if kind != 0 {
        frame.push(kind);
    }
    frame.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    frame.extend_from_slice(body);
    writer.write_all(&frame).await
}

/// The C string at the start of `bytes`, and what follows it.
fn c_string(bytes: &[u8]) -> (&[u8], &[u8]) {
    match bytes.iter().position(|b| *b == 0) {
        Some(end) => (&bytes[..end], &bytes[end + 1..]),
        None => (bytes, &[]),
    }
}

/// Relays one client connection to `upstream`, cutting the reply to every
/// second COMMIT of a transaction that wrote `totals` (until `CUTS`).
async fn relay(client: TcpStream, upstream: String, cuts: Arc<Cuts>) -> std::io::Result<()> {
    let server = TcpStream::connect(upstream).await?;
    // Messages go on one by one: without this, Nagle's algorithm and delayed
    // acknowledgements stall each small write.
    server.set_nodelay(true)?;
    client.set_nodelay(true)?;
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    let cut_pending = Arc::new(AtomicBool::new(false));

    let to_client = tokio::spawn({
        let cut_pending = cut_pending.clone();
        async move {
            loop {
                let (kind, body) = read_message(&mut server_read, false).await?;
                if cut_pending.load(Ordering::Acquire) {
                    // The COMMIT's reply: swallow it up to ReadyForQuery,
                    // then hang up on the client. The server has committed.
                    if kind == b'Z' {
                        client_write.shutdown().await?;
                        return Ok::<_, std::io::Error>(());
                    }
                    continue;
                }
                write_message(&mut client_write, kind, &body).await?;
            }
        }
    });

    let (kind, body) = read_message(&mut client_read, true).await?;
    write_message(&mut server_write, kind, &body).await?;
    // Prepared statements that write the read model, by name.
    let mut writers: HashSet<Vec<u8>> = HashSet::new();
    let mut wrote = false;
    loop {
        let Ok((kind, body)) = read_message(&mut client_read, false).await else {
            break;
        };
        match kind {
            b'Q' => {
                let (query, _) = c_string(&body);
                let query = String::from_utf8_lossy(query).to_uppercase();
                if query.contains("TOTALS") {
                    wrote = true;
                }
                if query.starts_with("COMMIT") {
                    if wrote {
                        let seen = cuts.batch_commits.fetch_add(1, Ordering::AcqRel);
                        if seen % 2 == 1 && cuts.done.load(Ordering::Acquire) < CUTS {
                            cuts.done.fetch_add(1, Ordering::AcqRel);
                            cut_pending.store(true, Ordering::Release);
                        }
                    }
                    wrote = false;
                } else if query.starts_with("ROLLBACK") {
                    wrote = false;
                }
            }
            b'P' => {
                let (name, rest) = c_string(&body);
                let (query, _) = c_string(rest);
                if String::from_utf8_lossy(query).contains("totals") {
                    writers.insert(name.to_vec());
                    wrote = true;
                }
            }
            b'B' => {
                let (_portal, rest) = c_string(&body);
                let (statement, _) = c_string(rest);
                if writers.contains(statement) {
                    wrote = true;
                }
            }
            _ => {}
        }
        if write_message(&mut server_write, kind, &body).await.is_err() {
            break;
        }
        if cut_pending.load(Ordering::Acquire) {
            // Nothing more goes to the server on this connection.
            break;
        }
    }
    let _ = to_client.await;
    Ok(())
}

/// A proxy on a free loopback port; returns its address.
async fn start_proxy(upstream: String, cuts: Arc<Cuts>) -> String {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind the proxy");
    let address = listener
        .local_addr()
        .expect("the proxy's address")
        .to_string();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            tokio::spawn(relay(client, upstream.clone(), cuts.clone()));
        }
    });
    address
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cut_commit_acknowledgements_do_not_apply_a_batch_twice() {
    let db = common::TestDb::new("commit_cut").await;
    let direct = db.store().await;
    let upstream = format!("{}:{}", db.options.get_host(), db.options.get_port());
    let cuts = Arc::new(Cuts::default());
    let proxy = start_proxy(upstream, cuts.clone()).await;
    let through_proxy = PostgresStore::builder(
        sqlx::postgres::PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(
                db.options.clone().host("127.0.0.1").port(
                    proxy
                        .rsplit(':')
                        .next()
                        .and_then(|p| p.parse().ok())
                        .expect("a port"),
                ),
            )
            .await
            .expect("connect through the proxy"),
    )
    .build()
    .await
    .expect("the runner's store");
    let runner = ProjectionRunner::builder(through_proxy.clone())
        .projection(
            ProjectionOptions::new(common::totals::Totals)
                .batch_size(4)
                .retry(RetryPolicy {
                    max_attempts: 50,
                    initial_backoff: Duration::from_millis(5),
                    max_backoff: Duration::from_millis(100),
                }),
        )
        .build()
        .expect("a runner");
    let (shutdown, handle) = common::start_runner(&runner);

    // Appends keep coming while the runner works, so batches are many and
    // small.
    let mut expected: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    let mut versions = [0u64; ACCOUNTS];
    for i in 0..EVENTS {
        let account = i % ACCOUNTS;
        let amount = (i as i64 % 7) + 1;
        let id = format!("acc-{account}");
        direct
            .append(AppendRequest {
                aggregate_type: "account".into(),
                aggregate_id: id.clone(),
                expected_version: versions[account],
                events: vec![NewEvent {
                    event_id: Uuid::now_v7(),
                    event_type: "Deposited".into(),
                    event_version: "1.0".into(),
                    payload: json!({ "Deposited": { "amount": amount } }),
                    metadata: Default::default(),
                    correlation_id: None,
                    causation_id: None,
                }],
            })
            .await
            .expect("append");
        versions[account] += 1;
        let entry = expected.entry(id).or_default();
        entry.0 += amount;
        entry.1 += 1;
        if i % 5 == 0 {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let head = common::read_until(&direct, Checkpoint::START, &LogFilter::all(), EVENTS)
        .await
        .last()
        .map(|e| e.checkpoint())
        .expect("events");
    runner
        .wait_for(head, &["totals"], Duration::from_secs(120))
        .await
        .expect("the runner caught up");
    common::stop_runner(shutdown, handle).await;

    let rows: Vec<(String, i64, i64)> =
        sqlx::query_as("SELECT account, sum, events FROM totals ORDER BY account")
            .fetch_all(direct.pool())
            .await
            .expect("read the totals");
    let got: BTreeMap<String, (i64, i64)> = rows.into_iter().map(|(a, s, n)| (a, (s, n))).collect();
    let cut = cuts.done.load(Ordering::Acquire);
    let commits = cuts.batch_commits.load(Ordering::Acquire);
    println!("{commits} batch commits, {cut} acknowledgements cut, {EVENTS} events");
    assert_eq!(got, expected, "a batch was applied twice or lost");
    assert_eq!(cut, CUTS, "only {cut} cuts in {commits} batch commits");
    assert!(runner
        .dead_letters("totals")
        .await
        .expect("dead letters")
        .is_empty());
    assert_eq!(direct.head().await.expect("head"), head);
}
