"""
API keys, per-key rate limits and the query history (the hosted API), kept in the server's state
database (storage.py: a SQLite file, or PostgreSQL shared by every replica) next to the training jobs.

Access control is off until the first key is created (anyone may call, like the LUT service API's alpha)
and on from then for good: every route but /health, /public/models and the docs needs
`Authorization: Bearer <key>`, even once every key is revoked, until an operator runs
`python access.py reopen` on the server's machine. While access is open, the first key may be
created only from the server's machine: POST /keys from the loopback interface, or this script.
A key is shown once, stored only as its SHA-256 (keys are 256 random bits, so a fast hash
suffices) and compared in constant time. A key may use the LUTs it
is bound to (exact names, or prefixes ending in '*'); admin keys may use every LUT and alone may
load models, start training and manage keys.

Keys from the shell, on the server's machine (also the way to make the first admin key):

    python access.py create --name admin --admin
    python access.py create --name acme --luts "acme-*" --rate_per_minute 120
    python access.py list
    python access.py revoke 2
    python access.py reopen        # every key revoked: let requests without a key in again
"""
import argparse
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import sys
import time
from dataclasses import dataclass

from server.ratelimit import LocalBuckets, RedisBuckets
from storage import Database, Transaction

# Versioned migrations (storage.Database.migrate); {id}, {real}: each engine's types.
MIGRATIONS = ["""
CREATE TABLE IF NOT EXISTS api_keys (
    id {id},
    name TEXT NOT NULL,
    key_hash TEXT NOT NULL UNIQUE,   -- sha256 of the key; the key itself is never stored
    prefix TEXT NOT NULL,            -- its first characters, to tell keys apart in listings
    admin INTEGER NOT NULL DEFAULT 0,
    luts TEXT NOT NULL DEFAULT '[]', -- JSON list of LUT names, or prefixes ending in '*'
    rate_per_minute INTEGER,         -- NULL: the server's default
    burst INTEGER,                   -- NULL: the server's default
    created {real} NOT NULL,
    revoked {real}
);
CREATE TABLE IF NOT EXISTS query_history (
    id {id},
    time {real} NOT NULL,
    app_id TEXT NOT NULL,            -- X-App-ID, "Unknown" when absent
    key_id INTEGER,                  -- NULL while access control is off
    method TEXT NOT NULL,
    route TEXT NOT NULL,
    model TEXT,
    lut_name TEXT,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    latency_ms {real} NOT NULL,
    status INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS query_history_app ON query_history(app_id);
CREATE INDEX IF NOT EXISTS query_history_key ON query_history(key_id);
""", """
-- One row while access control is on: written with the first key, in the database rather than in
-- memory so that every replica sees it, and deleted only by `python access.py reopen`.
CREATE TABLE IF NOT EXISTS access_closed (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    since {real} NOT NULL
);
-- a database that already holds keys stays closed, revoked or not
INSERT INTO access_closed (id, since) SELECT 1, created FROM api_keys ORDER BY id LIMIT 1;
"""]
KEY_PREFIX = "sk-gpt2-"
LUT_PATTERN = re.compile(r"[A-Za-z0-9_.:@-]{1,128}\*?")  # matched whole (fullmatch)


