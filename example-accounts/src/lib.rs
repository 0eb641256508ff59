//! A bank-account application built on Outflow: the aggregate, its commands
//! and events, written exactly as `cqrs-es` documents them.
//!
//! ```
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! use example_accounts::{BankAccount, BankCommand};
//! use outflow::{CommandBus, MemoryStore};
//!
//! let bus = CommandBus::<BankAccount, _>::new(MemoryStore::new(), ());
//! bus.execute("acc-1", BankCommand::Open { owner: "Ann".into() }).await?;
//! bus.execute("acc-1", BankCommand::Deposit { amount: 100 }).await?;
//! let refused = bus.execute("acc-1", BankCommand::Withdraw { amount: 500 }).await;
//! assert!(refused.is_err());
//! let (account, version) = bus.load("acc-1").await?;
//! assert_eq!((account.balance, version), (100, 2));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```

pub mod app;
pub mod http;
pub mod projections;
pub mod transfer;
pub mod user;
pub mod views;

use outflow::cqrs_es::event_sink::EventSink;
use outflow::cqrs_es::{Aggregate, DomainEvent};
use serde::{Deserialize, Serialize};

/// A bank account.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BankAccount {
    /// Whether the account was opened.
    pub opened: bool,
    /// Whether the account was closed.
    pub closed: bool,
    /// The owner's name.
    pub owner: String,
    /// Balance in cents.
    pub balance: i64,
}

/// What a client may ask of an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BankCommand {
    /// Opens the account.
    Open {
        /// The owner's name.
        owner: String,
    },
    /// Puts money in.
    Deposit {
        /// Cents, positive.
        amount: i64,
    },
    /// Takes money out, if the balance allows.
    Withdraw {
        /// Cents, positive.
        amount: i64,
    },
    /// Closes the account; only an empty account can be closed.
    Close,
    /// Takes money out for a transfer (sent by the transfer process).
    TransferOut {
        /// The transfer.
        transfer_id: String,
        /// Cents, positive.
        amount: i64,
    },
    /// Puts a transfer's money in (sent by the transfer process).
    TransferIn {
        /// The transfer.
        transfer_id: String,
        /// Cents, positive.
        amount: i64,
    },
    /// Gives back the money of a transfer whose credit was refused. Accepted
    /// on a closed account too: money is never lost on the way.
    Refund {
        /// The transfer.
        transfer_id: String,
        /// Cents, positive.
        amount: i64,
    },
}

/// What happened to an account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BankEvent {
    /// The account was opened.
    AccountOpened {
        /// The owner's name.
        owner: String,
    },
    /// Money was deposited.
    Deposited {
        /// Cents.
        amount: i64,
    },
    /// Money was withdrawn.
    Withdrawn {
        /// Cents.
        amount: i64,
    },
    /// The account was closed.
    AccountClosed,
    /// Money left for a transfer.
    TransferredOut {
        /// The transfer.
        transfer_id: String,
        /// Cents.
        amount: i64,
    },
    /// A transfer's money arrived.
    TransferredIn {
        /// The transfer.
        transfer_id: String,
        /// Cents.
        amount: i64,
    },
    /// A transfer's money came back.
    Refunded {
        /// The transfer.
        transfer_id: String,
        /// Cents.
        amount: i64,
    },
}

impl BankEvent {
    /// What the event does to the balance, in cents.
    pub fn balance_change(&self) -> i64 {
        match self {
            BankEvent::Deposited { amount }
            | BankEvent::TransferredIn { amount, .. }
            | BankEvent::Refunded { amount, .. } => *amount,
            BankEvent::Withdrawn { amount } | BankEvent::TransferredOut { amount, .. } => {
                0i64.saturating_sub(*amount)
            }
            BankEvent::AccountOpened { .. } | BankEvent::AccountClosed => 0,
        }
    }

