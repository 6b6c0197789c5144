#!/usr/bin/env python3
"""Builds the committed seed corpora in fuzz/seeds/<target>/ from recorded traffic.

Sources:
- benches/data/*.trace: recorded pgbench sessions (benches/record-traffic.sh), every read
  after login as [b'F' client | b'B' server][u32 big-endian length][bytes]. Client reads
  seed `frontend` (a few reads and every distinct message), server reads seed `scanner`
  (single reads and runs of reads, behind the target's 4 chunking bytes), and the SQL texts
  of Query and Parse messages seed `classify`.
- fuzz/recorded/startup/*.bin: the first message of real psql and pgbench connections
  (plain, sslmode=require, a cancel), recorded with `seeds.py --record-startup` (needs the
  PostgreSQL client binaries). Seed `startup`.
- tests/data/splitter/*.sql: the splitter's differential corpus. Seed `classify`.
- deploy/examples/jitgate.toml and a config in the shape the test harness writes. Seed
  `config`.
- `scram`: server-first / server-final messages in PostgreSQL's format for the target's fixed
  client nonce, computed here with hashlib (a third implementation beside the client and the
  target's checker).

Seeds are named by the SHA-1 of their content, as libFuzzer names corpus files. Run from
anywhere; rewrites fuzz/seeds/.
"""
import base64
import hashlib
import hmac
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading

FUZZ = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(FUZZ)
SEEDS = os.path.join(FUZZ, "seeds")
RECORDED = os.path.join(FUZZ, "recorded", "startup")


def reads(path):
    data = open(path, "rb").read()
    out, at = [], 0
    while len(data) - at >= 5:
        d, n = data[at : at + 1], struct.unpack(">I", data[at + 1 : at + 5])[0]
        out.append((d, data[at + 5 : at + 5 + n]))
        at += 5 + n
    return out


def messages(buf):
    at = 0
    while len(buf) - at >= 5:
        n = struct.unpack(">I", buf[at + 1 : at + 5])[0]
        yield buf[at : at + 1 + n]
        at += 1 + n


def write(target, data):
    d = os.path.join(SEEDS, target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, hashlib.sha1(data).hexdigest()), "wb") as f:
        f.write(data)


def traces():
    names = sorted(f for f in os.listdir(os.path.join(ROOT, "benches", "data")) if f.endswith(".trace"))
    for name in names:
        rs = reads(os.path.join(ROOT, "benches", "data", name))
        client = [b for d, b in rs if d == b"F"]
        server = [b for d, b in rs if d == b"B"]
        for b in client[:3]:
            write("frontend", b)
        kinds, shapes = {}, set()
        for b in client:
            for m in messages(b):
                kinds.setdefault(m[:1], m)
                sql = None
                if m[:1] == b"Q":
                    sql = m[5:-1]
                elif m[:1] == b"P":
                    sql = m[5:].split(b"\0")[1]
                # One text per shape: pgbench repeats its statements with other numbers.
                key = bytes(b"0"[0] if c in b"0123456789" else c for c in sql or b"")
                if sql is not None and key not in shapes:
                    shapes.add(key)
                    write("classify", sql)
        for m in kinds.values():
            write("frontend", m)
        # 4 bytes choose the chunking; vary them so seeds cover short and long reads.
        for i, b in enumerate(server[:3]):
            write("scanner", struct.pack("<I", 0x9E3779B9 * (i + 1) & 0xFFFFFFFF) + b)
        write("scanner", struct.pack("<I", 7) + b"".join(server[:8]))


