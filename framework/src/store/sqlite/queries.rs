//! Every statement of the SQLite backend that does not depend on a filter,
//! one `.sql` file each under `queries/` (as PostgreSQL's), rendered once
//! with the store's table names when the store is built (the placeholders
//! `{events}`, `{projections}`, … name the tables; `{columns}` the event
//! columns): no statement is rendered again on a call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::rows::COLUMNS;
use super::schema::Tables;

crate::store::sql::statements::sql_statements! {
    /// The statements, rendered for one store's tables.
    pub(super) struct Statements in "queries/" {
        version,
        read_stream,
        load,
        save_snapshot,
        head,
        outcome,
        outcome_insert,
        outcome_prune,
        partition_counts,
        register,
        node_heartbeat,
        live_nodes,
        claim,
        lease,
        renew,
        renewed,
        give_up,
        free_node_leases,
        delete_node,
        release,
        save_checkpoint,
        set_state,
        units,
        reset,
        set_paused,
        restart_leases,
        restart,
        park,
        dead_letters,
        take_dead_letter,
        note_dead_letter_failure,
        discard_dead_letter,
        inbox_claim,
        request_rebuild,
        rebuild_requests,
        take_rebuild_request,
        request_retry,
        retry_requests,
    }
}

/// The statements, and those rendered per call or on first use.
#[derive(Debug)]
pub(super) struct Queries {
    files: Statements,
    /// One `INSERT` per count of events, rendered when first used.
    inserts: Mutex<HashMap<usize, Arc<str>>>,
    tables: Tables,
    /// The timers' statements.
    pub(super) timers: super::timers::TimerQueries,
    /// The keys' statements.
    pub(super) keys: super::keys::KeyQueries,
}

impl std::ops::Deref for Queries {
    type Target = Statements;

    fn deref(&self) -> &Statements {
        &self.files
    }
}

impl Queries {
    pub(super) fn new(tables: &Tables) -> Self {
        Queries {
            files: Statements::new(|sql| tables.render(&sql.replace("{columns}", COLUMNS))),
            inserts: Mutex::new(HashMap::new()),
            tables: tables.clone(),
            timers: super::timers::TimerQueries::new(|sql| {
                tables.render(&sql.replace(
                    "{timer_columns}",
                    include_str!("queries/timers/columns.sql").trim_end(),
                ))
            }),
            keys: super::keys::KeyQueries::new(|sql| tables.render(sql)),
        }
    }

    /// The `INSERT` of `rows` events (see `append::insert_statement`).
    pub(super) fn insert(&self, rows: usize, statement: impl FnOnce(usize) -> String) -> Arc<str> {
        let render = || -> Arc<str> { self.tables.render(&statement(rows)).into() };
        match self.inserts.lock() {
            Ok(mut inserts) => inserts.entry(rows).or_insert_with(render).clone(),
            Err(_) => render(),
        }
    }

    /// A statement whose `{filter}` is given per call (a log filter's
    /// clause), rendered with the tables.
    pub(super) fn with_filter(&self, template: &str, filter: &str) -> String {
        self.tables.render(
            &template
                .replace("{columns}", COLUMNS)
                .replace("{filter}", filter),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_statement_is_rendered() {
        let tables = Tables::new("events").expect("tables");
        let queries = Queries::new(&tables);
        crate::store::sql::statements::assert_rendered(queries.statements(), &[]);
        assert!(queries.claim.contains("\"events_projections\""));
        assert!(queries.units.contains("error_kind"));
    }
}
