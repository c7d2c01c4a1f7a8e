#!/usr/bin/env python3
"""scripts/crash-test.d/crash.py: unilog's crash test. Run it through `scripts/crash-test`, which
starts the stack, builds unilog and sets the environment this file reads (UNILOG_BIN, PG_URL,
PG_ADMIN_URL, KAFKA_BROKERS, SCHEMA_REGISTRY_URL, PG_BIN, TANSU_BIN).

  1. setup     a fresh database `crash_<sfx>` with a table `items` holding --snapshot-rows rows; a
               pipeline `crash_<sfx>` (snapshot: initial) onto a fresh topic `crash.items.<sfx>`.
               unilog starts and copies the rows (the initial snapshot); the test waits until the
               checkpoint says `snapshot_complete`.
  2. load+kill a writer (one `psql -f` process) writes --changes row changes (inserts, updates,
               deletes; transactions of 1 to 500 rows) at a pace that spreads them over the kill
               schedule. Meanwhile unilog is SIGKILLed --kills times, each time a random delay
               (seeded) after its start, and restarted at once. The writer's psql output (command
               tags, and WAL positions read just before and just after each COMMIT) says exactly
               which row changes committed, and brackets each transaction's commit LSN.
  3. catch-up  once the writer is done, unilog runs until its slot's confirmed_flush_lsn covers the
               last transaction, then gets SIGTERM and must exit 0 ("stopped cleanly").
  4. verify    every record of the topic is read back (confluent_kafka, from the beginning; values
               decoded with the registry): no committed change is missing (per transaction, every
               ordinal is there), every repeated dedup id repeats the same key and value bytes, and
               folding the events per key in partition order (last event wins, deletes remove)
               gives exactly the rows of the table.

Every wait has a deadline; the database, slot, topic, registry subject and work directory are
removed at the end (--keep leaves them). On FAIL the work directory (unilog logs, load script and
output, records.tsv, report.json) is always kept.
"""

import argparse
import bisect
import datetime
import hashlib
import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))
import pgtools  # noqa: E402
from pgtools import lsn_fmt, lsn_parse, mask, pg_target, with_db  # noqa: E402

try:
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroDeserializer
    from confluent_kafka.serialization import MessageField, SerializationContext
except ImportError as e:  # run through scripts/crash-test, which uses the stack's venv
    if "--help" not in sys.argv and "-h" not in sys.argv:
        sys.exit(f"crash-test: cannot import confluent_kafka ({e}); run scripts/crash-test")

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


class TestError(Exception):
    """A failure that stops the test, with the message to print."""


def log(msg):
    print(f"crash-test: {msg}", file=sys.stderr, flush=True)


class Psql(pgtools.Psql):
    error = TestError


def sql(psql, url, query, timeout=60):
    """One statement with a fresh psql; rows split on '|'."""
    return pgtools.sql(psql, url, query, timeout, TestError)



# ---------------------------------------------------------------------------------------------
# the load


class Generator:
    """SQL of mixed transactions against `items`, from a seed. A model of the live ids makes every
    UPDATE and DELETE hit exactly the rows it names. Sizes: half of the transactions 1-10 rows, 35%
    11-100, 15% 101-500; rows 45% inserts, 40% updates, 15% deletes. One transaction in ten with
    inserts also updates its new rows again (two events of one key inside one transaction).
    Around each COMMIT: `SELECT 'L', pg_current_wal_insert_lsn()` before, `'P'` after: the
    commit LSN lies in [L, P], so a dedup id's LSN names its transaction, and "slot confirmed >= L"
    means the commit was acknowledged."""

    def __init__(self, rng, first_id):
        self.rng = rng
        self.next_id = first_id
        self.live = list(range(1, first_id))
        self.txn_no = 0

    def _size(self):
        r = self.rng.random()
        if r < 0.50:
            return self.rng.randint(1, 10)
        if r < 0.85:
            return self.rng.randint(11, 100)
        return self.rng.randint(101, 500)

    def _take(self, k):
        out = []
        for _ in range(k):
            i = self.rng.randrange(len(self.live))
            out.append(self.live[i])
            self.live[i] = self.live[-1]
            self.live.pop()
        return out

    def script(self, changes, rate):
        parts = ["SET synchronous_commit = on;",
                 "SELECT extract(epoch FROM clock_timestamp()) AS crash_t0 \\gset"]
        planned = []
        done = 0
        next_pause = 0.01
        while done < changes:
            size = min(self._size(), changes - done)
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
            again = ni > 0 and self.rng.random() < 0.10 and done + size + ni <= changes
            self.txn_no += 1
            chosen = self._take(nu + nd)
            upd, dele = chosen[:nu], chosen[nu:]
            parts.append("BEGIN;")
            if ni:
                a, b = self.next_id, self.next_id + ni - 1
                self.next_id = b + 1
                parts.append(
                    "INSERT INTO items (id, account_id, status, amount, payload, rev, updated_at) "
                    "SELECT g, g % 5000, 'new', ((g * 7919) % 100000) / 100.0, "
                    "jsonb_build_object('sku', 'SKU-' || g, 'qty', g % 7, "
                    "'note', repeat('x', (20 + g % 80)::int)), "
                    f"{self.txn_no}, clock_timestamp() FROM generate_series({a}::bigint, {b}::bigint) g;")
            if upd:
                ids = ",".join(map(str, upd))
                parts.append(
                    "UPDATE items SET status = (ARRAY['paid','shipped','refunded'])[1 + id % 3], "
                    f"amount = amount + 1, payload = payload || jsonb_build_object('rev', {self.txn_no}), "
                    f"rev = {self.txn_no}, updated_at = clock_timestamp() "
                    f"WHERE id = ANY('{{{ids}}}'::bigint[]);")
            if dele:
                ids = ",".join(map(str, dele))
                parts.append(f"DELETE FROM items WHERE id = ANY('{{{ids}}}'::bigint[]);")
            if again:
                parts.append(
                    f"UPDATE items SET status = 'checked', rev = -{self.txn_no}, updated_at = clock_timestamp() "
                    f"WHERE id BETWEEN {self.next_id - ni} AND {self.next_id - 1};")
            self.live.extend(range(self.next_id - ni, self.next_id))
            self.live.extend(upd)
            n = size + (ni if again else 0)
            parts.append("SELECT 'L', pg_current_wal_insert_lsn();")
            parts.append("COMMIT;")
            parts.append("SELECT 'P', pg_current_wal_insert_lsn();")
            planned.append(n)
            done += n
            due = done / rate
            if due >= next_pause:
                parts.append(f"SELECT pg_sleep(greatest(0, :crash_t0 + {due:.4f} "
                             "- extract(epoch FROM clock_timestamp())));")
                next_pause = due + 0.01
        return "\n".join(parts) + "\n", planned