def record_startup():
    """Records the first message of real client connections into fuzz/recorded/startup/."""
    os.makedirs(RECORDED, exist_ok=True)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    port = sock.getsockname()[1]
    got = []

    def serve():
        while True:
            try:
                c, _ = sock.accept()
            except OSError:
                return
            c.settimeout(5)
            head = c.recv(4)
            if len(head) < 4:
                c.close()
                continue
            n = struct.unpack(">I", head)[0]
            body = b""
            while len(body) < n - 4:
                chunk = c.recv(n - 4 - len(body))
                if not chunk:
                    break
                body += chunk
            got.append(head + body)
            if body[:4] == struct.pack(">I", 80877103):
                c.sendall(b"N")  # no TLS: libpq with sslmode=prefer goes on in plaintext
                continue_startup(c, got)
            c.close()

    def continue_startup(c, got):
        head = c.recv(4)
        if len(head) == 4:
            n = struct.unpack(">I", head)[0]
            got.append(head + c.recv(n - 4))

    threading.Thread(target=serve, daemon=True).start()
    env = dict(os.environ, PGCONNECT_TIMEOUT="3", PGPASSWORD="x")
    base = f"host=127.0.0.1 port={port} user=alice dbname=prod-db"
    for args in (
        ["psql", base + " sslmode=disable application_name=psql", "-c", "SELECT 1"],
        ["psql", base + " sslmode=prefer", "-c", "SELECT 1"],
        ["pgbench", "-h", "127.0.0.1", "-p", str(port), "-U", "alice", "-n", "-t", "1", "prod-db"],
    ):
        subprocess.run(args, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=20)
    sock.close()
    for m in got:
        with open(os.path.join(RECORDED, hashlib.sha1(m).hexdigest() + ".bin"), "wb") as f:
            f.write(m)
    print(f"recorded {len(got)} startup messages in {RECORDED}")


def startup():
    for f in sorted(os.listdir(RECORDED)):
        write("startup", open(os.path.join(RECORDED, f), "rb").read())
    # The three fixed-size requests, as libpq sends them.
    write("startup", struct.pack(">II", 8, 80877103))
    write("startup", struct.pack(">II", 8, 80877104))
    write("startup", struct.pack(">IIii", 16, 80877102, 4242, -559038737))


def scram():
    client_nonce = "fyko+d2lbbFgONRv9qkxdawL"  # fuzz_targets/scram.rs CLIENT_NONCE
    password = b"pencil"
    for salt, iterations, server_nonce in (
        (bytes(range(16)), 4096, "3rfcNHYJY1ZVvWVs7j"),
        (b"salt-of-jit_rdr!", 1, "QWxhZGRpbg+/="),
    ):
        nonce = client_nonce + server_nonce
        first = f"r={nonce},s={base64.b64encode(salt).decode()},i={iterations}"
        salted = hashlib.pbkdf2_hmac("sha256", password, salt, iterations)
        without_proof = f"c=biws,r={nonce}"
        auth = f"n=,r={client_nonce},{first},{without_proof}".encode()
        server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
        signature = base64.b64encode(hmac.new(server_key, auth, hashlib.sha256).digest())
        # Mode 0: the input's own final message, here the right one; mode 1: the target's.
        write("scram", b"\0" + first.encode() + b"\xff" + b"v=" + signature)
        write("scram", b"\0" + first.encode() + b"\xff" + b"e=invalid-proof")
        write("scram", b"\3" + first.encode() + b"\xffx=extension")


def classify():
    d = os.path.join(ROOT, "tests", "data", "splitter")
    for f in sorted(os.listdir(d)):
        write("classify", open(os.path.join(d, f), "rb").read())
    for sql in (
        "BEGIN; UPDATE t SET a = 1 WHERE id = 2; COMMIT",
        "CREATE ROLE r LOGIN PASSWORD 'secret'; ALTER USER r PASSWORD 'x",
        "SET ROLE admin; SET search_path = public, \"$user\"; RESET ALL; DISCARD ALL",
        "COPY t TO STDOUT; COPY t FROM PROGRAM 'id'",
        "WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d",
    ):
        write("classify", sql.encode())


def config():
    write("config", open(os.path.join(ROOT, "deploy", "examples", "jitgate.toml"), "rb").read())
    write(
        "config",
        b'''data_dir = "/tmp/jitgate-fuzz"
[listen]
postgres = "127.0.0.1:0"
api = "127.0.0.1:0"
metrics = "127.0.0.1:0"
[limits]
handshake_timeout = "10s"
shutdown_grace = "2s"

[[targets]]
name = "prod-db"
kind = "postgres"
address = "127.0.0.1:5432"
database = "app"
labels = { env = "prod" }
[targets.credentials.read]
user = "jit_reader"
[targets.credentials.write]
user = "jit_writer"
[[targets.guardrails]]
access = ["write", "admin"]
deny_kinds = ["drop", "truncate", "alter_system", "copy_program"]
deny_unfiltered_writes = true
''',
    )


