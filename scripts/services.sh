# Throwaway servers for tests and benchmarks. Source this file, then call
# `start_postgres` (and `start_nats`, `start_nats_cluster`); every server
# started here binds to 127.0.0.1 on free ports, lives in a temporary
# directory, and is stopped by its own PID when the calling script exits
# (`stop_services` runs from an EXIT trap).
#
# Exports: DATABASE_URL (a superuser URL to the `postgres` database, without
# TLS) and OUTFLOW_PG_TLS_CA (the certificate authority that signed the
# server's certificate: it also accepts TLS connections);
# NATS_URL and OUTFLOW_NATS_BIN (the `nats-server` binary, so a test can start
# servers of its own); NATS_CLUSTER_URL (from `start_nats_cluster`, which
# also sets OUTFLOW_NATS_BIN: the three client URLs of a JetStream cluster,
# comma-separated; OUTFLOW_NATS_CLUSTER_PIDS, their PIDs).

OUTFLOW_CLEANUPS=()

stop_services() {
    local i
    for (( i=${#OUTFLOW_CLEANUPS[@]}-1; i>=0; i-- )); do
        eval "${OUTFLOW_CLEANUPS[$i]}" || true
    done
    OUTFLOW_CLEANUPS=()
}
trap stop_services EXIT
trap 'exit 130' INT TERM

# Runs a command as the unprivileged user that owns the servers' files.
as_service_user() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u "$SERVICE_USER" -- "$@"
    else
        "$@"
    fi
}

choose_service_user() {
    if [ "$(id -u)" != 0 ]; then
        SERVICE_USER="$(id -un)"
    elif id postgres >/dev/null 2>&1; then
        SERVICE_USER=postgres
    else
        id outflow-test >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin outflow-test
        SERVICE_USER=outflow-test
    fi
}

# A TCP port on 127.0.0.1 that nothing listens on.
free_port() {
    local port attempt
    for attempt in $(seq 1 200); do
        port=$(( 20000 + (RANDOM % 30000) ))
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            echo "$port"
            return 0
        fi
    done
    echo "no free port found" >&2
    return 1
}

apt_install() {
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing Debian packages: $*" >&2
        if [ -z "${OUTFLOW_APT_UPDATED:-}" ]; then
            apt-get update -qq >&2
            OUTFLOW_APT_UPDATED=1
        fi
        # Keep the packages from starting their own services (Debian's
        # postgresql would start a cluster on port 5432): the tests start
        # private servers, and nothing else on the machine should change.
        local policy=/usr/sbin/policy-rc.d created_policy=""
        if [ ! -e "$policy" ]; then
            printf '#!/bin/sh\nexit 101\n' > "$policy"
            chmod +x "$policy"
            created_policy=1
        fi
        local status=0
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2 || status=$?
        [ -n "$created_policy" ] && rm -f "$policy"
        return "$status"
    else
        echo "missing: $*. Install with: sudo apt-get install $*" >&2
        return 1
    fi
}

postgres_bin_dir() {
    local dir
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -n "$dir" ] && [ -x "$dir/initdb" ]; then
        echo "$dir"
    elif command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1; then
        dirname "$(command -v initdb)"
    fi
}

start_postgres() {
    local bin port dir
    # An optional argument names another installation's bin directory.
    bin=${1:-$(postgres_bin_dir)}
    if [ -z "$bin" ]; then
        apt_install postgresql postgresql-contrib || return 1
        bin=$(postgres_bin_dir)
    fi
    if [ -z "$bin" ]; then
        echo "PostgreSQL server binaries still not found after installing" >&2
        return 1
    fi
    choose_service_user
    dir=$(mktemp -d "${TMPDIR:-/tmp}/outflow-pg.XXXXXX")
    chmod 755 "$dir"
    chown "$SERVICE_USER" "$dir"
    OUTFLOW_CLEANUPS+=("rm -rf '$dir'")
    as_service_user "$bin/initdb" -D "$dir/data" -U outflow --auth=trust -E UTF8 --no-instructions >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; return 1; }
    # A throwaway certificate authority and a server certificate it signed,
    # so clients can test TLS (sslmode=require, and verify-full with
    # OUTFLOW_PG_TLS_CA as the root).
    command -v openssl >/dev/null 2>&1 || apt_install openssl || return 1
    printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' >"$dir/server.ext"
    {
        openssl req -x509 -newkey rsa:2048 -nodes -days 7 -subj "/CN=outflow test CA" \
            -keyout "$dir/ca.key" -out "$dir/ca.crt" &&
        openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
            -keyout "$dir/server.key" -out "$dir/server.csr" &&
        openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
            -CAcreateserial -days 7 -extfile "$dir/server.ext" -out "$dir/server.crt"
    } >"$dir/openssl.log" 2>&1 || { cat "$dir/openssl.log" >&2; return 1; }
    chown "$SERVICE_USER" "$dir/server.key" "$dir/server.crt"
    chmod 600 "$dir/server.key" "$dir/ca.key"
    chmod 644 "$dir/server.crt" "$dir/ca.crt"
    port=$(free_port)
    # Tests open many connections at once; benchmarks keep the server's
    # defaults (OUTFLOW_PG_DEFAULTS=1) apart from what they need to connect.
    local settings="-c max_connections=400 -c shared_buffers=256MB"
    if [ -n "${OUTFLOW_PG_DEFAULTS:-}" ]; then
        settings="-c max_connections=200"
    fi
    # The benchmark counts statements per command (OUTFLOW_PG_STATEMENTS=1).
    if [ -n "${OUTFLOW_PG_STATEMENTS:-}" ]; then
        settings="$settings -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all"
    fi
    # A port nothing listened on a moment ago may still be taken when the
    # server binds it (another program's socket): then try another one.
    local tries
    for tries in 1 2 3 4 5; do
        if as_service_user "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
            -o "-p $port -k $dir -c listen_addresses=127.0.0.1 $settings -c ssl=on -c ssl_cert_file=$dir/server.crt -c ssl_key_file=$dir/server.key" start >&2; then
            break
        fi
        if [ "$tries" -lt 5 ] && grep -q "Address already in use" "$dir/server.log"; then
            echo "port $port was taken; trying another" >&2
            : >"$dir/server.log"
            port=$(free_port)
            continue
        fi
        cat "$dir/server.log" >&2
        return 1
    done
    local pid
    pid=$(head -n 1 "$dir/data/postmaster.pid")
    OUTFLOW_CLEANUPS+=("kill -INT $pid 2>/dev/null; for _ in \$(seq 1 100); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done; kill -KILL $pid 2>/dev/null")
    # Plain connections by default; the TLS tests ask for TLS themselves.
    export DATABASE_URL="postgres://outflow@127.0.0.1:$port/postgres?sslmode=disable"
    export OUTFLOW_PG_TLS_CA="$dir/ca.crt"
    export OUTFLOW_PG_BIN="$bin"
    export OUTFLOW_PG_SERVICE_USER="$SERVICE_USER"
    echo "PostgreSQL $("$bin/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (pid $pid)" >&2
}

