#!/usr/bin/env bash
# End-to-end benchmark in one command: pgbench against direct PostgreSQL (plain TCP and TLS),
# pgbouncer (session mode, plain; and with client mTLS, verify-full, jitgate's CA and server
# certificate: `pgbouncer-mtls`, the fair comparison) and jitgate (mTLS, full statement
# audit), directly and through a jitgate-agent on loopback (`jitgate-agent`: its CPU is the
# proxy's plus the agent's), round by round, plus session start rate, idle memory per session
# and sever latency at grant expiry and revoke (directly, and through one agent).
#
#   benches/e2e.sh                 # ROUNDS=3 DURATION=10
#   QUICK=1 benches/e2e.sh         # smoke test: 1 round of 2 s, small sessions counts
#   PROFILE=1 benches/e2e.sh       # also perf-record jitgate under pgbench -S -M prepared
#   HOLD=1 benches/e2e.sh          # set everything up, write hold.env, wait to be interrupted
#
# Knobs (environment): JITGATE_THREADS (jitgate's sessions.threads, 1, as pgbouncer runs one thread), ROUNDS, DURATION (seconds per pgbench run), CLIENTS (-c, 8),
# THREADS (-j, 2), SCALE (pgbench -i -s, 10), IDLE_SESSIONS ("1000 10000"),
# CONNECTS (sessions opened one after another per target to time session start, 2000; 0
# skips), QLAT_SECS (seconds of pgbench -S -M simple -c 1 per target for the added latency per
# query, 10; 0 skips), SEVER_SESSIONS ("100 1000 10000"; each count is cut once by the grant's expiry and once by a
# revoke; empty skips; both are capped to what the open-files limit allows:
# each session holds two descriptors in the proxy), WORKLOADS (pgbench workloads to run, all
# five by default; empty skips pgbench; `select-pipeline` runs benches/data/pipeline.sql, ten
# selects in one libpq pipeline), BASELINE_JITGATE (path to another jitgate binary, run as the
# extra target `jitgate-base` beside this build, same config, interleaved), SEVER_OPEN_RATE (sessions/s assumed when sizing the
# expiring grant, 150), AGENT (1: also measure the path through jitgate-agent; 0 skips it),
# SEVER_AGENT_SESSIONS ("1000": sessions through one agent cut by the grant's expiry; empty
# skips), PROFILE_SECS (10), RESULTS_DIR (where the table and raw output go; kept after the
# run).
#
# It installs what is missing with apt-get (postgresql, pgbouncer, openssl; linux-perf with
# PROFILE=1), builds jitgate and the jitgate-e2e helper in release mode, starts everything on
# free loopback ports in a temp dir and stops and removes it all on exit. PostgreSQL and
# pgbouncer run as the `postgres` user when the script runs as root.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
    ROUNDS=${ROUNDS:-1} DURATION=${DURATION:-2} SCALE=${SCALE:-1}
    IDLE_SESSIONS=${IDLE_SESSIONS-100} SEVER_SESSIONS=${SEVER_SESSIONS-100} SEVER_AGENT_SESSIONS=${SEVER_AGENT_SESSIONS-100}
    CONNECTS=${CONNECTS:-200} QLAT_SECS=${QLAT_SECS:-2}
fi
ROUNDS=${ROUNDS:-3}
DURATION=${DURATION:-10}
CLIENTS=${CLIENTS:-8}
THREADS=${THREADS:-2}
SCALE=${SCALE:-10}
IDLE_SESSIONS=${IDLE_SESSIONS-1000 10000}
SEVER_SESSIONS=${SEVER_SESSIONS-100 1000 10000}
SEVER_OPEN_RATE=${SEVER_OPEN_RATE:-150}
CONNECTS=${CONNECTS:-2000}
QLAT_SECS=${QLAT_SECS:-10}
PROFILE=${PROFILE:-0}
AGENT=${AGENT:-1}
SEVER_AGENT_SESSIONS=${SEVER_AGENT_SESSIONS-1000}
PROFILE_SECS=${PROFILE_SECS:-10}
RESULTS_DIR=${RESULTS_DIR:-${TMPDIR:-/tmp}/jitgate-e2e-results-$(date +%Y%m%d-%H%M%S)}
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME:-/root}/.cache/jitgate-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

say() { echo "== $*" >&2; }
die() { echo "e2e: $*" >&2; exit 1; }

sudo=""
[[ $(id -u) != 0 ]] && sudo="sudo"

