//! Read models of the bank: a hand-written batch projection into a
//! `account_balances` table (one upsert per batch), and a `cqrs-es` view of
//! the same data for the view adapter.

use std::collections::HashMap;

use async_trait::async_trait;
use outflow::cqrs_es::{EventEnvelope, View};
use outflow::projection::{HandlerError, Projection};
use outflow::{LogFilter, PostgresStore, RecordedEvent, SqliteStore};
use serde::{Deserialize, Serialize};
use sqlx::{PgExecutor, Postgres, Sqlite, SqliteExecutor, Transaction};

use crate::{BankAccount, BankEvent};

/// Balances of all accounts in the table `account_balances`, written with
/// one statement per batch.
#[derive(Debug, Clone)]
pub struct Balances {
    name: String,
}

impl Default for Balances {
    fn default() -> Self {
        Balances {
            name: "account_balances".to_owned(),
        }
    }
}

/// One row of `account_balances`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BalanceRow {
    /// Account id.
    pub account_id: String,
    /// Owner's name.
    pub owner: String,
    /// Balance in cents.
    pub balance: i64,
    /// Events applied to this row.
    pub events: i64,
    /// Whether the account is closed.
    pub closed: bool,
}

impl From<(String, String, i64, i64, bool)> for BalanceRow {
    /// A row as both backends' queries select it.
    fn from(
        (account_id, owner, balance, events, closed): (String, String, i64, i64, bool),
    ) -> Self {
        BalanceRow {
            account_id,
            owner,
            balance,
            events,
            closed,
        }
    }
}

impl Balances {
    /// The projection, under the name `account_balances`.
    pub fn new() -> Self {
        Self::default()
    }

    /// The same projection under another name (it still writes `account_balances`).
    pub fn named(name: impl Into<String>) -> Self {
        Balances { name: name.into() }
    }

    /// Creates the table if needed.
    ///
    /// # Errors
    ///
    /// The database error.
    pub async fn create_table<'e>(executor: impl PgExecutor<'e>) -> Result<(), sqlx::Error> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS account_balances (
                account_id text PRIMARY KEY,
                owner text NOT NULL DEFAULT '',
                balance bigint NOT NULL DEFAULT 0,
                events bigint NOT NULL DEFAULT 0,
                closed boolean NOT NULL DEFAULT false)",
        )
        .execute(executor)
        .await?;
        Ok(())
    }

    /// Every row, ordered by account id.
    ///
    /// # Errors
    ///
    /// The database error.
    pub async fn rows<'e>(executor: impl PgExecutor<'e>) -> Result<Vec<BalanceRow>, sqlx::Error> {
        let rows: Vec<(String, String, i64, i64, bool)> = sqlx::query_as(
            "SELECT account_id, owner, balance, events, closed FROM account_balances ORDER BY account_id",
        )
        .fetch_all(executor)
        .await?;
        Ok(rows.into_iter().map(BalanceRow::from).collect())
    }

    /// Folds events into rows in memory: what the table must hold after
    /// handling exactly these events once.
    pub fn fold<'a>(
        events: impl IntoIterator<Item = &'a BankEvent>,
        account_id: &str,
        row: &mut BalanceRow,
    ) {
        row.account_id = account_id.to_owned();
        for event in events {
            apply(row, event);
        }
    }
}

fn apply(row: &mut BalanceRow, event: &BankEvent) {
    row.events += 1;
    match event {
        BankEvent::AccountOpened { owner } => row.owner = owner.clone(),
        BankEvent::AccountClosed => row.closed = true,
        other => row.balance = row.balance.saturating_add(other.balance_change()),
    }
}

#[async_trait]
impl Projection<PostgresStore> for Balances {
    fn name(&self) -> &str {
        &self.name
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types(["account"])
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'static, Postgres>,
    ) -> Result<(), HandlerError> {
        let changes = changes(events)?;
        let mut ids = Vec::with_capacity(changes.len());
        let mut owners = Vec::with_capacity(changes.len());
        let mut deltas = Vec::with_capacity(changes.len());
        let mut counts = Vec::with_capacity(changes.len());
        let mut closed = Vec::with_capacity(changes.len());
        for (id, (owner, delta, count, close)) in changes {
            ids.push(id.to_owned());
            owners.push(owner);
            deltas.push(delta);
            counts.push(count);
            closed.push(close);
        }
        sqlx::query(
            "INSERT INTO account_balances AS b (account_id, owner, balance, events, closed)
             SELECT id, COALESCE(owner, ''), delta, n, closed
               FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::bool[])
                    AS u(id, owner, delta, n, closed)
             ON CONFLICT (account_id) DO UPDATE
                SET owner = CASE WHEN EXCLUDED.owner = '' THEN b.owner ELSE EXCLUDED.owner END,
                    balance = b.balance + EXCLUDED.balance,
                    events = b.events + EXCLUDED.events,
                    closed = b.closed OR EXCLUDED.closed",
        )
        .bind(&ids)
        .bind(&owners)
        .bind(&deltas)
        .bind(&counts)
        .bind(&closed)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    async fn setup(&self, tx: &mut Transaction<'static, Postgres>) -> Result<(), HandlerError> {
        Balances::create_table(&mut **tx).await?;
        Ok(())
    }

