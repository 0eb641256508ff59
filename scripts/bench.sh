#!/usr/bin/env bash
# Benchmarks Outflow against postgres-es on one throwaway PostgreSQL server
# (default settings, fsync on), and Outflow's JetStream store on a throwaway
# 3-node JetStream cluster, and writes docs/benchmarks.md.
#
#   scripts/bench.sh           the full run (under 20 minutes on 2 cores)
#   scripts/bench.sh --quick   a smaller run (under 3 minutes once built)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/services.sh
source scripts/services.sh

cargo build --release -p outflow-bench
OUTFLOW_PG_DEFAULTS=1 OUTFLOW_PG_STATEMENTS=1 start_postgres
start_nats_cluster
./target/release/outflow-bench "$@" --out docs/benchmarks.md