# ---------------------------------------------------------------- packages
pg_bin_dir() {
    local bin best=""
    for bin in /usr/lib/postgresql/*/bin; do
        [[ -x $bin/initdb && -x $bin/pg_ctl && -x $bin/pgbench && -x $bin/psql ]] && best=$bin
    done
    [[ -n $best ]] && echo "$best"
}
missing=()
pg_bin_dir >/dev/null || missing+=(postgresql postgresql-client)
command -v pgbouncer >/dev/null || [[ -x /usr/sbin/pgbouncer ]] || missing+=(pgbouncer)
command -v openssl >/dev/null || missing+=(openssl)
if [[ $PROFILE == 1 ]] && ! command -v perf >/dev/null; then missing+=(linux-perf); fi
if ((${#missing[@]})); then
    say "installing ${missing[*]} (apt-get)"
    $sudo apt-get update -qq
    # policy-rc.d keeps the packages from starting their own services (a cluster on 5432,
    # a pgbouncer on 6432).
    printf '#!/bin/sh\nexit 101\n' | $sudo tee /usr/sbin/policy-rc.d >/dev/null
    $sudo chmod +x /usr/sbin/policy-rc.d
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null || {
        $sudo rm -f /usr/sbin/policy-rc.d
        die "apt-get install ${missing[*]} failed"
    }
    $sudo rm -f /usr/sbin/policy-rc.d
fi
PGBIN=$(pg_bin_dir) || die "PostgreSQL server binaries not found"
PGBOUNCER=$(command -v pgbouncer || echo /usr/sbin/pgbouncer)
PGBENCH=$PGBIN/pgbench

# ---------------------------------------------------------------- build
say "building jitgate, jitgate-agent and jitgate-e2e (release)"
cargo build --release --locked -p jitgate -p jitgate-agent -p jitgate-benches --bins >&2
JG=$CARGO_TARGET_DIR/release/jitgate
AGENT_BIN=$CARGO_TARGET_DIR/release/jitgate-agent
E2E=$CARGO_TARGET_DIR/release/jitgate-e2e

# ---------------------------------------------------------------- sandbox
WORK=$(mktemp -d "${TMPDIR:-/tmp}/jitgate-e2e.XXXXXX")
chmod 755 "$WORK"
mkdir -p "$RESULTS_DIR"
RAW=$RESULTS_DIR/raw.txt
: >"$RAW"
PIDS=()
PG_STARTED=0

as_pg() {
    if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi
}
cleanup() {
    local pid
    set +e
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null; done
    for pid in "$WORK"/bouncer*/pgbouncer.pid; do [[ -f $pid ]] && kill "$(cat "$pid")" 2>/dev/null; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null; done
    ((PG_STARTED)) && as_pg "$PGBIN/pg_ctl" -D "$WORK/pg/data" -m immediate stop >/dev/null 2>&1
    rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Sockets: 10,000 sessions are 20,000 descriptors in the proxy.
ulimit -n 262144 2>/dev/null || ulimit -n "$(ulimit -Hn)"
NOFILE=$(ulimit -n)
fit_sessions() { # n -> n, or fewer when the proxy could not hold them
    local max=$(((NOFILE - 200) / 2))
    if (($1 > max)); then
        say "open-files limit $NOFILE: $1 sessions capped at $max"
        echo "$max"
    else
        echo "$1"
    fi
}

mapfile -t PORTS < <("$E2E" free-ports 12)
PG_PORT=${PORTS[0]} BOUNCER_PORT=${PORTS[1]} FAKE_PORT=${PORTS[2]} BOUNCER_MTLS_PORT=${PORTS[9]}
JG_PORTS=("${PORTS[3]}" "${PORTS[4]}") JGF_PORTS=("${PORTS[5]}" "${PORTS[6]}") JGB_PORTS=("${PORTS[7]}" "${PORTS[8]}")
AGENTS_PORT=${PORTS[10]} AGENTS_F_PORT=${PORTS[11]}

wait_port() { # port what
    local i
    for i in $(seq 1 200); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.05
    done
    die "$2 did not listen on port $1"
}

# PostgreSQL with TLS (an EC certificate for 127.0.0.1 from a CA of its own, so clients that
# refuse a self-signed CA as the server's own certificate, rustls among them, verify it too).
say "starting PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}') with TLS on port $PG_PORT"
mkdir -p "$WORK/pg"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=e2e-ca -keyout "$WORK/pg/ca.key" -out "$WORK/pg/ca.crt" 2>/dev/null
openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=127.0.0.1 \
    -keyout "$WORK/pg/server.key" -out "$WORK/pg/server.csr" 2>/dev/null
printf 'subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n' >"$WORK/pg/server.ext"
openssl x509 -req -in "$WORK/pg/server.csr" -CA "$WORK/pg/ca.crt" -CAkey "$WORK/pg/ca.key" \
    -CAcreateserial -days 2 -extfile "$WORK/pg/server.ext" -out "$WORK/pg/server.crt" 2>/dev/null
chmod 600 "$WORK/pg/server.key"
[[ $(id -u) == 0 ]] && chown -R postgres: "$WORK/pg"
as_pg "$PGBIN/initdb" -D "$WORK/pg/data" -U postgres --auth=trust -E UTF8 --locale=C >/dev/null
cat >>"$WORK/pg/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$WORK/pg'
max_connections = 300
shared_buffers = 256MB
synchronous_commit = off
ssl = on
ssl_cert_file = '$WORK/pg/server.crt'
ssl_key_file = '$WORK/pg/server.key'
EOF
printf 'local all all trust\nhost all all 127.0.0.1/32 trust\n' >"$WORK/pg/data/pg_hba.conf"
as_pg "$PGBIN/pg_ctl" -D "$WORK/pg/data" -l "$WORK/pg/log" -w start >/dev/null
PG_STARTED=1
psql_pg() { as_pg "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$WORK/pg" -p "$PG_PORT" -U postgres "$@"; }
psql_pg -d postgres -c "CREATE ROLE bench LOGIN" -c "CREATE DATABASE bench OWNER bench" \
    -c "CREATE ROLE bench_manager LOGIN CREATEROLE"
say "pgbench -i -s $SCALE"
"$PGBENCH" -i -q -s "$SCALE" "host=127.0.0.1 port=$PG_PORT dbname=bench user=bench sslmode=disable" \
    >"$RESULTS_DIR/pgbench-init.log" 2>&1 || die "pgbench -i failed: $(tail -5 "$RESULTS_DIR/pgbench-init.log")"

# pgbouncer, session mode, plain TCP to PostgreSQL; the client side as the caller says.
start_pgbouncer() { # dir port auth_type client-tls-lines -> sets BOUNCER_PID_OUT
    mkdir -p "$1"
    echo '"bench" ""' >"$1/userlist.txt"
    cat >"$1/pgbouncer.ini" <<EOF
[databases]
bench = host=127.0.0.1 port=$PG_PORT dbname=bench user=bench
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $2
unix_socket_dir =
auth_type = $3
auth_file = $1/userlist.txt
pool_mode = session
max_client_conn = 1000
default_pool_size = 50
server_tls_sslmode = disable
$4
ignore_startup_parameters = extra_float_digits
logfile = $1/pgbouncer.log
pidfile = $1/pgbouncer.pid
EOF
    [[ $(id -u) == 0 ]] && chown -R postgres: "$1"
    as_pg "$PGBOUNCER" -d -q "$1/pgbouncer.ini"
    wait_port "$2" "pgbouncer ($1)"
    BOUNCER_PID_OUT=$(cat "$1/pgbouncer.pid")
}
say "starting pgbouncer $("$PGBOUNCER" --version | head -1 | awk '{print $2}') on port $BOUNCER_PORT"
start_pgbouncer "$WORK/bouncer" "$BOUNCER_PORT" trust "client_tls_sslmode = disable"
BOUNCER_PID=$BOUNCER_PID_OUT

# jitgate: `jitgate init` PKI, a write grant (the TPC-B script writes), full statement audit.
start_jitgate() { # dir [binary] -> sets JG_PID_OUT
    "${2:-$JG}" serve --config "$1/jitgate.toml" >>"$1/serve.log" 2>&1 &
    JG_PID_OUT=$!
    PIDS+=("$JG_PID_OUT")
}
stop_pid() {
    local p keep=()
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}
setup_jitgate() { # dir pg_port api_port targets-toml [binary]
    local JG=${5:-$JG} per_user="# Every session is the one user \"bench\".
max_sessions_per_user = 30000"
    # A baseline build may predate the key (its own default then applies; -c stays far below).
    [[ -n ${5:-} ]] && per_user=""
    # One session thread, as pgbouncer runs one (JITGATE_THREADS; 0 is one per CPU). Not for
    # a baseline build, which may predate the key.
    local threads="threads = ${JITGATE_THREADS:-1}"
    [[ -n ${5:-} ]] && threads=""
    "$JG" init --data-dir "$1" >/dev/null
    cat >"$1/jitgate.toml" <<EOF
data_dir = "$1"
[listen]
postgres = "127.0.0.1:$2"
api = "127.0.0.1:$3"
metrics = "127.0.0.1:0"
${LISTEN_EXTRA:-}
[limits]
max_connections = 30000
$per_user
shutdown_grace = "2s"
[sessions]
expiry_notice = "0s"
$threads
[audit]
max_file_bytes = 1099511627776
$4
EOF
    "$JG" config check "$1/jitgate.toml" >/dev/null
    "$JG" cert issue --data-dir "$1" --user bench --ttl 8h --out "$1/bench" >/dev/null
}
JGD=$WORK/jg
say "starting jitgate on port ${JG_PORTS[0]}"
agent_target() { # name agent
    printf '[[targets]]\nname = "%s"\nvia = "%s"\ndatabase = "bench"\n[targets.credentials.write]\nuser = "bench"\n' "$1" "$2"
}
listen_agents=""
((AGENT)) && listen_agents="agents = \"127.0.0.1:$AGENTS_PORT\""
LISTEN_EXTRA=$listen_agents setup_jitgate "$JGD" "${JG_PORTS[0]}" "${JG_PORTS[1]}" "[[targets]]
name = \"bench-db\"
address = \"127.0.0.1:$PG_PORT\"
database = \"bench\"
[targets.credentials.write]
user = \"bench\"

# The same database in ephemeral mode: a temporary role per grant (session start measured).
[[targets]]
name = \"bench-eph\"
address = \"127.0.0.1:$PG_PORT\"
database = \"bench\"
[targets.credentials]
mode = \"ephemeral\"
connection_limit = 1000
[targets.credentials.write]
user = \"bench\"
[targets.manager]
user = \"bench_manager\"
[targets.on_end]
drop_owned = true
$( ((AGENT)) && agent_target bench-agent bench-east)"
start_jitgate "$JGD"
JG_PID=$JG_PID_OUT
wait_port "${JG_PORTS[0]}" jitgate
wait_port "${JG_PORTS[1]}" "jitgate api"
"$JG" grant create --data-dir "$JGD" --user bench --target bench-db --access write --for 8h \
    --reason "e2e benchmark" >/dev/null
"$JG" grant create --data-dir "$JGD" --user bench --target bench-eph --access write --for 8h \
    --reason "e2e benchmark, ephemeral mode" >/dev/null
AUDIT=$JGD/audit.jsonl

# jitgate-agent on loopback, beside PostgreSQL: joins with a token, serves one target.
wait_agent() { # data-dir name
    local i
    for i in $(seq 1 300); do
        "$JG" agent list --data-dir "$1" --json 2>/dev/null |
            python3 -c 'import json, sys; sys.exit(0 if any(a["name"] == sys.argv[1] and a["connected"] for a in json.load(sys.stdin)) else 1)' "$2" &&
            return 0
        sleep 0.1
    done
    die "agent $2 did not connect"
}
start_agent() { # proxy-data-dir agents-port agent-dir name target upstream -> sets AGENT_PID_OUT
    local token
    token=$("$JG" agent token create --data-dir "$1" --name "$4" --targets "$5" --ttl 1h 2>/dev/null)
    "$AGENT_BIN" join --proxy "127.0.0.1:$2" --token "$token" --data-dir "$3" >/dev/null
    printf 'reconnect_max = "1s"\n[targets]\n%s = "%s"\n' "$5" "$6" >"$3/agent.toml"
    JITGATE_LOG=warn "$AGENT_BIN" run --data-dir "$3" >>"$3/run.log" 2>&1 &
    AGENT_PID_OUT=$!
    PIDS+=("$AGENT_PID_OUT")
    wait_agent "$1" "$4"
}
if ((AGENT)); then
    say "starting jitgate-agent (loopback) for target bench-agent"
    start_agent "$JGD" "$AGENTS_PORT" "$WORK/agent" bench-east bench-agent "127.0.0.1:$PG_PORT"
    AGENT_PID=$AGENT_PID_OUT
    "$JG" grant create --data-dir "$JGD" --user bench --target bench-agent --access write --for 8h \
        --reason "e2e benchmark through an agent" >/dev/null
fi

# pgbouncer with client mTLS, the fair comparison: verify-full against jitgate's CA, with
# jitgate's server certificate, and `auth_type = cert` (the certificate's CN is the user, as
# jitgate checks its certificate's user).
say "starting pgbouncer with client mTLS on port $BOUNCER_MTLS_PORT"
mkdir -p "$WORK/bouncer-mtls"
cp "$JGD/ca.crt" "$JGD/server.crt" "$JGD/server.key" "$WORK/bouncer-mtls/"
chmod 600 "$WORK/bouncer-mtls/server.key"
start_pgbouncer "$WORK/bouncer-mtls" "$BOUNCER_MTLS_PORT" cert "client_tls_sslmode = verify-full
client_tls_ca_file = $WORK/bouncer-mtls/ca.crt
client_tls_cert_file = $WORK/bouncer-mtls/server.crt
client_tls_key_file = $WORK/bouncer-mtls/server.key"
BOUNCER_MTLS_PID=$BOUNCER_PID_OUT
# It must refuse a client without a certificate, or the comparison is not the fair one.
if "$PGBIN/psql" -X -q "host=127.0.0.1 port=$BOUNCER_MTLS_PORT dbname=bench user=bench sslmode=require" \
    -c "SELECT 1" >/dev/null 2>&1; then
    die "pgbouncer-mtls let in a client without a certificate"
fi
if [[ -n ${BASELINE_JITGATE:-} ]]; then
    JGB=$WORK/jgb
    say "starting the baseline jitgate ($BASELINE_JITGATE) on port ${JGB_PORTS[0]}"
    setup_jitgate "$JGB" "${JGB_PORTS[0]}" "${JGB_PORTS[1]}" "[[targets]]
name = \"bench-db\"
address = \"127.0.0.1:$PG_PORT\"
database = \"bench\"
[targets.credentials.write]
user = \"bench\"" "$BASELINE_JITGATE"
    start_jitgate "$JGB" "$BASELINE_JITGATE"
    JGB_PID=$JG_PID_OUT
    wait_port "${JGB_PORTS[0]}" "baseline jitgate"
    wait_port "${JGB_PORTS[1]}" "baseline jitgate api"
    "$BASELINE_JITGATE" grant create --data-dir "$JGB" --user bench --target bench-db --access write \
        --for 8h --reason "e2e benchmark" >/dev/null
    CONN_JGB="host=127.0.0.1 port=${JGB_PORTS[0]} dbname=bench-db user=bench sslmode=verify-full sslrootcert=$JGB/bench/ca.crt sslcert=$JGB/bench/bench.crt sslkey=$JGB/bench/bench.key"
fi

CONN_TCP="host=127.0.0.1 port=$PG_PORT dbname=bench user=bench sslmode=disable"
CONN_TLS="host=127.0.0.1 port=$PG_PORT dbname=bench user=bench sslmode=verify-full sslrootcert=$WORK/pg/ca.crt"
CONN_BOUNCER="host=127.0.0.1 port=$BOUNCER_PORT dbname=bench user=bench sslmode=disable"
CONN_BOUNCER_MTLS="host=127.0.0.1 port=$BOUNCER_MTLS_PORT dbname=bench user=bench sslmode=verify-full sslrootcert=$JGD/bench/ca.crt sslcert=$JGD/bench/bench.crt sslkey=$JGD/bench/bench.key"
CONN_JG="host=127.0.0.1 port=${JG_PORTS[0]} dbname=bench-db user=bench sslmode=verify-full sslrootcert=$JGD/bench/ca.crt sslcert=$JGD/bench/bench.crt sslkey=$JGD/bench/bench.key"
CONN_JGE=${CONN_JG/dbname=bench-db/dbname=bench-eph}
CONN_JGA=${CONN_JG/dbname=bench-db/dbname=bench-agent}
TARGETS=(direct-tcp direct-tls pgbouncer pgbouncer-mtls jitgate)
((AGENT)) && TARGETS+=(jitgate-agent)
[[ -n ${BASELINE_JITGATE:-} ]] && TARGETS+=(jitgate-base)
conn_of() {
    case $1 in
    direct-tcp) echo "$CONN_TCP" ;; direct-tls) echo "$CONN_TLS" ;;
    pgbouncer) echo "$CONN_BOUNCER" ;; pgbouncer-mtls) echo "$CONN_BOUNCER_MTLS" ;; jitgate) echo "$CONN_JG" ;; jitgate-ephemeral) echo "$CONN_JGE" ;; jitgate-base) echo "$CONN_JGB" ;;
    jitgate-agent) echo "$CONN_JGA" ;;
    esac
}
pid_of() {
    # The path through an agent costs the proxy's CPU and the agent's.
    case $1 in pgbouncer) echo "$BOUNCER_PID" ;; pgbouncer-mtls) echo "$BOUNCER_MTLS_PID" ;; jitgate) echo "$JG_PID" ;; jitgate-base) echo "$JGB_PID" ;; jitgate-agent) echo "$JG_PID $AGENT_PID" ;; *) echo "" ;; esac
}
if [[ ${HOLD:-0} == 1 ]]; then
    # Everything stays up for measuring by hand: the connection strings and process ids go
    # to hold.env; interrupt the script to stop and remove it all.
    {
        for t in "${TARGETS[@]}"; do
            v=${t//-/_}
            printf 'CONN_%s=%q\n' "${v^^}" "$(conn_of "$t")"
            printf 'PID_%s=%q\n' "${v^^}" "$(pid_of "$t")"
        done
        printf 'PGBENCH=%q\nAUDIT=%q\nJGD=%q\n' "$PGBENCH" "$AUDIT" "$JGD"
    } >"$RESULTS_DIR/hold.env"
    say "holding: source $RESULTS_DIR/hold.env; interrupt to stop"
    while :; do sleep 3600 & wait $! || break; done
fi
read -r -a WORKLOADS <<<"${WORKLOADS-select-simple select-extended select-prepared tpcb-simple connect-select}"
args_of() {
    case $1 in
    select-simple) echo "-S -M simple" ;;
    select-extended) echo "-S -M extended" ;;
    select-prepared) echo "-S -M prepared" ;;
    tpcb-simple) echo "-M simple" ;;
    connect-select) echo "-S -M simple -C" ;;
    select-pipeline) echo "-M prepared -f $ROOT/benches/data/pipeline.sql" ;;
    esac
}