class AccessError(Exception):
    def __init__(self, status, message, headers=None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


@dataclass
class Key:
    id: int
    name: str
    admin: bool
    luts: list
    rate_per_minute: int
    burst: int

    def may_use(self, lut_name):
        return self.admin or any(lut_name == p or (p.endswith("*") and lut_name.startswith(p[:-1]))
                                 for p in self.luts)


def hash_key(secret):
    return hashlib.sha256(secret.encode()).hexdigest()


class Access:

    def __init__(self, db, rate_per_minute=60, burst=10, redis_url=None):
        """db: a storage.Database, or its SQLite path or postgresql:// URL. redis_url: keep the rate
        limits' buckets (key ids, "anon:<address>", ...) in Redis, shared by every replica."""
        self.db = db if isinstance(db, Database) else Database(db)
        self.rate_per_minute, self.burst = rate_per_minute, burst
        self.buckets = RedisBuckets(redis_url) if redis_url else LocalBuckets()
        self.db.migrate("access", MIGRATIONS)

    def _db(self):
        return self.db.connection()

    # ---- keys

    def create_key(self, name, admin=False, luts=(), rate_per_minute=None, burst=None):
        """Returns (the key, its record): the only time the key is seen."""
        if not isinstance(name, str) or not 1 <= len(name) <= 128:
            raise AccessError(400, "name must be a string of 1-128 characters")
        if not isinstance(admin, bool):
            raise AccessError(400, "admin must be true or false")
        if not isinstance(luts, (list, tuple)) or not all(isinstance(p, str) and LUT_PATTERN.fullmatch(p) for p in luts):
            raise AccessError(400, "luts must be a list of LUT names (letters, digits, _.:@-), each optionally "
                                   "ending in '*' to allow every LUT with that prefix")
        for field, value in (("rate_per_minute", rate_per_minute), ("burst", burst)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise AccessError(400, f"{field} must be an integer >= 1")
        secret = KEY_PREFIX + secrets.token_urlsafe(32)
        with Transaction(self.db) as db:  # the key and the closed flag together, or neither
            key_id = db.insert("INSERT INTO api_keys (name, key_hash, prefix, admin, luts, rate_per_minute, burst, "
                               "created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               (name, hash_key(secret), secret[:len(KEY_PREFIX) + 4], int(admin),
                                json.dumps(list(luts)), rate_per_minute, burst, time.time()))
            db.execute("INSERT INTO access_closed (id, since) VALUES (1, ?) ON CONFLICT (id) DO NOTHING",
                       (time.time(),))
        return secret, self.get_key(key_id)

    def get_key(self, key_id):
        with self._db() as db:
            row = db.execute("SELECT * FROM api_keys WHERE id = ?", (key_id,)).fetchone()
        if row is None:
            raise AccessError(404, f"no API key with id {key_id}")
        return describe(row)

    def list_keys(self):
        with self._db() as db:
            return [describe(r) for r in db.execute("SELECT * FROM api_keys ORDER BY id")]

    def revoke_key(self, key_id):
        with self._db() as db:
            changed = db.execute("UPDATE api_keys SET revoked = ? WHERE id = ? AND revoked IS NULL",
                                 (time.time(), key_id)).rowcount
        record = self.get_key(key_id)  # 404 if there is no such key
        if not changed:
            raise AccessError(409, f"API key {key_id} is already revoked")
        return record

    def enabled(self):
        """On from the first key until reopen(): revoking every key does not switch it off."""
        with self._db() as db:
            return db.execute("SELECT 1 FROM access_closed").fetchone() is not None

    def reopen(self):
        """Switch access control off: for the shell only (no route calls it). Refused while a key
        is live, since requests without a key would then get past it."""
        with Transaction(self.db) as db:
            live = db.execute("SELECT COUNT(*) FROM api_keys WHERE revoked IS NULL").fetchone()[0]
            if live:
                raise AccessError(409, f"{live} API key(s) not revoked; revoke them first (python access.py list)")
            return db.execute("DELETE FROM access_closed").rowcount > 0

    # ---- requests

    def authenticate(self, authorization):
        """The Authorization header -> the caller's Key, or None while access control is off."""
        scheme, _, secret = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            if not self.enabled():
                return None
            raise AccessError(401, "an API key is required: send Authorization: Bearer <key>",
                              {"WWW-Authenticate": "Bearer"})
        digest = hash_key(secret.strip())
        with self._db() as db:
            row = db.execute("SELECT * FROM api_keys WHERE key_hash = ? AND revoked IS NULL", (digest,)).fetchone()
        if row is None or not hmac.compare_digest(row["key_hash"], digest):
            if not self.enabled():
                return None  # open: any (or no) key is accepted
            raise AccessError(401, "invalid or revoked API key", {"WWW-Authenticate": "Bearer"})
        return Key(row["id"], row["name"], bool(row["admin"]), json.loads(row["luts"]),
                   row["rate_per_minute"] or self.rate_per_minute, row["burst"] or self.burst)

    def check_rate(self, key):
        """The per-key limit: the key's own, or the server's."""
        self.take(key.id, key.rate_per_minute, key.burst)

    def check_anonymous(self, address, rate_per_minute, burst):
        """The LocalLab-style API's limit for requests without a key: one bucket per client address."""
        self.take(f"anon:{address}", rate_per_minute, burst)

    def take(self, bucket, rate_per_minute, burst):
        """Token bucket: `burst` requests at once, refilled at rate_per_minute; 429 when empty."""
        rate = rate_per_minute / 60.0
        taken, tokens = self.buckets.take(bucket, rate, burst)
        if not taken:
            wait = math.ceil((1 - tokens) / rate)
            raise AccessError(429, f"rate limit of {rate_per_minute} requests per minute (burst {burst}) "
                                   f"reached; retry in {wait} s", {"Retry-After": str(wait)})

    def record(self, app_id, key_id, method, route, model, lut_name, prompt_tokens, completion_tokens,
               latency_ms, status):
        with self._db() as db:
            db.execute("INSERT INTO query_history (time, app_id, key_id, method, route, model, lut_name, "
                       "prompt_tokens, completion_tokens, latency_ms, status) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                       (time.time(), app_id, key_id, method, route, model, lut_name, prompt_tokens,
                        completion_tokens, round(latency_ms, 2), status))

    def history(self, key_id=None, app_id=None, limit=100):
        """The latest queries, newest first; key_id/app_id narrow them down."""
        where, args = query_filter(key_id, app_id)
        with self._db() as db:
            rows = db.execute(f"SELECT * FROM query_history {where} ORDER BY id DESC LIMIT ?", (*args, limit))
            return [dict(r) for r in rows]

    def usage(self, key_id=None):
        """Totals per app and per key (all of them, or one key's)."""
        where, args = query_filter(key_id, None)
        totals = ("COUNT(*) AS requests, SUM(prompt_tokens) AS prompt_tokens, "
                  "SUM(completion_tokens) AS completion_tokens, SUM(CASE WHEN status >= 400 THEN 1 ELSE 0 END) "
                  "AS errors, AVG(latency_ms) AS mean_latency_ms")
        out = {}
        with self._db() as db:
            for group in ("app_id", "key_id"):
                rows = db.execute(f"SELECT {group}, {totals} FROM query_history {where} GROUP BY {group} "
                                  f"ORDER BY {group}", args)
                out[group.replace("_id", "")] = [{**r, "mean_latency_ms": round(r["mean_latency_ms"], 2)}
                                                 for r in map(dict, rows)]
        return {"by_app": out["app"], "by_key": out["key"]}