def agent_hello():
    """The agent link's hello lines: a run, a join, a refusal, a bare token."""
    token = b"jgj1.at-0a1b.c2VjcmV0." + b"0123456789abcdef" * 4
    write("agent_hello", b'{"kind":"run","v":1,"targets":["prod-db"],"version":"0.1.0"}')
    write(
        "agent_hello",
        b'{"kind":"join","v":1,"token":"' + token + b'","csr":"-----BEGIN CERTIFICATE REQUEST-----\\nMIIB\\n'
        b'-----END CERTIFICATE REQUEST-----\\n","version":"0.1.0"}',
    )
    write("agent_hello", b'{"v":1,"error":"join token already used","permanent":true}')
    write("agent_hello", token)


def sftp():
    """SFTP exchanges as the sftp target reads them: [u16 client length][client][server]."""

    def pkt(kind, rid, *fields):
        body = bytes([kind]) + (struct.pack(">I", rid) if rid is not None else b"") + b"".join(fields)
        return struct.pack(">I", len(body)) + body

    def s(b):
        return struct.pack(">I", len(b)) + b

    def u32(n):
        return struct.pack(">I", n)

    def u64(n):
        return struct.pack(">Q", n)

    def ok(rid):
        return pkt(101, rid, u32(0), s(b"Success"), s(b""))

    def seed(client, server):
        write("sftp", struct.pack(">H", len(client)) + client + server)

    init = pkt(1, None, u32(3))
    version = pkt(2, None, u32(3), s(b"posix-rename@openssh.com"), s(b"1"))
    # An upload: open for write, two writes, close.
    seed(
        init
        + pkt(3, 1, s(b"/tmp/up.bin"), u32(0x1A), u32(0))
        + pkt(6, 2, s(b"0"), u64(0), s(b"x" * 64))
        + pkt(6, 3, s(b"0"), u64(64), s(b"y" * 32))
        + pkt(4, 4, s(b"0")),
        version + pkt(102, 1, s(b"0")) + ok(2) + ok(3) + ok(4),
    )
    # A download: open for read, a read answered with data, then EOF, close.
    seed(
        init
        + pkt(3, 1, s(b"/etc/hosts"), u32(1), u32(0))
        + pkt(5, 2, s(b"7"), u64(0), u32(32768))
        + pkt(5, 3, s(b"7"), u64(100), u32(32768))
        + pkt(4, 4, s(b"7")),
        version + pkt(102, 1, s(b"7")) + pkt(103, 2, s(b"z" * 100)) + pkt(101, 3, u32(1), s(b"EOF"), s(b"")) + ok(4),
    )
    # Renames (plain and posix-rename), remove, mkdir, rmdir, symlink, an unknown extension.
    seed(
        pkt(18, 1, s(b"/a"), s(b"/b"))
        + pkt(200, 2, s(b"posix-rename@openssh.com"), s(b"/b"), s(b"/c"))
        + pkt(13, 3, s(b"/c"))
        + pkt(14, 4, s(b"/d"), u32(0))
        + pkt(15, 5, s(b"/d"))
        + pkt(20, 6, s(b"/target"), s(b"/link"))
        + pkt(200, 7, s(b"copy-data"), s(b"0"), u64(0), u64(0), s(b"1"), u64(0))
        + pkt(200, 8, s(b"vendor@example.com"), s(b"/x")),
        ok(1) + ok(2) + pkt(101, 3, u32(2), s(b"No such file"), s(b"")) + ok(4) + ok(5) + ok(6) + ok(7) + ok(8),
    )


def main():
    if "--record-startup" in sys.argv:
        record_startup()
    if os.path.isdir(SEEDS):
        shutil.rmtree(SEEDS)
    traces()
    startup()
    scram()
    classify()
    config()
    agent_hello()
    sftp()
    for t in sorted(os.listdir(SEEDS)):
        files = os.listdir(os.path.join(SEEDS, t))
        size = sum(os.path.getsize(os.path.join(SEEDS, t, f)) for f in files)
        print(f"{t}: {len(files)} seeds, {size} bytes")


main()
