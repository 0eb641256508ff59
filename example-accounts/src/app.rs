//! The application: its command buses, its projections and its queries, on
//! whichever backend the user chose. Everything here is generic over the
//! store; the few SQL statements of the application itself (the sent
//! e-mails) are in [`AppStore`], written once for both backends. A user's
//! address is unique across users through a decision
//! ([`crate::user::Registration`]), enforced by the event store itself.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outflow::cqrs_es::Aggregate;
use outflow::decision::DecisionBus;
use outflow::process::Process;
use outflow::projection::{OnError, Projection, ProjectionOptions, RetryPolicy};
use outflow::pubsub::EventBus;
use outflow::runner::{ProjectionRunner, RetryError};
use outflow::sqlx;
use outflow::store::projections::DeadLetter;
use outflow::timer::{Clock, Timers};
use outflow::view::{ViewProjection, ViewQuery, ViewStore};
use outflow::{
    async_trait, AppendInTransaction, CommandBus, HandlerError, LogFilter, PostgresStore,
    ProjectionStore, RecordedEvent, SqliteStore, StoreError,
};
use serde::Serialize;
use tracing::Instrument;

use crate::transfer::{Transfer, TransferProcess};
use crate::user::{Registration, User, UserEvent};
use crate::views::{Balance, Statement, TransferStatus, UserEntry};
use crate::BankAccount;

/// The projections the application runs, by name.
pub const BALANCES: &str = "balances";
/// Statements with running balances.
pub const STATEMENTS: &str = "statements";
/// The user directory.
pub const USERS: &str = "users";
/// Transfers and their status.
pub const TRANSFERS: &str = "transfers";
/// The welcome e-mails.
pub const WELCOME_EMAILS: &str = "welcome_emails";
/// The transfer process manager.
pub const TRANSFER_PROCESS: &str = "transfer_process";

/// Every projection, in the order the runner has them.
pub const PROJECTIONS: [&str; 6] = [
    BALANCES,
    STATEMENTS,
    USERS,
    TRANSFERS,
    WELCOME_EMAILS,
    TRANSFER_PROCESS,
];

/// An e-mail the application "sent" (recorded in `sent_emails` in place of
/// an SMTP server).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SentEmail {
    /// The idempotency key: the id of the event that asked for it.
    pub key: String,
    /// The recipient.
    pub to: String,
    /// The subject.
    pub subject: String,
}

/// What the application needs from a backend beyond Outflow's traits: its
/// own two tables. Implemented for [`SqliteStore`] and [`PostgresStore`]
/// with the same SQL.
#[async_trait]
pub trait AppStore:
    ProjectionStore
    + outflow::timer::TimerStore
    + ViewStore
    + AppendInTransaction
    + outflow::store::ConditionalAppend
    + outflow::EventStore
    + outflow::EventLog
    + Clone
    + 'static
{
    /// Creates the application's tables if they are missing.
    async fn create_tables(&self) -> Result<(), StoreError>;

    /// Records an e-mail as sent, once per key.
    async fn send_email(&self, email: &SentEmail, body: &str) -> Result<(), StoreError>;

    /// The e-mails sent, oldest first.
    async fn sent_emails(&self) -> Result<Vec<SentEmail>, StoreError>;

    /// Deletes the e-mails sent to `to` (the mail server's copies of a
    /// forgotten user's data: outside Outflow, erased by the application);
    /// returns how many.
    async fn erase_sent_emails(&self, to: &str) -> Result<u64, StoreError>;

    /// Leaves no bytes of erased rows behind: on SQLite the write-ahead
    /// log truncated (the file overwrites deleted rows itself), on
    /// PostgreSQL the table vacuumed.
    async fn scrub(&self) -> Result<(), StoreError>;

    /// `process` with `timers` (its deadlines commit with its batches).
    fn with_timers<P: outflow::process::ProcessManager>(
        process: Process<P, Self>,
        timers: Timers<Self>,
    ) -> Process<P, Self>;
}

const CREATE_SENT: &str = "CREATE TABLE IF NOT EXISTS sent_emails (
    key TEXT PRIMARY KEY,
    recipient TEXT NOT NULL,
    subject TEXT NOT NULL,
    body TEXT NOT NULL,
    sent_at TEXT NOT NULL)";
const SEND: &str = "INSERT INTO sent_emails (key, recipient, subject, body, sent_at) \
     VALUES ($1, $2, $3, $4, $5) ON CONFLICT (key) DO NOTHING";
const SENT: &str = "SELECT key, recipient, subject FROM sent_emails ORDER BY sent_at, key";
const ERASE_SENT: &str = "DELETE FROM sent_emails WHERE recipient = $1";

