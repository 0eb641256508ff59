//! Transfers between two accounts: the `Transfer` aggregate records what was
//! asked and how it ended; the [`TransferProcess`] moves the money, one
//! account at a time, and compensates when the second step is refused.
//!
//! ```text
//! TransferRequested ──▶ TransferOut on the source ──▶ TransferredOut
//!   ├─ refused ──▶ FailDebit ──▶ TransferFailed                   (nothing moved)
//!   └──▶ TransferIn on the target ──▶ TransferredIn ──▶ Complete ──▶ TransferCompleted
//!          └─ refused ──▶ FailCredit ──▶ TransferCreditFailed
//!               ──▶ Refund on the source ──▶ Refunded ──▶ Compensate ──▶ TransferCompensated
//! ```
//!
//! Every command is sent with `execute_once` and a command id derived from
//! the event it answers, so a step replayed after a crash does not move the
//! money twice.
//!
//! **The deadline.** `TransferRequested` schedules a timer
//! (`transfer/<id>/deadline`, in the batch's transaction): a transfer still
//! open when it falls due receives `TimeOut`. The transfer aggregate decides
//! between the timeout and the credit: the credit starts with
//! `StartCredit`, refused once the transfer timed out, and `TimeOut` is
//! refused once the credit started or the transfer ended. So exactly one
//! wins — the money arrives, or the transfer times out and the debited
//! money is refunded (`TransferTimedOut ──▶ Refund ──▶ Refunded ──▶
//! Compensate`), never both.

use std::sync::Arc;
use std::time::Duration;

use outflow::cqrs_es::event_sink::EventSink;
use outflow::cqrs_es::{Aggregate, DomainEvent};
use outflow::process::ProcessManager;
use outflow::timer::{Timer, TimerChange};
use outflow::{async_trait, RecordedEvent};
use outflow::{CommandBus, CommandContext, CommandError, EventStore, HandlerError, LogFilter};
use serde::{Deserialize, Serialize};

use crate::{BankAccount, BankCommand, BankEvent};

/// A transfer of money between two accounts.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transfer {
    /// Whether it was requested.
    pub requested: bool,
    /// Whether it ended (completed, failed or compensated).
    pub ended: bool,
    /// Whether the credit started: too late to time out.
    #[serde(default)]
    pub credit_started: bool,
    /// Whether it timed out: too late to credit.
    #[serde(default)]
    pub timed_out: bool,
}

/// What may be asked of a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferCommand {
    /// Asks for money to move from `from` to `to`.
    Request {
        /// The source account.
        from: String,
        /// The target account.
        to: String,
        /// Cents, positive.
        amount: i64,
    },
    /// The source refused the debit: nothing moved.
    FailDebit {
        /// Why.
        reason: String,
    },
    /// The target refused the credit: the money goes back.
    FailCredit {
        /// Why.
        reason: String,
    },
    /// The money arrived.
    Complete,
    /// The money went back to the source.
    Compensate,
    /// The credit is about to be sent: refused once the transfer timed out.
    StartCredit,
    /// The deadline passed: refused once the credit started or the
    /// transfer ended.
    TimeOut,
}

/// What happened to a transfer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TransferEvent {
    /// A transfer was asked for.
    TransferRequested {
        /// The source account.
        from: String,
        /// The target account.
        to: String,
        /// Cents.
        amount: i64,
    },
    /// The source refused the debit; nothing moved.
    TransferFailed {
        /// Why.
        reason: String,
    },
    /// The target refused the credit; a refund follows.
    TransferCreditFailed {
        /// Why.
        reason: String,
    },
    /// The money arrived.
    TransferCompleted,
    /// The money went back to the source.
    TransferCompensated,
    /// The credit started: the transfer no longer times out.
    TransferCreditStarted,
    /// The deadline passed before the credit started: the money goes back.
    TransferTimedOut,
}

impl DomainEvent for TransferEvent {
    fn event_type(&self) -> String {
        match self {
            TransferEvent::TransferRequested { .. } => "TransferRequested",
            TransferEvent::TransferFailed { .. } => "TransferFailed",
            TransferEvent::TransferCreditFailed { .. } => "TransferCreditFailed",
            TransferEvent::TransferCompleted => "TransferCompleted",
            TransferEvent::TransferCompensated => "TransferCompensated",
            TransferEvent::TransferCreditStarted => "TransferCreditStarted",
            TransferEvent::TransferTimedOut => "TransferTimedOut",
        }
        .to_owned()
    }

