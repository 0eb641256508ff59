//! Every statement of the SQLite backend that does not depend on a filter,
//! rendered once with the store's table names when the store is built (the
//! placeholders `{events}`, `{projections}`, … name the tables; `{columns}`
//! the event columns): no statement is rendered again on a call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::rows::COLUMNS;
use super::schema::Tables;

/// The columns a dead letter is decoded from (see [`dead_letter_from_row`]).
macro_rules! dead_letter_columns {
    () => {
        "id, projection, partition, event_id, transaction_id, position, aggregate_type, \
         aggregate_id, sequence, event_type, event_version, error, attempts, \
         first_failed_at, last_failed_at"
    };
}

/// The stream's version alone (read after a refused append, to report it).
const VERSION: &str = "SELECT COALESCE(MAX(e.sequence), 0) FROM {events} e \
     WHERE e.aggregate_type = ?1 AND e.aggregate_id = ?2";

const READ_STREAM: &str = "SELECT {columns} FROM {events} e \
     WHERE e.aggregate_type = ?1 AND e.aggregate_id = ?2 AND e.sequence > ?3 \
     ORDER BY e.sequence LIMIT ?4";

/// A stream for a command in one statement (one state of the file): the
/// snapshot row (kind 0, when asked for), then the events after it (kind 1).
const LOAD: &str = "SELECT 0 AS kind, s.version AS sequence, NULL AS position, \
        NULL AS event_type, NULL AS event_version, s.payload \
       FROM {snapshots} s \
      WHERE ?3 AND s.aggregate_type = ?1 AND s.aggregate_id = ?2 \
     UNION ALL \
     SELECT 1, e.sequence, e.position, e.event_type, e.event_version, e.payload \
       FROM {events} e \
      WHERE e.aggregate_type = ?1 AND e.aggregate_id = ?2 \
        AND e.sequence > CASE WHEN ?3 THEN COALESCE((SELECT s.version FROM {snapshots} s \
              WHERE s.aggregate_type = ?1 AND s.aggregate_id = ?2), 0) ELSE 0 END \
     ORDER BY kind, sequence";

const SAVE_SNAPSHOT: &str =
    "INSERT INTO {snapshots} (aggregate_type, aggregate_id, version, payload, taken_at) \
     VALUES (?1, ?2, ?3, ?4, ?5) \
     ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE \
     SET version = excluded.version, payload = excluded.payload, taken_at = excluded.taken_at \
     WHERE excluded.version > {snapshots}.version";

const HEAD: &str = "SELECT e.transaction_id, e.position FROM {events} e \
     ORDER BY e.position DESC LIMIT 1";

const OUTCOME: &str =
    "SELECT o.version, o.refusal, o.refusal_json, o.recorded_at FROM {outcomes} o \
     WHERE o.aggregate_type = ?1 AND o.aggregate_id = ?2 AND o.command_id = ?3";

const INSERT: &str = "INSERT INTO {outcomes} \
     (aggregate_type, aggregate_id, command_id, version, refusal, refusal_json, recorded_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
     ON CONFLICT (aggregate_type, aggregate_id, command_id) DO NOTHING";

const PRUNE: &str = "DELETE FROM {outcomes} WHERE recorded_at < ?1";

/// The partition counts a projection is registered with (one, unless two
/// deployments disagree).
const PARTITION_COUNTS: &str =
    "SELECT DISTINCT p.partitions FROM {projections} p WHERE p.projection = ?1";

/// Creates the missing state rows `0..?2` of projection `?1`. The `WHERE`
/// of the `SELECT` also keeps SQLite from reading `ON CONFLICT` as a join
/// constraint.
const REGISTER: &str = "WITH RECURSIVE series(partition) AS ( \
         SELECT 0 UNION ALL SELECT s.partition + 1 FROM series s WHERE s.partition + 1 < ?2) \
     INSERT INTO {projections} (projection, partition, partitions, updated_at) \
     SELECT ?1, s.partition, ?2, ?3 FROM series s WHERE s.partition < ?2 \
     ON CONFLICT (projection, partition) DO NOTHING";

/// Records a node's heartbeat (`?2`: now, in unix milliseconds).
const NODE_HEARTBEAT: &str = "INSERT INTO {nodes} (node, last_seen) VALUES (?1, ?2) \
     ON CONFLICT (node) DO UPDATE SET last_seen = excluded.last_seen";

/// The live nodes: those seen after `?2` (now minus the TTL), and `?1`, the
/// node that just beat, whatever its clock says.
const LIVE_NODES: &str =
    "SELECT n.node FROM {nodes} n WHERE n.node = ?1 OR n.last_seen > ?2 ORDER BY n.node";

