"""The server's state SQLite file (training jobs, API keys, query history): WAL mode and
short-lived autocommit connections, one per use, so none is shared by threads or carried across
a fork. The LUTs live in their own file (lut.py)."""
import os
import sqlite3
from contextlib import closing


def init(db_path, schema):
    os.makedirs(os.path.dirname(os.path.abspath(db_path)), exist_ok=True)
    with connect(db_path) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(schema)


def connect(db_path):
    conn = sqlite3.connect(db_path, timeout=30, isolation_level=None)
    conn.row_factory = sqlite3.Row
    return closing(conn)
