#!/usr/bin/env python3
"""scripts/bench.d/bench.py: the unilog benchmark. Run it through `scripts/bench`, which starts the
stack, builds the release binary and sets the environment this file reads.

One fresh database, one WAL, one machine (docs/BENCHMARKS.md explains the method and the figures):

  1. load      N row changes (inserts, updates, deletes) in transactions of 1 to 500 rows, written
               with psql as fast as it goes while no slot is read (a backlog). Both slots, and
               unilog's publication, exist before it.
  2. baseline  pg_recvlogical reads that backlog from its own pgoutput slot (same publication) to
               /dev/null: the rate at which PostgreSQL emits the changes. N / wall time.
  3. backlog   unilog starts on the same backlog and runs until its slot's confirmed_flush_lsn
               covers the last transaction. A follower tails the topic meanwhile, so the time the
               last event became readable at the broker is known to a few ms (the slot moves
               only when unilog sends a status update, once a second).
  4. live      unilog restarted and idle; another N changes are written while it streams.
               Per event: commit -> produced (record timestamp), commit -> readable at the broker
               (follower), commit -> slot confirmed.

Standard library only; PostgreSQL through psql (a long-lived psql session for the 20 ms polls),
Kafka through a minimal Fetch client (read-only). Every wait has a deadline; what the run created
(database, slots, topic, registry subject, temporary files) is removed at the end.
"""

import argparse
import bisect
import datetime
import json
import os
import platform
import random
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))
import pgtools  # noqa: E402
from pgtools import lsn_fmt, lsn_parse, mask, pg_target, with_db  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
DOC = os.path.join(REPO, "docs", "BENCHMARKS.md")
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Targets from the issue: unilog at least half the pg_recvlogical rate, under 150 MB RSS.
TARGET_RATIO = 0.5
TARGET_RSS_MB = 150.0


class BenchError(Exception):
    """A failure that stops the benchmark, with the message to print."""


def log(msg):
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# small helpers


def percentile(pairs, q):
    """Weighted percentile of (value, weight) pairs: the smallest value with at least q of the
    total weight at or below it."""
    if not pairs:
        return None
    pairs = sorted(pairs)
    total = sum(w for _, w in pairs)
    rank = q * total
    seen = 0
    for v, w in pairs:
        seen += w
        if seen >= rank:
            return v
    return pairs[-1][0]