    async fn reset(&self, tx: &mut Transaction<'static, Postgres>) -> Result<(), HandlerError> {
        sqlx::query("DELETE FROM account_balances")
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// One account's change in a batch: owner (when opened), balance delta,
/// events, closed.
type Change = (Option<String>, i64, i64, bool);

/// Folds a batch per account in memory, so each account is written once.
fn changes(events: &[RecordedEvent]) -> Result<HashMap<&str, Change>, HandlerError> {
    let mut changes: HashMap<&str, Change> = HashMap::new();
    for event in events {
        let payload = event.decode_payload::<BankAccount>()?;
        let change = changes.entry(&event.aggregate_id).or_default();
        change.2 += 1;
        match payload {
            BankEvent::AccountOpened { owner } => change.0 = Some(owner),
            BankEvent::AccountClosed => change.3 = true,
            other => change.1 = change.1.saturating_add(other.balance_change()),
        }
    }
    Ok(changes)
}

/// The same read model as [`Balances`] (table `account_balances`, one row
/// per account) for a [`SqliteStore`]: the table lives in the store's file.
#[derive(Debug, Clone)]
pub struct SqliteBalances {
    name: String,
}

impl Default for SqliteBalances {
    fn default() -> Self {
        SqliteBalances {
            name: "account_balances".to_owned(),
        }
    }
}

impl SqliteBalances {
    /// The projection, under the name `account_balances`.
    pub fn new() -> Self {
        Self::default()
    }

    /// The same projection under another name (it still writes `account_balances`).
    pub fn named(name: impl Into<String>) -> Self {
        SqliteBalances { name: name.into() }
    }

    /// Creates the table in SQLite if needed.
    ///
    /// # Errors
    ///
    /// The database error.
    pub async fn create_table<'e>(executor: impl SqliteExecutor<'e>) -> Result<(), sqlx::Error> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS account_balances (
                account_id TEXT PRIMARY KEY,
                owner TEXT NOT NULL DEFAULT '',
                balance INTEGER NOT NULL DEFAULT 0,
                events INTEGER NOT NULL DEFAULT 0,
                closed INTEGER NOT NULL DEFAULT 0)",
        )
        .execute(executor)
        .await?;
        Ok(())
    }

    /// Every row of the SQLite table, ordered by account id.
    ///
    /// # Errors
    ///
    /// The database error.
    pub async fn rows<'e>(
        executor: impl SqliteExecutor<'e>,
    ) -> Result<Vec<BalanceRow>, sqlx::Error> {
        let rows: Vec<(String, String, i64, i64, bool)> = sqlx::query_as(
            "SELECT account_id, owner, balance, events, closed FROM account_balances ORDER BY account_id",
        )
        .fetch_all(executor)
        .await?;
        Ok(rows.into_iter().map(BalanceRow::from).collect())
    }
}

#[async_trait]
impl Projection<SqliteStore> for SqliteBalances {
    fn name(&self) -> &str {
        &self.name
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types(["account"])
    }

    async fn setup(&self, tx: &mut Transaction<'static, Sqlite>) -> Result<(), HandlerError> {
        SqliteBalances::create_table(&mut **tx).await?;
        Ok(())
    }

    async fn handle(
        &self,
        events: &[RecordedEvent],
        tx: &mut Transaction<'static, Sqlite>,
    ) -> Result<(), HandlerError> {
        for (id, (owner, delta, count, close)) in changes(events)? {
            sqlx::query(
                "INSERT INTO account_balances (account_id, owner, balance, events, closed)
                 VALUES (?1, COALESCE(?2, ''), ?3, ?4, ?5)
                 ON CONFLICT (account_id) DO UPDATE
                    SET owner = CASE WHEN excluded.owner = '' THEN owner ELSE excluded.owner END,
                        balance = balance + excluded.balance,
                        events = events + excluded.events,
                        closed = closed OR excluded.closed",
            )
            .bind(id)
            .bind(owner)
            .bind(delta)
            .bind(count)
            .bind(close)
            .execute(&mut **tx)
            .await?;
        }
        Ok(())
    }

    async fn reset(&self, tx: &mut Transaction<'static, Sqlite>) -> Result<(), HandlerError> {
        sqlx::query("DELETE FROM account_balances")
            .execute(&mut **tx)
            .await?;
        Ok(())
    }
}

/// A `cqrs-es` view of an account, as its documentation would write one.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccountView {
    /// Owner's name.
    pub owner: String,
    /// Balance in cents.
    pub balance: i64,
    /// Every movement, as text.
    pub ledger: Vec<String>,
    /// Whether the account is closed.
    pub closed: bool,
}

impl View<BankAccount> for AccountView {
    fn update(&mut self, event: &EventEnvelope<BankAccount>) {
        match &event.payload {
            BankEvent::AccountOpened { owner } => self.owner = owner.clone(),
            BankEvent::AccountClosed => self.closed = true,
            other => {
                let change = other.balance_change();
                self.balance = self.balance.saturating_add(change);
                self.ledger.push(format!("{change:+}"));
            }
        }
    }
}
