//! Every statement of the SQLite backend that does not depend on a filter,
//! one `.sql` file each under `queries/` (as PostgreSQL's), rendered once
//! with the store's table names when the store is built (the placeholders
//! `{events}`, `{projections}`, … name the tables; `{columns}` the event
//! columns): no statement is rendered again on a call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::rows::COLUMNS;
use super::schema::Tables;

/// The statements, rendered for one store's tables.
#[derive(Debug)]
pub(super) struct Queries {
    pub(super) version: String,
    pub(super) read_stream: String,
    pub(super) load: String,
    pub(super) save_snapshot: String,
    pub(super) head: String,
    pub(super) outcome: String,
    pub(super) outcome_insert: String,
    pub(super) outcome_prune: String,
    pub(super) partition_counts: String,
    pub(super) register: String,
    pub(super) node_heartbeat: String,
    pub(super) live_nodes: String,
    pub(super) claim: String,
    pub(super) lease: String,
    pub(super) renew: String,
    pub(super) renewed: String,
    pub(super) give_up: String,
    pub(super) free_node_leases: String,
    pub(super) delete_node: String,
    pub(super) release: String,
    pub(super) save_checkpoint: String,
    pub(super) set_state: String,
    pub(super) units: String,
    pub(super) reset: String,
    pub(super) set_paused: String,
    pub(super) restart_leases: String,
    pub(super) restart: String,
    pub(super) park: String,
    pub(super) dead_letters: String,
    pub(super) take_dead_letter: String,
    pub(super) note_dead_letter_failure: String,
    pub(super) discard_dead_letter: String,
    pub(super) inbox_claim: String,
    /// One `INSERT` per count of events, rendered when first used.
    inserts: Mutex<HashMap<usize, Arc<str>>>,
    tables: Tables,
}

impl Queries {
    pub(super) fn new(tables: &Tables) -> Self {
        let render = |sql: &str| tables.render(&sql.replace("{columns}", COLUMNS));
        Queries {
            version: render(include_str!("queries/version.sql")),
            read_stream: render(include_str!("queries/read_stream.sql")),
            load: render(include_str!("queries/load.sql")),
            save_snapshot: render(include_str!("queries/save_snapshot.sql")),
            head: render(include_str!("queries/head.sql")),
            outcome: render(include_str!("queries/outcome.sql")),
            outcome_insert: render(include_str!("queries/outcome_insert.sql")),
            outcome_prune: render(include_str!("queries/outcome_prune.sql")),
            partition_counts: render(include_str!("queries/partition_counts.sql")),
            register: render(include_str!("queries/register.sql")),
            node_heartbeat: render(include_str!("queries/node_heartbeat.sql")),
            live_nodes: render(include_str!("queries/live_nodes.sql")),
            claim: render(include_str!("queries/claim.sql")),
            lease: render(include_str!("queries/lease.sql")),
            renew: render(include_str!("queries/renew.sql")),
            renewed: render(include_str!("queries/renewed.sql")),
            give_up: render(include_str!("queries/give_up.sql")),
            free_node_leases: render(include_str!("queries/free_node_leases.sql")),
            delete_node: render(include_str!("queries/delete_node.sql")),
            release: render(include_str!("queries/release.sql")),
            save_checkpoint: render(include_str!("queries/save_checkpoint.sql")),
            set_state: render(include_str!("queries/set_state.sql")),
            units: render(include_str!("queries/units.sql")),
            reset: render(include_str!("queries/reset.sql")),
            set_paused: render(include_str!("queries/set_paused.sql")),
            restart_leases: render(include_str!("queries/restart_leases.sql")),
            restart: render(include_str!("queries/restart.sql")),
            park: render(include_str!("queries/park.sql")),
            dead_letters: render(include_str!("queries/dead_letters.sql")),
            take_dead_letter: render(include_str!("queries/take_dead_letter.sql")),
            note_dead_letter_failure: render(include_str!("queries/note_dead_letter_failure.sql")),
            discard_dead_letter: render(include_str!("queries/discard_dead_letter.sql")),
            inbox_claim: render(include_str!("queries/inbox_claim.sql")),
            inserts: Mutex::new(HashMap::new()),
            tables: tables.clone(),
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
        let statements = [
            ("version", &queries.version),
            ("read_stream", &queries.read_stream),
            ("load", &queries.load),
            ("save_snapshot", &queries.save_snapshot),
            ("head", &queries.head),
            ("outcome", &queries.outcome),
            ("outcome_insert", &queries.outcome_insert),
            ("outcome_prune", &queries.outcome_prune),
            ("partition_counts", &queries.partition_counts),
            ("register", &queries.register),
            ("node_heartbeat", &queries.node_heartbeat),
            ("live_nodes", &queries.live_nodes),
            ("claim", &queries.claim),
            ("lease", &queries.lease),
            ("renew", &queries.renew),
            ("renewed", &queries.renewed),
            ("give_up", &queries.give_up),
            ("free_node_leases", &queries.free_node_leases),
            ("delete_node", &queries.delete_node),
            ("release", &queries.release),
            ("save_checkpoint", &queries.save_checkpoint),
            ("set_state", &queries.set_state),
            ("units", &queries.units),
            ("reset", &queries.reset),
            ("set_paused", &queries.set_paused),
            ("restart_leases", &queries.restart_leases),
            ("restart", &queries.restart),
            ("park", &queries.park),
            ("dead_letters", &queries.dead_letters),
            ("take_dead_letter", &queries.take_dead_letter),
            (
                "note_dead_letter_failure",
                &queries.note_dead_letter_failure,
            ),
            ("discard_dead_letter", &queries.discard_dead_letter),
            ("inbox_claim", &queries.inbox_claim),
        ];
        for (name, sql) in statements {
            assert!(!sql.is_empty(), "statement `{name}` is empty");
            for placeholder in [
                "{events}",
                "{projections}",
                "{leases}",
                "{nodes}",
                "{columns}",
            ] {
                assert!(
                    !sql.contains(placeholder),
                    "statement `{name}` still holds {placeholder}"
                );
            }
        }
        assert!(queries.claim.contains("\"events_projections\""));
        assert!(queries.units.contains("error_kind"));
    }
}
