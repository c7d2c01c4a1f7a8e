"""PostgreSQL LSNs, connection URLs and psql sessions, shared by scripts/bench and scripts/crash-test."""

import os
import re
import select
import subprocess
import tempfile
import time
import urllib.parse


def lsn_parse(text):
    """`16/B374D848` -> int."""
    hi, lo = text.strip().split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


def lsn_fmt(value):
    """int -> `16/B374D848`."""
    return f"{value >> 32:X}/{value & 0xFFFFFFFF:X}"


def with_db(url, db):
    """The URL with its database replaced."""
    u = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((u.scheme, u.netloc, "/" + db, u.query, u.fragment))


def pg_target(url):
    """(URL without its password, environment with PGPASSWORD): passwords stay out of argv."""
    u = urllib.parse.urlsplit(url)
    env = dict(os.environ, PGCONNECT_TIMEOUT="10")
    if u.password is None:
        return url, env
    env["PGPASSWORD"] = urllib.parse.unquote(u.password)
    netloc = u.netloc.rsplit("@", 1)
    user = netloc[0].split(":", 1)[0]
    return urllib.parse.urlunsplit((u.scheme, f"{user}@{netloc[1]}", u.path, u.query, u.fragment)), env


def mask(url):
    """The URL with its password replaced by ***."""
    return re.sub(r"//([^:/@]*):[^@]*@", r"//\1:***@", url)


class PsqlError(Exception):
    """psql failed or did not answer; scripts pass their own error class instead."""


PSQL_ARGS = ["-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"]


def sql(psql, url, query, timeout=60, error=PsqlError):
    """One statement with a fresh psql; rows split on '|'."""
    target, env = pg_target(url)
    try:
        r = subprocess.run([psql, *PSQL_ARGS, "-c", query, target],
                           capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        raise error(f"psql timed out after {timeout}s on {mask(url)}: {query}") from None
    if r.returncode != 0:
        raise error(f"psql failed on {mask(url)}: {query}\n{r.stderr.strip()}")
    return [line.split("|") for line in r.stdout.splitlines() if line]


class Psql:
    """A long-lived psql session: one query at a time, answers read with a deadline.
    Subclasses set `error` to the exception class their script handles."""

    error = PsqlError
    MARK = "__psql_query_end__"

    def __init__(self, psql, url, timeout=15):
        self.timeout = timeout
        self.err = tempfile.TemporaryFile()
        url, env = pg_target(url)
        self.p = subprocess.Popen(
            [psql, *PSQL_ARGS, url],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.err, env=env,
            start_new_session=True)
        self.buf = b""

    def query(self, q):
        """Rows of the query as lists of strings (fields split on '|')."""
        q = q.strip().rstrip(";") + ";"
        self.p.stdin.write(q.encode() + f"\n\\echo {self.MARK}\n".encode())
        self.p.stdin.flush()
        deadline = time.monotonic() + self.timeout
        rows = []
        while True:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                line = line.decode()
                if line == self.MARK:
                    return rows
                rows.append(line.split("|"))
            left = deadline - time.monotonic()
            if left <= 0:
                raise self.error(f"psql did not answer within {self.timeout}s: {q}")
            ready, _, _ = select.select([self.p.stdout], [], [], left)
            if ready:
                chunk = os.read(self.p.stdout.fileno(), 65536)
                if not chunk:
                    self.err.seek(0)
                    raise self.error(f"psql ended while running: {q}\n{self.err.read().decode(errors='replace')}")
                self.buf += chunk

    def close(self):
        try:
            self.p.stdin.close()
            self.p.wait(timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            self.p.kill()
            self.p.wait()
