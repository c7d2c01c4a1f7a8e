"""PostgreSQL LSNs and connection URLs, shared by scripts/bench and scripts/crash-test."""

import os
import re
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