/// A driver error as the store classifies it: a value the database
/// refuses (a NUL byte in text on PostgreSQL, SQLSTATE class 22) is the
/// data's fault and parks the event, a missing table is infrastructure.
fn app_error<'a, S: outflow::Transactional>(
    store: &'a S,
    what: &'static str,
) -> impl FnOnce(sqlx::Error) -> StoreError + 'a {
    move |e| {
        let kind = store
            .classify(&e)
            .unwrap_or(outflow::ErrorKind::Infrastructure);
        StoreError::database(what, kind, e)
    }
}

/// The same statements on both backends (`$n` parameters work on both).
macro_rules! app_store {
    ($store:ty, $pool:ident, $scrub:path) => {
        #[async_trait]
        impl AppStore for $store {
            async fn create_tables(&self) -> Result<(), StoreError> {
                for statement in [CREATE_SENT] {
                    sqlx::query(statement)
                        .execute(self.$pool())
                        .await
                        .map_err(app_error(self, "creating the application's tables"))?;
                }
                Ok(())
            }

            async fn send_email(&self, email: &SentEmail, body: &str) -> Result<(), StoreError> {
                sqlx::query(SEND)
                    .bind(&email.key)
                    .bind(&email.to)
                    .bind(&email.subject)
                    .bind(body)
                    .bind(chrono_now())
                    .execute(self.$pool())
                    .await
                    .map_err(app_error(self, "recording a sent e-mail"))?;
                Ok(())
            }

            async fn sent_emails(&self) -> Result<Vec<SentEmail>, StoreError> {
                let rows: Vec<(String, String, String)> = sqlx::query_as(SENT)
                    .fetch_all(self.$pool())
                    .await
                    .map_err(app_error(self, "reading the sent e-mails"))?;
                Ok(rows
                    .into_iter()
                    .map(|(key, to, subject)| SentEmail { key, to, subject })
                    .collect())
            }

            async fn erase_sent_emails(&self, to: &str) -> Result<u64, StoreError> {
                let done = sqlx::query(ERASE_SENT)
                    .bind(to)
                    .execute(self.$pool())
                    .await
                    .map_err(app_error(self, "erasing sent e-mails"))?;
                Ok(done.rows_affected())
            }

            async fn scrub(&self) -> Result<(), StoreError> {
                $scrub(self).await
            }

            fn with_timers<P: outflow::process::ProcessManager>(
                process: Process<P, Self>,
                timers: Timers<Self>,
            ) -> Process<P, Self> {
                process.with_timers(timers)
            }
        }
    };
}

app_store!(SqliteStore, writer, scrub_sqlite);
app_store!(PostgresStore, pool, scrub_postgres);