    /// The transfer the event belongs to, if any.
    pub fn transfer_id(&self) -> Option<&str> {
        match self {
            BankEvent::TransferredOut { transfer_id, .. }
            | BankEvent::TransferredIn { transfer_id, .. }
            | BankEvent::Refunded { transfer_id, .. } => Some(transfer_id),
            _ => None,
        }
    }
}

impl DomainEvent for BankEvent {
    fn event_type(&self) -> String {
        match self {
            BankEvent::AccountOpened { .. } => "AccountOpened",
            BankEvent::Deposited { .. } => "Deposited",
            BankEvent::Withdrawn { .. } => "Withdrawn",
            BankEvent::AccountClosed => "AccountClosed",
            BankEvent::TransferredOut { .. } => "TransferredOut",
            BankEvent::TransferredIn { .. } => "TransferredIn",
            BankEvent::Refunded { .. } => "Refunded",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

/// Why an account refused a command. Serializable, so a refusal remembered
/// by `execute_once` comes back as the same value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum BankError {
    /// `Open` on an account that is already open.
    #[error("the account is already open")]
    AlreadyOpen,
    /// Any command but `Open` on an account never opened.
    #[error("the account is not open")]
    NotOpen,
    /// Any command on a closed account.
    #[error("the account is closed")]
    Closed,
    /// A zero or negative amount.
    #[error("amount must be positive, got {0}")]
    InvalidAmount(i64),
    /// A withdrawal larger than the balance.
    #[error("insufficient funds: balance {balance}, requested {requested}")]
    InsufficientFunds {
        /// The balance.
        balance: i64,
        /// The amount asked for.
        requested: i64,
    },
    /// `Close` with money left.
    #[error("the account still holds {0}")]
    NotEmpty(i64),
    /// An empty owner, or one with control characters.
    #[error("{0}")]
    InvalidOwner(String),
    /// A credit that would take the balance past the largest amount an
    /// account can hold (`i64::MAX` cents).
    #[error("the balance {balance} cannot take {amount} more")]
    Overflow {
        /// The balance.
        balance: i64,
        /// The amount credited.
        amount: i64,
    },
}

/// The longest name (a user's, an account owner's) the HTTP API accepts,
/// in characters.
pub const MAX_NAME: usize = 200;

/// The domain's rule for names, the same on every backend: no control
/// characters (a NUL among them, which PostgreSQL cannot store in text).
/// Returns why not. (The HTTP API also bounds their length: [`MAX_NAME`].)
pub fn check_name(field: &str, name: &str) -> Result<(), String> {
    if name.chars().any(char::is_control) {
        return Err(format!("the {field} contains control characters"));
    }
    Ok(())
}

impl Aggregate for BankAccount {
    const TYPE: &'static str = "account";
    type Command = BankCommand;
    type Event = BankEvent;
    type Error = BankError;
    type Services = ();

    async fn handle(
        &mut self,
        command: BankCommand,
        _services: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), BankError> {
        if let BankCommand::Refund {
            transfer_id,
            amount,
        } = command
        {
            if !self.opened {
                return Err(BankError::NotOpen);
            }
            self.check_credit(amount)?;
            sink.write(
                BankEvent::Refunded {
                    transfer_id,
                    amount,
                },
                self,
            )
            .await;
            return Ok(());
        }
        if self.closed {
            return Err(BankError::Closed);
        }
        match command {
            BankCommand::Open { owner } => {
                if self.opened {
                    return Err(BankError::AlreadyOpen);
                }
                let owner = owner.trim().to_owned();
                if owner.is_empty() {
                    return Err(BankError::InvalidOwner("an owner is required".into()));
                }
                check_name("owner", &owner).map_err(BankError::InvalidOwner)?;
                sink.write(BankEvent::AccountOpened { owner }, self).await;
            }
            BankCommand::Deposit { amount } => {
                self.check_open(amount)?;
                self.check_credit(amount)?;
                sink.write(BankEvent::Deposited { amount }, self).await;
            }
            BankCommand::Withdraw { amount } => {
                self.check_open(amount)?;
                if amount > self.balance {
                    return Err(BankError::InsufficientFunds {
                        balance: self.balance,
                        requested: amount,
                    });
                }
                sink.write(BankEvent::Withdrawn { amount }, self).await;
            }
            BankCommand::Close => {
                if !self.opened {
                    return Err(BankError::NotOpen);
                }
                if self.balance != 0 {
                    return Err(BankError::NotEmpty(self.balance));
                }
                sink.write(BankEvent::AccountClosed, self).await;
            }
            BankCommand::TransferOut {
                transfer_id,
                amount,
            } => {
                self.check_open(amount)?;
                if amount > self.balance {
                    return Err(BankError::InsufficientFunds {
                        balance: self.balance,
                        requested: amount,
                    });
                }
                sink.write(
                    BankEvent::TransferredOut {
                        transfer_id,
                        amount,
                    },
                    self,
                )
                .await;
            }
            BankCommand::TransferIn {
                transfer_id,
                amount,
            } => {
                self.check_open(amount)?;
                self.check_credit(amount)?;
                sink.write(
                    BankEvent::TransferredIn {
                        transfer_id,
                        amount,
                    },
                    self,
                )
                .await;
            }
            BankCommand::Refund { .. } => {}
        }
        Ok(())
    }

    fn apply(&mut self, event: BankEvent) {
        match event {
            BankEvent::AccountOpened { owner } => {
                self.opened = true;
                self.owner = owner;
            }
            BankEvent::AccountClosed => self.closed = true,
            // Commands refuse what would overflow; saturating keeps a
            // hand-written event from panicking a load.
            other => self.balance = self.balance.saturating_add(other.balance_change()),
        }
    }
}

impl BankAccount {
    fn check_open(&self, amount: i64) -> Result<(), BankError> {
        if !self.opened {
            return Err(BankError::NotOpen);
        }
        if amount <= 0 {
            return Err(BankError::InvalidAmount(amount));
        }
        Ok(())
    }

    fn check_credit(&self, amount: i64) -> Result<(), BankError> {
        match self.balance.checked_add(amount) {
            Some(_) => Ok(()),
            None => Err(BankError::Overflow {
                balance: self.balance,
                amount,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outflow::cqrs_es::test::TestFramework;

    type AccountTest = TestFramework<BankAccount>;

    #[test]
    fn opens_an_account() {
        AccountTest::with(())
            .given_no_previous_events()
            .when(BankCommand::Open {
                owner: "Ann".into(),
            })
            .then_expect_events(vec![BankEvent::AccountOpened {
                owner: "Ann".into(),
            }]);
    }

    #[test]
    fn deposits_and_withdraws() {
        AccountTest::with(())
            .given(vec![
                BankEvent::AccountOpened {
                    owner: "Ann".into(),
                },
                BankEvent::Deposited { amount: 50 },
            ])
            .when(BankCommand::Withdraw { amount: 20 })
            .then_expect_events(vec![BankEvent::Withdrawn { amount: 20 }]);
    }

    #[test]
    fn refuses_an_overdraft() {
        AccountTest::with(())
            .given(vec![
                BankEvent::AccountOpened {
                    owner: "Ann".into(),
                },
                BankEvent::Deposited { amount: 50 },
            ])
            .when(BankCommand::Withdraw { amount: 80 })
            .then_expect_error(BankError::InsufficientFunds {
                balance: 50,
                requested: 80,
            });
    }

    #[test]
    fn refuses_everything_once_closed() {
        AccountTest::with(())
            .given(vec![
                BankEvent::AccountOpened {
                    owner: "Ann".into(),
                },
                BankEvent::AccountClosed,
            ])
            .when(BankCommand::Deposit { amount: 1 })
            .then_expect_error(BankError::Closed);
    }

    #[test]
    fn refuses_non_positive_amounts() {
        AccountTest::with(())
            .given(vec![BankEvent::AccountOpened {
                owner: "Ann".into(),
            }])
            .when(BankCommand::Deposit { amount: 0 })
            .then_expect_error(BankError::InvalidAmount(0));
    }
}
