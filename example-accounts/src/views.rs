//! The read models, as `cqrs-es` views kept by Outflow's `ViewProjection`
//! in tables of the application's database (SQLite or PostgreSQL alike).

use outflow::cqrs_es::{EventEnvelope, View};
use outflow::personal::Personal;
use serde::{Deserialize, Serialize};

use crate::transfer::{Transfer, TransferEvent};
use crate::user::{User, UserEvent};
use crate::{BankAccount, BankEvent};

/// An account's balance (view `balances`).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Balance {
    /// The owner's name.
    pub owner: String,
    /// Cents.
    pub balance: i64,
    /// Whether the account is closed.
    pub closed: bool,
}

impl View<BankAccount> for Balance {
    fn update(&mut self, event: &EventEnvelope<BankAccount>) {
        match &event.payload {
            BankEvent::AccountOpened { owner } => self.owner = owner.clone(),
            BankEvent::AccountClosed => self.closed = true,
            other => self.balance = self.balance.saturating_add(other.balance_change()),
        }
    }
}

/// One line of a statement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Movement {
    /// `deposit`, `withdrawal`, `transfer out`, `transfer in` or `refund`.
    pub kind: String,
    /// Cents, positive for money in, negative for money out.
    pub amount: i64,
    /// The balance after the movement.
    pub balance: i64,
    /// The transfer it belongs to, if any.
    pub transfer_id: Option<String>,
}

/// An account's movements with their running balance (view `statements`).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Statement {
    /// The movements, oldest first.
    pub movements: Vec<Movement>,
}

impl View<BankAccount> for Statement {
    fn update(&mut self, event: &EventEnvelope<BankAccount>) {
        let kind = match &event.payload {
            BankEvent::Deposited { .. } => "deposit",
            BankEvent::Withdrawn { .. } => "withdrawal",
            BankEvent::TransferredOut { .. } => "transfer out",
            BankEvent::TransferredIn { .. } => "transfer in",
            BankEvent::Refunded { .. } => "refund",
            BankEvent::AccountOpened { .. } | BankEvent::AccountClosed => return,
        };
        let amount = event.payload.balance_change();
        let before = self.movements.last().map_or(0, |m| m.balance);
        self.movements.push(Movement {
            kind: kind.to_owned(),
            amount,
            balance: before + amount,
            transfer_id: event.payload.transfer_id().map(str::to_owned),
        });
    }
}

/// A user in the directory (view `users`). Its fields are personal, as in
/// the events: stored sealed, `null` in the API once the user is forgotten.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserEntry {
    /// The user's name.
    pub name: Personal<String>,
    /// The user's e-mail address.
    pub email: Personal<String>,
}

impl View<User> for UserEntry {
    fn update(&mut self, event: &EventEnvelope<User>) {
        match &event.payload {
            UserEvent::UserSignedUp { name, email } => {
                self.name = name.clone();
                self.email = email.clone();
            }
        }
    }
}

/// A transfer and how it stands (view `transfers`).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferStatus {
    /// The source account.
    pub from: String,
    /// The target account.
    pub to: String,
    /// Cents.
    pub amount: i64,
    /// `requested`, `crediting`, `completed`, `failed`, `compensating` or
    /// `compensated`.
    pub status: String,
    /// Why it failed or was compensated.
    pub reason: Option<String>,
}

impl View<Transfer> for TransferStatus {
    fn update(&mut self, event: &EventEnvelope<Transfer>) {
        match &event.payload {
            TransferEvent::TransferRequested { from, to, amount } => {
                self.from = from.clone();
                self.to = to.clone();
                self.amount = *amount;
                self.status = "requested".to_owned();
            }
            TransferEvent::TransferFailed { reason } => {
                self.status = "failed".to_owned();
                self.reason = Some(reason.clone());
            }
            TransferEvent::TransferCreditFailed { reason } => {
                self.status = "compensating".to_owned();
                self.reason = Some(reason.clone());
            }
            TransferEvent::TransferCompleted => self.status = "completed".to_owned(),
            TransferEvent::TransferCompensated => self.status = "compensated".to_owned(),
            TransferEvent::TransferCreditStarted => self.status = "crediting".to_owned(),
            TransferEvent::TransferTimedOut => {
                self.status = "compensating".to_owned();
                self.reason = Some("not completed in time".to_owned());
            }
        }
    }
}