    fn event_version(&self) -> String {
        "1.0".to_owned()
    }
}

/// Why a transfer command was refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum TransferError {
    /// `Request` twice on one id.
    #[error("the transfer was already requested")]
    AlreadyRequested,
    /// A step on a transfer never requested.
    #[error("no such transfer")]
    NotRequested,
    /// A step on a transfer that already ended.
    #[error("the transfer already ended")]
    Ended,
    /// A zero or negative amount.
    #[error("amount must be positive, got {0}")]
    InvalidAmount(i64),
    /// Source and target are the same account.
    #[error("a transfer needs two different accounts")]
    SameAccount,
    /// `StartCredit` after the deadline passed.
    #[error("the transfer timed out")]
    TimedOut,
    /// `TimeOut` once the credit started.
    #[error("the credit already started")]
    CreditUnderway,
}

impl Aggregate for Transfer {
    const TYPE: &'static str = "transfer";
    type Command = TransferCommand;
    type Event = TransferEvent;
    type Error = TransferError;
    type Services = ();

    async fn handle(
        &mut self,
        command: TransferCommand,
        _services: &(),
        sink: &EventSink<Self>,
    ) -> Result<(), TransferError> {
        if let TransferCommand::Request { from, to, amount } = command {
            if self.requested {
                return Err(TransferError::AlreadyRequested);
            }
            if amount <= 0 {
                return Err(TransferError::InvalidAmount(amount));
            }
            if from == to {
                return Err(TransferError::SameAccount);
            }
            sink.write(TransferEvent::TransferRequested { from, to, amount }, self)
                .await;
            return Ok(());
        }
        if !self.requested {
            return Err(TransferError::NotRequested);
        }
        if self.ended {
            return Err(TransferError::Ended);
        }
        let event = match command {
            TransferCommand::StartCredit if self.timed_out => return Err(TransferError::TimedOut),
            TransferCommand::StartCredit => TransferEvent::TransferCreditStarted,
            TransferCommand::TimeOut if self.credit_started => {
                return Err(TransferError::CreditUnderway)
            }
            TransferCommand::TimeOut if self.timed_out => return Err(TransferError::TimedOut),
            TransferCommand::TimeOut => TransferEvent::TransferTimedOut,
            TransferCommand::FailDebit { reason } => TransferEvent::TransferFailed { reason },
            TransferCommand::FailCredit { reason } => {
                TransferEvent::TransferCreditFailed { reason }
            }
            TransferCommand::Complete => TransferEvent::TransferCompleted,
            TransferCommand::Compensate => TransferEvent::TransferCompensated,
            TransferCommand::Request { .. } => return Ok(()),
        };
        sink.write(event, self).await;
        Ok(())
    }

    fn apply(&mut self, event: TransferEvent) {
        match event {
            TransferEvent::TransferRequested { .. } => self.requested = true,
            TransferEvent::TransferCreditFailed { .. } => {}
            TransferEvent::TransferCreditStarted => self.credit_started = true,
            TransferEvent::TransferTimedOut => self.timed_out = true,
            TransferEvent::TransferFailed { .. }
            | TransferEvent::TransferCompleted
            | TransferEvent::TransferCompensated => self.ended = true,
        }
    }
}

/// Where a transfer process stands.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Step {
    /// Nothing seen yet.
    #[default]
    New,
    /// Waiting for the source's debit.
    Debiting,
    /// Waiting for the target's credit.
    Crediting,
    /// Waiting for the refund to the source.
    Refunding,
    /// Waiting for the transfer to record its end.
    Ending,
    /// Done.
    Ended,
}

/// The state of one transfer process.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferState {
    /// The step.
    pub step: Step,
    /// The source account.
    pub from: String,
    /// The target account.
    pub to: String,
    /// Cents.
    pub amount: i64,
    /// Whether the transfer timed out.
    #[serde(default)]
    pub timed_out: bool,
}

/// What the transfer process sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransferStep {
    /// Take the money from the source.
    Debit,
    /// Give the money to the target.
    Credit,
    /// Give the money back to the source.
    Refund,
    /// Record on the transfer that the money arrived.
    Complete,
    /// Record on the transfer that the money went back.
    Compensate,
}