def query_filter(key_id, app_id):
    clauses = [(c, v) for c, v in (("key_id = ?", key_id), ("app_id = ?", app_id)) if v is not None]
    return ("WHERE " + " AND ".join(c for c, _ in clauses) if clauses else ""), tuple(v for _, v in clauses)


def describe(row):
    return {"id": row["id"], "name": row["name"], "prefix": row["prefix"], "admin": bool(row["admin"]),
            "luts": json.loads(row["luts"]), "rate_per_minute": row["rate_per_minute"], "burst": row["burst"],
            "created": row["created"], "revoked": row["revoked"]}


def add_key_arguments(create):
    """The flags of a key to create: `python access.py create` and `api_client.py keys create`."""
    create.add_argument("--name", required=True, help="who or what the key is for")
    create.add_argument("--admin", action="store_true", help="may manage models, training, keys and every LUT")
    create.add_argument("--luts", default="", help="comma-separated LUT names it may use; 'acme-*' = any with that prefix")
    create.add_argument("--rate_per_minute", type=int, default=None, help="its rate limit (default: the server's)")
    create.add_argument("--burst", type=int, default=None, help="requests it may make at once (default: the server's)")


def main(argv=None):
    # the server's own two flags, with its precedence (--database_url, when set, holds the keys), taken
    # before or after the command (SUPPRESS: one given before is not undone by the command's default)
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--database_url", default=argparse.SUPPRESS,
                       help="the server's postgresql://user@host/db, when it keeps its state there "
                            "(default: $GPT_DATABASE_URL); wins over --state_db")
    where.add_argument("--state_db", default=argparse.SUPPRESS,
                       help="the server's state SQLite file, or a postgresql:// URL (default: $GPT_STATE_DB, "
                            "else out/server.sqlite)")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                parents=[where])
    sub = p.add_subparsers(dest="cmd", required=True)
    add_key_arguments(sub.add_parser("create", parents=[where], help="create a key and print it (shown only this once)"))
    sub.add_parser("list", parents=[where], help="list keys (never the keys themselves)")
    revoke = sub.add_parser("revoke", parents=[where], help="revoke a key")
    revoke.add_argument("key_id", type=int, help="the key's id (from list)")
    sub.add_parser("reopen", parents=[where], help="switch access control off once every key is revoked: requests "
                   "without a key are served again, and the next key created (POST /keys from this machine, or "
                   "create) switches it back on")
    args = p.parse_args(argv)
    access = Access(getattr(args, "database_url", None) or os.environ.get("GPT_DATABASE_URL")
                    or getattr(args, "state_db", None) or os.environ.get("GPT_STATE_DB", "out/server.sqlite"))
    try:
        if args.cmd == "create":
            luts = [x.strip() for x in args.luts.split(",") if x.strip()]
            secret, record = access.create_key(args.name, args.admin, luts, args.rate_per_minute, args.burst)
            print(f"created key {record['id']} ({record['name']}); it is shown only now:\n{secret}")
        elif args.cmd == "list":
            print(json.dumps(access.list_keys(), indent=2))
        elif args.cmd == "reopen":
            print("access control is off: requests without a key are served" if access.reopen()
                  else "access control is off already")
        else:
            print(json.dumps(access.revoke_key(args.key_id), indent=2))
    except AccessError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
