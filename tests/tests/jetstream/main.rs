//! The JetStream event store on a real server and on 3-node clusters, the
//! cluster harness included.
//!
//! Each module is one file's suite; run one with
//! `cargo test -p outflow-tests --test jetstream <module>::`.

mod console_partitions;
mod jetstream_cluster;
mod jetstream_store;
mod nats_cluster_harness;