def proc_cpu_seconds(pid):
    """utime + stime of a live process, in seconds; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK
    except (OSError, IndexError, ValueError):
        return None


def quantiles(pairs):
    """p50, p99 and max of (value, weight) pairs."""
    return {"p50": percentile(pairs, 0.50), "p99": percentile(pairs, 0.99),
            "max": max(v for v, _ in pairs)}


def proc_ctx_switches(pid):
    """Voluntary + involuntary context switches of a live process (in the JSON output)."""
    v = proc_status_kb(pid, "voluntary_ctxt_switches")
    nv = proc_status_kb(pid, "nonvoluntary_ctxt_switches")
    return None if v is None or nv is None else v + nv


def proc_status_kb(pid, key):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class Psql(pgtools.Psql):
    error = BenchError


def sql(psql, url, query, timeout=60):
    """One statement with a fresh psql; rows split on '|'."""
    return pgtools.sql(psql, url, query, timeout, BenchError)



# ---------------------------------------------------------------------------------------------
# reading the topic back: a minimal Kafka Fetch (v4) client, standard library only


def _varint(buf, pos):
    """A zigzag varint (Kafka record fields); returns (value, next position)."""
    shift = 0
    raw = 0
    while True:
        b = buf[pos]
        pos += 1
        raw |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
    return (raw >> 1) ^ -(raw & 1), pos


class KafkaConn:
    """One connection to one broker, Fetch v4 only. The benchmark talks to the first broker of
    KAFKA_BROKERS; the local Tansu leads every partition. Tansu answers max_wait 0 with nothing,
    and waits the whole max_wait when there is nothing new, so waits are short and non-zero."""

    def __init__(self, broker, topic, partitions, timeout=30):
        host, port = broker.rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.topic = topic
        self.partitions = partitions
        self.cid = 0

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def _recv(self, n):
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(min(n - len(out), 4 << 20))
            if not chunk:
                raise BenchError("the broker closed the connection during a fetch")
            out += chunk
        return bytes(out)

    def fetch(self, offsets, max_wait_ms):
        """{partition: record-batch bytes} from the given offsets."""
        self.cid += 1
        t = self.topic.encode()
        body = bytearray(struct.pack(">iiiib", -1, max_wait_ms, 1, 64 << 20, 0))
        body += struct.pack(">ih", 1, len(t)) + t + struct.pack(">i", len(offsets))
        for part, off in offsets.items():
            body += struct.pack(">iqi", part, off, 16 << 20)
        msg = struct.pack(">hhih", 1, 4, self.cid, 5) + b"bench" + bytes(body)
        self.sock.sendall(struct.pack(">i", len(msg)) + msg)
        (n,) = struct.unpack(">i", self._recv(4))
        r = self._recv(n)
        if struct.unpack_from(">i", r, 0)[0] != self.cid:
            raise BenchError("Kafka fetch: answer to another request")
        pos = 8  # correlation id, throttle time
        out = {}
        (ntopics,) = struct.unpack_from(">i", r, pos)
        pos += 4
        for _ in range(ntopics):
            (tl,) = struct.unpack_from(">h", r, pos)
            pos += 2 + tl
            (nparts,) = struct.unpack_from(">i", r, pos)
            pos += 4
            for _ in range(nparts):
                part, err, _, _, naborted = struct.unpack_from(">ihqqi", r, pos)
                pos += 26
                if naborted > 0:
                    pos += 16 * naborted
                (rl,) = struct.unpack_from(">i", r, pos)
                pos += 4
                if err:
                    raise BenchError(f"Kafka fetch {self.topic}/{part}: error code {err}")
                if rl > 0:
                    out[part] = r[pos:pos + rl]
                    pos += rl
        return out


def record_batches(recs):
    """(base offset, last offset, record count, position of the first record, end) of each whole
    v2 record batch in a fetch answer."""
    q = 0
    while q + 61 <= len(recs):
        base, blen = struct.unpack_from(">qi", recs, q)
        end = q + 12 + blen
        if end > len(recs):
            return  # a partial batch at the end of the answer
        (_, magic, _, attrs, last_delta, _, _, _, _, _, count) = \
            struct.unpack_from(">ibIhiqqqhii", recs, q + 12)
        if magic != 2 or attrs & 0x07:
            raise BenchError("Kafka fetch: not an uncompressed v2 record batch")
        yield base, base + last_delta, count, q, end
        q = end


class TopicReader:
    """Reads a topic back after a phase: per record its partition, offset, timestamp (CreateTime,
    set by librdkafka when unilog handed the record over) and the commit LSN in its
    `unilog.dedup_id` header. Reads until a fetch brings nothing new: Tansu's high watermark is
    not reliable (docs/INFRA)."""

    def __init__(self, broker, topic, partitions):
        self.conn = KafkaConn(broker, topic, partitions)
        self.next = {p: 0 for p in range(partitions)}

    def close(self):
        self.conn.close()

    def read_new(self):
        """(partition, offset, timestamp ms, commit LSN or None) of each record since last call."""
        out = []
        while True:
            got = False
            for part, recs in self.conn.fetch(dict(self.next), 100).items():
                for base, last, count, q, _ in record_batches(recs):
                    (base_ts,) = struct.unpack_from(">q", recs, q + 27)
                    pos = q + 61
                    for _ in range(count):
                        _, pos = _varint(recs, pos)  # record length
                        pos += 1  # attributes
                        ts_delta, pos = _varint(recs, pos)
                        off_delta, pos = _varint(recs, pos)
                        kl, pos = _varint(recs, pos)
                        pos += max(kl, 0)
                        vl, pos = _varint(recs, pos)
                        pos += max(vl, 0)
                        nh, pos = _varint(recs, pos)
                        lsn = None
                        for _ in range(nh):
                            hk, pos = _varint(recs, pos)
                            key = recs[pos:pos + hk]
                            pos += hk
                            hv, pos = _varint(recs, pos)
                            if key == b"unilog.dedup_id" and hv > 0:
                                # pg/<database>/<commit lsn X/Y>/<ordinal>
                                parts = recs[pos:pos + hv].decode().split("/")
                                if len(parts) >= 5:
                                    lsn = lsn_parse(parts[-3] + "/" + parts[-2])
                            pos += max(hv, 0)
                        offset = base + off_delta
                        if offset >= self.next[part]:
                            out.append((part, offset, base_ts + ts_delta, lsn))
                    if last + 1 > self.next[part]:
                        self.next[part] = last + 1
                        got = True
            if not got:
                return out


class TopicFollower(threading.Thread):
    """Tails the topic during a phase, like a consumer would, and notes when each record batch
    became readable at the broker: with acks=all on one broker that is when Kafka confirmed it,
    give or take the 5 ms fetch wait. Parses batch headers only, to stay cheap."""

    def __init__(self, broker, topic, partitions, start):
        super().__init__(daemon=True)
        self.conn = KafkaConn(broker, topic, partitions)
        self.next = dict(start)
        self.seen = {p: [] for p in start}  # partition -> [(first offset, last offset, time)]
        self.count = 0
        self.last_time = None
        self.error = None
        self.stop_flag = threading.Event()

    def run(self):
        try:
            while not self.stop_flag.is_set():
                answer = self.conn.fetch(dict(self.next), 5)
                now = time.time()
                for part, recs in answer.items():
                    for base, last, _, _, _ in record_batches(recs):
                        first = max(base, self.next[part])
                        if last < first:
                            continue
                        self.seen[part].append((first, last, now))
                        self.count += last - first + 1
                        self.next[part] = last + 1
                        self.last_time = now
        except (OSError, struct.error, BenchError) as e:
            self.error = e
        finally:
            self.conn.close()

    def stop(self):
        self.stop_flag.set()
        self.join(timeout=10)

    def arrival(self, part, offset):
        """When the record at part/offset was first readable, or None."""
        rows = self.seen.get(part, [])
        i = bisect.bisect_right(rows, (offset, float("inf"), float("inf"))) - 1
        if i >= 0 and rows[i][0] <= offset <= rows[i][1]:
            return rows[i][2]
        return None


# ---------------------------------------------------------------------------------------------
# the load generator


class Generator:
    """Writes SQL scripts of mixed transactions against `items`. Keeps a model of the live ids so
    every UPDATE and DELETE hits exactly the rows it names: a script of N changes makes exactly N
    row changes (checked against psql's command tags).

    Transaction sizes: half of them 1-10 rows, 35% 11-100, 15% 101-max (500). Row operations:
    45% inserts, 40% updates, 15% deletes (fewer updates/deletes while the table is small).
    After each transaction's last change: `SELECT 'L', pg_current_wal_insert_lsn()` (a position
    inside the transaction, so "slot confirmed >= L" means this commit was delivered) and after
    COMMIT `SELECT 'T', clock_timestamp()` (when the commit returned to the client)."""

    def __init__(self, seed, max_txn):
        self.rng = random.Random(seed)
        self.max_txn = max_txn
        self.next_id = 1
        self.live = []
        self.txn_no = 0

    def _size(self):
        r = self.rng.random()
        if r < 0.50:
            n = self.rng.randint(1, 10)
        elif r < 0.85:
            n = self.rng.randint(11, 100)
        else:
            n = self.rng.randint(101, max(101, self.max_txn))
        return max(1, min(n, self.max_txn))

    def _take(self, k):
        """Removes k random live ids and returns them."""
        out = []
        for _ in range(k):
            i = self.rng.randrange(len(self.live))
            out.append(self.live[i])
            self.live[i] = self.live[-1]
            self.live.pop()
        return out

    def script(self, changes, synchronous_commit="on", rate=0):
        """SQL text for `changes` row changes; and the sizes of its transactions. With a rate
        (changes/s), pg_sleep keeps the load on that schedule (checked every 10 ms of it)."""
        parts = [f"SET synchronous_commit = {synchronous_commit};"]
        if rate:
            parts.append("SELECT extract(epoch FROM clock_timestamp()) AS bench_t0 \\gset")
        next_pause = 0.01
        sizes = []
        remaining = changes
        while remaining > 0:
            size = min(self._size(), remaining)
            ni = nu = nd = 0
            for _ in range(size):
                r = self.rng.random()
                if r < 0.45:
                    ni += 1
                elif r < 0.85:
                    nu += 1
                else:
                    nd += 1
            short = nu + nd - len(self.live)
            if short > 0:
                cut = min(nd, short)
                nd -= cut
                nu -= short - cut
                ni += short
            self.txn_no += 1
            chosen = self._take(nu + nd)
            upd, dele = chosen[:nu], chosen[nu:]
            parts.append("BEGIN;")
            if ni:
                a = self.next_id
                b = a + ni - 1
                self.next_id = b + 1
                parts.append(
                    "INSERT INTO items (id, account_id, status, amount, payload, updated_at) "
                    "SELECT g, g % 5000, 'new', ((g * 7919) % 100000) / 100.0, "
                    "jsonb_build_object('sku', 'SKU-' || g, 'qty', g % 7, 'channel', 'web', "
                    "'note', repeat('x', (20 + g % 80)::int), 'tags', jsonb_build_array('a', 'b')), "
                    f"now() FROM generate_series({a}::bigint, {b}::bigint) g;"
                )
            if upd:
                ids = ",".join(map(str, upd))
                parts.append(
                    "UPDATE items SET status = (ARRAY['paid','shipped','refunded'])[1 + id % 3], "
                    f"amount = amount + 1, payload = payload || jsonb_build_object('rev', {self.txn_no}), "
                    f"updated_at = now() WHERE id = ANY('{{{ids}}}'::bigint[]);"
                )
            if dele:
                ids = ",".join(map(str, dele))
                parts.append(f"DELETE FROM items WHERE id = ANY('{{{ids}}}'::bigint[]);")
            # live ids after this transaction: the new rows join, deleted ones are gone already
            self.live.extend(range(self.next_id - ni, self.next_id))
            self.live.extend(upd)
            parts.append("SELECT 'L', pg_current_wal_insert_lsn();")
            parts.append("COMMIT;")
            parts.append("SELECT 'T', extract(epoch FROM clock_timestamp());")
            sizes.append(size)
            remaining -= size
            due = (changes - remaining) / rate if rate else 0
            if rate and due >= next_pause:
                parts.append(f"SELECT pg_sleep(greatest(0, :bench_t0 + {due:.4f} "
                             "- extract(epoch FROM clock_timestamp())));")
                next_pause = due + 0.01
        return "\n".join(parts) + "\n", sizes


def parse_load_output(text, sizes, changes):
    """(L, T, rows) per transaction from psql's output of a generator script; checks counts."""
    txns = []
    rows = 0
    cur_l = None
    for line in text.splitlines():
        if line.startswith("INSERT 0 "):
            rows += int(line.split()[2])
        elif line.startswith("UPDATE ") or line.startswith("DELETE "):
            rows += int(line.split()[1])
        elif line.startswith("L|"):
            cur_l = lsn_parse(line[2:])
        elif line.startswith("T|"):
            if cur_l is None:
                raise BenchError("load output: a commit time without a position")
            txns.append((cur_l, float(line[2:]), rows))
            rows = 0
            cur_l = None
    if len(txns) != len(sizes):
        raise BenchError(f"load: {len(txns)} transactions committed, {len(sizes)} written")
    done = sum(t[2] for t in txns)
    if done != changes or any(t[2] != s for t, s in zip(txns, sizes)):
        raise BenchError(f"load: psql reported {done} row changes, expected {changes}")
    return txns