def parse_load_output(text, planned):
    """[(L, P, rows)] per committed transaction, from psql's command tags and position lines."""
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
        elif line.startswith("P|"):
            if cur_l is None:
                raise TestError("load output: a position after COMMIT without one before it")
            txns.append((cur_l, lsn_parse(line[2:]), rows))
            rows = 0
            cur_l = None
    if len(txns) != len(planned):
        raise TestError(f"load: {len(txns)} transactions committed, {len(planned)} written")
    bad = [i for i, (t, n) in enumerate(zip(txns, planned)) if t[2] != n]
    if bad:
        raise TestError(f"load: psql's command tags differ from the plan in {len(bad)} transactions "
                        f"(first: #{bad[0]}: {txns[bad[0]][2]} rows, planned {planned[bad[0]]})")
    return txns


# ---------------------------------------------------------------------------------------------
# the test


class CrashTest:
    def __init__(self, args, seed):
        self.args = args
        self.seed = seed
        self.rng = random.Random(seed)
        env = os.environ
        self.psql = os.path.join(env.get("PG_BIN", "/usr/lib/postgresql/15/bin"), "psql")
        if not os.path.exists(self.psql):
            self.psql = shutil.which("psql") or self.psql
        self.unilog = env["UNILOG_BIN"]
        self.pg_url = env["PG_URL"]
        self.admin_url = env["PG_ADMIN_URL"]
        self.brokers = env["KAFKA_BROKERS"]
        self.registry = env["SCHEMA_REGISTRY_URL"].rstrip("/")
        # the names come from the OS's randomness, not the seed: two runs with one seed do not clash
        sfx = "".join(random.SystemRandom().choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(8))
        self.sfx = sfx
        self.db = f"crash_{sfx}"
        self.name = f"crash_{sfx}"
        self.slot = f"unilog_{self.name}"
        self.publication = f"unilog_{self.name}"
        self.topic = f"crash.items.{sfx}"
        self.db_url = with_db(self.pg_url, self.db)
        self.tmp = tempfile.mkdtemp(prefix=f"unilog-crash-{sfx}-")
        self.children = []
        self.created_db = False
        self.unilog_runs = 0
        self.runs = []  # per unilog process: dict(start, end, how, rc, log)
        self.poll = None
        self.warnings = []

    # -- unilog processes ----------------------------------------------------------------------

    def start_unilog(self):
        self.unilog_runs += 1
        logf = os.path.join(self.tmp, f"unilog-{self.unilog_runs:02d}.log")
        env = dict(os.environ)
        env.pop("RUST_LOG", None)
        with open(logf, "w") as err:
            p = subprocess.Popen([self.unilog, "--log-format", "json", "run", "--config", self.config],
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                 cwd=self.tmp, env=env, start_new_session=True)
        self.children.append(p)
        run = {"n": self.unilog_runs, "pid": p.pid, "start": time.monotonic(), "log": logf}
        self.runs.append(run)
        return p, run

    @staticmethod
    def tail(path, n=12):
        try:
            with open(path) as f:
                return "".join(f.readlines()[-n:]) or "(its log is empty)\n"
        except OSError:
            return "(no log)\n"

    @staticmethod
    def last_error(path):
        """The message of the last ERROR line of a JSON log, or None."""
        msg = None
        try:
            with open(path) as f:
                for line in f:
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        continue
                    if obj.get("level") == "ERROR":
                        fields = obj.get("fields", {})
                        msg = fields.get("error") or fields.get("message") or line.strip()
        except OSError:
            pass
        return msg

    def slot_state(self):
        rows = self.poll.query(f"SELECT active, coalesce(confirmed_flush_lsn::text, '0/0') "
                               f"FROM pg_replication_slots WHERE slot_name = '{self.slot}'")
        if not rows:
            return False, 0
        return rows[0][0] == "t", lsn_parse(rows[0][1])

    def reap_unexpected(self, p, run):
        """When unilog exited by itself: note it, and start a new one (a supervisor would)."""
        if p.poll() is None:
            return p, run
        run["end"] = time.monotonic()
        run["how"] = "exited"
        run["rc"] = p.returncode
        run["error"] = self.last_error(run["log"])
        log(f"unilog run {run['n']} exited by itself with status {p.returncode} after "
            f"{run['end'] - run['start']:.1f} s: {run['error'] or '(no error line)'}; restarting")
        if sum(1 for r in self.runs if r.get("how") == "exited") > 2 * self.args.kills + 10:
            raise TestError("unilog keeps exiting by itself; last log:\n" + self.tail(run["log"]))
        time.sleep(0.5)
        return self.start_unilog()

    def kill(self, p, run):
        active, conf = self.slot_state()
        os.kill(p.pid, signal.SIGKILL)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            raise TestError(f"unilog pid {p.pid} did not die within 30 s of SIGKILL") from None
        run["end"] = time.monotonic()
        run["how"] = "SIGKILL" if p.returncode == -signal.SIGKILL else "exited"
        run["rc"] = p.returncode
        run["slot_active"] = active
        run["confirmed"] = lsn_fmt(conf)
        run["events_logged"] = self.published_so_far(run["log"])
        if run["how"] != "SIGKILL":
            run["error"] = self.last_error(run["log"])

    @staticmethod
    def published_so_far(path):
        """The last `published` count of a run's progress lines, if any."""
        n = None
        try:
            with open(path) as f:
                for line in f:
                    if '"published"' in line:
                        try:
                            n = json.loads(line).get("fields", {}).get("published", n)
                        except ValueError:
                            pass
        except OSError:
            pass
        return n

    def stop_unilog(self, p, run, timeout=90):
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            raise TestError(f"unilog did not stop within {timeout}s of SIGTERM:\n" + self.tail(run["log"]))
        run["end"] = time.monotonic()
        run["how"] = "SIGTERM"
        run["rc"] = p.returncode
        stopped = None
        with open(run["log"]) as f:
            for line in f:
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                if obj.get("fields", {}).get("message") == "stopped cleanly":
                    stopped = obj["fields"]
        return p.returncode, stopped

    # -- phases --------------------------------------------------------------------------------

    def setup(self):
        a = self.args
        log(f"database {self.db}, slot {self.slot}, topic {self.topic}, work dir {self.tmp}")
        owner = urllib.parse.urlsplit(self.pg_url).username or "unilog"
        sql(self.psql, self.admin_url, f'CREATE DATABASE {self.db} OWNER "{owner}"')
        self.created_db = True
        sql(self.psql, self.db_url, f"""
            CREATE TABLE items (
              id bigint PRIMARY KEY,
              account_id bigint NOT NULL,
              status text NOT NULL,
              amount numeric(12,2) NOT NULL,
              payload jsonb NOT NULL,
              rev bigint NOT NULL,
              updated_at timestamptz NOT NULL);
            INSERT INTO items SELECT g, g % 5000, 'old', (g % 1000) / 10.0,
              jsonb_build_object('sku', 'SKU-' || g, 'qty', g % 7), 0, clock_timestamp()
              FROM generate_series(1, {a.snapshot_rows}) g""")
        with open(os.path.join(self.tmp, "items.yaml"), "w") as f:
            f.write(f"table: public.items\ntopic: {self.topic}\n"
                    "events: {insert: ItemAdded, update: ItemChanged, delete: ItemRemoved, "
                    "snapshot: ItemImported}\n")
        cfg = os.path.join(self.tmp, "crash.yaml")
        fd = os.open(cfg, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds a password
        with os.fdopen(fd, "w") as f:
            f.write(f"""name: {self.name}
source:
  postgres:
    url: {json.dumps(self.db_url)}
    snapshot: initial
kafka:
  brokers: {json.dumps(self.brokers)}
  partitions: {a.partitions}
  exactly_once: {"true" if a.exactly_once else "false"}
schema_registry:
  url: {json.dumps(self.registry)}
mappings: [items.yaml]
state_dir: state
""")
        self.config = cfg
        self.checkpoint = os.path.join(self.tmp, "state", f"{self.name}.json")

    def snapshot_done(self):
        try:
            with open(self.checkpoint) as f:
                return bool(json.load(f).get("snapshot_complete"))
        except (OSError, ValueError):
            return False

    def run(self):
        a = self.args
        t_begin = time.monotonic()
        self.setup()
        self.poll = Psql(self.psql, self.admin_url)

        # kill schedule and load pace, both from the seed
        # one kill in five comes early (50 ms to 1 s after the start: during start-up or the first
        # batches), the others anywhere between --min-delay and --max-delay
        delays = [round(self.rng.uniform(0.05, 1.0) if self.rng.random() < 0.2
                        else self.rng.uniform(a.min_delay, a.max_delay), 3) for _ in range(a.kills)]
        load_s = max(15.0, sum(delays) + a.kills * a.restart_estimate)
        rate = a.changes / load_s
        script, planned = Generator(random.Random(self.rng.random()), a.snapshot_rows + 1).script(a.changes, rate)
        load_sql = os.path.join(self.tmp, "load.sql")
        with open(load_sql, "w") as f:
            f.write(script)
        log(f"seed {self.seed}: {sum(planned):,} changes in {len(planned):,} transactions at "
            f"{rate:,.0f}/s (~{load_s:.0f} s); kills after {', '.join(f'{d:.1f}' for d in delays)} s")

        # 1. snapshot
        p, run = self.start_unilog()
        deadline = time.monotonic() + a.timeout
        while not self.snapshot_done():
            p, run = self.reap_unexpected(p, run)
            if time.monotonic() > deadline:
                raise TestError(f"the initial snapshot did not complete within {a.timeout}s:\n" + self.tail(run["log"]))
            time.sleep(0.1)
        t_snap = time.monotonic()
        log(f"initial snapshot of {a.snapshot_rows:,} rows delivered after {t_snap - t_begin:.1f} s")

        # 2. load and kills
        load_out = os.path.join(self.tmp, "load.out")
        target, env = pg_target(self.db_url)
        with open(load_out, "w") as out, open(os.path.join(self.tmp, "load.err"), "w") as err:
            writer = subprocess.Popen([self.psql, "-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-f", load_sql, target],
                                      stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=env,
                                      start_new_session=True)
        self.children.append(writer)
        t_load0 = time.monotonic()
        run["start"] = t_load0  # the first delay counts from the start of the load
        load_deadline = t_load0 + load_s * 3 + a.timeout
        kills_during_load = 0
        for i, d in enumerate(delays):
            while time.monotonic() < run["start"] + d:
                p, run = self.reap_unexpected(p, run)
                if time.monotonic() > load_deadline:
                    raise TestError("the kill schedule overran its deadline")
                time.sleep(0.01)
            if p.poll() is not None:  # exited just now: restart, take this kill on the new one
                p, run = self.reap_unexpected(p, run)
                continue
            self.kill(p, run)
            during = writer.poll() is None
            kills_during_load += during
            run["during_load"] = during
            log(f"kill {i + 1}/{a.kills}: SIGKILL unilog run {run['n']} {run['end'] - run['start']:.2f} s after "
                f"its start (slot {'active' if run['slot_active'] else 'not active yet'}, confirmed "
                f"{run['confirmed']}, load {'running' if during else 'done'})")
            time.sleep(self.rng.uniform(0, a.restart_pause))
            p, run = self.start_unilog()
        kills = sum(1 for r in self.runs if r.get("how") == "SIGKILL")

        # the rest of the load
        while writer.poll() is None:
            p, run = self.reap_unexpected(p, run)
            if time.monotonic() > load_deadline:
                writer.kill()
                raise TestError("the load did not finish in time")
            time.sleep(0.05)
        t_load1 = time.monotonic()
        if writer.returncode != 0:
            with open(os.path.join(self.tmp, "load.err")) as f:
                raise TestError(f"the load failed (psql exit {writer.returncode}): {f.read()[-2000:]}")
        with open(load_out) as f:
            txns = parse_load_output(f.read(), planned)
        changes = sum(t[2] for t in txns)
        last_l = txns[-1][0]
        log(f"load: {changes:,} changes in {len(txns):,} transactions committed in {t_load1 - t_load0:.1f} s; "
            f"last commit after {lsn_fmt(last_l)}")

        # 3. catch-up, clean stop
        deadline = time.monotonic() + a.timeout
        while True:
            p, run = self.reap_unexpected(p, run)
            _, conf = self.slot_state()
            if conf >= last_l:
                break
            if time.monotonic() > deadline:
                raise TestError(f"the slot reached {lsn_fmt(conf)}, not {lsn_fmt(last_l)}, within {a.timeout}s:\n"
                                + self.tail(run["log"]))
            time.sleep(0.05)
        t_caught = time.monotonic()
        log(f"caught up: slot confirmed {lsn_fmt(conf)} >= {lsn_fmt(last_l)}, "
            f"{t_caught - t_load1:.1f} s after the load")
        rc, stopped = self.stop_unilog(p, run)
        _, conf_end = self.slot_state()
        log(f"SIGTERM: unilog exited {rc} ({'stopped cleanly' if stopped else 'no stopped-cleanly line'})")

        # 4. verify
        t_v0 = time.monotonic()
        table = self.read_table()
        records = self.read_topic()
        self.hides_aborted = self.broker_hides_aborted() if a.exactly_once else True
        self.kills_done = kills
        result = self.verify(records, txns, table, conf_end)
        t_end = time.monotonic()
        unexpected = [r for r in self.runs if r.get("how") == "exited"]
        result.update({
            "seed": self.seed,
            "exactly_once": self.args.exactly_once,
            "broker_hides_aborted": getattr(self, "hides_aborted", None),
            "build": os.environ.get("UNILOG_BUILD", "?"),
            "changes": changes,
            "transactions": len(txns),
            "snapshot_rows": a.snapshot_rows,
            "kills": kills,
            "kills_during_load": kills_during_load,
            "kill_delays_s": [round(r["end"] - r["start"], 2) for r in self.runs if r.get("how") == "SIGKILL"],
            "kills_before_slot_active": sum(1 for r in self.runs if r.get("how") == "SIGKILL" and not r["slot_active"]),
            "unilog_runs": len(self.runs),
            "unexpected_exits": [{"run": r["n"], "rc": r["rc"], "error": r.get("error")} for r in unexpected],
            "stop_rc": rc,
            "stopped_cleanly": stopped is not None,
            "load_s": t_load1 - t_load0,
            "catch_up_s": t_caught - t_load1,
            "verify_s": t_end - t_v0,
            "total_s": t_end - t_begin,
            "load_rate": changes / (t_load1 - t_load0),
            "slot_confirmed_end": lsn_fmt(conf_end),
            "last_commit_after": lsn_fmt(last_l),
        })
        if rc != 0 or stopped is None:
            result["problems"].append(f"the final SIGTERM: exit {rc}, "
                                      f"{'stopped cleanly' if stopped else 'no stopped-cleanly line'}")
        result["pass"] = not result["problems"]
        return result

    def broker_hides_aborted(self):
        """Whether read_committed readers skip records of aborted transactions (Apache Kafka does;
        the local Tansu broker does not, so there a kill can leak the batch in flight)."""
        topic = f"crash.probe.{self.sfx}"
        p = Producer({"bootstrap.servers": self.brokers, "transactional.id": f"crash-probe-{self.sfx}"})
        p.init_transactions(30)
        p.begin_transaction()
        p.produce(topic, b"aborted", key=b"k", partition=0)
        p.flush(30)
        p.abort_transaction(30)
        p.begin_transaction()
        p.produce(topic, b"committed", key=b"k", partition=0)
        p.commit_transaction(30)
        c = Consumer({"bootstrap.servers": self.brokers, "group.id": f"crash-probe-{self.sfx}",
                      "enable.auto.commit": False, "isolation.level": "read_committed",
                      "auto.offset.reset": "earliest"})
        c.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
        seen = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and b"committed" not in seen:
            m = c.poll(0.2)
            if m is not None and m.error() is None:
                seen.append(m.value())
        c.close()
        if b"committed" not in seen:
            raise TestError(f"probe topic {topic}: the committed probe record did not arrive")
        hides = b"aborted" not in seen
        log(f"the broker {'hides' if hides else 'does NOT hide'} aborted transactions from read_committed readers")
        return hides

    def read_table(self):
        rows = sql(self.psql, self.db_url,
                   "SELECT json_build_object('id', id, 'account_id', account_id, 'status', status, "
                   "'amount', amount::text, 'payload', payload::text, 'rev', rev, "
                   "'updated_at', (extract(epoch FROM updated_at) * 1000000)::bigint)::text FROM items",
                   timeout=120)
        out = {}
        for (text,) in ([("|".join(r),) for r in rows]):
            row = json.loads(text)
            out[str(row["id"])] = row
        return out

    def read_topic(self):
        """Every record of the topic: (partition, offset, key, value, dedup id, event type)."""
        a = self.args
        c = Consumer({"bootstrap.servers": self.brokers, "group.id": f"crash-test-{self.sfx}",
                      "enable.auto.commit": False, "enable.partition.eof": True,
                      "isolation.level": "read_committed", "allow.auto.create.topics": False,
                      "fetch.max.bytes": 16 << 20})
        try:
            md = c.list_topics(self.topic, timeout=15)
            tm = md.topics.get(self.topic)
            if tm is None or tm.error is not None or not tm.partitions:
                raise TestError(f"topic {self.topic} not found on {self.brokers}")
            parts = sorted(tm.partitions)
            c.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in parts])
            recs = []
            eof = set()
            deadline = time.monotonic() + a.timeout
            quiet_since = None
            while True:
                if time.monotonic() > deadline:
                    raise TestError(f"reading {self.topic} back took longer than {a.timeout}s")
                msgs = c.consume(10000, timeout=0.5)
                if not msgs:
                    if len(eof) == len(parts):
                        quiet_since = quiet_since or time.monotonic()
                        if time.monotonic() - quiet_since > 2.0:  # EOF everywhere and nothing new
                            break
                    continue
                for m in msgs:
                    if m.error():
                        if m.error().code() == KafkaError._PARTITION_EOF:
                            eof.add(m.partition())
                            continue
                        raise TestError(f"reading {self.topic}: {m.error()}")
                    eof.discard(m.partition())
                    quiet_since = None
                    h = dict(m.headers() or [])
                    did = h.get("unilog.dedup_id")
                    recs.append((m.partition(), m.offset(), m.key(), m.value(),
                                 did.decode() if did is not None else None,
                                 (h.get("unilog.event_type") or b"").decode()))
            return recs
        finally:
            c.close()

    def verify(self, records, txns, table, conf_end):
        problems = []
        records.sort(key=lambda r: (r[0], r[1]))
        with open(os.path.join(self.tmp, "records.tsv"), "w") as f:
            f.write("partition\toffset\tdedup_id\tevent_type\tkey\tvalue_sha256\n")
            for part, off, key, val, did, et in records:
                f.write(f"{part}\t{off}\t{did}\t{et}\t{(key or b'').decode(errors='replace')}\t"
                        f"{hashlib.sha256(val or b'').hexdigest()[:16]}\n")
        # duplicates: same dedup id -> same key and value bytes
        by_id = {}
        mismatched = []
        no_id = 0
        for part, off, key, val, did, _ in records:
            if did is None:
                no_id += 1
                continue
            prev = by_id.get(did)
            if prev is None:
                by_id[did] = (key, val, part, off)
            elif prev[0] != key or prev[1] != val:
                mismatched.append({"dedup_id": did, "first": f"{prev[2]}@{prev[3]}", "again": f"{part}@{off}",
                                   "same_key": prev[0] == key})
        if no_id:
            problems.append(f"{no_id} records without a unilog.dedup_id header")
        if mismatched:
            problems.append(f"{len(mismatched)} dedup ids repeated with different key or value bytes "
                            f"(first: {mismatched[0]})")
        # ids: the snapshot's and one per committed row change
        snap_ids = {}
        per_txn = {}
        unknown = []
        lows = [t[0] for t in txns]

        for did in by_id:
            parts = did.split("/")
            if len(parts) != 5 or parts[0] != "pg" or parts[1] != self.db:
                unknown.append(did)
                continue
            lsn = lsn_parse(parts[2] + "/" + parts[3])
            if parts[4].startswith("s"):
                snap_ids.setdefault(lsn, set()).add(int(parts[4][1:]))
                continue
            i = bisect.bisect_right(lows, lsn) - 1
            if i < 0 or not (txns[i][0] <= lsn <= txns[i][1]):
                unknown.append(did)
                continue
            per_txn.setdefault(i, {}).setdefault(lsn, set()).add(int(parts[4]))
        if unknown:
            problems.append(f"{len(unknown)} dedup ids that match no committed transaction (first: {unknown[:3]})")
        if len(snap_ids) != 1:
            problems.append(f"snapshot ids from {len(snap_ids)} consistent points (expected 1): "
                            f"{[lsn_fmt(x) for x in snap_ids]}")
        snap_n = sum(len(s) for s in snap_ids.values())
        if snap_n != self.args.snapshot_rows:
            problems.append(f"{snap_n} distinct snapshot ids, expected {self.args.snapshot_rows}")
        lost = []
        for i, (lo, hi, n) in enumerate(txns):
            got = per_txn.get(i, {})
            if len(got) > 1:
                problems.append(f"transaction #{i} ({lsn_fmt(lo)}..{lsn_fmt(hi)}) has ids with "
                                f"{len(got)} commit LSNs: {[lsn_fmt(x) for x in got]}")
            ords = set().union(*got.values()) if got else set()
            missing = sorted(set(range(n)) - ords)
            extra = sorted(ords - set(range(n)))
            if missing or extra:
                commit = lsn_fmt(next(iter(got))) if got else None
                lost.append({"txn": i, "L": lsn_fmt(lo), "P": lsn_fmt(hi), "commit_lsn": commit, "rows": n,
                             "missing_ordinals": missing[:50], "missing": len(missing),
                             "unexpected_ordinals": extra[:50],
                             "acknowledged": conf_end >= lo,
                             "dedup_ids": [f"pg/{self.db}/{commit}/{o}" for o in missing[:10]] if commit else []})
        lost_n = sum(x["missing"] for x in lost)
        if lost:
            problems.append(f"{lost_n} committed changes missing in {len(lost)} transactions "
                            f"(first: {lost[0]})")
        distinct = len(by_id)
        expected = sum(t[2] for t in txns) + self.args.snapshot_rows
        if distinct != expected and not lost and not unknown:
            problems.append(f"{distinct} distinct dedup ids, expected {expected}")
        # fold per key, in partition order: last event wins, deletes remove
        fold_problems, folded, ops = self.fold(records, table)
        problems += fold_problems
        dups = len(records) - no_id - distinct
        if self.args.exactly_once and dups:
            if self.hides_aborted:
                problems.append(f"{dups} duplicates although kafka.exactly_once is on "
                                f"(a read_committed consumer must see each dedup id once)")
            elif dups > self.kills_done * 2000:
                # The broker shows records of aborted transactions: a kill
                # can leak the batch in flight (at most batch.max_events).
                problems.append(f"{dups} duplicates with kafka.exactly_once: more than one aborted "
                                f"batch of 2,000 per kill ({self.kills_done} kills) explains")
        return {"problems": problems, "records": len(records), "distinct_ids": distinct,
                "expected_ids": expected, "lost": lost_n, "lost_detail": lost[:100],
                "duplicates": dups, "duplicates_pct": 100.0 * dups / max(1, distinct),
                "mismatched_duplicates": len(mismatched), "mismatched_detail": mismatched[:100],
                "ops": ops, "table_rows": len(table), "folded_keys": folded}

    def fold(self, records, table):
        registry = SchemaRegistryClient({"url": self.registry})
        deser = AvroDeserializer(registry)
        ctx = SerializationContext(self.topic, MessageField.VALUE)
        state = {}
        ops = {}
        cache = {}
        for part, off, key, val, did, _ in records:
            ev = cache.get(val)
            if ev is None:
                ev = deser(val, ctx)
                cache[val] = ev
            op = ev["op"]
            ops[op] = ops.get(op, 0) + 1
            k = ev["key"]
            if op == "delete":
                state.pop(k, None)
            elif op in ("insert", "update", "snapshot"):
                r = ev["after"]
                state[k] = {"id": r["id"], "account_id": r["account_id"], "status": r["status"],
                            "amount": str(r["amount"]), "payload": r["payload"], "rev": r["rev"],
                            "updated_at": (r["updated_at"] - EPOCH) // datetime.timedelta(microseconds=1)}
            else:
                return [f"unexpected op {op!r} at {part}@{off}"], len(state), ops
        problems = []
        only_k = sorted(set(state) - set(table), key=int)
        only_t = sorted(set(table) - set(state), key=int)
        differ = sorted((k for k in set(state) & set(table) if state[k] != table[k]), key=int)
        if only_k or only_t or differ:
            first = differ[0] if differ else None
            problems.append(
                f"folded state != table: {len(only_k)} keys only in Kafka {only_k[:10]}, {len(only_t)} only in "
                f"the table {only_t[:10]}, {len(differ)} differ"
                + (f" (first: key {first}: Kafka {state[first]} table {table[first]})" if first else ""))
        return problems, len(state), ops

    # -- cleanup -------------------------------------------------------------------------------

    def cleanup(self, keep_files):
        problems = []
        for p in self.children:
            if p.poll() is None:
                try:
                    p.send_signal(signal.SIGTERM)
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        if self.poll is not None:
            self.poll.close()
        if self.args.keep:
            log(f"--keep: left database {self.db}, slot {self.slot}, topic {self.topic}, work dir {self.tmp}")
            return problems
        try:
            deadline = time.monotonic() + 15
            while True:
                rows = sql(self.psql, self.admin_url,
                           f"SELECT active, coalesce(active_pid, 0) FROM pg_replication_slots WHERE slot_name = '{self.slot}'")
                if not rows:
                    break
                if rows[0][0] == "t":
                    if time.monotonic() > deadline:
                        raise TestError(f"slot {self.slot} still active")
                    sql(self.psql, self.admin_url, f"SELECT pg_terminate_backend({rows[0][1]})")
                    time.sleep(0.2)
                    continue
                sql(self.psql, self.admin_url, f"SELECT pg_drop_replication_slot('{self.slot}')")
                break
        except TestError as e:
            problems.append(f"dropping slot {self.slot}: {e}")
        if self.created_db:
            try:
                sql(self.psql, self.admin_url, f"DROP DATABASE IF EXISTS {self.db} WITH (FORCE)")
            except TestError as e:
                problems.append(f"dropping database {self.db}: {e}")
        tansu = os.environ.get("TANSU_BIN")
        if tansu and self.unilog_runs:
            try:
                r = subprocess.run([tansu, "topic", "delete", "--broker", f"tcp://{self.brokers.split(',')[0]}",
                                    self.topic], capture_output=True, text=True, timeout=30)
                if r.returncode != 0:
                    self.warnings.append(f"deleting topic {self.topic}: {(r.stderr or r.stdout).strip()[:200]}")
            except (OSError, subprocess.TimeoutExpired) as e:
                problems.append(f"deleting topic {self.topic}: {e}")
            if self.args.exactly_once:
                progress = f"unilog.{self.name}.progress"
                try:
                    subprocess.run([tansu, "topic", "delete", "--broker", f"tcp://{self.brokers.split(',')[0]}",
                                    progress], capture_output=True, text=True, timeout=30)
                except (OSError, subprocess.TimeoutExpired) as e:
                    self.warnings.append(f"deleting topic {progress}: {e}")
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
        if keep_files:
            log(f"kept the work dir with the evidence: {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)
        return problems


def cleanup_stale(psql, admin_url):
    rows = sql(psql, admin_url, r"SELECT slot_name FROM pg_replication_slots WHERE NOT active AND "
                                r"slot_name ~ '^unilog_crash_[a-z0-9]{8}$'")
    for (slot,) in rows:
        log(f"dropping stale slot {slot}")
        sql(psql, admin_url, f"SELECT pg_drop_replication_slot('{slot}')")
    rows = sql(psql, admin_url, r"SELECT d.datname FROM pg_database d WHERE d.datname ~ '^crash_[a-z0-9]{8}$' "
                                r"AND NOT EXISTS (SELECT 1 FROM pg_replication_slots s WHERE s.database = d.datname)")
    for (db,) in rows:
        log(f"dropping stale database {db}")
        sql(psql, admin_url, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")


def report(r):
    ops = ", ".join(f"{k} {v:,}" for k, v in sorted(r["ops"].items()))
    delays = r["kill_delays_s"]
    rows = [
        ("result", "PASS" if r["pass"] else "FAIL"),
        ("seed / build", f"{r['seed']} / {r['build']}"),
        ("delivery", ("exactly once (kafka.exactly_once: true); the broker "
                      + ("hides" if r.get("broker_hides_aborted") else "does NOT hide")
                      + " aborted transactions") if r.get("exactly_once") else "at least once"),
        ("committed row changes", f"{r['changes']:,} in {r['transactions']:,} transactions "
                                  f"(+ {r['snapshot_rows']:,} snapshot rows)"),
        ("SIGKILLs", f"{r['kills']} ({r['kills_during_load']} while the load ran, "
                     f"{r['kills_before_slot_active']} before the slot was active), "
                     f"{min(delays) if delays else 0:.2f}-{max(delays) if delays else 0:.2f} s after start; "
                     f"{r['unilog_runs']} unilog runs, {len(r['unexpected_exits'])} exits not caused by the test"),
        ("records in the topic", f"{r['records']:,} ({ops})"),
        ("distinct dedup ids", f"{r['distinct_ids']:,} (expected {r['expected_ids']:,})"),
        ("lost", f"{r['lost']:,}"),
        ("duplicates", f"{r['duplicates']:,} ({r['duplicates_pct']:.2f} % of distinct), "
                       f"{r['mismatched_duplicates']} with different bytes"),
        ("final state", f"{r['folded_keys']:,} keys folded from the topic, {r['table_rows']:,} rows in the table"),
        ("clean stop", f"exit {r['stop_rc']}, {'stopped cleanly' if r['stopped_cleanly'] else 'NO stopped-cleanly line'}"),
        ("time", f"{r['total_s']:.1f} s (load {r['load_s']:.1f} s at {r['load_rate']:,.0f} changes/s, "
                 f"catch-up {r['catch_up_s']:.1f} s, verify {r['verify_s']:.1f} s)"),
    ]
    w = max(len(k) for k, _ in rows)
    print("\nunilog crash test")
    for k, v in rows:
        print(f"  {k:<{w}}  {v}")
    for u in r["unexpected_exits"]:
        print(f"  note: unilog run {u['run']} exited by itself with status {u['rc']}: {u['error']}")
    for pr in r["problems"]:
        print(f"  FAIL: {pr}")


def main():
    ap = argparse.ArgumentParser(prog="scripts/crash-test", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--changes", type=int, default=100_000, help="row changes the writer commits (100000)")
    ap.add_argument("--kills", type=int, default=10, help="SIGKILLs of unilog during the load (10)")
    ap.add_argument("--seed", type=int, default=None, help="seed of the load and the kill delays (random)")
    ap.add_argument("--keep", action="store_true", help="leave database, slot, topic and work dir")
    ap.add_argument("--snapshot-rows", type=int, default=2000, help="rows copied by the initial snapshot (2000)")
    ap.add_argument("--min-delay", type=float, default=0.3, help="shortest kill delay after a start, s (0.3)")
    ap.add_argument("--max-delay", type=float, default=7.0, help="longest kill delay after a start, s (7)")
    ap.add_argument("--restart-pause", type=float, default=0.3, help="longest random pause before a restart, s (0.3)")
    ap.add_argument("--restart-estimate", type=float, default=1.0,
                    help="seconds per restart added to the load's duration (1)")
    ap.add_argument("--partitions", type=int, default=3, help="partitions of the topic (3)")
    ap.add_argument("--exactly-once", action="store_true",
                    help="run unilog with kafka.exactly_once: true and fail on any duplicate")
    ap.add_argument("--timeout", type=float, default=600, help="limit of each wait, s (600)")
    ap.add_argument("--max-seconds", type=float, default=3600, help="limit of the whole run, s (3600)")
    ap.add_argument("--json", metavar="FILE", help="also write the result as JSON to FILE")
    ap.add_argument("--cleanup-stale", action="store_true",
                    help="drop inactive crash_* slots and databases of killed runs, then exit")
    args = ap.parse_args(sys.argv[1:])
    if args.changes < 1 or args.kills < 0 or args.snapshot_rows < 1 or args.min_delay > args.max_delay:
        ap.error("--changes and --snapshot-rows must be at least 1, --kills at least 0, min <= max delay")

    for var in ("PG_URL", "PG_ADMIN_URL", "KAFKA_BROKERS", "SCHEMA_REGISTRY_URL") + \
            (() if args.cleanup_stale else ("UNILOG_BIN",)):
        if not os.environ.get(var):
            log(f"error: {var} is not set; run this through scripts/crash-test")
            return 2
    if args.cleanup_stale:
        cleanup_stale(os.path.join(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"), "psql"),
                      os.environ["PG_ADMIN_URL"])
        return 0

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    def on_alarm(_signum, _frame):
        raise TestError(f"the run took longer than --max-seconds {args.max_seconds:g}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(int(args.max_seconds))

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 30)
    t = CrashTest(args, seed)
    status = 0
    result = None
    try:
        result = t.run()
        status = 0 if result["pass"] else 1
    except TestError as e:
        log(f"error: {e}")
        status = 1
    except KeyboardInterrupt:
        log("interrupted")
        status = 130
    finally:
        signal.alarm(0)
        if result is not None or status == 1:
            try:
                with open(os.path.join(t.tmp, "report.json"), "w") as f:
                    json.dump({"result": result, "runs": t.runs}, f, indent=2, default=str)
            except OSError:
                pass
        problems = t.cleanup(keep_files=status != 0)
        for w in t.warnings:
            log(f"warning: {w}")
        for pr in problems:
            log(f"cleanup failed: {pr}")
    if result is not None:
        report(result)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(result, f, indent=2, default=str)
    if status == 1 and result is None:
        print(f"\nunilog crash test: FAIL (error, seed {seed}); evidence in {t.tmp}")
    return status


if __name__ == "__main__":
    sys.exit(main())