/// Checkpoints the write-ahead log into the file and truncates it, trying
/// again while readers hold it (up to 10 s).
async fn scrub_sqlite(store: &SqliteStore) -> Result<(), StoreError> {
    for _ in 0..100 {
        if store.truncate_wal().await? {
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    Err(StoreError::Unsupported {
        what: "truncating the write-ahead log",
        reason: "readers kept it busy for 10 s",
    })
}

/// Vacuums the sent e-mails, so the deleted rows leave the table's file.
async fn scrub_postgres(store: &PostgresStore) -> Result<(), StoreError> {
    sqlx::query("VACUUM sent_emails")
        .execute(store.pool())
        .await
        .map_err(app_error(store, "vacuuming the sent e-mails"))?;
    Ok(())
}

/// The time as RFC 3339 text with microseconds (sorts as text).
fn chrono_now() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    format!("{:020}.{:06}", now.as_secs(), now.subsec_micros())
}

/// The stand-in for an SMTP server: it refuses mail to the domains it is
/// told to (the demo's poison event), and accepts the rest.
#[derive(Debug, Clone, Default)]
pub struct MailServer {
    refused: Arc<Mutex<HashSet<String>>>,
    /// A file listing more refused domains (one per line), read at every
    /// e-mail: editing it changes the answer of a running server.
    refused_file: Arc<Mutex<Option<std::path::PathBuf>>>,
}

impl MailServer {
    /// Also refuses the domains listed in `path` (one per line; a missing
    /// file lists none), read again for every e-mail.
    pub fn refuse_listed_in(&self, path: impl Into<std::path::PathBuf>) {
        *self.refused_file.lock().unwrap_or_else(|e| e.into_inner()) = Some(path.into());
    }

    /// Refuses mail to `domain` from now on.
    pub fn refuse(&self, domain: &str) {
        self.lock().insert(domain.to_lowercase());
    }

    /// Accepts mail to `domain` again.
    pub fn accept(&self, domain: &str) {
        self.lock().remove(&domain.to_lowercase());
    }

    fn refuses(&self, address: &str) -> bool {
        let domain = address
            .rsplit('@')
            .next()
            .unwrap_or_default()
            .to_lowercase();
        if self.lock().contains(&domain) {
            return true;
        }
        let file = self
            .refused_file
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        file.and_then(|path| std::fs::read_to_string(path).ok())
            .is_some_and(|listed| {
                listed
                    .lines()
                    .any(|line| line.trim().eq_ignore_ascii_case(&domain))
            })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.refused.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Sends each new user a welcome e-mail: an effect, at least once, made
/// idempotent by the event's id as the e-mail's key.
struct WelcomeEmails<S> {
    store: S,
    mail: MailServer,
}

impl<S: AppStore> WelcomeEmails<S> {
    async fn send_welcome(&self, event: &RecordedEvent) -> Result<(), HandlerError> {
        let UserEvent::UserSignedUp { name, email } = event.decode_payload::<User>()?;
        // A user forgotten since (a rebuild, a retry): nobody to write to.
        let (Some(name), Some(email)) = (name.into_value(), email.into_value()) else {
            return Ok(());
        };
        if self.mail.refuses(&email) {
            // The error is kept with the parked event: it names the user,
            // not the address.
            return Err(HandlerError::msg(format!(
                "the mail server refused the address of user {}",
                event.aggregate_id
            )));
        }
        let sent = SentEmail {
            key: event.event_id.to_string(),
            to: email,
            subject: "Welcome to Outflow Bank".to_owned(),
        };
        let body = format!("Hello {name}, your account at Outflow Bank is ready.");
        self.store.send_email(&sent, &body).await?;
        Ok(())
    }
}

#[async_trait]
impl<S: AppStore> Projection<S> for WelcomeEmails<S> {
    fn name(&self) -> &str {
        WELCOME_EMAILS
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types([User::TYPE]).with_event_types(["UserSignedUp"])
    }

    async fn effects(&self, events: &[RecordedEvent]) -> Result<(), HandlerError> {
        for event in events {
            // Each e-mail continues the trace of the sign-up that caused it.
            let span = tracing::info_span!("welcome_email", user = %event.aggregate_id);
            outflow::trace::follow(&span, event);
            self.send_welcome(event).instrument(span).await?;
        }
        Ok(())
    }

    async fn handle(
        &self,
        _events: &[RecordedEvent],
        _tx: &mut S::Transaction,
    ) -> Result<(), HandlerError> {
        Ok(())
    }
}

/// The running application.
pub struct App<S: AppStore> {
    /// The store.
    pub store: S,
    /// Accounts.
    pub accounts: Arc<CommandBus<BankAccount, S>>,
    /// Users.
    pub users: Arc<CommandBus<User, S>>,
    /// Sign-ups: the unique-address rule, decided across users.
    pub sign_ups: Arc<DecisionBus<Registration, S>>,
    /// The users' keys: forgetting a user deletes theirs.
    pub keys: outflow::personal::KeyRing,
    /// Transfers.
    pub transfers: Arc<CommandBus<Transfer, S>>,
    /// The projections.
    pub runner: ProjectionRunner<S>,
    /// Balances by account.
    pub balances: ViewQuery<BankAccount, Balance, S>,
    /// Statements by account.
    pub statements: ViewQuery<BankAccount, Statement, S>,
    /// Users by id.
    pub directory: ViewQuery<User, UserEntry, S>,
    /// Transfers by id.
    pub transfer_status: ViewQuery<Transfer, TransferStatus, S>,
    /// Every event this process commits, after its commit (at most once).
    pub feed: EventBus,
    /// The mail server stand-in.
    pub mail: MailServer,
    /// The timers (transfer deadlines).
    pub timers: Timers<S>,
}

/// What the application can be told.
#[derive(Debug, Clone)]
pub struct Settings {
    /// How long a transfer may take before it is cancelled and its debit
    /// refunded (default 60 s).
    pub transfer_timeout: Duration,
    /// The clock the deadlines are due by (tests move it forward).
    pub clock: Clock,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            transfer_timeout: Duration::from_secs(60),
            clock: Clock::new(),
        }
    }
}

impl<S: AppStore> std::fmt::Debug for App<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("App").finish_non_exhaustive()
    }
}

impl<S: AppStore> App<S> {
    /// Wires the application on `store` (creating its tables and the read
    /// models').
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the tables cannot be created.
    pub async fn new(store: S) -> Result<Self, StoreError> {
        Self::with_settings(store, Settings::default()).await
    }

