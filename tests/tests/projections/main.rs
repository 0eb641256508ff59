//! Operating projections: admin, catch-up, handler errors, nodes sharing
//! units, leases and their fence, views, operators in another process.
//!
//! Each module is one file's suite; run one with
//! `cargo test -p outflow-tests --test projections <module>::`.

mod admin_console;
mod lease_fence;
mod operators_elsewhere;
mod projection_admin;
mod projection_catch_up;
mod projection_errors;
mod projection_nodes;
mod projection_views;
