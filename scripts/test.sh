#!/usr/bin/env bash
# Runs Outflow's whole test suite against real, throwaway servers.
#
# Installs what is missing (Debian's `postgresql`, `nats-server`, `chromium`
# and `chromium-driver` when run as root with apt-get), starts a PostgreSQL
# cluster, a JetStream-enabled nats-server and a three-node JetStream cluster
# (NATS_CLUSTER_URL) in temporary directories on free loopback ports, runs
# `cargo test --workspace`, builds the book when `mdbook` is installed, and
# stops the servers by their own PIDs whatever happens. Extra arguments go
# to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/services.sh
source scripts/services.sh

start_postgres
start_nats
start_nats_cluster
ensure_browser
cargo test --workspace "$@"
# The book: its Rust is compiled and run above (docs/examples); building it
# checks that every include, anchor and link resolves.
if command -v mdbook >/dev/null 2>&1; then
    bash scripts/check-book.sh
else
    echo "mdbook is not installed: the book was not built (cargo install mdbook)" >&2
fi