CLK_TCK=$(getconf CLK_TCK)
cpu_ticks() { # pid... -> user + system ticks of them all
    local p sum=0
    for p in "$@"; do sum=$((sum + $(awk '{print $14 + $15}' "/proc/$p/stat"))); done
    echo "$sum"
}
audit_seq() { tail -c 65536 "$AUDIT" | tail -n 1 | sed -n 's/^{"seq":\([0-9]*\).*/\1/p'; }

run_pgbench() { # workload target round
    local w=$1 t=$2 r=$3 pid conn out cpu0 cpu1 cpu=- seq0 seq1 audit=- tps lat txns
    pid=$(pid_of "$t")
    conn=$(conn_of "$t")
    out=$RESULTS_DIR/pgbench-$w-$t-$r.log
    # shellcheck disable=SC2086
    [[ -n $pid ]] && cpu0=$(cpu_ticks $pid)
    [[ $t == jitgate || $t == jitgate-agent ]] && seq0=$(audit_seq)
    # shellcheck disable=SC2046
    if ! "$PGBENCH" -n $(args_of "$w") -c "$CLIENTS" -j "$THREADS" -T "$DURATION" "$conn" >"$out" 2>&1; then
        die "pgbench $w against $t failed: $(tail -5 "$out")"
    fi
    if [[ -n $pid ]]; then
        # shellcheck disable=SC2086
        cpu1=$(cpu_ticks $pid)
        cpu=$(awk -v a="$cpu0" -v b="$cpu1" -v hz="$CLK_TCK" 'BEGIN{printf "%.3f", (b - a) / hz}')
    fi
    if [[ $t == jitgate || $t == jitgate-agent ]]; then
        seq1=$(audit_seq)
        audit=$((seq1 - seq0))
    fi
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$out" | head -1)
    txns=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out")
    if [[ $w == connect-* ]]; then
        # Session start: pgbench's average connection time.
        lat=$(sed -n 's/^average connection time = \([0-9.]*\) ms/\1/p' "$out")
    else
        lat=$(sed -n 's/^latency average = \([0-9.]*\) ms/\1/p' "$out")
    fi
    echo "pgbench $w $t $r $DURATION ${tps:--} ${lat:--} ${txns:--} $cpu $audit" | tee -a "$RAW" >&2
}

