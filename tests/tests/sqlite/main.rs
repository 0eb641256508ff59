//! SQLite on real files: the log under a held writer, the file after
//! SIGKILLs.
//!
//! Each module is one file's suite; run one with
//! `cargo test -p outflow-tests --test sqlite <module>::`.

mod group_commit;
mod sqlite_backend;
mod sqlite_crash;
