//! Runs the time chapter's code on a SQLite file, with a clock moved
//! forward instead of waiting a day.

use std::future::Future;
use std::time::Duration;

use outflow::sqlx;
use outflow::timer::{Clock, TimerState};
use outflow::Transactional;
use outflow_book_examples::time::{
    deadline_key, promise_callback, start, start_alone, OrderCommand, Shop, PAYMENT_WINDOW,
};

/// Generous: the scheduler fires within milliseconds of the clock's move.
const PATIENCE: Duration = Duration::from_secs(30);

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("outflow-book-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("a directory");
    dir
}

/// Polls `check` until it holds, failing after `PATIENCE` with the last
/// thing it saw.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let last = match check().await {
            Ok(()) => return,
            Err(last) => last,
        };
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: still not so after {PATIENCE:?}; last seen: {last}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn timer_state(shop: &Shop, key: &str) -> Option<TimerState> {
    shop.timers
        .get(key)
        .await
        .expect("read the timer")
        .map(|t| t.state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpaid_order_is_released_and_a_paid_one_is_not() {
    let dir = scratch("time");
    let clock = Clock::new();
    let shop = start(&dir.join("shop.db"), clock.clone())
        .await
        .expect("the chapter's wiring");
    let mut tx = shop.store.begin().await.expect("begin");
    sqlx::query("CREATE TABLE IF NOT EXISTS callbacks (order_id TEXT NOT NULL)")
        .execute(&mut *tx)
        .await
        .expect("the callbacks table");
    shop.store.commit(tx).await.expect("commit");

    // ANCHOR: advance
    for id in ["o-unpaid", "o-paid"] {
        shop.orders
            .execute(id, OrderCommand::Place)
            .await
            .expect("place");
    }
    let paid = shop
        .orders
        .execute("o-paid", OrderCommand::Pay)
        .await
        .expect("pay");
    // The process has scheduled both deadlines and cancelled the paid one.
    let written = paid.checkpoint().expect("an event");
    shop.runner
        .wait_for(written, &["payment_deadline"], PATIENCE)
        .await
        .expect("the process caught up");
    assert_eq!(
        timer_state(&shop, &deadline_key("o-unpaid")).await,
        Some(TimerState::Pending)
    );
    assert_eq!(
        timer_state(&shop, &deadline_key("o-paid")).await,
        Some(TimerState::Cancelled)
    );

    // A day and an hour later, by the timers' clock: no sleeping.
    clock.advance(PAYMENT_WINDOW + Duration::from_secs(3600));
    eventually("the unpaid order released", || async {
        let (order, _) = shop
            .orders
            .load("o-unpaid")
            .await
            .map_err(|e| e.to_string())?;
        let state = timer_state(&shop, &deadline_key("o-unpaid")).await;
        match (order.released, state) {
            (true, Some(TimerState::Fired)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // ANCHOR_END: advance

    // The paid order's deadline stayed cancelled, and nothing released it.
    assert_eq!(
        timer_state(&shop, &deadline_key("o-paid")).await,
        Some(TimerState::Cancelled)
    );
    let (paid_order, _) = shop.orders.load("o-paid").await.expect("load");
    assert!(paid_order.paid && !paid_order.released, "{paid_order:?}");
    // Too late to pay: the release won, and the order says so.
    let late = shop.orders.execute("o-unpaid", OrderCommand::Pay).await;
    assert!(late.is_err_and(|e| e.is_refusal()));
    let status = shop.timers.status().await.expect("status");
    assert_eq!(
        (
            status.counts.pending,
            status.counts.fired,
            status.counts.cancelled
        ),
        (0, 1, 1),
        "{status:?}"
    );

    // Application code: a row of its own and a reminder, in one
    // transaction; the reminder reaches the outbox when it falls due.
    promise_callback(
        &shop.store,
        &shop.timers,
        "o-paid",
        Duration::from_secs(7200),
    )
    .await
    .expect("promise a callback");
    assert_eq!(
        timer_state(&shop, "callback/o-paid").await,
        Some(TimerState::Pending)
    );
    clock.advance(Duration::from_secs(3 * 3600));
    eventually("the reminder enqueued", || async {
        let state = timer_state(&shop, "callback/o-paid").await;
        let outbox = shop.outbox.status().await.map_err(|e| e.to_string())?;
        match (state, outbox.pending) {
            (Some(TimerState::Fired), 1) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    shop.stop().await.expect("a clean stop");
    std::fs::remove_dir_all(&dir).expect("clean up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlines_kept_by_an_inline_handler_and_a_scheduler_alone() {
    let dir = scratch("time-inline");
    let clock = Clock::new();
    let alone = start_alone(&dir.join("shop.db"), clock.clone())
        .await
        .expect("the chapter's wiring");
    for id in ["o-unpaid", "o-paid"] {
        alone
            .orders
            .execute(id, OrderCommand::Place)
            .await
            .expect("place");
    }
    alone
        .orders
        .execute("o-paid", OrderCommand::Pay)
        .await
        .expect("pay");
    // Written with the events: nothing to wait for.
    let state = |key: String| {
        let timers = alone.timers.clone();
        async move { timers.get(&key).await.expect("get").map(|t| t.state) }
    };
    assert_eq!(
        state(deadline_key("o-unpaid")).await,
        Some(TimerState::Pending)
    );
    assert_eq!(
        state(deadline_key("o-paid")).await,
        Some(TimerState::Cancelled)
    );

    clock.advance(PAYMENT_WINDOW + Duration::from_secs(60));
    eventually("the unpaid order released", || async {
        let (order, _) = alone
            .orders
            .load("o-unpaid")
            .await
            .map_err(|e| e.to_string())?;
        match (order.released, state(deadline_key("o-unpaid")).await) {
            (true, Some(TimerState::Fired)) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let (paid, _) = alone.orders.load("o-paid").await.expect("load");
    assert!(paid.paid && !paid.released, "{paid:?}");
    assert_eq!(
        state(deadline_key("o-paid")).await,
        Some(TimerState::Cancelled)
    );
    alone.stop().await.expect("a clean stop");
    std::fs::remove_dir_all(&dir).expect("clean up");
}