say "pgbench: ${#WORKLOADS[@]} workloads x ${#TARGETS[@]} targets x $ROUNDS rounds x ${DURATION}s (-c $CLIENTS -j $THREADS)"
for r in $(seq 1 "$ROUNDS"); do
    # Each round starts one target later, so no target always follows the same one.
    n=${#TARGETS[@]} order=()
    for i in $(seq 0 $((n - 1))); do order+=("${TARGETS[$(((i + r - 1) % n))]}"); done
    for w in "${WORKLOADS[@]}"; do
        for t in "${order[@]}"; do
            run_pgbench "$w" "$t" "$r"
        done
    done
done

# Session start, one after another (TLS, startup, the upstream's login, first ReadyForQuery),
# and what one simple query costs at -c 1: pgbench's per-transaction log.
latency_targets=(direct-tls pgbouncer-mtls jitgate jitgate-ephemeral)
((AGENT)) && latency_targets+=(jitgate-agent)
[[ -n ${BASELINE_JITGATE:-} ]] && latency_targets+=(jitgate-base)
connect_args() { # target
    case $1 in
    direct-tls) echo "--addr 127.0.0.1:$PG_PORT --dbname bench --user bench --ca $WORK/pg/ca.crt" ;;
    pgbouncer-mtls) echo "--addr 127.0.0.1:$BOUNCER_MTLS_PORT --dbname bench --user bench --cert $JGD/bench/bench.crt --key $JGD/bench/bench.key --ca $JGD/bench/ca.crt" ;;
    jitgate) echo "--addr 127.0.0.1:${JG_PORTS[0]} --dbname bench-db --user bench --cert $JGD/bench/bench.crt --key $JGD/bench/bench.key --ca $JGD/bench/ca.crt" ;;
    jitgate-ephemeral) echo "--addr 127.0.0.1:${JG_PORTS[0]} --dbname bench-eph --user bench --cert $JGD/bench/bench.crt --key $JGD/bench/bench.key --ca $JGD/bench/ca.crt" ;;
    jitgate-base) echo "--addr 127.0.0.1:${JGB_PORTS[0]} --dbname bench-db --user bench --cert $JGB/bench/bench.crt --key $JGB/bench/bench.key --ca $JGB/bench/ca.crt" ;;
    jitgate-agent) echo "--addr 127.0.0.1:${JG_PORTS[0]} --dbname bench-agent --user bench --cert $JGD/bench/bench.crt --key $JGD/bench/bench.key --ca $JGD/bench/ca.crt" ;;
    esac
}
if ((CONNECTS > 0)); then
    say "session start: $CONNECTS sessions one after another, per target"
    for t in "${latency_targets[@]}"; do
        # shellcheck disable=SC2046
        "$E2E" connect $(connect_args "$t") --n "$CONNECTS" --label "$t" | tee -a "$RAW" >&2
    done