/// Moves a transfer's money: reacts to the transfer's and the accounts'
/// events, sends one command per step.
pub struct TransferProcess<S: EventStore> {
    accounts: Arc<CommandBus<BankAccount, S>>,
    transfers: Arc<CommandBus<Transfer, S>>,
    timeout: Option<Duration>,
}

impl<S: EventStore> std::fmt::Debug for TransferProcess<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransferProcess").finish_non_exhaustive()
    }
}

impl<S: EventStore> TransferProcess<S> {
    /// The process, sending commands through these buses, with no
    /// deadline.
    pub fn new(
        accounts: Arc<CommandBus<BankAccount, S>>,
        transfers: Arc<CommandBus<Transfer, S>>,
    ) -> Self {
        TransferProcess {
            accounts,
            transfers,
            timeout: None,
        }
    }

    /// A transfer not completed within `timeout` of its request times out
    /// (see the [module documentation](self)); the process then needs its
    /// timers ([`Process::with_timers`](outflow::process::Process::with_timers)).
    pub fn with_deadline(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The key of a transfer's deadline timer.
    pub fn deadline_key(transfer_id: &str) -> String {
        format!("transfer/{transfer_id}/deadline")
    }
}

impl TransferStep {
    /// The step's name in logs and halt points: `debit`, `credit`,
    /// `refund`, `complete`, `compensate`.
    pub fn name(self) -> &'static str {
        match self {
            TransferStep::Debit => "debit",
            TransferStep::Credit => "credit",
            TransferStep::Refund => "refund",
            TransferStep::Complete => "complete",
            TransferStep::Compensate => "compensate",
        }
    }
}

/// The process's state carried in the command: which transfer and its terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Order {
    /// The step to take.
    pub step: TransferStep,
    /// The transfer.
    pub transfer_id: String,
    /// Its terms.
    pub state: TransferState,
}

/// How many times a step is tried again when its account is busy.
const ATTEMPTS: u32 = 5;

// ANCHOR: process_manager
#[async_trait]
impl<S: EventStore> ProcessManager for TransferProcess<S> {
    type State = TransferState;
    type Command = Order;

    fn name(&self) -> &str {
        "transfer_process"
    }

    fn filter(&self) -> LogFilter {
        LogFilter::aggregate_types([Transfer::TYPE, BankAccount::TYPE]).with_event_types([
            "TransferRequested",
            "TransferFailed",
            "TransferCreditFailed",
            "TransferCompleted",
            "TransferCompensated",
            "TransferCreditStarted",
            "TransferTimedOut",
            "TransferredOut",
            "TransferredIn",
            "Refunded",
        ])
    }

    fn process_id(&self, event: &RecordedEvent) -> Option<String> {
        if event.aggregate_type == Transfer::TYPE {
            return Some(event.aggregate_id.clone());
        }
        // The account events of a transfer carry its id.
        event
            .payload
            .as_object()
            .and_then(|object| object.values().next())
            .and_then(|body| body.get("transfer_id"))
            .and_then(|id| id.as_str())
            .map(str::to_owned)
    }

    fn react(
        &self,
        state: &mut TransferState,
        event: &RecordedEvent,
    ) -> Result<Vec<Order>, HandlerError> {
        let next = if event.aggregate_type == Transfer::TYPE {
            match event.decode_payload::<Transfer>()? {
                TransferEvent::TransferRequested { from, to, amount } => {
                    *state = TransferState {
                        step: Step::Debiting,
                        from,
                        to,
                        amount,
                        timed_out: false,
                    };
                    Some(TransferStep::Debit)
                }
                TransferEvent::TransferTimedOut => {
                    state.timed_out = true;
                    // Debited and the credit refused to start: refund. (Still
                    // debiting: the refund follows the debit's event.)
                    if state.step == Step::Crediting {
                        state.step = Step::Refunding;
                        Some(TransferStep::Refund)
                    } else {
                        None
                    }
                }
                TransferEvent::TransferCreditStarted => None,
                TransferEvent::TransferCreditFailed { .. } => {
                    state.step = Step::Refunding;
                    Some(TransferStep::Refund)
                }
                TransferEvent::TransferFailed { .. }
                | TransferEvent::TransferCompleted
                | TransferEvent::TransferCompensated => {
                    state.step = Step::Ended;
                    None
                }
            }
        } else {
            match event.decode_payload::<BankAccount>()? {
                BankEvent::TransferredOut { .. } if state.timed_out => {
                    state.step = Step::Refunding;
                    Some(TransferStep::Refund)
                }
                BankEvent::TransferredOut { .. } => {
                    state.step = Step::Crediting;
                    Some(TransferStep::Credit)
                }
                BankEvent::TransferredIn { .. } => {
                    state.step = Step::Ending;
                    Some(TransferStep::Complete)
                }
                BankEvent::Refunded { .. } => {
                    state.step = Step::Ending;
                    Some(TransferStep::Compensate)
                }
                _ => None,
            }
        };
        let transfer_id = self.process_id(event).unwrap_or_default();
        Ok(next
            .map(|step| Order {
                step,
                transfer_id,
                state: state.clone(),
            })
            .into_iter()
            .collect())
    }