/// Takes unit (`?1`, `?2`) for node `?3` at time `?4` (unix milliseconds)
/// when it is not stopped and no other node holds a valid lease on it (its
/// lease row is missing, released, expired, or this node's). The epoch is
/// bumped unless this node still holds a valid lease, which fences the
/// commits of any previous owner.
///
/// PostgreSQL skips a unit whose batch is in flight (its row is locked by
/// the batch's transaction). Here that cannot happen: a batch's transaction
/// holds SQLite's write lock from its first statement to its commit, and
/// this statement runs in a write transaction too, so it only ever sees a
/// unit between batches.
const CLAIM: &str = "UPDATE {projections} AS p \
     SET epoch = p.epoch + CASE WHEN EXISTS ( \
             SELECT 1 FROM {leases} l \
              WHERE l.projection = p.projection AND l.partition = p.partition \
                AND l.owner = ?3 AND l.lease_until > ?4) THEN 0 ELSE 1 END, \
         last_error = CASE WHEN EXISTS ( \
             SELECT 1 FROM {leases} l \
              WHERE l.projection = p.projection AND l.partition = p.partition \
                AND l.owner = ?3 AND l.lease_until > ?4) THEN p.last_error ELSE NULL END, \
         error_kind = CASE WHEN EXISTS ( \
             SELECT 1 FROM {leases} l \
              WHERE l.projection = p.projection AND l.partition = p.partition \
                AND l.owner = ?3 AND l.lease_until > ?4) THEN p.error_kind ELSE NULL END, \
         updated_at = ?5 \
     WHERE p.projection = ?1 AND p.partition = ?2 AND p.state <> 'stopped' \
       AND NOT EXISTS ( \
             SELECT 1 FROM {leases} l \
              WHERE l.projection = p.projection AND l.partition = p.partition \
                AND l.owner <> ?3 AND l.lease_until >= ?4) \
     RETURNING epoch, transaction_id, position, paused";

/// Gives a claimed unit's lease to node `?3` until `?4`.
const LEASE: &str = "INSERT INTO {leases} (projection, partition, owner, lease_until) \
     VALUES (?1, ?2, ?3, ?4) \
     ON CONFLICT (projection, partition) \
     DO UPDATE SET owner = excluded.owner, lease_until = excluded.lease_until";

/// Extends until `?3` the leases node `?1` holds and that are valid at `?2`.
/// Only the leases table is written.
const RENEW: &str = "UPDATE {leases} SET lease_until = ?3 WHERE owner = ?1 AND lease_until >= ?2";

/// The units whose leases [`RENEW`] just extended, with their state (same
/// parameters; in the same transaction, so the same rows).
const RENEWED: &str = "SELECT l.projection, l.partition, p.epoch, p.transaction_id, p.position, \
            p.paused \
       FROM {leases} l \
       JOIN {projections} p ON p.projection = l.projection AND p.partition = l.partition \
      WHERE l.owner = ?1 AND l.lease_until >= ?2 \
      ORDER BY l.projection, l.partition";

/// Frees unit (`?1`, `?2`) if node `?3` holds it, whatever its epoch (a node
/// that lost the epoch gives the lease up at once).
const GIVE_UP: &str = "UPDATE {leases} SET owner = NULL, lease_until = NULL \
     WHERE projection = ?1 AND partition = ?2 AND owner = ?3";

/// A node's clean stop: its leases freed, its row gone.
const FREE_NODE_LEASES: &str =
    "UPDATE {leases} SET owner = NULL, lease_until = NULL WHERE owner = ?1";

const DELETE_NODE: &str = "DELETE FROM {nodes} WHERE node = ?1";

/// Frees unit (`?1`, `?2`) if node `?4` holds it and its epoch is still `?3`.
const RELEASE: &str = "UPDATE {leases} SET owner = NULL, lease_until = NULL \
     WHERE projection = ?1 AND partition = ?2 AND owner = ?4 \
       AND EXISTS (SELECT 1 FROM {projections} p \
                    WHERE p.projection = ?1 AND p.partition = ?2 AND p.epoch = ?3)";

/// Moves a unit's checkpoint from (`?4`, `?5`) to (`?6`, `?7`), only for the
/// holder of epoch `?3` and only from where it stands: a batch retried after
/// a commit whose acknowledgement was lost finds the checkpoint moved and
/// writes nothing.
const SAVE_CHECKPOINT: &str = "UPDATE {projections} \
     SET transaction_id = ?6, position = ?7, processed = processed + ?8, updated_at = ?9 \
     WHERE projection = ?1 AND partition = ?2 AND epoch = ?3 \
       AND transaction_id = ?4 AND position = ?5";

/// Records a unit's state and error for the holder of epoch `?3`; a row
/// already in that state is left alone (its `updated_at` keeps when the state
/// began).
const SET_STATE: &str = "UPDATE {projections} \
     SET state = ?4, last_error = ?5, updated_at = ?6, error_kind = ?7 \
     WHERE projection = ?1 AND partition = ?2 AND epoch = ?3 \
       AND (state IS NOT ?4 OR last_error IS NOT ?5 OR error_kind IS NOT ?7)";