fi
if ((QLAT_SECS > 0)); then
    say "query latency: pgbench -S -M simple -c 1 for ${QLAT_SECS}s, per target"
    for t in "${latency_targets[@]}"; do
        "$PGBENCH" -n -S -M simple -c 1 -j 1 -T "$QLAT_SECS" --log --log-prefix="$WORK/qlat-$t" "$(conn_of "$t")" \
            >"$RESULTS_DIR/qlat-$t.log" 2>&1 || die "pgbench -c 1 against $t failed: $(tail -5 "$RESULTS_DIR/qlat-$t.log")"
        "$E2E" qlat --label "$t" "$WORK/qlat-$t".* | tee -a "$RAW" >&2
        rm -f "$WORK/qlat-$t".*
    done
fi

if [[ $PROFILE == 1 ]]; then
    say "profiling jitgate under pgbench -S -M prepared (${PROFILE_SECS}s)"
    event=cycles
    perf stat -e instructions true 2>&1 | grep -q 'not supported' && event=cpu-clock
    "$PGBENCH" -n -S -M prepared -c "$CLIENTS" -j "$THREADS" -T $((PROFILE_SECS + 2)) "$CONN_JG" \
        >"$RESULTS_DIR/pgbench-profile.log" 2>&1 &
    bench_pid=$!
    sleep 1
    perf record -e "$event" -F 999 --call-graph dwarf,16384 -p "$JG_PID" -o "$RESULTS_DIR/perf.data" \
        -- sleep "$PROFILE_SECS" >/dev/null 2>&1 || say "perf record failed"
    wait "$bench_pid" || true
    if [[ -s $RESULTS_DIR/perf.data ]]; then
        perf report -i "$RESULTS_DIR/perf.data" --no-children --sort symbol --stdio --percent-limit 0.5 \
            -g none 2>/dev/null >"$RESULTS_DIR/perf-self.txt" || true
        perf report -i "$RESULTS_DIR/perf.data" --children --sort symbol --stdio --percent-limit 2 \
            -g none 2>/dev/null >"$RESULTS_DIR/perf-children.txt" || true
        say "profile: $RESULTS_DIR/perf-self.txt, perf-children.txt (event $event)"
    fi