    fn timers(
        &self,
        _state: &TransferState,
        event: &RecordedEvent,
    ) -> Result<Vec<TimerChange>, HandlerError> {
        let Some(timeout) = self.timeout else {
            return Ok(Vec::new());
        };
        if event.aggregate_type != Transfer::TYPE {
            return Ok(Vec::new());
        }
        let key = Self::deadline_key(&event.aggregate_id);
        Ok(match event.event_type.as_str() {
            // Due `timeout` after the request was recorded: the same
            // instant however late (or often) this step runs.
            "TransferRequested" => {
                let due = chrono::Duration::from_std(timeout)
                    .ok()
                    .and_then(|timeout| event.recorded_at.checked_add_signed(timeout))
                    .ok_or_else(|| HandlerError::msg("the transfer timeout is out of range"))?;
                vec![TimerChange::Schedule(
                    Timer::command::<Transfer>(
                        key,
                        &event.aggregate_id,
                        &TransferCommand::TimeOut,
                    )?
                    .at(due),
                )]
            }
            // Past the point of no return, or ended: the deadline goes.
            "TransferCreditStarted"
            | "TransferFailed"
            | "TransferCompleted"
            | "TransferCompensated" => vec![TimerChange::Cancel(key)],
            _ => Vec::new(),
        })
    }

    async fn dispatch(&self, order: Order, context: CommandContext) -> Result<(), HandlerError> {
        let Order {
            step,
            transfer_id,
            state,
        } = order;
        let name = step.name();
        halt_point("before", name, &transfer_id).await;
        let amount = state.amount;
        let account =
            |command: fn(String, i64) -> BankCommand| command(transfer_id.clone(), amount);
        match step {
            TransferStep::Debit => {
                let debit = account(|transfer_id, amount| BankCommand::TransferOut {
                    transfer_id,
                    amount,
                });
                let refused = self.send(&state.from, debit, &context).await?;
                halt_point("after", name, &transfer_id).await;
                if let Some(reason) = refused {
                    self.record(
                        &transfer_id,
                        TransferCommand::FailDebit { reason },
                        &context,
                    )
                    .await?;
                }
            }
            TransferStep::Credit => {
                // The transfer decides: the credit starts, or the deadline
                // passed first and the refund follows its event.
                if let Some(reason) = self.start_credit(&transfer_id, &context).await? {
                    tracing::info!(%transfer_id, %reason, "the credit did not start");
                    halt_point("done", name, &transfer_id).await;
                    return Ok(());
                }
                let credit = account(|transfer_id, amount| BankCommand::TransferIn {
                    transfer_id,
                    amount,
                });
                let refused = self.send(&state.to, credit, &context).await?;
                halt_point("after", name, &transfer_id).await;
                if let Some(reason) = refused {
                    self.record(
                        &transfer_id,
                        TransferCommand::FailCredit { reason },
                        &context,
                    )
                    .await?;
                }
            }
            TransferStep::Refund => {
                let refund = account(|transfer_id, amount| BankCommand::Refund {
                    transfer_id,
                    amount,
                });
                let refused = self.send(&state.from, refund, &context).await?;
                halt_point("after", name, &transfer_id).await;
                if let Some(reason) = refused {
                    // Refunds are accepted on any opened account; a refusal
                    // here is a bug to look at, not a business outcome.
                    return Err(HandlerError::msg(format!(
                        "refund of transfer {transfer_id} refused: {reason}"
                    )));
                }
            }
            TransferStep::Complete => {
                self.record(&transfer_id, TransferCommand::Complete, &context)
                    .await?;
                halt_point("after", name, &transfer_id).await;
            }
            TransferStep::Compensate => {
                self.record(&transfer_id, TransferCommand::Compensate, &context)
                    .await?;
                halt_point("after", name, &transfer_id).await;
            }
        }
        // Everything this step sends is sent; the batch (and the process's
        // state) commits after the last step of the batch.
        halt_point("done", name, &transfer_id).await;
        Ok(())
    }
}