nats_server_bin() {
    if command -v nats-server >/dev/null 2>&1; then
        command -v nats-server
    elif [ -x /usr/sbin/nats-server ]; then
        echo /usr/sbin/nats-server
    fi
}

# Headless Chromium and ChromeDriver for the example's page test (Debian's
# `chromium` and `chromium-driver`); the test starts and stops them itself.
ensure_browser() {
    if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
        return 0
    fi
    apt_install chromium chromium-driver || return 1
    if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then
        echo "chromium or chromedriver still not found after installing" >&2
        return 1
    fi
}

# The `nats-server` binary, installed from Debian's package when missing.
ensure_nats_server() {
    local bin
    bin=$(nats_server_bin)
    if [ -z "$bin" ]; then
        apt_install nats-server || return 1
        bin=$(nats_server_bin)
    fi
    if [ -z "$bin" ]; then
        echo "nats-server still not found after installing" >&2
        return 1
    fi
    echo "$bin"
}

# A JetStream-enabled nats-server (Debian's `nats-server` package) on a free
# loopback port, storing its streams in a temporary directory.
start_nats() {
    local bin port dir pid
    bin=$(ensure_nats_server) || return 1
    choose_service_user
    dir=$(mktemp -d "${TMPDIR:-/tmp}/outflow-nats.XXXXXX")
    chmod 755 "$dir"
    chown "$SERVICE_USER" "$dir"
    OUTFLOW_CLEANUPS+=("rm -rf '$dir'")
    port=$(free_port)
    # The server writes its own PID (`-P`): `$!` would be runuser's or a
    # subshell's, and killing those leaves the server running.
    as_service_user "$bin" -js -a 127.0.0.1 -p "$port" -sd "$dir/store" -P "$dir/nats.pid" \
        >"$dir/server.log" 2>&1 &
    local launcher=$! attempt
    # Not a job of the caller's shell: a bare `wait` there must not wait for it.
    disown "$launcher" 2>/dev/null || true
    for attempt in $(seq 1 100); do
        [ -s "$dir/nats.pid" ] && break
        kill -0 "$launcher" 2>/dev/null || break
        sleep 0.1
    done
    pid=$(cat "$dir/nats.pid" 2>/dev/null || true)
    if [ -z "$pid" ]; then
        cat "$dir/server.log" >&2
        echo "nats-server did not start" >&2
        return 1
    fi
    OUTFLOW_CLEANUPS+=("kill -TERM $pid 2>/dev/null; for _ in \$(seq 1 100); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done; kill -KILL $pid 2>/dev/null")
    for attempt in $(seq 1 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        cat "$dir/server.log" >&2
        echo "nats-server did not accept connections within 10 s" >&2
        return 1
    fi
    export NATS_URL="nats://127.0.0.1:$port"
    export OUTFLOW_NATS_BIN="$bin"
    echo "nats-server $("$bin" --version | awk '{print $2}') on 127.0.0.1:$port (pid $pid)" >&2
}

# A free port on 127.0.0.1 that is none of the ones already given.
free_port_except() {
    local port attempt taken other
    for attempt in $(seq 1 50); do
        port=$(free_port) || return 1
        taken=""
        for other in "$@"; do
            [ "$other" = "$port" ] && taken=1
        done
        if [ -z "$taken" ]; then
            echo "$port"
            return 0
        fi
    done
    echo "no free port found" >&2
    return 1
}

# The body of an HTTP GET of `path` from 127.0.0.1:`port` (with its headers;
# empty when nothing answers within 2 s).
http_get_local() {
    local port=$1 path=$2
    (
        exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 1
        printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$path" >&3
        timeout 2 cat <&3
    ) 2>/dev/null
}

# A three-node JetStream cluster (servers `n1`, `n2`, `n3`, cluster
# `outflow`): every node listens for clients, routes and monitoring on free
# loopback ports, stores its streams in its own temporary directory, and is
# stopped by its own PID. Returns once every node accepts clients and knows
# the JetStream meta group's leader (OUTFLOW_CLUSTER_WAIT seconds at most,
# 120 by default).
start_nats_cluster() {
    local bin dir i j pid attempt
    local -a pids=()
    bin=$(ensure_nats_server) || return 1
    choose_service_user
    dir=$(mktemp -d "${TMPDIR:-/tmp}/outflow-nats-cluster.XXXXXX")
    chmod 755 "$dir"
    chown "$SERVICE_USER" "$dir"
    OUTFLOW_CLEANUPS+=("rm -rf '$dir'")
    # Client, route and monitoring ports: nine distinct ones, all chosen
    # before any node starts.
    local -a client_ports=() route_ports=() http_ports=() taken=()
    for i in 1 2 3; do
        client_ports[$i]=$(free_port_except "${taken[@]}") || return 1
        taken+=("${client_ports[$i]}")
        route_ports[$i]=$(free_port_except "${taken[@]}") || return 1
        taken+=("${route_ports[$i]}")
        http_ports[$i]=$(free_port_except "${taken[@]}") || return 1
        taken+=("${http_ports[$i]}")
    done
    local routes
    for i in 1 2 3; do
        mkdir "$dir/n$i"
        chown "$SERVICE_USER" "$dir/n$i"
        routes=""
        for j in 1 2 3; do
            [ "$j" = "$i" ] && continue
            routes="$routes    nats-route://127.0.0.1:${route_ports[$j]}
"
        done
        cat >"$dir/n$i/server.conf" <<CONF
server_name: n$i
listen: 127.0.0.1:${client_ports[$i]}
http: 127.0.0.1:${http_ports[$i]}
jetstream {
  store_dir: "$dir/n$i/store"
}
cluster {
  name: outflow
  listen: 127.0.0.1:${route_ports[$i]}
  routes: [
$routes  ]
}
CONF
        chmod 644 "$dir/n$i/server.conf"
        # The server writes its own PID (`-P`): `$!` would be runuser's or a
        # subshell's, and killing those leaves the server running.
        as_service_user "$bin" -c "$dir/n$i/server.conf" -P "$dir/n$i/nats.pid" \
            >"$dir/n$i/server.log" 2>&1 &
        local launcher=$!
        # Not a job of the caller's shell: a bare `wait` there must not wait
        # for it.
        disown "$launcher" 2>/dev/null || true
        for attempt in $(seq 1 100); do
            [ -s "$dir/n$i/nats.pid" ] && break
            kill -0 "$launcher" 2>/dev/null || break
            sleep 0.1
        done
        pid=$(cat "$dir/n$i/nats.pid" 2>/dev/null || true)
        if [ -z "$pid" ]; then
            cat "$dir/n$i/server.log" >&2
            echo "nats-server n$i did not start" >&2
            return 1
        fi
        OUTFLOW_CLEANUPS+=("kill -TERM $pid 2>/dev/null; for _ in \$(seq 1 100); do kill -0 $pid 2>/dev/null || break; sleep 0.1; done; kill -KILL $pid 2>/dev/null")
        pids[$i]=$pid
    done
    # Ready: every node accepts clients, and its monitoring endpoint names
    # the meta group's leader and a cluster of three. An idle machine gets
    # there in seconds; a loaded one may need much longer (the election
    # timers run late), so the wait is generous: OUTFLOW_CLUSTER_WAIT
    # seconds, 120 unless set.
    local patience="${OUTFLOW_CLUSTER_WAIT:-120}"
    local ready="" jsz deadline=$(( SECONDS + patience ))
    while [ "$SECONDS" -lt "$deadline" ]; do
        ready=1
        for i in 1 2 3; do
            if ! kill -0 "${pids[$i]}" 2>/dev/null; then
                ready=""
                echo "nats-server n$i (pid ${pids[$i]}) exited" >&2
                break 2
            fi
            if ! (exec 3<>"/dev/tcp/127.0.0.1/${client_ports[$i]}") 2>/dev/null; then
                ready=""
                break
            fi
            jsz=$(http_get_local "${http_ports[$i]}" /jsz || true)
            if ! grep -q '"leader": *"n[123]"' <<<"$jsz" || ! grep -q '"cluster_size": *3' <<<"$jsz"; then
                ready=""
                break
            fi
        done
        [ -n "$ready" ] && break
        sleep 0.1
    done
    if [ -z "$ready" ]; then
        for i in 1 2 3; do
            echo "--- nats-server n$i (127.0.0.1:${client_ports[$i]}):" >&2
            tail -n 20 "$dir/n$i/server.log" >&2
        done
        echo "the nats-server cluster did not accept connections and agree on a JetStream meta leader within $patience s" >&2
        return 1
    fi
    local leader
    leader=$(grep -o '"leader": *"n[123]"' <<<"$jsz" | head -n 1 | grep -o 'n[123]')
    export NATS_CLUSTER_URL="nats://127.0.0.1:${client_ports[1]},nats://127.0.0.1:${client_ports[2]},nats://127.0.0.1:${client_ports[3]}"
    export OUTFLOW_NATS_BIN="$bin"
    # The servers' own PIDs, for the benchmark's CPU accounting.
    export OUTFLOW_NATS_CLUSTER_PIDS="${pids[1]},${pids[2]},${pids[3]}"
    echo "nats-server $("$bin" --version | awk '{print $2}') cluster outflow on $NATS_CLUSTER_URL (pids ${pids[*]}, meta leader $leader)" >&2
}
