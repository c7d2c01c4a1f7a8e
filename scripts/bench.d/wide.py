#!/usr/bin/env python3
"""Start of a pipeline over a whole legacy schema (scripts/bench --wide-schema).

One fresh database with N tables of the shapes real schemas have: plain tables with a primary key
and a dozen column types, partitioned tables (4 partitions each), inheritance parents (2 children
each), keyless tables with a unique index as their replica identity, an unlogged table and a view
(which init must set aside). Then, in the same run:

- `unilog init` writes the pipeline and the mappings from the catalog;
- `unilog check` (wall time);
- `unilog run` until the slot streams (wall time from exec, peak RSS), every table snapshotted;
- the baseline: what PostgreSQL itself must do for the same start, through psql and
  pg_recvlogical: CREATE PUBLICATION for the same tables, a logical slot with an exported
  snapshot, and a COPY of every table (the rows the snapshot reads).

Prints a table; with --doc, replaces the "Wide schema" section of docs/BENCHMARKS.md.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))
import pgtools  # noqa: E402
from pgtools import with_db  # noqa: E402

ROWS = 50


def log(msg):
    print(f"wide: {msg}", file=sys.stderr, flush=True)


def sql(psql, url, q, timeout=300):
    return pgtools.sql(psql, url, q, timeout)


def schema_sql(n):
    """DDL and rows for about n mapped tables."""
    out = ["CREATE TYPE status AS ENUM ('new', 'paid', 'shipped');"]
    parts = max(1, n // 15)
    parents = max(1, n // 15)
    keyless = max(1, n // 15)
    plain = n - parts - parents - keyless
    cols = ("name text NOT NULL, email text, amount numeric(12,2), score int, ratio float8, "
            "active boolean, born date, seen timestamptz, tags text[], meta jsonb, st status, uid uuid")
    vals = ("'n' || g, 'e' || g || '@x', g * 1.5, g, g / 3.0, g % 2 = 0, DATE '2020-01-01' + g, "
            "now(), ARRAY['a', 'b'], jsonb_build_object('g', g), 'paid', gen_random_uuid()")
    for i in range(plain):
        out.append(f"CREATE TABLE t{i:03d} (id bigint PRIMARY KEY, {cols});")
        out.append(f"INSERT INTO t{i:03d} SELECT g, {vals} FROM generate_series(1, {ROWS}) g;")
    for i in range(parts):
        out.append(f"CREATE TABLE p{i:03d} (id bigint, region int, {cols}, PRIMARY KEY (id, region)) PARTITION BY LIST (region);")
        for r in range(4):
            out.append(f"CREATE TABLE p{i:03d}_{r} PARTITION OF p{i:03d} FOR VALUES IN ({r});")
        out.append(f"INSERT INTO p{i:03d} SELECT g, g % 4, {vals} FROM generate_series(1, {ROWS}) g;")
    for i in range(parents):
        out.append(f"CREATE TABLE h{i:03d} (id bigint PRIMARY KEY, {cols});")
        for c in range(2):
            out.append(f"CREATE TABLE h{i:03d}_{c} () INHERITS (h{i:03d}); ALTER TABLE h{i:03d}_{c} ADD PRIMARY KEY (id);")
            out.append(f"INSERT INTO h{i:03d}_{c} SELECT g + {c * ROWS}, {vals} FROM generate_series(1, {ROWS // 2}) g;")
    for i in range(keyless):
        out.append(f"CREATE TABLE k{i:03d} (code text NOT NULL, {cols});")
        out.append(f"CREATE UNIQUE INDEX k{i:03d}_code ON k{i:03d} (code);")
        out.append(f"ALTER TABLE k{i:03d} REPLICA IDENTITY USING INDEX k{i:03d}_code;")
        out.append(f"INSERT INTO k{i:03d} SELECT 'c' || g, {vals} FROM generate_series(1, {ROWS}) g;")
    out.append("CREATE UNLOGGED TABLE scratch (id int PRIMARY KEY);")
    out.append("CREATE VIEW recent AS SELECT * FROM t000;")
    tables = ([f"t{i:03d}" for i in range(plain)] + [f"p{i:03d}" for i in range(parts)]
              + [f"h{i:03d}" for i in range(parents)] + [f"k{i:03d}" for i in range(keyless)])
    return "\n".join(out), tables


def peak_rss_kb(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def streaming(psql, admin, app):
    rows = sql(psql, admin, f"SELECT count(*) FROM pg_stat_replication WHERE application_name = '{app}' AND state = 'streaming'")
    return rows and rows[0][0] != "0"


def run_until_streaming(unilog, cfg, env, psql, admin, work, what):
    """Starts `unilog run`, waits until its slot streams, stops it: (seconds from exec, peak RSS kB)."""
    t = time.monotonic()
    logf = os.path.join(work, f"{what}.log")
    proc = subprocess.Popen([unilog, "run", "--config", cfg], env=dict(env, RUST_LOG="info", NO_COLOR="1"),
                            stdout=subprocess.DEVNULL, stderr=open(logf, "w"))
    peak = 0
    try:
        while not streaming(psql, admin, "unilog-unilog_wide"):
            if proc.poll() is not None:
                raise SystemExit(f"unilog run ({what}) exited {proc.returncode}: {open(logf).read()[-3000:]}")
            peak = max(peak, peak_rss_kb(proc.pid) or 0)
            if time.monotonic() - t > 600:
                raise SystemExit(f"unilog run ({what}) did not stream within 600 s")
            time.sleep(0.05)
        took = time.monotonic() - t
        time.sleep(2)
        return took, max(peak, peak_rss_kb(proc.pid) or 0)
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def main():
    ap = argparse.ArgumentParser(prog="scripts/bench --wide-schema", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tables", type=int, default=150, help="mapped tables (150)")
    ap.add_argument("--doc", action="store_true", help="replace the Wide schema section of docs/BENCHMARKS.md")
    ap.add_argument("--keep", action="store_true", help="leave the database and files")
    args = ap.parse_args()
    env = os.environ
    unilog = env["UNILOG_BIN"]
    pg_bin = env.get("PG_BIN", "/usr/lib/postgresql/15/bin")
    psql = shutil.which("psql") or os.path.join(pg_bin, "psql")
    recvlogical = os.path.join(pg_bin, "pg_recvlogical")
    admin = env["PG_ADMIN_URL"]
    db = f"bench_wide_{os.getpid()}"
    owner = sql(psql, env["PG_URL"], "SELECT current_user")[0][0]
    sql(psql, admin, f"CREATE DATABASE {db} OWNER {owner}")
    url = with_db(env["PG_URL"], db)
    admin_db = with_db(admin, db)
    work = tempfile.mkdtemp(prefix="unilog-wide-")
    result = {"tables": args.tables}
    try:
        ddl, tables = schema_sql(args.tables)
        t = time.monotonic()
        target, penv = pgtools.pg_target(url)
        subprocess.run([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", target], input=ddl, text=True, check=True,
                       stdout=subprocess.DEVNULL, env=penv)
        log(f"schema: {len(tables)} mapped tables, {ROWS} rows each, in {time.monotonic() - t:.1f} s")
        run_env = dict(env, PG_URL=url)
        # init
        t = time.monotonic()
        out = subprocess.run([unilog, "init", "--url", url, "--out", work, "--name", "wide",
                              "--topic-prefix", f"wide{os.getpid()}."], env=run_env,
                             capture_output=True, text=True)
        result["init_s"] = time.monotonic() - t
        if out.returncode != 0:
            raise SystemExit(f"unilog init failed: {out.stderr}")
        ready = len(re.findall(r"^  - ", open(os.path.join(work, "pipeline.yaml")).read(), re.M))
        pending = re.search(r"(\d+) table\(s\) need a decision", out.stdout)
        result["init_ready"] = ready
        result["init_pending"] = int(pending.group(1)) if pending else 0
        log(f"init: {ready} mappings ready, {result['init_pending']} pending, {result['init_s']:.2f} s")
        cfg = os.path.join(work, "pipeline.yaml")
        text = open(cfg).read().replace("state_dir: .unilog/state", f"state_dir: {work}/state")
        open(cfg, "w").write(text)
        # check
        t = time.monotonic()
        out = subprocess.run([unilog, "check", "--config", cfg], env=run_env, capture_output=True, text=True)
        result["check_s"] = time.monotonic() - t
        if out.returncode != 0:
            raise SystemExit(f"unilog check failed: {out.stderr[-3000:]}")
        log(f"check: {result['check_s']:.2f} s")
        # run until streaming
        result["run_to_streaming_s"], peak = run_until_streaming(unilog, cfg, run_env, psql, admin, work, "run")
        result["run_peak_rss_mb"] = peak / 1024
        log(f"run: streaming after {result['run_to_streaming_s']:.2f} s, peak RSS {result['run_peak_rss_mb']:.0f} MB")
        # A restart: schemas registered, slot and publication there, no snapshot.
        time.sleep(1)
        result["restart_to_streaming_s"], _ = run_until_streaming(unilog, cfg, run_env, psql, admin, work, "restart")
        log(f"restart: streaming after {result['restart_to_streaming_s']:.2f} s")
        # Where the first start's time went: registering each new subject.
        t = time.monotonic()
        for i in range(20):
            body = json.dumps({"schema": json.dumps({"type": "record", "name": f"W{i}", "fields": [{"name": "a", "type": "int"}]})})
            subprocess.run(["curl", "-sf", "-o", "/dev/null", "-X", "POST", "-H", "Content-Type: application/vnd.schemaregistry.v1+json",
                            "--data", body, f"{env['SCHEMA_REGISTRY_URL']}/subjects/wide-timing-{os.getpid()}-{i}-value/versions"], check=False)
        result["registry_register_ms"] = (time.monotonic() - t) / 20 * 1000
        sql(psql, admin, "SELECT pg_drop_replication_slot('unilog_wide')")
        # baseline: the server's own work for the same start
        names = ", ".join(tables)
        t = time.monotonic()
        sql(psql, url, f"CREATE PUBLICATION base_wide FOR TABLE {names} WITH (publish_via_partition_root = true)")
        subprocess.run([recvlogical, "-d", admin_db, "--slot", "base_wide", "--create-slot", "-P", "pgoutput"],
                       check=True, capture_output=True)
        copy = "".join(f"\\copy (SELECT * FROM {tname}) TO '/dev/null'\n" for tname in tables)
        subprocess.run([psql, "-X", "-q", "-v", "ON_ERROR_STOP=1", target], input=copy, text=True, check=True,
                       stdout=subprocess.DEVNULL, env=penv)
        result["baseline_s"] = time.monotonic() - t
        sql(psql, admin, "SELECT pg_drop_replication_slot('base_wide')")
        log(f"baseline (psql + pg_recvlogical): {result['baseline_s']:.2f} s")
    finally:
        if not args.keep:
            sql(psql, admin, f"SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = '{db}' AND NOT active")
            sql(psql, admin, f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
            shutil.rmtree(work, ignore_errors=True)
    table = (
        f"| step | {args.tables}-table schema |\n|---|---|\n"
        f"| `unilog init` (catalog to {result['init_ready']} mappings, {result['init_pending']} set aside) | {result['init_s']:.2f} s |\n"
        f"| `unilog check` | {result['check_s']:.2f} s |\n"
        f"| `unilog run` to streaming, first start (registers {args.tables} subjects, publication, slot, snapshot of every table) | {result['run_to_streaming_s']:.2f} s |\n"
        f"| `unilog run` to streaming, a restart (schemas, slot and publication there) | {result['restart_to_streaming_s']:.2f} s |\n"
        f"| of which, registering one new subject in the registry (curl, the same registry) | {result['registry_register_ms']:.0f} ms each |\n"
        f"| peak RSS of `unilog run` | {result['run_peak_rss_mb']:.0f} MB |\n"
        f"| baseline: psql `CREATE PUBLICATION` + `pg_recvlogical --create-slot` + `\\copy` of every table | {result['baseline_s']:.2f} s |\n"
    )
    print(table)
    print(json.dumps(result))
    if args.doc:
        path = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "docs", "BENCHMARKS.md")
        doc = open(path).read()
        start, end = "<!-- wide-schema:start -->", "<!-- wide-schema:end -->"
        block = f"{start}\nRun on {time.strftime('%Y-%m-%d')} ({os.cpu_count()} cores):\n\n{table}{end}"
        if start in doc:
            doc = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, doc, flags=re.S)
        else:
            doc += "\n## Wide schema: a pipeline of every table\n\n" + (__doc__.split("\n\n", 1)[1]) + "\n" + block + "\n"
        open(path, "w").write(doc)
        log(f"wrote {path}")


if __name__ == "__main__":
    main()