    /// Wires the application on `store` with `settings`.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the tables cannot be created.
    pub async fn with_settings(store: S, settings: Settings) -> Result<Self, StoreError> {
        store.create_tables().await?;
        let timers = Timers::with_clock(&store, settings.clock.clone()).await?;
        let feed = EventBus::new(256);
        let accounts = Arc::new(
            CommandBus::<BankAccount, _>::builder(store.clone(), ())
                .snapshot_every(50)
                .publish_to(feed.clone())
                .remember_typed_refusals()
                .build(),
        );
        let users = Arc::new(
            CommandBus::<User, _>::builder(store.clone(), ())
                .tag_events()
                .publish_to(feed.clone())
                .build(),
        );
        let sign_ups = Arc::new(DecisionBus::new(store.clone()).publish_to(feed.clone()));
        let transfers = Arc::new(
            CommandBus::<Transfer, _>::builder(store.clone(), ())
                .publish_to(feed.clone())
                .remember_typed_refusals()
                .build(),
        );
        let balances = ViewProjection::<BankAccount, Balance>::new(BALANCES, "balances")?;
        let statements = ViewProjection::<BankAccount, Statement>::new(STATEMENTS, "statements")?;
        let directory = ViewProjection::<User, UserEntry>::new(USERS, "users")?;
        let transfer_status =
            ViewProjection::<Transfer, TransferStatus>::new(TRANSFERS, "transfers")?;
        let mail = MailServer::default();
        // ANCHOR: wiring
        let process = Process::new(
            TransferProcess::new(accounts.clone(), transfers.clone())
                .with_deadline(settings.transfer_timeout),
            &store,
            "transfer_processes",
        )?;
        let process = S::with_timers(process, timers.clone());
        // The node that holds the timers' lease sends each transfer's
        // `TimeOut` when its deadline passes.
        let scheduler = timers.scheduler().command(transfers.clone()).build()?;
        // ANCHOR_END: wiring
        let quick = RetryPolicy {
            max_attempts: 3,
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
        };
        // The status gauges at `/metrics` (lag, dead letters, a rebuild's
        // progress) are read every 15 s, or as often as this asks.
        let status_metrics = std::env::var("OUTFLOW_STATUS_METRICS_MS")
            .ok()
            .and_then(|ms| ms.parse().ok())
            .map_or(Duration::from_secs(15), Duration::from_millis);
        let runner = ProjectionRunner::builder(store.clone())
            .status_metrics_every(status_metrics)
            .projection(ProjectionOptions::new(balances.clone()))
            .projection(ProjectionOptions::new(statements.clone()))
            .projection(ProjectionOptions::new(directory.clone()))
            .projection(ProjectionOptions::new(transfer_status.clone()))
            .projection(
                ProjectionOptions::new(WelcomeEmails {
                    store: store.clone(),
                    mail: mail.clone(),
                })
                .retry(quick)
                .on_error(OnError::Park),
            )
            .projection(ProjectionOptions::new(process).retry(RetryPolicy {
                max_attempts: 10,
                ..quick
            }))
            .scheduler(scheduler)
            .build()?;
        // The read models' tables exist before the first query.
        runner.setup().await?;
        let keys = outflow::EventStore::key_ring(&store).ok_or(StoreError::Unsupported {
            what: "personal data",
            reason: "the store keeps no keys",
        })?;
        Ok(App {
            keys,
            balances: balances.query(&store),
            statements: statements.query(&store),
            directory: directory.query(&store),
            transfer_status: transfer_status.query(&store),
            store,
            accounts,
            users,
            sign_ups,
            transfers,
            runner,
            feed,
            mail,
            timers,
        })
    }
}

impl<S: AppStore> App<S> {
    /// Every parked event of every projection, with the projection's name.
    ///
    /// # Errors
    ///
    /// [`StoreError`] when the dead letters cannot be read.
    pub async fn dead_letters(&self) -> Result<Vec<(&'static str, DeadLetter)>, StoreError> {
        let mut all = Vec::new();
        for name in PROJECTIONS {
            for letter in self.runner.dead_letters(name).await? {
                all.push((name, letter));
            }
        }
        Ok(all)
    }

    /// Retries dead letter `id` in whichever projection parked it: the
    /// projection's name, or `None` when no projection has it.
    ///
    /// # Errors
    ///
    /// [`RetryError`] when the handler fails again or the store fails.
    pub async fn retry_dead_letter(&self, id: u64) -> Result<Option<&'static str>, RetryError> {
        for name in PROJECTIONS {
            match self.runner.retry_dead_letter(name, id).await {
                Ok(()) => return Ok(Some(name)),
                Err(RetryError::NotFound { .. }) => continue,
                Err(other) => return Err(other),
            }
        }
        Ok(None)
    }
}