fi

# Idle memory and sever latency: a second jitgate in front of the fake upstream, restarted
# for each measurement so every one starts from a fresh process.
say "fake PostgreSQL upstream on port $FAKE_PORT; second jitgate on port ${JGF_PORTS[0]}"
"$E2E" fake-pg --listen "127.0.0.1:$FAKE_PORT" >"$WORK/fake-pg.log" 2>&1 &
PIDS+=("$!")
wait_port "$FAKE_PORT" fake-pg
JGF=$WORK/jgf
fake_target() {
    printf '[[targets]]\nname = "%s"\naddress = "127.0.0.1:%s"\ndatabase = "fake"\n[targets.credentials.read]\nuser = "bench"\n' \
        "$1" "$FAKE_PORT"
}
fake_agent_target() {
    printf '[[targets]]\nname = "fake-sever-agent"\nvia = "fake-east"\ndatabase = "fake"\n[targets.credentials.read]\nuser = "bench"\n'
}
LISTEN_EXTRA="agents = \"127.0.0.1:$AGENTS_F_PORT\"" setup_jitgate "$JGF" "${JGF_PORTS[0]}" "${JGF_PORTS[1]}" "$(fake_target fake-idle)
$(fake_target fake-sever)
$(fake_agent_target)"
JGF_PID="" JGF_AGENT=0
restart_fake_jitgate() {
    [[ -n $JGF_PID ]] && stop_pid "$JGF_PID"
    start_jitgate "$JGF"
    JGF_PID=$JG_PID_OUT
    wait_port "${JGF_PORTS[0]}" "jitgate (fake upstream)"
    wait_port "${JGF_PORTS[1]}" "jitgate api (fake upstream)"
    # The agent redials the restarted proxy by itself (reconnect_max 1s).
    ((JGF_AGENT)) && wait_agent "$JGF" fake-east
    return 0
}
restart_fake_jitgate
"$JG" grant create --data-dir "$JGF" --user bench --target fake-idle --access read --for 8h \
    --reason "e2e idle sessions" >/dev/null
