//! The "coming from cqrs-es" chapter (`docs/src/from-cqrs-es.md`): the same
//! application on postgres-es and on Outflow, side by side. Both compile here;
//! `tests/from_cqrs_es.rs` runs both against one PostgreSQL database.

use std::sync::Arc;

use outflow::cqrs_es::{EventEnvelope, Query};

use crate::quickstart::{Cart, CartCommand, CartSummary};

/// An audit trail: a plain cqrs-es `Query`, the same on both sides.
#[derive(Default)]
pub struct Audit {
    pub lines: std::sync::Mutex<Vec<String>>,
}

#[outflow::async_trait]
impl Query<Cart> for Audit {
    async fn dispatch(&self, cart_id: &str, events: &[EventEnvelope<Cart>]) {
        if let Ok(mut lines) = self.lines.lock() {
            for event in events {
                lines.push(format!("{cart_id} #{}", event.sequence));
            }
        }
    }
}

/// [`Audit`] shared between the framework and the test that reads it.
pub struct SharedAudit(pub Arc<Audit>);

#[outflow::async_trait]
impl Query<Cart> for SharedAudit {
    async fn dispatch(&self, cart_id: &str, events: &[EventEnvelope<Cart>]) {
        self.0.dispatch(cart_id, events).await;
    }
}

// ANCHOR: before
use cqrs_es::persist::GenericQuery;
use postgres_es::{postgres_cqrs, PostgresViewRepository};

/// postgres-es: the queries run inside `execute`, after the commit, once.
pub async fn before(
    pool: outflow::sqlx::PgPool,
    audit: Arc<Audit>,
) -> Result<Option<CartSummary>, Box<dyn std::error::Error>> {
    let views = Arc::new(PostgresViewRepository::<CartSummary, Cart>::new(
        "cart_summaries",
        pool.clone(),
    ));
    let summaries = GenericQuery::new(views.clone());
    let cqrs = postgres_cqrs(
        pool,
        vec![Box::new(summaries), Box::new(SharedAudit(audit))],
        (),
    );
    cqrs.execute("cart-1", CartCommand::AddItem { item: "tea".into() })
        .await?;
    // Up to date here: the view was written before `execute` returned —
    // unless that write failed, which `execute` does not report.
    Ok(GenericQuery::<_, CartSummary, Cart>::new(views)
        .load("cart-1")
        .await)
}
// ANCHOR_END: before

// ANCHOR: after
use std::time::Duration;

use outflow::prelude::*;
use outflow::projection::{ProjectionOptions, QueryProjection};
use outflow::view::ViewProjection;

/// Outflow: the same view table and the same `Query`, run from the durable
/// log by projections; a read that must see the command waits for it.
pub async fn after(
    store: PostgresStore,
    audit: Arc<Audit>,
) -> Result<Option<CartSummary>, Box<dyn std::error::Error>> {
    // `CqrsFramework` → `CommandBus`: same aggregate, same services.
    let carts = CommandBus::<Cart, _>::new(store.clone(), ());
    // `GenericQuery` + `PostgresViewRepository` → `ViewProjection` (same
    // table layout: view_id, version, payload).
    let summaries = ViewProjection::<Cart, CartSummary>::new("cart_summaries", "cart_summaries")?;
    let query = summaries.query(&store);
    // Any other `Query` → `QueryProjection`: dispatched once per command.
    let audit = QueryProjection::new("audit", SharedAudit(audit));
    let runner = ProjectionRunner::builder(store.clone())
        .projection(ProjectionOptions::new(summaries))
        .projection(ProjectionOptions::new(audit))
        .build()?;
    let shutdown = CancellationToken::new();
    let running = tokio::spawn({
        let (runner, shutdown) = (runner.clone(), shutdown.clone());
        async move { runner.run(shutdown).await }
    });

    let done = carts
        .execute("cart-1", CartCommand::AddItem { item: "tea".into() })
        .await?;
    // Read-your-writes where the next page needs it; everywhere else the
    // view is a few milliseconds behind.
    let summary = query
        .load_after(done.checkpoint(), "cart-1", Duration::from_secs(5))
        .await?;
    // `checkpoint()` is `None` only for a command that wrote no event.
    let written = done.checkpoint().ok_or("the command wrote no event")?;
    runner
        .wait_for(written, &["audit"], Duration::from_secs(5))
        .await?;
    shutdown.cancel();
    running.await??;
    Ok(summary)
}
// ANCHOR_END: after
