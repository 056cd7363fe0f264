"""The storage layer on both engines: every test runs on a SQLite file and on a fresh PostgreSQL
schema (db_target in conftest.py). LUTs stored whole or not at all and bit-identical after reload,
caches revalidated across stores (as across replicas), keys and usage, training jobs shared by two
Trainers, versioned migrations, and a database that goes away and comes back."""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch

from conftest import ROOT, wait_for
from lut import CANON, LUTError, build_entries
from lut_store import LUTStore
from storage import Database, StoreUnavailable, Transaction

LABEL = "TLG Capital is an asset management firm."
LABELS = [f"Client number {i} of TLG is called Aurelia{'x' * i} Quinn." for i in range(8)]


def whole_label_counts(model, tok, labels):
    """{label: entries it keeps} once labels are taught to one LUT in this order: each keeps all of
    build_entries' entries but those a later label replaced (lut_store.insert_entries: the same
    non-canonical evidence predicting another token; latest wins)."""
    kept = []  # [label, evidence, target] in teaching order
    for label in labels:
        built = build_entries(model, tok, label)
        new = [(label, tuple(int(t) for t in ev), int(t)) for ev, t in zip(built["evidence"], built["target"])]
        for _, ev, target in new:
            if ev[0] != CANON:
                kept = [e for e in kept if not (e[1] == ev and e[2] != target)]
        kept += new
    return {label: sum(e[0] == label for e in kept) for label in labels}


def same_lut(a, b):
    """Bit-identical: values, targets, and every trigger group (evidence, lengths, min_len)."""
    groups = lambda lut: {tok: [x.tolist() if hasattr(x, "tolist") else x for x in g] for tok, g in lut.groups.items()}
    return torch.equal(a.values, b.values) and (a.targets == b.targets).all() and groups(a) == groups(b)


def test_lut_stored_whole_and_bit_identical_after_reload(db_target, tiny):
    model, tok = tiny
    store = LUTStore(db_target)
    added = store.teach(model, tok, "u1", LABEL)
    assert added["added"] == len(build_entries(model, tok, LABEL)["target"]) > 0
    assert store.teach(model, tok, "u1", LABEL) == {"added": 0, "replaced": 0}  # the same lesson: nothing new
    before = store.load("u1", model)
    store.close()
    again = LUTStore(db_target)  # as after a restart
    after = again.load("u1", model)
    assert after is not before and same_lut(before, after) and after.values.dtype == torch.float16
    assert [x["name"] for x in again.list()] == ["u1"] and again.show("u1")["labels"][0]["label"] == LABEL

    again.import_(again.export("u1"), "u2")
    assert same_lut(again.load("u1", model), again.load("u2", model))
    with pytest.raises(LUTError) as e:
        again.import_(again.export("u1"))
    assert e.value.status == 409
    label_id = again.show("u2")["labels"][0]["id"]
    again.delete_label("u2", label_id)
    assert again.show("u2")["entries"] == 0 and again.load("u2", model).values.shape[0] == 0
    again.delete("u2")
    with pytest.raises(LUTError) as e:
        again.show("u2")
    assert e.value.status == 404
    again.close()


def test_lut_cache_revalidated_across_stores(db_target, tiny):
    """Two stores on one database, as two replicas: a write through one is seen by the next load
    through the other, and an unchanged LUT is served from the cache."""
    model, tok = tiny
    a, b = LUTStore(db_target), LUTStore(db_target)
    assert b.load("u1", model) is None  # cold start
    a.teach(model, tok, "u1", LABELS[0])
    first = b.load("u1", model)
    assert first is not None and b.load("u1", model) is first  # cached while unchanged
    a.teach(model, tok, "u1", LABELS[1])
    second = b.load("u1", model)
    assert second.version > first.version and len(second) > len(first)
    a.delete("u1")
    assert b.load("u1", model) is None
    a.close(), b.close()