/// The units of projection `?1` (all when `NULL`), with their leases as seen
/// at `?2` (unix milliseconds).
const UNITS: &str = "SELECT p.projection, p.partition, p.partitions, p.transaction_id, \
            p.position, l.owner, \
            COALESCE(l.owner IS NOT NULL AND l.lease_until >= ?2, 0) AS lease_valid, \
            p.epoch, p.state, p.paused, p.last_error, p.error_kind, p.processed, p.rebuild_total, \
            p.updated_at, \
            (SELECT d.transaction_id FROM {dead_letters} d \
              WHERE d.projection = p.projection AND d.partition = p.partition \
              ORDER BY d.transaction_id DESC, d.position DESC LIMIT 1) AS parked_transaction_id, \
            (SELECT d.position FROM {dead_letters} d \
              WHERE d.projection = p.projection AND d.partition = p.partition \
              ORDER BY d.transaction_id DESC, d.position DESC LIMIT 1) AS parked_position \
       FROM {projections} p \
       LEFT JOIN {leases} l ON l.projection = p.projection AND l.partition = p.partition \
      WHERE ?1 IS NULL OR p.projection = ?1 \
      ORDER BY p.projection, p.partition";

/// Sends every unit of projection `?1` back to the start of the log with a
/// new epoch, for a rebuild of `?2` events.
const RESET: &str = "UPDATE {projections} \
     SET transaction_id = 0, position = 0, epoch = epoch + 1, processed = 0, \
         rebuild_total = ?2, state = 'catching_up', last_error = NULL, error_kind = NULL, \
         updated_at = ?3 \
     WHERE projection = ?1";

/// Pauses (`?2` = 1) or resumes (`?2` = 0) every unit of projection `?1`.
const SET_PAUSED: &str =
    "UPDATE {projections} SET paused = ?2, updated_at = ?3 WHERE projection = ?1";

/// Frees the leases of projection `?1`'s stopped units; runs before
/// [`RESTART`], which makes them no longer stopped.
const RESTART_LEASES: &str = "UPDATE {leases} SET owner = NULL, lease_until = NULL \
     WHERE projection = ?1 \
       AND partition IN (SELECT p.partition FROM {projections} p \
                          WHERE p.projection = ?1 AND p.state = 'stopped')";

/// Makes projection `?1`'s stopped units claimable again.
const RESTART: &str = "UPDATE {projections} \
     SET state = 'idle', last_error = NULL, error_kind = NULL, updated_at = ?2 \
     WHERE projection = ?1 AND state = 'stopped'";

/// Parks an event: the unit, the event's identity and place, the error,
/// the attempts, the first failure (`?13`) and now (`?14`).
const PARK: &str = "INSERT INTO {dead_letters} (projection, partition, event_id, \
     transaction_id, position, aggregate_type, aggregate_id, sequence, event_type, \
     event_version, error, attempts, first_failed_at, last_failed_at) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)";

/// A projection's dead letters, oldest first.
const DEAD_LETTERS: &str = concat!(
    "SELECT ",
    dead_letter_columns!(),
    " FROM {dead_letters} WHERE projection = ?1 ORDER BY id"
);

const TAKE_DEAD_LETTER: &str = concat!(
    "DELETE FROM {dead_letters} WHERE id = ?1 RETURNING ",
    dead_letter_columns!()
);

const NOTE_DEAD_LETTER_FAILURE: &str = "UPDATE {dead_letters} \
     SET attempts = attempts + 1, error = ?2, last_failed_at = ?3 WHERE id = ?1";

const DISCARD_DEAD_LETTER: &str = "DELETE FROM {dead_letters} WHERE id = ?1";

/// Records a handled message; a message recorded already inserts nothing.
const INBOX_CLAIM: &str = "INSERT INTO {inbox} (handler, message_id, handled_at) \
     VALUES (?1, ?2, ?3) ON CONFLICT (handler, message_id) DO NOTHING";

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
            version: render(VERSION),
            read_stream: render(READ_STREAM),
            load: render(LOAD),
            save_snapshot: render(SAVE_SNAPSHOT),
            head: render(HEAD),
            outcome: render(OUTCOME),
            outcome_insert: render(INSERT),
            outcome_prune: render(PRUNE),
            partition_counts: render(PARTITION_COUNTS),
            register: render(REGISTER),
            node_heartbeat: render(NODE_HEARTBEAT),
            live_nodes: render(LIVE_NODES),
            claim: render(CLAIM),
            lease: render(LEASE),
            renew: render(RENEW),
            renewed: render(RENEWED),
            give_up: render(GIVE_UP),
            free_node_leases: render(FREE_NODE_LEASES),
            delete_node: render(DELETE_NODE),
            release: render(RELEASE),
            save_checkpoint: render(SAVE_CHECKPOINT),
            set_state: render(SET_STATE),
            units: render(UNITS),
            reset: render(RESET),
            set_paused: render(SET_PAUSED),
            restart_leases: render(RESTART_LEASES),
            restart: render(RESTART),
            park: render(PARK),
            dead_letters: render(DEAD_LETTERS),
            take_dead_letter: render(TAKE_DEAD_LETTER),
            note_dead_letter_failure: render(NOTE_DEAD_LETTER_FAILURE),
            discard_dead_letter: render(DISCARD_DEAD_LETTER),
            inbox_claim: render(INBOX_CLAIM),
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
