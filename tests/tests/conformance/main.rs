//! Suites whose one body runs on several backends: the role traits, the event
//! store's behaviour, the projection runner, commands sent once, contention,
//! restarts and the rest of what every backend must keep.
//!
//! Each module is one file's suite; run one with
//! `cargo test -p outflow-tests --test conformance <module>::`.

mod aggregate_cache;
mod bad_configuration;
mod cancelled_transactions;
mod commands_once;
mod contention;
mod day_two_status;
mod decisions;
mod personal;
mod renames;
mod restarts;
mod role_suites;
mod runner_conformance;
mod snapshots;
mod split_backends;
mod store_behaviour;
mod timers;
mod transfer_property;
mod wake_stress;