client_args() { # target n
    echo "--addr 127.0.0.1:${JGF_PORTS[0]} --dbname $1 --user bench --cert $JGF/bench/bench.crt --key $JGF/bench/bench.key --ca $JGF/bench/ca.crt --n $2"
}
for n in $IDLE_SESSIONS; do
    n=$(fit_sessions "$n")
    restart_fake_jitgate
    say "idle memory: $n sessions"
    # shellcheck disable=SC2046
    "$E2E" hold $(client_args fake-idle "$n") --pid "$JGF_PID" | tee -a "$RAW" >&2
done
for n in $SEVER_SESSIONS; do
    n=$(fit_sessions "$n")
    restart_fake_jitgate
    lead=$((5 + n / SEVER_OPEN_RATE))
    say "sever: $n sessions under one grant ending in ${lead}s"
    "$JG" grant create --data-dir "$JGF" --user bench --target fake-sever --access read --for "${lead}s" \
        --reason "e2e sever" --json >"$WORK/sever-grant.json"
    # shellcheck disable=SC2046
    "$E2E" sever $(client_args fake-sever "$n") --grant-json "$WORK/sever-grant.json" | tee -a "$RAW" >&2
    # The same number of sessions cut by one revoke, timed from the start of the CLI call.
    restart_fake_jitgate
    say "sever: $n sessions under one grant, revoked"
    "$JG" grant create --data-dir "$JGF" --user bench --target fake-sever --access read --for 1h \
        --reason "e2e sever by revoke" --json >"$WORK/sever-grant.json"
    grant_id=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["id"])' "$WORK/sever-grant.json")
    # shellcheck disable=SC2046
    "$E2E" sever $(client_args fake-sever "$n") --grant-json "$WORK/sever-grant.json" \
        --probe "$JG grant list --data-dir $JGF" --revoke "$JG grant revoke --data-dir $JGF $grant_id" |
        tee -a "$RAW" >&2
