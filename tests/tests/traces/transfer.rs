//! One trace follows a request through the example bank, with an in-memory
//! OpenTelemetry exporter behind `tracing-opentelemetry`: the command's
//! trace context is stored in its events, the transfer process's steps and
//! the commands they dispatch continue that trace, the projection batches
//! that handled the events are linked to it, and the welcome e-mail (an
//! effect) continues the sign-up's trace — on PostgreSQL.

use outflow_tests as common;

use std::collections::HashSet;
use std::time::Duration;

use example_accounts::app::{self, App};
use example_accounts::transfer::TransferCommand;
use example_accounts::user::UserCommand;
use example_accounts::{BankAccount, BankCommand};
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::SpanData;
use outflow::cqrs_es::Aggregate;
use outflow::trace::TraceParent;
use outflow::{EventLog, LogFilter, RecordedEvent};
use tracing::Instrument;

fn trace_id(parent: &TraceParent) -> TraceId {
    TraceId::from_bytes(parent.trace_id)
}

fn span_id(parent: &TraceParent) -> SpanId {
    SpanId::from_bytes(parent.span_id)
}

fn stamped(event: &RecordedEvent) -> TraceParent {
    TraceParent::of(event).unwrap_or_else(|| {
        panic!(
            "{} {} #{} carries no valid traceparent: {:?}",
            event.aggregate_type, event.aggregate_id, event.sequence, event.metadata
        )
    })
}

fn attribute(span: &SpanData, key: &str) -> Option<String> {
    span.attributes
        .iter()
        .find(|kv| kv.key.as_str() == key)
        .map(|kv| kv.value.to_string())
}

