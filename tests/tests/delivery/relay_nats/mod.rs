//! The JetStream relay and consumer against a real PostgreSQL and a real
//! nats-server: every event reaches the stream exactly once and is applied
//! once by a consumer across two SIGKILLs of the server; headers and subjects
//! are as documented; a poison message is parked after N deliveries.
//!
//! Needs `NATS_URL` and `OUTFLOW_NATS_BIN` (scripts/test.sh sets both); a
//! missing one fails the test.

use outflow_tests as common;

use common::nats::{jetstream, msg_id, read_stream};

use std::collections::{BTreeMap, HashSet};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use outflow::projection::{HandlerError, OnError, ProjectionOptions, RetryPolicy};
use outflow::relay::{
    ensure_stream, headers, subject_token, JetStreamConsumer, JetStreamRelay, MessageHandler,
    PostgresDeadMessages, ReceivedMessage,
};
use outflow::runner::ProjectionRunner;
use outflow::store::ProjectionState;
use outflow::{AppendRequest, Checkpoint, EventStore, NewEvent, PostgresStore, RecordedEvent};
use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

mod kills;
mod messages;
mod outbox_and_outage;

fn nats_url() -> String {
    std::env::var("NATS_URL")
        .expect("NATS_URL is not set: run the tests with scripts/test.sh, which starts nats-server")
}

fn nats_bin() -> String {
    std::env::var("OUTFLOW_NATS_BIN").expect(
        "OUTFLOW_NATS_BIN is not set: run the tests with scripts/test.sh, which finds nats-server",
    )
}

/// A nats-server of the test's own, on a fixed port and storage directory,
/// so it can be killed and started again as the same server.
struct OwnNats {
    bin: String,
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
    starts: u32,
}

impl OwnNats {
    fn start_new() -> OwnNats {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir = std::env::temp_dir().join(format!("outflow-relay-test-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&dir).expect("storage dir");
        let mut server = OwnNats {
            bin: nats_bin(),
            port,
            dir,
            child: None,
            starts: 0,
        };
        server.start();
        server
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.starts += 1;
        let log = std::fs::File::create(self.dir.join(format!("server-{}.log", self.starts)))
            .expect("log file");
        let child = Command::new(&self.bin)
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .arg("-sd")
            .arg(self.dir.join("store"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not accept connections within 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, by the child's PID.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().expect("SIGKILL nats-server");
            child.wait().expect("reap nats-server");
        }
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spawn_consumer(
    consumer: JetStreamConsumer<PostgresStore>,
) -> (CancellationToken, tokio::task::JoinHandle<()>) {
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn({
        let shutdown = shutdown.clone();
        async move { consumer.run(shutdown).await }
    });
    (shutdown, handle)
}

fn fast_retries() -> RetryPolicy {
    RetryPolicy {
        max_attempts: 3,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(400),
    }
}

fn event(event_type: &str, payload: serde_json::Value) -> NewEvent {
    NewEvent {
        event_id: Uuid::now_v7(),
        event_type: event_type.to_owned(),
        event_version: "1".to_owned(),
        payload,
        metadata: Default::default(),
        correlation_id: None,
        causation_id: None,
    }
}

/// Applies each relayed event to `relay_effects`; a second application of the
/// same event would raise its counter.
struct ApplyOnce {
    table: &'static str,
}

#[async_trait::async_trait]
impl MessageHandler<PostgresStore> for ApplyOnce {
    async fn handle(
        &self,
        message: &ReceivedMessage,
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        if message.payload == b"poison" {
            return Err(HandlerError::msg("poisoned payload"));
        }
        sqlx::query(&format!(
            "INSERT INTO {} (message_id, applied) VALUES ($1, 1)
             ON CONFLICT (message_id) DO UPDATE SET applied = {}.applied + 1",
            self.table, self.table
        ))
        .bind(&message.message_id)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

async fn create_effects(pool: &PgPool, table: &str) {
    sqlx::query(&format!(
        "CREATE TABLE {table} (message_id text PRIMARY KEY, applied integer NOT NULL)"
    ))
    .execute(pool)
    .await
    .expect("effects table");
}

async fn count(pool: &PgPool, sql: &str, bind: &str) -> i64 {
    sqlx::query_scalar(sql)
        .bind(bind)
        .fetch_one(pool)
        .await
        .expect("count")
}

async fn rows(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT count(*) FROM {table}"))
        .fetch_one(pool)
        .await
        .expect("count")
}

const AGGREGATES: usize = 100;
const PER_AGGREGATE: usize = 100;
const PER_APPEND: usize = 10;
const TOTAL: usize = AGGREGATES * PER_AGGREGATE;
