#!/usr/bin/env bash
# Records real pgbench traffic for the in-process benches (benches/benches/frames.rs):
# a throwaway PostgreSQL (trust, no TLS), a recording TCP relay in front of it, and
# `pgbench -n -c 1 -t 200` through the relay with -S in each -M mode and the TPC-B-like
# script. Writes benches/data/<workload>.trace: every read the relay made after login, in
# order, as [direction: 'F' client or 'B' server][u32 big-endian length][bytes].
#
# Only needed to re-record; the traces are committed. Needs postgresql and python3.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$PWD/benches/data
BIN=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
WORK=$(mktemp -d)
chmod 755 "$WORK"
as_pg() { if [[ $(id -u) == 0 ]]; then runuser -u postgres -- "$@"; else "$@"; fi; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
PGPORT=$(free_port)
[[ $(id -u) == 0 ]] && chown postgres "$WORK"
as_pg "$BIN/initdb" -D "$WORK/db" -A trust -U postgres >/dev/null
as_pg "$BIN/pg_ctl" -D "$WORK/db" -o "-p $PGPORT -k $WORK -c listen_addresses=127.0.0.1" -l "$WORK/pg.log" -w start >/dev/null
trap 'as_pg "$BIN/pg_ctl" -D "$WORK/db" -m immediate stop >/dev/null 2>&1 || true; kill "${RELAY:-0}" 2>/dev/null || true; rm -rf "$WORK"' EXIT
"$BIN/pgbench" -h 127.0.0.1 -p "$PGPORT" -U postgres -i -s 1 -q postgres >/dev/null 2>&1

cat >"$WORK/relay.py" <<'PY'
import asyncio, os, struct, sys
listen_port, pg_port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
counter = 0

async def session(cr, cw):
    global counter
    counter += 1
    n = counter
    sr, sw = await asyncio.open_connection("127.0.0.1", pg_port)
    chunks, state = [], {"live": False, "buf": b""}
    def after_login(data):
        # Startup ends with the server's first ReadyForQuery: record from the next read on.
        state["buf"] += data
        b = state["buf"]
        while len(b) >= 5:
            tag, length = b[0:1], struct.unpack(">I", b[1:5])[0]
            if len(b) < 1 + length:
                break
            b = b[1 + length:]
            if tag == b"Z":
                state["live"] = True
        state["buf"] = b
    async def pump(r, w, d):
        while True:
            data = await r.read(65536)
            if not data:
                w.close()
                return
            if state["live"]:
                chunks.append((d, data))
            elif d == b"B":
                after_login(data)
            w.write(data)
            await w.drain()
    await asyncio.gather(pump(cr, sw, b"F"), pump(sr, cw, b"B"), return_exceptions=True)
    with open(os.path.join(out_dir, f"conn-{n}.trace"), "wb") as f:
        for d, data in chunks:
            f.write(d + struct.pack(">I", len(data)) + data)

async def main():
    server = await asyncio.start_server(session, "127.0.0.1", listen_port)
    async with server:
        await server.serve_forever()
asyncio.run(main())
PY

record() { # name, pgbench args...
    local name=$1; shift
    local port; port=$(free_port)
    rm -rf "$WORK/rec" && mkdir "$WORK/rec"
    python3 "$WORK/relay.py" "$port" "$PGPORT" "$WORK/rec" & RELAY=$!
    sleep 0.5
    PGSSLMODE=disable "$BIN/pgbench" -h 127.0.0.1 -p "$port" -U postgres -n -c 1 -t 200 "$@" postgres >/dev/null
    sleep 0.5
    kill "$RELAY"; wait "$RELAY" 2>/dev/null || true
    # pgbench opens a short connection of its own first; keep the benchmark's (the largest).
    cp "$(ls -S "$WORK"/rec/*.trace | head -1)" "$OUT/$name.trace"
    echo "recorded $OUT/$name.trace ($(stat -c %s "$OUT/$name.trace") bytes)"
}
record select-simple -S -M simple
record select-extended -S -M extended
record select-prepared -S -M prepared
record tpcb-simple -M simple