#[tokio::test]
async fn a_trace_follows_a_transfer_from_the_request_to_every_step_and_projection() {
    // This test's thread only (a current-thread runtime: the runner's tasks
    // run here too); the other tests of the binary are not traced.
    let traced = common::traces::Traced::install();

    let db = common::TestDb::new("traces").await;
    let bank = App::new(db.store().await).await.expect("the app");
    let (shutdown, running) = common::start_runner(&bank.runner);

    let request = tracing::info_span!("request");
    async {
        for (id, amount) in [("acc-a", 100), ("acc-b", 0)] {
            bank.accounts
                .execute(
                    id,
                    BankCommand::Open {
                        owner: id.to_owned(),
                    },
                )
                .await
                .expect("open");
            if amount > 0 {
                bank.accounts
                    .execute(id, BankCommand::Deposit { amount })
                    .await
                    .expect("deposit");
            }
        }
        bank.users
            .execute(
                "user-1",
                UserCommand::SignUp {
                    name: "Ann".into(),
                    email: "ann@example.org".into(),
                },
            )
            .await
            .expect("sign up");
        bank.transfers
            .execute(
                "tr-1",
                TransferCommand::Request {
                    from: "acc-a".into(),
                    to: "acc-b".into(),
                    amount: 30,
                },
            )
            .await
            .expect("transfer");
    }
    .instrument(request.clone())
    .await;
    let root = {
        use opentelemetry::trace::TraceContextExt;
        use tracing_opentelemetry::OpenTelemetrySpanExt;
        request.context().span().span_context().clone()
    };
    drop(request);
    assert!(
        root.is_valid(),
        "the request span has an OpenTelemetry context"
    );

    // The transfer completes through the process manager: account b is
    // credited by a command the process dispatched, then the transfer is
    // marked completed by another.
    let (credited, _) =
        common::eventually("the transfer's completion", Duration::from_secs(60), || {
            let store = bank.store.clone();
            async move {
                let events = store
                    .read_log(outflow::Checkpoint::START, &LogFilter::all(), 1000)
                    .await
                    .map_err(|e| e.to_string())?;
                let credit = events
                    .iter()
                    .find(|e| e.aggregate_id == "acc-b" && e.event_type == "TransferredIn");
                let completed = events.iter().any(|e| e.event_type == "TransferCompleted");
                match credit {
                    Some(credit) if completed => Ok(credit.clone()),
                    _ => Err(format!(
                        "{} events, credit {}, completed {completed}",
                        events.len(),
                        credit.is_some()
                    )),
                }
            }
        })
        .await;
    let head = bank.store.committed_head().await.expect("head");
    bank.runner
        .wait_for(head, &app::PROJECTIONS, Duration::from_secs(60))
        .await
        .expect("every projection caught up");
    common::stop_runner(shutdown, running).await;
    let spans = traced.spans();

    // 1. Every event written in the request carries the request's trace,
    //    under the span of the command that wrote it.
    let all = bank
        .store
        .read_log(outflow::Checkpoint::START, &LogFilter::all(), 1000)
        .await
        .expect("read");
    let commands: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == "outflow.command")
        .collect();
    let command_ids: HashSet<SpanId> = commands.iter().map(|s| s.span_context.span_id()).collect();
    for event in &all {
        let parent = stamped(event);
        assert_eq!(
            trace_id(&parent),
            root.trace_id(),
            "{}: another trace",
            event.event_type
        );
        assert!(
            command_ids.contains(&span_id(&parent)),
            "{} {}: written under a span that is no `outflow.command` span",
            event.aggregate_id,
            event.event_type
        );
    }
    for command in &commands {
        assert_eq!(command.span_context.trace_id(), root.trace_id());
    }

    // 2. The credit was written by a command the transfer process
    //    dispatched: its command span's parent is a process step, itself a
    //    child of the span that wrote the event it reacted to.
    let credit_parent = stamped(&credited);
    let credit_command = commands
        .iter()
        .find(|s| s.span_context.span_id() == span_id(&credit_parent))
        .expect("the credit's command span");
    let step = spans
        .iter()
        .find(|s| s.span_context.span_id() == credit_command.parent_span_id)
        .unwrap_or_else(|| {
            panic!(
                "the credit command's parent span {:?} is not among the spans:\n{}",
                credit_command.parent_span_id,
                spans
                    .iter()
                    .map(|s| format!(
                        "{} {:?} parent {:?} {:?}",
                        s.name,
                        s.span_context.span_id(),
                        s.parent_span_id,
                        s.attributes
                    ))
                    .collect::<Vec<_>>()
                    .join("\n")
            )
        });
    assert_eq!(step.name, "outflow.process.step");
    assert_eq!(
        attribute(step, "process").as_deref(),
        Some(app::TRANSFER_PROCESS)
    );
    assert_eq!(step.span_context.trace_id(), root.trace_id());
    assert!(
        step.parent_span_is_remote,
        "a step continues the stored context"
    );
    assert!(
        command_ids.contains(&step.parent_span_id),
        "the step's parent is the command that wrote the event it reacted to"
    );

    // 3. The balances' batches are traces of their own, linked to the
    //    commands that wrote the events they handled.
    let batches: Vec<&SpanData> = spans
        .iter()
        .filter(|s| {
            s.name == "outflow.projection.batch"
                && attribute(s, "projection").as_deref() == Some(app::BALANCES)
        })
        .collect();
    assert!(!batches.is_empty(), "no batch span of the balances");
    let linked: HashSet<SpanId> = batches
        .iter()
        .flat_map(|s| s.links.iter())
        .filter(|link| link.span_context.trace_id() == root.trace_id())
        .map(|link| link.span_context.span_id())
        .collect();
    for batch in &batches {
        assert_ne!(
            batch.span_context.trace_id(),
            root.trace_id(),
            "a batch is its own trace"
        );
    }
    let account_events: Vec<&RecordedEvent> = all
        .iter()
        .filter(|e| e.aggregate_type == BankAccount::TYPE)
        .collect();
    // Opened twice, a deposit, out and in.
    assert_eq!(account_events.len(), 5, "the accounts' events");
    for event in account_events {
        assert!(
            linked.contains(&span_id(&stamped(event))),
            "no balances batch links to the command that wrote {} {}",
            event.aggregate_id,
            event.event_type
        );
    }

    // 4. The welcome e-mail, an effect, continues the sign-up's trace.
    let signed_up = all
        .iter()
        .find(|e| e.event_type == "UserSignedUp")
        .expect("the sign-up");
    let mail = spans
        .iter()
        .find(|s| s.name == "welcome_email")
        .expect("the welcome e-mail's span");
    assert_eq!(mail.span_context.trace_id(), root.trace_id());
    assert_eq!(mail.parent_span_id, span_id(&stamped(signed_up)));
}