# ---------------------------------------------------------------------------------------------
# the benchmark


class Bench:
    def __init__(self, args):
        self.args = args
        self.env = os.environ
        self.psql = os.path.join(self.env.get("PG_BIN", "/usr/lib/postgresql/15/bin"), "psql")
        self.recvlogical = os.path.join(os.path.dirname(self.psql), "pg_recvlogical")
        if not os.path.exists(self.psql):
            self.psql = shutil.which("psql") or self.psql
            self.recvlogical = shutil.which("pg_recvlogical") or self.recvlogical
        self.unilog = self.env["UNILOG_BIN"]
        self.pg_url = self.env["PG_URL"]
        self.admin_url = self.env["PG_ADMIN_URL"]
        self.brokers = self.env["KAFKA_BROKERS"]
        self.registry = self.env["SCHEMA_REGISTRY_URL"].rstrip("/")
        sfx = "".join(random.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))
        self.sfx = sfx
        self.db = f"bench_{sfx}"
        self.name = f"bench_{sfx}"
        self.unilog_slot = f"unilog_{self.name}"
        self.publication = f"unilog_{self.name}"
        self.base_slot = f"bench_{sfx}_base"
        self.topic = f"bench.items.{sfx}"
        self.db_url = with_db(self.pg_url, self.db)
        self.db_admin_url = with_db(self.admin_url, self.db)
        self.tmp = tempfile.mkdtemp(prefix=f"unilog-bench-{sfx}-")
        self.children = []  # Popen objects we started and must not leave behind
        self.created_db = False
        self.unilog_runs = 0
        self.warnings = []
        self.reader = None
        self.reader_failed = False

    # -- setup -------------------------------------------------------------------------------

    def setup(self):
        a = self.args
        log(f"database {self.db}, slots {self.unilog_slot} (unilog) and {self.base_slot} "
            f"(pg_recvlogical), publication {self.publication}, topic {self.topic}")
        owner = urllib.parse.urlsplit(self.pg_url).username or "unilog"
        sql(self.psql, self.admin_url, f'CREATE DATABASE {self.db} OWNER "{owner}"')
        self.created_db = True
        sql(self.psql, self.db_url, """
            CREATE TABLE items (
              id bigint PRIMARY KEY,
              account_id bigint NOT NULL,
              status text NOT NULL,
              amount numeric(12,2) NOT NULL,
              payload jsonb NOT NULL,
              updated_at timestamptz NOT NULL DEFAULT now())""")
        with open(os.path.join(self.tmp, "items.yaml"), "w") as f:
            f.write(f"table: public.items\ntopic: {self.topic}\n"
                    "events: {insert: ItemAdded, update: ItemChanged, delete: ItemRemoved}\n")
        cfg = os.path.join(self.tmp, "bench.yaml")
        fd = os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds a password
        with os.fdopen(fd, "w") as f:
            f.write(f"""name: {self.name}
source:
  postgres:
    url: {json.dumps(self.db_url)}
    snapshot: never
kafka:
  brokers: {json.dumps(self.brokers)}
  partitions: {a.partitions}
schema_registry:
  url: {json.dumps(self.registry)}
mappings: [items.yaml]
state_dir: state
""")
        self.config = cfg
        # unilog creates its publication and slot; then the baseline slot: both exist before
        # the load, so both see the same WAL.
        log("first unilog start: creates its publication and slot")
        p, logf = self.start_unilog("setup")
        deadline = time.monotonic() + a.timeout
        while True:
            rows = sql(self.psql, self.admin_url,
                       f"SELECT active FROM pg_replication_slots WHERE slot_name = '{self.unilog_slot}'")
            if rows and rows[0][0] == "t":
                break
            self.check_alive(p, logf)
            if time.monotonic() > deadline:
                raise BenchError(f"unilog did not open slot {self.unilog_slot} within {a.timeout}s")
            time.sleep(0.1)
        self.stop_unilog(p, logf)
        sql(self.psql, self.db_admin_url,
            f"SELECT pg_create_logical_replication_slot('{self.base_slot}', 'pgoutput')")

    # -- unilog process ----------------------------------------------------------------------

    def start_unilog(self, tag):
        self.unilog_runs += 1
        logf = os.path.join(self.tmp, f"unilog-{self.unilog_runs}-{tag}.log")
        env = dict(os.environ)
        env.pop("RUST_LOG", None)
        with open(logf, "w") as err:
            p = subprocess.Popen(
                [self.unilog, "--log-format", "json", "run", "--config", self.config],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=self.tmp,
                env=env,
                start_new_session=True,
            )
        self.children.append(p)
        return p, logf

    def check_alive(self, p, logf):
        if p.poll() is not None:
            raise BenchError(f"unilog exited with status {p.returncode} before the end of the phase:\n"
                             + self.tail(logf))

    @staticmethod
    def tail(path, n=15):
        try:
            with open(path) as f:
                return "".join(f.readlines()[-n:]) or "(its log is empty)"
        except OSError:
            return "(no log)"

    def stop_unilog(self, p, logf):
        """SIGTERM, wait for the drain; returns the fields of the "stopped cleanly" line."""
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=self.args.stop_timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise BenchError(f"unilog did not stop within {self.args.stop_timeout}s of SIGTERM:\n"
                             + self.tail(logf))
        if p.returncode != 0:
            raise BenchError(f"unilog exited with status {p.returncode}:\n" + self.tail(logf))
        stopped = None
        with open(logf) as f:
            for line in f:
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                fields = obj.get("fields", {})
                if fields.get("message") == "stopped cleanly":
                    stopped = fields
        if stopped is None:
            raise BenchError("unilog exited 0 without a \"stopped cleanly\" line:\n" + self.tail(logf))
        return stopped

    # -- load --------------------------------------------------------------------------------

    def flush_wal(self):
        """Waits until the WAL of the load is flushed: a walsender only sends flushed WAL, and
        with synchronous_commit=off the WAL writer may take seconds (when it hibernated). A
        transaction with an xid, committed synchronously (in the postgres database, so no slot
        of the benchmark decodes it) flushes everything before it."""
        insert = sql(self.psql, self.admin_url, "SELECT pg_current_wal_insert_lsn()")[0][0]
        sql(self.psql, self.admin_url,
            "SET synchronous_commit = on; SELECT pg_current_xact_id()")
        deadline = time.monotonic() + 30
        while sql(self.psql, self.admin_url,
                  f"SELECT pg_current_wal_flush_lsn() >= '{insert}'::pg_lsn")[0][0] != "t":
            if time.monotonic() > deadline:
                raise BenchError(f"the WAL was not flushed up to {insert} within 30 s")
            time.sleep(0.02)

    def run_load(self, script, tag):
        path = os.path.join(self.tmp, f"load-{tag}.sql")
        with open(path, "w") as f:
            f.write(script)
        out_path = os.path.join(self.tmp, f"load-{tag}.out")
        with open(out_path, "w") as out:
            t0 = time.time()
            target, env = pg_target(self.db_url)
            p = subprocess.Popen(
                [self.psql, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-f", path, target],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE,
                env=env, start_new_session=True)
            self.children.append(p)
        return p, t0, out_path

    def finish_load(self, p, out_path, sizes, timeout):
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.communicate()
            raise BenchError(f"the load did not finish within {timeout}s") from None
        t1 = time.time()
        if p.returncode != 0:
            raise BenchError(f"the load failed (psql exit {p.returncode}): {err.decode(errors='replace').strip()[-2000:]}")
        with open(out_path) as f:
            txns = parse_load_output(f.read(), sizes, self.args.changes)
        return t1, txns

    # -- phases ------------------------------------------------------------------------------

    def baseline(self, end_lsn):
        """pg_recvlogical over the backlog to /dev/null; stops on the first message past end_lsn,
        which is the last transaction's commit (end_lsn is a position inside it)."""
        a = self.args
        poll = Psql(self.psql, self.admin_url)
        try:
            target, env = pg_target(self.db_url)
            cmd = [self.recvlogical, "-d", target, "--slot", self.base_slot, "--start",
                   "-o", "proto_version=1", "-o", f"publication_names={self.publication}",
                   "--endpos", lsn_fmt(end_lsn), "-f", "/dev/null"]
            t0 = time.time()
            p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, start_new_session=True, env=env)
            self.children.append(p)
            wal_pid = None
            wal_cpu = None
            wal_ctx = None
            client_cpu = None
            deadline = time.monotonic() + a.timeout
            while True:
                pid, wstatus, ru = os.wait4(p.pid, os.WNOHANG)
                if pid:
                    t1 = time.time()
                    p.returncode = os.waitstatus_to_exitcode(wstatus)
                    client_cpu = ru.ru_utime + ru.ru_stime
                    break
                if time.monotonic() > deadline:
                    p.kill()
                    p.wait()
                    raise BenchError(f"pg_recvlogical did not reach {lsn_fmt(end_lsn)} within {a.timeout}s")
                if wal_pid is None:
                    rows = poll.query(f"SELECT coalesce(active_pid, 0) FROM pg_replication_slots "
                                      f"WHERE slot_name = '{self.base_slot}'")
                    if rows and rows[0][0] != "0":
                        wal_pid = int(rows[0][0])
                if wal_pid:
                    c = proc_cpu_seconds(wal_pid)
                    if c is not None:
                        wal_cpu = c
                        wal_ctx = proc_ctx_switches(wal_pid)
                time.sleep(0.01)
            err = p.stderr.read()
            if p.returncode != 0:
                raise BenchError(f"pg_recvlogical failed (exit {p.returncode}): {err.decode(errors='replace').strip()}")
        finally:
            poll.close()
        secs = t1 - t0
        return {"seconds": secs, "rate": a.changes / secs, "walsender_cpu_s": wal_cpu,
                "walsender_ctx_switches": wal_ctx, "client_cpu_s": client_cpu}

    def stream_phase(self, tag, txns_known=None, live=None):
        """Starts unilog and polls its slot every poll_ms until it confirmed the load's last
        transaction. Meanwhile a follower tails the topic (when --no-follow is not given).

        Backlog: txns_known holds the load's transactions (committed before unilog starts).
        Live: live=(script, sizes); the load starts once unilog has streamed idle for --settle s."""
        a = self.args
        n = a.changes
        tansu_pid = self.env.get("TANSU_PID")
        poll = Psql(self.psql, self.admin_url)
        perf = None
        follower = None
        try:
            q = (f"SELECT active, coalesce(active_pid, 0), coalesce(confirmed_flush_lsn::text, '0/0') "
                 f"FROM pg_replication_slots WHERE slot_name = '{self.unilog_slot}'")
            start_lsn = lsn_parse(poll.query(q)[0][2])
            if not a.no_follow:
                follower = self.start_follower()
            tansu_cpu0 = proc_cpu_seconds(tansu_pid) if tansu_pid else None
            t_start = time.time()
            p, logf = self.start_unilog(tag)
            samples = []  # (time, confirmed lsn)
            t_active = None
            wal_pid = None
            wal_cpu = None
            wal_ctx = None
            deadline = time.monotonic() + a.timeout
            load = None
            txns = txns_known
            end = txns[-1][0] if txns else None
            t_load0 = t_load1 = None
            while True:
                rows = poll.query(q)
                now = time.time()
                if not rows:
                    raise BenchError(f"slot {self.unilog_slot} disappeared")
                active, pid, conf = rows[0]
                conf = lsn_parse(conf)
                samples.append((now, conf))
                if active == "t" and t_active is None:
                    t_active = now
                    wal_pid = int(pid) or None
                    if a.perf and tag == "backlog":
                        perf = self.start_perf(p.pid)
                if wal_pid:
                    c = proc_cpu_seconds(wal_pid)
                    if c is not None:
                        wal_cpu = c
                        wal_ctx = proc_ctx_switches(wal_pid)
                self.check_alive(p, logf)
                if live is not None and load is None and t_active is not None \
                        and now - t_active >= a.settle:
                    script, sizes = live
                    log(f"live: unilog has streamed for {a.settle:g} s, starting the load")
                    lp, t_load0, out_path = self.run_load(script, "live")
                    load = (lp, out_path, sizes)
                if load is not None and txns is None and load[0].poll() is not None:
                    t_load1, txns = self.finish_load(load[0], load[1], load[2], 1)
                    end = txns[-1][0]
                if end is not None and conf >= end:
                    t_done = now
                    break
                if time.monotonic() > deadline:
                    where = lsn_fmt(end) if end else "the end of the load"
                    if load is not None and txns is None:
                        load[0].kill()
                    raise BenchError(f"{tag}: unilog's slot reached {lsn_fmt(conf)}, not {where}, "
                                     f"within {a.timeout:g} s\n" + self.tail(logf))
                time.sleep(max(0.0, a.poll_ms / 1000 - (time.time() - now)))
            rss_hwm = proc_status_kb(p.pid, "VmHWM")
            rss_now = proc_status_kb(p.pid, "VmRSS")
            cpu = proc_cpu_seconds(p.pid)
            tansu_cpu = (proc_cpu_seconds(tansu_pid) - tansu_cpu0) if tansu_cpu0 is not None else None
            if follower is not None:
                # every record is confirmed, so readable: give the follower a moment to see it
                wait_until = time.monotonic() + 5
                while follower.count < n and follower.error is None and time.monotonic() < wait_until:
                    time.sleep(0.01)
                follower.stop()
            if perf is not None:
                self.stop_perf(perf)
            stopped = self.stop_unilog(p, logf)
        finally:
            poll.close()
            if follower is not None:
                follower.stop()
        records = self.read_topic()
        published = int(stopped.get("published", -1))
        if published != n:
            raise BenchError(f"{tag}: unilog published {published} events, the load made {n} changes")
        res = {
            "start_lsn": lsn_fmt(start_lsn),
            "end_lsn": lsn_fmt(end),
            "startup_s": t_active - t_start,
            "seconds_total": t_done - t_start,
            "seconds_streaming": t_done - t_active,
            "rss_hwm_mb": rss_hwm / 1024 if rss_hwm else None,
            "rss_end_mb": rss_now / 1024 if rss_now else None,
            "unilog_cpu_s": cpu,
            "walsender_cpu_s": wal_cpu,
            "walsender_ctx_switches": wal_ctx,
            "tansu_cpu_s": tansu_cpu,
            "published": published,
            "internal_latency": {k: stopped[k] for k in
                                 ("latency_samples", "latency_p50_ms", "latency_p99_ms") if k in stopped},
        }
        # confirmed_flush_lsn moves when unilog sends a standby status update (one a second at
        # most): the gaps between its moves say how coarse the "slot confirmed" times are.
        steps = [t for (t, l), (_, l0) in zip(samples[1:], samples) if l != l0]
        gaps = [y - x for x, y in zip(steps, steps[1:])]
        res["status_update_gap_s"] = max(gaps) if gaps else None
        t_from = t_active if live is None else t_load0
        if follower is not None:
            res["follower_records"] = follower.count
            if follower.error is not None:
                self.warnings.append(f"{tag}: the topic follower failed: {follower.error}")
            elif follower.count != n:
                self.warnings.append(f"{tag}: the topic follower saw {follower.count} records, expected {n}")
            elif follower.last_time is not None:
                res["broker_last_s"] = follower.last_time - t_start
                res["rate_broker"] = n / (follower.last_time - t_from)
                res["rate_broker_total"] = n / (follower.last_time - t_start)
        if records is not None:
            res["kafka_records"] = len(records)
            if len(records) != n:
                self.warnings.append(f"{tag}: {len(records)} records in {self.topic}, expected {n}")
        if records:
            last = max(r[2] for r in records) / 1000.0
            res["produced_last_s"] = last - t_start
            res["rate_produced"] = n / (last - t_from)
        if live is None:
            res["rate_total"] = n / res["seconds_total"]
            res["rate_streaming"] = n / res["seconds_streaming"]
        else:
            res["load_s"] = t_load1 - t_load0
            res["load_rate"] = n / (t_load1 - t_load0)
            res["seconds_live"] = t_done - t_load0
            res["rate_live"] = n / (t_done - t_load0)
            res["transactions"] = len(txns)
            lat = []
            i = 0
            for l_pos, t_commit, rows in txns:
                while i < len(samples) and samples[i][1] < l_pos:
                    i += 1
                if i == len(samples):
                    raise BenchError("live: a transaction was never seen confirmed")
                lat.append(((samples[i][0] - t_commit) * 1000.0, rows))
            res["confirm_ms"] = quantiles(lat)
            if records:
                self.record_latencies(res, records, txns, follower)
        if perf is not None:
            res["perf"] = self.perf_report()
        return res

    def record_latencies(self, res, records, txns, follower):
        """Per event: commit -> produced (record timestamp) and commit -> readable at the broker
        (the follower's arrival time), from the commit LSN in each record's dedup id."""
        ls = [t[0] for t in txns]
        produced, at_broker = [], []
        unknown = 0
        for part, offset, ts, lsn in records:
            i = bisect.bisect_right(ls, lsn) - 1 if lsn is not None else -1
            if i < 0:
                unknown += 1
                continue
            t_commit = txns[i][1]
            produced.append((ts - t_commit * 1000.0, 1))
            if follower is not None and follower.error is None:
                arrived = follower.arrival(part, offset)
                if arrived is not None:
                    at_broker.append(((arrived - t_commit) * 1000.0, 1))
        if unknown:
            self.warnings.append(f"live: {unknown} records whose commit is not one of the load's; "
                                 "no per-event latency")
            return
        res["produced_ms"] = quantiles(produced)
        if at_broker and len(at_broker) == len(records):
            res["broker_ms"] = quantiles(at_broker)

    def start_follower(self):
        try:
            if self.reader is None and not self.reader_failed:
                self.reader = TopicReader(self.brokers.split(",")[0].strip(), self.topic,
                                          self.args.partitions)
            start = dict(self.reader.next) if self.reader else {p: 0 for p in range(self.args.partitions)}
            f = TopicFollower(self.brokers.split(",")[0].strip(), self.topic, self.args.partitions, start)
        except (OSError, BenchError) as e:
            self.warnings.append(f"cannot follow {self.topic}: {e}")
            return None
        f.start()
        return f

    def start_perf(self, pid):
        if not shutil.which("perf"):
            self.warnings.append("--perf: perf is not installed")
            return None
        perf = subprocess.Popen(
            ["perf", "record", "-F", "499", "-g", "-p", str(pid), "-o", os.path.join(self.tmp, "perf.data")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        self.children.append(perf)
        return perf

    @staticmethod
    def stop_perf(perf):
        perf.send_signal(signal.SIGINT)
        try:
            perf.wait(timeout=60)
        except subprocess.TimeoutExpired:
            perf.kill()
            perf.wait()

    def read_topic(self):
        """The records the phase added to the topic, or None when they cannot be read."""
        if self.reader_failed:
            return None
        try:
            if self.reader is None:
                self.reader = TopicReader(self.brokers.split(",")[0].strip(), self.topic,
                                          self.args.partitions)
            return self.reader.read_new()
        except (OSError, struct.error, IndexError, UnicodeDecodeError, ValueError, BenchError) as e:
            self.warnings.append(f"could not read {self.topic} back, no Kafka-side figures: {e}")
            self.reader_failed = True
            return None

    def perf_report(self):
        data = os.path.join(self.tmp, "perf.data")
        try:
            r = subprocess.run(["perf", "report", "-i", data, "--stdio", "--no-children",
                                "--sort", "dso,symbol", "--percent-limit", "1.5", "-g", "none"],
                               capture_output=True, text=True, timeout=300)
        except subprocess.TimeoutExpired:
            return "(perf report timed out)"
        keep = os.path.join(self.args.perf_out or self.tmp, f"perf-{self.sfx}.txt")
        os.makedirs(os.path.dirname(keep), exist_ok=True)
        try:
            inclusive = subprocess.run(
                ["perf", "report", "-i", data, "--stdio", "--children", "--sort", "symbol",
                 "--percent-limit", "4", "-g", "none"],
                capture_output=True, text=True, timeout=300).stdout
        except subprocess.TimeoutExpired:
            inclusive = "(timed out)"
        with open(keep, "w") as f:
            f.write("# self time by dso,symbol\n" + r.stdout + "\n# inclusive time (children) by symbol\n"
                    + inclusive)
        if self.args.perf_out:
            shutil.copy(data, os.path.join(self.args.perf_out, f"perf-{self.sfx}.data"))
        lines = [re.sub(r"(\s+-)+\s*$", "", l).rstrip() for l in r.stdout.splitlines()
                 if l.strip() and not l.startswith("#")]
        return {"file": keep, "top": lines[:25]}

    # -- cleanup -----------------------------------------------------------------------------

    def cleanup(self):
        problems = []
        for p in self.children:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                    p.wait(timeout=self.args.stop_timeout)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if self.reader is not None:
            self.reader.close()
        if self.args.keep:
            log(f"--keep: left database {self.db}, slots, topic {self.topic} and {self.tmp}")
            return problems
        for slot in (self.base_slot, self.unilog_slot):
            try:
                deadline = time.monotonic() + 15
                while True:
                    rows = sql(self.psql, self.admin_url,
                               f"SELECT active, coalesce(active_pid, 0) FROM pg_replication_slots "
                               f"WHERE slot_name = '{slot}'")
                    if not rows:
                        break
                    if rows[0][0] == "t":
                        if time.monotonic() > deadline:
                            raise BenchError(f"slot {slot} still active")
                        sql(self.psql, self.admin_url, f"SELECT pg_terminate_backend({rows[0][1]})")
                        time.sleep(0.2)
                        continue
                    sql(self.psql, self.admin_url, f"SELECT pg_drop_replication_slot('{slot}')")
                    break
            except BenchError as e:
                problems.append(f"dropping slot {slot}: {e}")
        if self.created_db:
            try:
                sql(self.psql, self.admin_url, f"DROP DATABASE IF EXISTS {self.db} WITH (FORCE)")
            except BenchError as e:
                problems.append(f"dropping database {self.db}: {e}")
        tansu = self.env.get("TANSU_BIN")
        if tansu and self.unilog_runs:
            broker = self.brokers.split(",")[0]
            try:
                r = subprocess.run([tansu, "topic", "delete", "--broker", f"tcp://{broker}", self.topic],
                                   capture_output=True, text=True, timeout=30)
                if r.returncode != 0:
                    # fine when unilog never created it
                    listed = subprocess.run([tansu, "topic", "list", "--broker", f"tcp://{broker}"],
                                            capture_output=True, text=True, timeout=30)
                    if listed.returncode != 0 or f'"{self.topic}"' in listed.stdout:
                        problems.append(f"deleting topic {self.topic}: "
                                        f"{(r.stderr or r.stdout).strip() or f'exit {r.returncode}'}")
            except (OSError, subprocess.TimeoutExpired) as e:
                problems.append(f"deleting topic {self.topic}: {e}")
        elif self.unilog_runs:
            self.warnings.append(f"topic {self.topic} left on {self.brokers} (not the local Tansu)")
        if self.unilog_runs:
            subject = urllib.parse.quote(f"{self.topic}-value", safe="")
            for suffix in ("", "?permanent=true"):
                req = urllib.request.Request(f"{self.registry}/subjects/{subject}{suffix}", method="DELETE")
                try:
                    urllib.request.urlopen(req, timeout=10).read()
                except urllib.error.HTTPError as e:
                    if e.code != 404:
                        problems.append(f"deleting subject {self.topic}-value: HTTP {e.code}")
                except OSError as e:
                    problems.append(f"deleting subject {self.topic}-value: {e}")
        shutil.rmtree(self.tmp, ignore_errors=True)
        return problems


# ---------------------------------------------------------------------------------------------
# report


def machine_info(b):
    info = {"nproc": os.cpu_count()}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    info["ram_gb"] = int(line.split()[1]) / 1024 / 1024
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["kernel"] = platform.release()
    try:
        with open("/proc/loadavg") as f:
            info["loadavg"] = " ".join(f.read().split()[:3])
    except OSError:
        pass

    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return "?"

    info["postgres"] = sql(b.psql, b.admin_url, "SHOW server_version")[0][0]
    info["pg_settings"] = ", ".join(
        f"{k}={v}" for k, v in sql(b.psql, b.admin_url,
                                   "SELECT name, setting FROM pg_settings WHERE name IN "
                                   "('synchronous_commit','fsync','wal_level','logical_decoding_work_mem','wal_writer_delay') "
                                   "ORDER BY name"))
    info["pg_recvlogical"] = run([b.recvlogical, "--version"])
    info["unilog"] = run([b.unilog, "--version"])
    git = run(["git", "-C", REPO, "rev-parse", "--short", "HEAD"])
    dirty = run(["git", "-C", REPO, "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"])
    info["git"] = git + (" + uncommitted src" if dirty else "")
    tansu = b.env.get("TANSU_BIN")
    info["broker"] = (os.path.basename(tansu) + " (memory storage)") if tansu else f"external {b.brokers}"
    info["rustc"] = run(["rustc", "--version"])
    rows = sql(b.psql, b.admin_url, "SELECT count(*) FROM pg_stat_replication")
    info["other_walsenders"] = int(rows[0][0])
    return info


def fmt(v, spec=",.0f", none="n/a"):
    return none if v is None else format(v, spec)


def pair(a, b, spec=",.0f"):
    return f"{fmt(a, spec)} / {fmt(b, spec)}"


def internal_latency(live):
    il = live["internal_latency"]
    if "latency_p50_ms" in il:
        return pair(il["latency_p50_ms"], il["latency_p99_ms"])
    return "not logged"


def lat(live, key):
    q = live.get(key)
    return f"{q['p50']:,.0f} / {q['p99']:,.0f} / {q['max']:,.0f}" if q else "n/a"


def ratio(x, base):
    return "n/a" if x is None else f"{x / base:.2f}"


def headline(back):
    """The backlog rate the targets are checked against: last event readable at the broker, from
    the slot going active; the slot-confirmed rate when the topic could not be followed."""
    if back.get("rate_broker"):
        return back["rate_broker"], "last event at the broker"
    return back["rate_streaming"], "slot confirmed"


def summary_rows(r):
    base, back, live = r["baseline"], r["backlog"], r["live"]
    return [
        ("pg_recvlogical changes/s", fmt(base["rate"])),
        ("unilog backlog events/s, last event at broker: from start / from slot active",
         pair(back.get("rate_broker_total"), back.get("rate_broker"))),
        ("unilog backlog events/s, slot confirmed: from start / from slot active",
         pair(back["rate_total"], back["rate_streaming"])),
        ("unilog backlog events/s, last event produced (from slot active)", fmt(back.get("rate_produced"))),
        ("ratio unilog/pg_recvlogical, at broker from slot active (slot confirmed)",
         f"{ratio(back.get('rate_broker'), base['rate'])} ({ratio(back['rate_streaming'], base['rate'])})"),
        ("unilog live events/s: at broker / slot confirmed (load written at)",
         f"{pair(live.get('rate_broker'), live['rate_live'])} ({fmt(live['load_rate'])})"),
        ("live latency ms, commit -> at broker: p50 / p99 / max", lat(live, "broker_ms")),
        ("live latency ms, commit -> produced: p50 / p99 / max", lat(live, "produced_ms")),
        ("live latency ms, commit -> slot confirmed: p50 / p99 / max", lat(live, "confirm_ms")),
        ("live latency ms, commit -> Kafka ack, unilog's log: p50 / p99", internal_latency(live)),
        ("unilog peak RSS MB: backlog / live", pair(back["rss_hwm_mb"], live["rss_hwm_mb"])),
        ("unilog start-up s (process start -> slot active)", fmt(back["startup_s"], ".2f")),
        ("CPU s, baseline: pg_recvlogical / walsender",
         pair(base.get("client_cpu_s"), base["walsender_cpu_s"], ".1f")),
        ("CPU s, backlog: unilog / walsender / tansu",
         f"{fmt(back['unilog_cpu_s'], '.1f')} / {fmt(back['walsender_cpu_s'], '.1f')} / {fmt(back['tansu_cpu_s'], '.1f')}"),
        ("CPU s, live: unilog / walsender / tansu",
         f"{fmt(live['unilog_cpu_s'], '.1f')} / {fmt(live['walsender_cpu_s'], '.1f')} / {fmt(live['tansu_cpu_s'], '.1f')}"),
        ("events read back from the topic: backlog / live",
         pair(back.get("kafka_records"), live.get("kafka_records"))),
    ]


def summary_table(r):
    rows = summary_rows(r)
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{w}}  {v}" for k, v in rows)


def verdicts(r):
    rate, how = headline(r["backlog"])
    x = rate / r["baseline"]["rate"]
    rss = max(r["backlog"]["rss_hwm_mb"], r["live"]["rss_hwm_mb"])
    return [
        (f"throughput: unilog {x:.2f}x pg_recvlogical ({how}, from slot active; "
         f"target >= {TARGET_RATIO})", x >= TARGET_RATIO),
        (f"memory: peak RSS {rss:.0f} MB (target < {TARGET_RSS_MB:.0f} MB)", rss < TARGET_RSS_MB),
    ]


HISTORY_START = "<!-- bench:history:start -->"
HISTORY_END = "<!-- bench:history:end -->"
LATEST_START = "<!-- bench:latest:start -->"
LATEST_END = "<!-- bench:latest:end -->"
HISTORY_HEADER = (
    "| date (UTC) | commit | options | pg_recvlogical changes/s | unilog backlog events/s: at broker "
    "(slot confirmed) | ratio | unilog live events/s: at broker (load rate) | "
    "commit→at broker p50 / p99 ms | commit→Kafka ack p50 / p99 ms (unilog) | "
    "peak RSS MB | load avg at start |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|\n"
)


def history_row(r):
    m, base, back, live = r["machine"], r["baseline"], r["backlog"], r["live"]
    rate, _ = headline(back)
    bl = live.get("broker_ms")
    return (f"| {r['date']} | {m['git']} | {r['options'] or 'defaults'} | {fmt(base['rate'])} | "
            f"{fmt(back.get('rate_broker'))} ({fmt(back['rate_streaming'])}) | "
            f"{ratio(rate, base['rate'])} | "
            f"{fmt(live.get('rate_broker'))} ({fmt(live['load_rate'])}) | "
            f"{pair(bl['p50'], bl['p99']) if bl else 'n/a'} | {internal_latency(live)} | "
            f"{fmt(max(back['rss_hwm_mb'], live['rss_hwm_mb']))} | {m.get('loadavg', '?')} |\n")


def latest_block(r):
    m = r["machine"]
    lines = [
        f"Last run: {r['date']} UTC, `{('scripts/bench ' + r['options']).strip()}`",
        "",
        f"- machine: {m['nproc']} cores ({m.get('cpu', '?')}), {m.get('ram_gb', 0):.1f} GB RAM, "
        f"Linux {m['kernel']}; load average at start {m.get('loadavg', '?')}, "
        f"{m['other_walsenders']} other walsender(s) active on the cluster at start",
        f"- versions: {m['unilog']} (git {m['git']}, release build), {m['rustc']}; PostgreSQL "
        f"{m['postgres']} ({m['pg_settings']}); {m['pg_recvlogical']}; broker {m['broker']}; "
        f"schema registry: the repo's stand-in",
        f"- load: {r['changes']:,} row changes per phase in {r['backlog_txns']:,} (backlog) and "
        f"{r['live']['transactions']:,} (live) transactions; backlog load written in "
        f"{r['load_backlog_s']:.1f} s ({r['changes'] / r['load_backlog_s']:,.0f} changes/s)",
        "",
        "```",
        summary_table(r),
        "```",
        "",
    ]
    for text, ok in verdicts(r):
        lines.append(f"- {'met' if ok else '**MISSED**'}: {text}")
    return "\n".join(lines) + "\n"


def update_doc(r):
    if os.path.exists(DOC):
        with open(DOC) as f:
            doc = f.read()
    else:
        os.makedirs(os.path.dirname(DOC), exist_ok=True)
        doc = (f"# Benchmarks\n\nWritten by `scripts/bench`.\n\n## Latest run\n\n{LATEST_START}\n"
               f"{LATEST_END}\n\n## History\n\n{HISTORY_START}\n{HISTORY_HEADER}{HISTORY_END}\n")
    if LATEST_START in doc and LATEST_END in doc:
        a, rest = doc.split(LATEST_START, 1)
        _, b = rest.split(LATEST_END, 1)
        doc = a + LATEST_START + "\n" + latest_block(r) + LATEST_END + b
    if HISTORY_START in doc and HISTORY_END in doc:
        a, rest = doc.split(HISTORY_START, 1)
        body, b = rest.split(HISTORY_END, 1)
        if "|---" not in body:
            body = "\n" + HISTORY_HEADER
        doc = a + HISTORY_START + body + history_row(r) + HISTORY_END + b
    tmp = DOC + ".tmp"
    with open(tmp, "w") as f:
        f.write(doc)
    os.replace(tmp, DOC)


# ---------------------------------------------------------------------------------------------


MEASUREMENT_OPTIONS = ("changes", "max_txn", "live_rate", "synchronous_commit", "partitions",
                       "settle", "no_follow", "perf")


def measurement_options(args):
    """The options that change what is measured, as they would be typed (defaults left out)."""
    defaults = {"changes": 200_000, "max_txn": 500, "live_rate": 0, "synchronous_commit": "on",
                "partitions": 3, "settle": 2.0, "no_follow": False, "perf": False}
    out = []
    for name in MEASUREMENT_OPTIONS:
        v = getattr(args, name)
        if v == defaults[name]:
            continue
        flag = "--" + name.replace("_", "-")
        out.append(flag if isinstance(v, bool) else f"{flag} {v:g}" if isinstance(v, float) else f"{flag} {v}")
    return " ".join(out)


def cleanup_stale(psql, admin_url):
    """Drops what an interrupted (SIGKILLed) bench left: inactive bench slots, bench databases."""
    rows = sql(psql, admin_url,
               r"SELECT slot_name FROM pg_replication_slots WHERE NOT active AND "
               r"(slot_name ~ '^bench_[a-z0-9]{8}_base$' OR slot_name ~ '^unilog_bench_[a-z0-9]{8}$')")
    for (slot,) in rows:
        log(f"dropping stale slot {slot}")
        sql(psql, admin_url, f"SELECT pg_drop_replication_slot('{slot}')")
    rows = sql(psql, admin_url,
               r"SELECT d.datname FROM pg_database d WHERE d.datname ~ '^bench_[a-z0-9]{8}$' "
               r"AND NOT EXISTS (SELECT 1 FROM pg_replication_slots s WHERE s.database = d.datname)")
    for (db,) in rows:
        log(f"dropping stale database {db}")
        sql(psql, admin_url, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def main():
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--changes", type=int, default=200_000, help="row changes per phase (200000)")
    ap.add_argument("--max-txn", type=int, default=500, help="largest transaction, rows (500)")
    ap.add_argument("--seed", type=int, default=None, help="generator seed (random)")
    ap.add_argument("--live-rate", type=float, default=0,
                    help="live phase: write the load at this many changes/s (0: as fast as it goes)")
    ap.add_argument("--synchronous-commit", choices=("on", "off"), default="on",
                    help="the load's synchronous_commit (on: the walsender sees each commit at once; "
                         "off, the stack's default, adds up to wal_writer_delay to the live latency)")
    ap.add_argument("--partitions", type=int, default=3, help="partitions of the topic (3)")
    ap.add_argument("--poll-ms", type=float, default=20, help="slot poll interval, ms (20)")
    ap.add_argument("--settle", type=float, default=2.0,
                    help="live phase: seconds unilog streams idle before the load (2)")
    ap.add_argument("--timeout", type=float, default=600, help="limit of each wait, s (600)")
    ap.add_argument("--stop-timeout", type=float, default=60, help="limit for unilog to stop, s (60)")
    ap.add_argument("--no-follow", action="store_true",
                    help="do not tail the topic during the phases (no broker-side figures)")
    ap.add_argument("--no-doc", action="store_true", help="do not update docs/BENCHMARKS.md")
    ap.add_argument("--json", metavar="FILE", help="also write the raw results as JSON to FILE")
    ap.add_argument("--perf", action="store_true",
                    help="record a perf profile of unilog during the backlog phase")
    ap.add_argument("--perf-out", metavar="DIR", help="where to keep the perf report (temp dir)")
    ap.add_argument("--keep", action="store_true", help="leave database, slots, topic, files")
    ap.add_argument("--fail-on-miss", action="store_true",
                    help="exit 3 when a target (ratio >= 0.5, RSS < 150 MB) is missed")
    ap.add_argument("--cleanup-stale", action="store_true",
                    help="drop inactive bench_* slots and databases of interrupted runs, then exit")
    args = ap.parse_args(sys.argv[1:])
    if args.changes < 1 or args.max_txn < 1:
        ap.error("--changes and --max-txn must be at least 1")

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)

    for var in ("UNILOG_BIN", "PG_URL", "PG_ADMIN_URL", "KAFKA_BROKERS", "SCHEMA_REGISTRY_URL"):
        if not os.environ.get(var):
            log(f"error: {var} is not set; run this through scripts/bench")
            return 2

    if args.cleanup_stale:
        psql = os.path.join(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"), "psql")
        cleanup_stale(psql, os.environ["PG_ADMIN_URL"])
        return 0

    b = Bench(args)
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    status = 0
    results = None
    try:
        machine = machine_info(b)
        b.setup()

        gen = Generator(seed, args.max_txn)
        script1, sizes1 = gen.script(args.changes, args.synchronous_commit)
        script2, sizes2 = gen.script(args.changes, args.synchronous_commit, args.live_rate)
        log(f"load: {args.changes:,} changes in {len(sizes1):,} transactions (seed {seed})")
        p, t0, out = b.run_load(script1, "backlog")
        t1, txns1 = b.finish_load(p, out, sizes1, args.timeout)
        end1 = txns1[-1][0]
        log(f"load: written in {t1 - t0:.1f} s; last transaction after {lsn_fmt(end1)}")
        b.flush_wal()

        log("baseline: pg_recvlogical over the backlog")
        base = b.baseline(end1)
        log(f"baseline: {base['seconds']:.2f} s, {base['rate']:,.0f} changes/s")

        log("backlog: unilog over the same backlog")
        back = b.stream_phase("backlog", txns_known=txns1)
        log(f"backlog: slot confirmed {back['seconds_streaming']:.2f} s after it went active "
            f"({back['rate_streaming']:,.0f} events/s); last event at the broker after "
            f"{fmt(back.get('rate_broker') and args.changes / back['rate_broker'], '.2f')} s "
            f"({fmt(back.get('rate_broker'))} events/s)")

        log("live: unilog restarted, load written while it streams")
        live = b.stream_phase("live", live=(script2, sizes2))
        log(f"live: {fmt(live.get('rate_broker'))} events/s at the broker (load written at "
            f"{live['load_rate']:,.0f}/s); commit -> at broker p50/p99/max {lat(live, 'broker_ms')} ms")

        results = {
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
            "options": measurement_options(args),
            "changes": args.changes,
            "seed": seed,
            "machine": machine,
            "backlog_txns": len(txns1),
            "load_backlog_s": t1 - t0,
            "baseline": base,
            "backlog": back,
            "live": live,
        }
    except BenchError as e:
        log(f"error: {e}")
        status = 1
    except KeyboardInterrupt:
        log("interrupted")
        status = 130
    finally:
        problems = b.cleanup()
        for w in b.warnings:
            log(f"warning: {w}")
        for pr in problems:
            log(f"cleanup failed: {pr}")
        if problems and status == 0:
            status = 1

    if results is None:
        return status
    print()
    print(f"unilog benchmark, {results['date']} UTC, {args.changes:,} changes per phase "
          f"({results['machine']['nproc']} cores, load average {results['machine'].get('loadavg')})")
    print(summary_table(results))
    if "perf" in results["backlog"]:
        pr = results["backlog"]["perf"]
        print(f"\nperf profile of unilog during the backlog phase ({pr['file'] if isinstance(pr, dict) else ''}):")
        for line in (pr["top"] if isinstance(pr, dict) else [pr]):
            print("  " + line)
    missed = False
    for text, ok in verdicts(results):
        print(f"  {'met' if ok else 'MISSED'}: {text}")
        missed |= not ok
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2, default=str)
    if not args.no_doc:
        update_doc(results)
        print(f"\nupdated {os.path.relpath(DOC, os.getcwd())}")
    if missed and args.fail_on_miss and status == 0:
        status = 3
    return status


if __name__ == "__main__":
    sys.exit(main())
