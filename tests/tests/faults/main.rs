//! Faults forced on purpose: database restarts, long transactions, lost and
//! cut commit acknowledgements, killed processes, bad stored rows, missing
//! tables, hostile input.
//!
//! Each module is one file's suite; run one with
//! `cargo test -p outflow-tests --test faults <module>::`.

mod asynchronous_commits;
mod bad_input;
mod bad_stored_data;
mod commit_cut;
mod console_outage;
mod database_restart;
mod long_transaction;
mod lost_ack;
mod loud_failures;
mod missing_table;
mod projection_crash;