def test_concurrent_teaches_of_one_lut_are_each_whole(db_target, tiny):
    model, tok = tiny
    stores = [LUTStore(db_target), LUTStore(db_target)]
    errors = []

    def teach(i):
        try:
            stores[i % 2].teach(model, tok, "shared", LABELS[i])
        except Exception as e:  # noqa: BLE001  (reported below)
            errors.append(e)

    threads = [threading.Thread(target=teach, args=(i,)) for i in range(len(LABELS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    shown = stores[0].show("shared")
    assert sorted(x["label"] for x in shown["labels"]) == sorted(LABELS)
    assert shown["version"] == len(LABELS)
    # every label has all its entries (none lost to a concurrent teach) but those the labels taught
    # after it replaced: teaches of one LUT take turns, in the order of their label ids
    in_order = [x["label"] for x in sorted(shown["labels"], key=lambda x: x["id"])]
    expected = whole_label_counts(model, tok, in_order)
    assert {x["label"]: x["entries"] for x in shown["labels"]} == expected
    assert shown["entries"] == sum(expected.values())
    for s in stores:
        s.close()


KILL_SCRIPT = """
import os, sys
sys.path.insert(0, {root!r})
import storage
from lut_store import LUTStore
from model import load_model
from tokenizer import get_tokenizer
model = load_model("gpt2"); tok = get_tokenizer()
store = LUTStore({target!r})
store.teach(model, tok, "u1", "First lesson is kept safe.")
def die_before_commit(self, *exc):
    os._exit(9)  # like SIGKILL: no cleanup, no rollback, no commit
storage.Transaction.__exit__ = die_before_commit
store.teach(model, tok, "u1", "Second lesson is about to die.")
"""


def test_killed_mid_teach_leaves_no_partial_label(db_target, tiny, cli_env):
    r = subprocess.run([sys.executable, "-c", KILL_SCRIPT.format(root=ROOT, target=db_target)], env=cli_env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 9, r.stderr
    model, tok = tiny
    store = LUTStore(db_target)
    shown = store.show("u1")
    assert [x["label"] for x in shown["labels"]] == ["First lesson is kept safe."]
    assert shown["entries"] == len(build_entries(model, tok, "First lesson is kept safe.")["target"])
    store.teach(model, tok, "u1", "Second lesson is about to die.")  # nothing half-written is in the way
    assert len(store.show("u1")["labels"]) == 2
    store.close()


def test_keys_usage_and_history(db_target):
    from access import Access, AccessError
    a, b = Access(db_target), Access(db_target)  # two replicas
    assert a.authenticate(None) is None  # no keys yet: open
    secret, record = a.create_key("acme", luts=["acme-*"], rate_per_minute=5, burst=2)
    key = b.authenticate(f"Bearer {secret}")
    assert key.id == record["id"] and key.may_use("acme-1") and not key.may_use("other")
    with pytest.raises(AccessError) as e:
        b.authenticate(None)
    assert e.value.status == 401
    for status in (200, 200, 404):
        a.record("app1", key.id, "POST", "/generate", "gpt2", "acme-1", 3, 5, 12.345, status)
    b.record("app2", None, "GET", "/health", None, None, 0, 0, 1.0, 200)
    usage = b.usage()
    assert usage["by_app"][0] == {"app_id": "app1", "requests": 3, "prompt_tokens": 9, "completion_tokens": 15,
                                  "errors": 1, "mean_latency_ms": 12.35}
    assert json.loads(json.dumps(usage)) == usage  # plain JSON types on both engines
    assert [q["app_id"] for q in a.history(limit=2)] == ["app2", "app1"]
    assert len(a.history(key_id=key.id)) == 3
    b.revoke_key(record["id"])
    pytest.raises(AccessError, a.authenticate, f"Bearer {secret}")  # revoked everywhere; closed still
    with pytest.raises(AccessError) as e:
        a.revoke_key(record["id"])
    assert e.value.status == 409


def test_migrations_are_versioned_and_run_once(db_target):
    from access import Access
    from server.trainer import Trainer
    db = Database(db_target)
    LUTStore(db), Access(db), Trainer(db)
    with db.connection() as c:
        versions = dict(c.execute("SELECT component, version FROM schema_versions").fetchall())
    assert versions == {"luts": 2, "access": 2, "trainer": 3}
    LUTStore(db), Access(db), Trainer(db)  # a second start-up (another replica) changes nothing
    with db.connection() as c:
        assert dict(c.execute("SELECT component, version FROM schema_versions").fetchall()) == versions
        assert c.execute("SELECT COUNT(*) FROM train_jobs").fetchone()[0] == 0
    db.close()


def test_state_file_from_before_migrations_is_upgraded(tmp_path):
    """A SQLite state file written before versioned migrations (train_jobs without host/progress)."""
    import sqlite3

    from server.trainer import Trainer
    path = str(tmp_path / "old.sqlite")
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE train_jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, status TEXT NOT NULL, "
                     "pid INTEGER, output_dir TEXT NOT NULL, out_dir TEXT NOT NULL, config TEXT NOT NULL, "
                     "cancel_requested INTEGER NOT NULL DEFAULT 0, returncode INTEGER, error TEXT, "
                     "created REAL NOT NULL, finished REAL)")
        conn.execute("INSERT INTO train_jobs (status, output_dir, out_dir, config, created, finished) "
                     "VALUES ('succeeded', 'x', ?, '{}', 1, 2)", (str(tmp_path / "x"),))
    job = Trainer(path).get(1)
    assert job["status"] == "succeeded" and job["iteration"] is None


def test_training_job_shared_by_two_trainers(db_target, tmp_path, cli_env):
    """Started through one Trainer (replica), seen with its progress and cancelled through the
    other; max_jobs holds across both."""
    from server.trainer import JobError, Trainer
    data = tmp_path / "data"
    text = tmp_path / "text.txt"
    text.write_text("".join(f"ROMEO:\nLine {i} of a play, spoken softly to the moon.\n\n" for i in range(3000)))
    subprocess.run([sys.executable, "data/shakespeare_char/prepare.py", "--input", str(text), "--out_dir",
                    str(data / "shakespeare_char")], cwd=ROOT, env=cli_env, check=True, capture_output=True)
    import dataclasses

    import train
    out = tmp_path / "out" / "job"
    settings = {**dataclasses.asdict(train.TrainConfig()), "dataset": "shakespeare_char", "data_dir": str(data),
                "out_dir": str(out), "init_from": "scratch", "n_layer": 1, "n_head": 2, "n_embd": 16,
                "block_size": 16, "batch_size": 4, "max_iters": 100000, "eval_interval": 50, "eval_iters": 1,
                "log_interval": 1, "device": "cpu"}
    a, b = Trainer(db_target), Trainer(db_target)
    b.host = "another-host"  # b stands for a replica elsewhere: it cannot signal a's process itself
    job = a.start(settings, "out/job", str(out), {"dataset": "shakespeare_char"})
    try:
        with pytest.raises(JobError) as e:
            b.start(settings, "out/other", str(tmp_path / "out" / "other"), {})
        assert e.value.status == 409
        wait_for(lambda: (b.get(job["job_id"])["iteration"] or 0) >= 2, timeout=120, interval=0.3,
                 what="iteration 2 seen through the other trainer")
        assert [j["status"] for j in b.list()] == ["running"]
        db = Database(db_target)

        def copied():  # the runner's copy of the progress, for replicas that cannot read its files
            with db.connection() as c:
                row = c.execute("SELECT progress FROM train_jobs WHERE id = ?", (job["job_id"],)).fetchone()[0]
            return row and (json.loads(row).get("iteration") or 0) >= 2 and json.loads(row)
        progress = wait_for(copied, timeout=60, interval=0.2, what="the runner's progress copy")
        db.close()
        assert progress["max_iters"] == 100000
        cancelled = b.cancel(job["job_id"])  # recorded by b, carried out by a's runner
        assert cancelled["status"] == "cancelled"
        assert a.get(job["job_id"])["status"] == "cancelled"
    finally:  # never leave a 100,000-iteration job running, whatever failed above
        proc = a.procs.get(job["job_id"])
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        wait_for(lambda: not a.procs, timeout=60, what="the runner to record the end")  # before the schema goes


def test_a_job_whose_runner_stops_reporting_is_failed_everywhere(db_target, tmp_path):
    """A replica killed with its runner: other replicas stop showing the job as running once its
    heartbeat is RUNNER_TIMEOUT old; a runner that reports again puts it back to running."""
    from server import trainer
    here = trainer.Trainer(db_target)
    now = time.time()
    with Database(db_target).connection() as c:
        ids = [c.insert("INSERT INTO train_jobs (status, host, pid, output_dir, out_dir, config, created, heartbeat) "
                        "VALUES ('running', 'gone-host', 4242, 'out/x', ?, '{}', ?, ?)",
                        (str(tmp_path / "x"), now - 300, beat)) for beat in (now - trainer.RUNNER_TIMEOUT - 5, now)]
    lost, alive = (here.get(i) for i in ids)
    assert lost["status"] == "failed" and lost["error"].startswith("its runner on host gone-host stopped reporting")
    assert alive["status"] == "running"
    assert [j["status"] for j in trainer.Trainer(db_target).list()] == ["failed", "running"]  # every replica
    runner = trainer.Trainer(db_target)
    runner.host = "gone-host"
    runner._report(ids[0], 4242, str(tmp_path / "x"))  # it was only cut off: its next report revives the job
    assert here.get(ids[0])["status"] == "running" and here.get(ids[0])["error"] is None


# ---- the database goes away and comes back

def test_postgres_outage_is_503_with_retry_after_then_service_resumes(pg_url, app_factory, relay):
    proxy, proxied = relay(pg_url)
    c = app_factory(database_url=proxied).test_client()
    assert c.post("/train_lut", json={"lut_name": "u1", "label": LABEL}).status_code == 200
    proxy.cut()
    for request in (lambda: c.post("/train_lut", json={"lut_name": "u1", "label": LABELS[0]}),
                    lambda: c.post("/generate", json={"prompt": "TLG Capital is", "length": 4, "lut_name": "u1"}),
                    lambda: c.get("/luts"), lambda: c.get("/usage"), lambda: c.get("/api/train")):
        r = request()
        assert r.status_code == 503 and r.headers["Retry-After"], r.get_json()
        assert "database" in r.get_json()["detail"]
    assert c.get("/health").status_code == 200  # the process itself is fine
    assert "gpt2lut:store_errors_total 5.0" in c.get("/metrics").get_data(as_text=True)
    proxy.restore()
    ask = {"prompt": "TLG Capital is", "length": 6, "lut_name": "u1", "do_sample": False}
    r = wait_for(lambda: (r := c.post("/generate", json=ask)).status_code != 503 and r, timeout=30, interval=0.5,
                 what="the pool to reconnect by itself (no restart)")
    assert r.status_code == 200 and r.get_json()["completion"].startswith(" an asset management firm")
    assert c.post("/train_lut", json={"lut_name": "u1", "label": LABELS[0]}).status_code == 200
    assert [x["label"] for x in c.get("/luts/u1").get_json()["labels"]] == [LABEL, LABELS[0]]


def test_unreachable_database_is_store_unavailable():
    port = socket.create_server(("127.0.0.1", 0))
    closed = port.getsockname()[1]
    port.close()
    db = Database(f"postgresql://postgres@127.0.0.1:{closed}/test?connect_timeout=1")
    started = time.time()
    with pytest.raises(StoreUnavailable) as e:
        with Transaction(db) as c:
            c.execute("SELECT 1")
    assert e.value.headers["Retry-After"] and time.time() - started < 30
    db.close()