// ANCHOR_END: process_manager

// ANCHOR: send
impl<S: EventStore> TransferProcess<S> {
    /// Sends an account command once; returns the reason when the account
    /// refuses it.
    async fn send(
        &self,
        account: &str,
        command: BankCommand,
        context: &CommandContext,
    ) -> Result<Option<String>, HandlerError> {
        let mut attempt = 1;
        loop {
            match self
                .accounts
                .execute_once(account, command.clone(), context.clone())
                .await
            {
                Ok(_) => return Ok(None),
                // Refused now or, on a replay, when first sent: the same
                // refusal either way (`execute_once` remembers it).
                Err(error) if error.is_refusal() => return Ok(error.refusal_message()),
                Err(error) if error.is_conflict() && attempt < ATTEMPTS => attempt += 1,
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Starts the credit on the transfer, once; the reason when the
    /// transfer refuses (it timed out).
    async fn start_credit(
        &self,
        transfer_id: &str,
        context: &CommandContext,
    ) -> Result<Option<String>, HandlerError> {
        let context = context.follow_up("start-credit");
        let mut attempt = 1;
        loop {
            match self
                .transfers
                .execute_once(transfer_id, TransferCommand::StartCredit, context.clone())
                .await
            {
                Ok(_) => return Ok(None),
                Err(error) if error.is_refusal() => return Ok(error.refusal_message()),
                Err(error) if error.is_conflict() && attempt < ATTEMPTS => attempt += 1,
                Err(error) => return Err(error.into()),
            }
        }
    }

    /// Records a step's outcome on the transfer, once.
    async fn record(
        &self,
        transfer_id: &str,
        command: TransferCommand,
        context: &CommandContext,
    ) -> Result<(), HandlerError> {
        let context = context.follow_up("transfer");
        let mut attempt = 1;
        loop {
            match self
                .transfers
                .execute_once(transfer_id, command.clone(), context.clone())
                .await
            {
                Ok(_) => return Ok(()),
                // The transfer already ended the same way (a replay).
                Err(CommandError::Rejected(TransferError::Ended)) => return Ok(()),
                Err(error) if error.is_conflict() && attempt < ATTEMPTS => attempt += 1,
                Err(error) => return Err(error.into()),
            }
        }
    }
}

// ANCHOR_END: send

/// For the crash tests: the process stops at a named point of a step and
/// waits to be killed, saying so on standard output (`halted at
/// <when>:<step> of transfer <id>`). `EXAMPLE_ACCOUNTS_HALT_AT` names the
/// points, comma-separated: `<when>:<step>` with `when` one of `before`
/// (nothing of the step sent), `after` (the step's command answered, its
/// follow-up not sent), `done` (everything sent, the batch not committed)
/// and `step` one of [`TransferStep::name`]'s. The older
/// `EXAMPLE_ACCOUNTS_HALT_BEFORE_CREDIT` means `before:credit`.
///
/// Only this task waits: parking the thread instead would take one of the
/// runtime's workers with it, and tasks queued on that worker would never
/// run — the server would stop answering the very requests the test makes
/// before the kill.
async fn halt_point(when: &str, step: &str, transfer_id: &str) {
    let point = format!("{when}:{step}");
    let halts = std::env::var("EXAMPLE_ACCOUNTS_HALT_AT")
        .map(|points| points.split(',').any(|p| p.trim() == point))
        .unwrap_or(false)
        || (point == "before:credit"
            && std::env::var_os("EXAMPLE_ACCOUNTS_HALT_BEFORE_CREDIT").is_some());
    if halts {
        println!("halted at {point} of transfer {transfer_id}");
        if point == "before:credit" {
            println!("halted before the credit of transfer {transfer_id}");
        }
        std::future::pending::<()>().await;
    }
}
