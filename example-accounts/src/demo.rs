//! `demo`: a scripted scenario that shows each delivery guarantee at work,
//! then prints the read models. Each run uses new ids, so the database
//! keeps every run.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use example_accounts::app::{self, App, AppStore};
use example_accounts::transfer::TransferCommand;
use example_accounts::user::Register;
use example_accounts::{BankAccount, BankCommand, BankEvent};
use outflow::{AppendRequest, CancellationToken, CommandError, NewEvent, StoreError};

fn money(cents: i64) -> String {
    format!(
        "{}{}.{:02}",
        if cents < 0 { "-" } else { "" },
        cents.abs() / 100,
        cents.abs() % 100
    )
}

/// Prints what a command did, or why it was refused.
fn report<A: outflow::cqrs_es::Aggregate>(
    label: &str,
    result: Result<outflow::Committed<A>, CommandError<A::Error>>,
) -> anyhow::Result<()> {
    match result {
        Ok(done) => {
            let events: Vec<&str> = done.events.iter().map(|e| e.event_type.as_str()).collect();
            let at = done.checkpoint().map_or(0, |c| c.position);
            println!("  {label:<46} ok: {} at position {at}", events.join(", "));
            Ok(())
        }
        Err(CommandError::Rejected(reason)) => {
            println!("  {label:<46} refused: {reason}");
            Ok(())
        }
        Err(CommandError::Inline { handler, error }) => {
            println!("  {label:<46} refused by {handler}: {}", error.source());
            Ok(())
        }
        Err(other) => bail!("{label}: {}", outflow::error::error_chain(&other)),
    }
}

pub async fn run<S: AppStore>(app: Arc<App<S>>) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let runner = app.runner.clone();
        let shutdown = shutdown.clone();
        async move { runner.run(shutdown).await }
    });
    let result = scenario(&app).await;
    shutdown.cancel();
    running.await.context("the projections' task")??;
    result
}

async fn scenario<S: AppStore>(app: &App<S>) -> anyhow::Result<()> {
    let run = uuid::Uuid::now_v7().simple().to_string()[20..].to_owned();
    let id = |name: &str| format!("{name}-{run}");
    let (ann, bob, carl) = (id("ann"), id("bob"), id("carl"));
    // The "mail server" refuses this domain until the fix below.
    let bouncing = "bounce.example";
    app.mail.refuse(bouncing);

    println!("Sign-ups (one address, one user: decided across users):");
    for (user, name, email) in [
        (id("user-ann"), "Ann", format!("ann-{run}@example.com")),
        (id("user-bob"), "Bob", format!("bob-{run}@example.com")),
        (
            id("user-ann2"),
            "Ann again",
            format!("ANN-{run}@example.com"),
        ),
        (id("user-eve"), "Eve", format!("eve-{run}@{bouncing}")),
    ] {
        let label = format!("sign up {name} <{email}>");
        let result = app
            .sign_ups
            .execute(Register {
                user_id: user,
                name: name.into(),
                email,
            })
            .await;
        match result {
            Ok(done) => {
                let at = done.checkpoint().map_or(0, |c| c.position);
                println!("  {label:<46} ok: UserSignedUp at position {at}");
            }
            Err(CommandError::Rejected(reason)) => println!("  {label:<46} refused: {reason}"),
            Err(other) => bail!("{label}: {}", outflow::error::error_chain(&other)),
        }
    }

    println!("\nAccounts:");
    for (account, owner) in [(&ann, "Ann"), (&bob, "Bob"), (&carl, "Carl")] {
        report(
            &format!("open {account}"),
            app.accounts
                .execute(
                    account,
                    BankCommand::Open {
                        owner: owner.into(),
                    },
                )
                .await,
        )?;
    }
    for (account, command) in [
        (&ann, BankCommand::Deposit { amount: 10_000 }),
        (&bob, BankCommand::Deposit { amount: 5_000 }),
        (&bob, BankCommand::Withdraw { amount: 8_000 }),
        (&carl, BankCommand::Close),
    ] {
        report(
            &format!("{command:?} on {account}"),
            app.accounts.execute(account, command).await,
        )?;
    }

    println!("\nA concurrency conflict, retried:");
    conflict(app, &ann).await?;

    println!("\nTransfers (a process manager moves the money):");
    let completed = id("tr-ok");
    let compensated = id("tr-back");
    for (transfer, to, amount) in [(&completed, &bob, 3_000), (&compensated, &carl, 1_000)] {
        report(
            &format!("transfer {} from {ann} to {to}", money(amount)),
            app.transfers
                .execute(
                    transfer,
                    TransferCommand::Request {
                        from: ann.clone(),
                        to: to.clone(),
                        amount,
                    },
                )
                .await,
        )?;
    }
    for transfer in [&completed, &compensated] {
        let status = transfer_end(app, transfer).await?;
        println!("  transfer {transfer} ended: {status}");
    }

    println!("\nA poison event: the mail server refuses Eve's address.");
    let parked = parked_welcome(app).await?;
    println!(
        "  parked: #{} {} of {} `{}`: {}",
        parked.id,
        parked.event.event_type,
        parked.event.aggregate_type,
        parked.event.aggregate_id,
        parked.error
    );
    app.mail.accept(bouncing);
    app.runner
        .retry_dead_letter(app::WELCOME_EMAILS, parked.id)
        .await
        .context("retrying the parked e-mail")?;
    println!(
        "  fixed (the domain is accepted again) and retried: #{} handled",
        parked.id
    );

    // Read-your-writes for the tables below.
    let head = app.store.head().await?;
    app.runner
        .wait_for(
            head,
            &[app::BALANCES, app::STATEMENTS, app::USERS, app::TRANSFERS],
            Duration::from_secs(10),
        )
        .await?;
    print_read_models(app, &run, &[&ann, &bob, &carl]).await
}