done
if [[ -n $SEVER_AGENT_SESSIONS ]]; then
    say "starting jitgate-agent (loopback) for target fake-sever-agent"
    start_agent "$JGF" "$AGENTS_F_PORT" "$WORK/agent-f" fake-east fake-sever-agent "127.0.0.1:$FAKE_PORT"
    JGF_AGENT=1
fi
for n in $SEVER_AGENT_SESSIONS; do
    n=$(fit_sessions "$n")
    restart_fake_jitgate
    lead=$((5 + n / SEVER_OPEN_RATE))
    say "sever through one agent: $n sessions under one grant ending in ${lead}s"
    "$JG" grant create --data-dir "$JGF" --user bench --target fake-sever-agent --access read --for "${lead}s" \
        --reason "e2e sever through an agent" --json >"$WORK/sever-grant.json"
    # shellcheck disable=SC2046
    "$E2E" sever $(client_args fake-sever-agent "$n") --grant-json "$WORK/sever-grant.json" |
        sed 's/^sever /sever via=agent /' | tee -a "$RAW" >&2
done

# ---------------------------------------------------------------- report
{
    echo "# jitgate e2e benchmark, $(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo
    echo "Command: \`ROUNDS=$ROUNDS DURATION=$DURATION CLIENTS=$CLIENTS THREADS=$THREADS SCALE=$SCALE QUICK=$QUICK benches/e2e.sh\`"
    echo
    echo "Machine: $(nproc) CPUs, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1), Linux $(uname -r)," \
        "$(awk '/MemTotal/ {printf "%.0f GiB RAM", $2 / 1048576}' /proc/meminfo)"
    echo "Versions: PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}')," \
        "pgbouncer $("$PGBOUNCER" --version | head -1 | awk '{print $2}'), $("$JG" --version)," \
        "$(rustc --version 2>/dev/null || echo rustc unknown), git $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo -)"
    echo
    echo "Medians over $ROUNDS rounds of ${DURATION}s, pgbench -c $CLIENTS -j $THREADS, scale $SCALE." \
        "For connect-select (pgbench -C), the latency column is pgbench's average connection time."
    echo
    "$E2E" report "$RAW"
} >"$RESULTS_DIR/RESULTS.md"
cat "$RESULTS_DIR/RESULTS.md"
say "results and raw output in $RESULTS_DIR"