/// A clerk with a stale copy of the account appends a deposit: the store
/// refuses it (someone else wrote first); the command bus's retry reloads
/// the account and succeeds.
async fn conflict<S: AppStore>(app: &App<S>, account: &str) -> anyhow::Result<()> {
    let (_, version) = app.accounts.load(account).await?;
    app.accounts
        .execute(account, BankCommand::Deposit { amount: 100 })
        .await?;
    let stale = AppendRequest {
        aggregate_type: "account".into(),
        aggregate_id: account.into(),
        expected_version: version,
        events: vec![NewEvent::from_event::<BankAccount>(
            account,
            &BankEvent::Deposited { amount: 100 },
        )?],
    };
    match app.store.append(stale).await {
        Err(StoreError::Conflict {
            expected, actual, ..
        }) => println!(
            "  a deposit written at version {expected} conflicted (the account is at {})",
            actual.map_or("?".to_owned(), |a| a.to_string())
        ),
        other => bail!("the stale append was not refused: {other:?}"),
    }
    let done = app
        .accounts
        .execute_retrying(account, 3, || BankCommand::Deposit { amount: 100 })
        .await?;
    println!(
        "  retried with the account reloaded: committed at version {}",
        done.version
    );
    Ok(())
}

/// Waits until a transfer has ended (the process manager runs in the
/// background).
async fn transfer_end<S: AppStore>(app: &App<S>, transfer: &str) -> anyhow::Result<String> {
    for _ in 0..200 {
        if let Some(status) = app.transfer_status.load(transfer).await? {
            if matches!(
                status.status.as_str(),
                "completed" | "compensated" | "failed"
            ) {
                return Ok(match status.reason {
                    Some(reason) => format!("{} ({reason})", status.status),
                    None => status.status,
                });
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("transfer {transfer} did not end within 10 s")
}

/// Waits until the welcome e-mail projection has parked an event.
async fn parked_welcome<S: AppStore>(
    app: &App<S>,
) -> anyhow::Result<outflow::store::projections::DeadLetter> {
    for _ in 0..200 {
        if let Some(letter) = app.runner.dead_letters(app::WELCOME_EMAILS).await?.pop() {
            return Ok(letter);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the refused e-mail was not parked within 10 s")
}

async fn print_read_models<S: AppStore>(
    app: &App<S>,
    run: &str,
    accounts: &[&String],
) -> anyhow::Result<()> {
    println!("\nBalances (projection `balances`):");
    println!("  {:<16} {:<6} {:>10}", "account", "owner", "balance");
    for account in accounts {
        if let Some(b) = app.balances.load(account).await? {
            println!(
                "  {account:<16} {:<6} {:>10}  {}",
                b.owner,
                money(b.balance),
                if b.closed { "closed" } else { "" }
            );
        }
    }
    println!("\nStatement of {} (projection `statements`):", accounts[0]);
    if let Some(statement) = app.statements.load(accounts[0]).await? {
        for m in statement.movements {
            println!(
                "  {:<13} {:>10} {:>10}  {}",
                m.kind,
                money(m.amount),
                money(m.balance),
                m.transfer_id.unwrap_or_default()
            );
        }
    }
    println!("\nUsers (projection `users`):");
    for (user, entry) in app.directory.list(None, 10_000).await? {
        if user.ends_with(run) {
            println!("  {user:<22} {:<10} {}", entry.name, entry.email);
        }
    }
    println!("\nTransfers (projection `transfers`):");
    for (transfer, t) in app.transfer_status.list(None, 10_000).await? {
        if transfer.ends_with(run) {
            println!(
                "  {transfer:<18} {} -> {} {:>8}  {}",
                t.from,
                t.to,
                money(t.amount),
                t.status
            );
        }
    }
    println!("\nE-mails sent (at least once, one per sign-up):");
    for email in app.store.sent_emails().await? {
        if email.to.contains(run) {
            println!("  to {:<36} {}", email.to, email.subject);
        }
    }
    println!("\nProjections:");
    for s in app.runner.status().await? {
        println!(
            "  {:<18} {:<8} position {:>6}  lag {:>3}  parked {}",
            s.projection,
            s.state.to_string(),
            s.checkpoint.position,
            s.lag_events,
            s.parked
        );
    }
    Ok(())
}
