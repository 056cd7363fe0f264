"""
Training jobs for the server: each one is `python train.py --config <out_dir>/train_config.json`
in its own process group, recorded in the state database (storage.py: SQLite, or PostgreSQL shared
by every replica) so that its status survives a server restart and every replica serves it.

A job is running, succeeded, failed or cancelled. The process's output goes to
<out_dir>/train_output.log; its progress (iteration, losses, tokens/s) is read from the
train_log.jsonl that train.py writes. A job that was running when the server stopped is looked
up again by pid: still alive (and still train.py on that config) means running, otherwise its
log says whether it finished ("done" record) or not.

Replicas: the replica that starts a job runs and watches it (one runner per job) and copies its
progress into the database every PROGRESS_EVERY seconds, with a heartbeat, so replicas on other
hosts show it too; a cancel sent to any replica is recorded there, and the runner stops the
process. max_jobs holds across replicas (the launch decision is taken under a database lock).
A runner that stops reporting for RUNNER_TIMEOUT seconds (its replica was killed, its host went
away) makes the job "failed" with an error saying so, on every replica, instead of "running" for
ever; a server restarted on the runner's host takes over watching a job still alive there, and a
runner that reports again puts its job back to "running".
"""
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from storage import Database, Transaction

TRAIN_PY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "train.py")
LAUNCH_LOCK = 7_253_115  # storage lock key: one launch decision at a time, across replicas
PROGRESS_EVERY = 1.0  # seconds between the runner's progress copies (and cancel checks)
RUNNER_TIMEOUT = 60.0  # seconds without a heartbeat after which a job's runner counts as gone
RUNNER_LOST = "its runner on host "  # how the error of a job whose runner went away begins

# Versioned migrations (storage.Database.migrate); {id}, {real}: each engine's types. Version 2:
# host is the runner's (only there is its pid meaningful); progress is the runner's copy of what
# the job's files say, for replicas on other hosts.
MIGRATIONS = ["""
CREATE TABLE IF NOT EXISTS train_jobs (
    id {id},
    status TEXT NOT NULL,            -- running | succeeded | failed | cancelled
    pid INTEGER,
    output_dir TEXT NOT NULL,        -- as the client gave it
    out_dir TEXT NOT NULL,           -- resolved, absolute
    config TEXT NOT NULL,            -- the request's settings (JSON)
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    returncode INTEGER,
    error TEXT,
    created {real} NOT NULL,
    finished {real}
)""", """
ALTER TABLE train_jobs ADD COLUMN host TEXT;
ALTER TABLE train_jobs ADD COLUMN progress TEXT
""",
    # version 3: when the runner last reported (time.time()); NULL for jobs of earlier versions
    "ALTER TABLE train_jobs ADD COLUMN heartbeat {real}"]


class JobError(Exception):
    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


class Trainer:

    def __init__(self, db, max_jobs=1):
        """db: a storage.Database, or its SQLite path or postgresql:// URL."""
        self.db = db if isinstance(db, Database) else Database(db)
        self.max_jobs = max_jobs
        self.host = socket.gethostname()
        self.lock = threading.Lock()  # one launch decision at a time in this process
        self.procs = {}  # job id -> Popen, for the jobs this process started
        self.adopted = set()  # ids of jobs an earlier server on this host started, watched here now
        self.db.migrate("trainer", MIGRATIONS)
        with self._db() as db:  # take over watching this host's jobs that are still alive
            running = db.execute("SELECT * FROM train_jobs WHERE status = 'running'").fetchall()
        for row in running:
            self._refresh(row)

    def _db(self):
        return self.db.connection()

    # ---------------------------------------------------------------- start, cancel

    def start(self, settings, output_dir, out_dir, request_config):
        """settings: a full train.py config (dict); writes it to out_dir/train_config.json and
        launches train.py on it. Returns the job."""
        with self.lock:
            self.list()  # records jobs that ended unwatched as ended
            with Transaction(self.db) as db:
                db.lock(LAUNCH_LOCK)
                running = db.execute("SELECT id FROM train_jobs WHERE status = 'running' ORDER BY id").fetchall()
                if len(running) >= self.max_jobs:
                    j = running[0][0]
                    raise JobError(409, f"training job {j} is still running (one job at a time); wait for it "
                                        f"or cancel it with POST /api/train/{j}/cancel")
                now = time.time()
                job_id = db.insert("INSERT INTO train_jobs (status, host, output_dir, out_dir, config, created, "
                                   "heartbeat) VALUES ('running', ?, ?, ?, ?, ?, ?)",
                                   (self.host, output_dir, out_dir, json.dumps(request_config), now, now))
            try:
                proc = launch(settings, out_dir)
            except OSError as e:
                with self._db() as db:
                    db.execute("UPDATE train_jobs SET status = 'failed', error = ?, finished = ? WHERE id = ?",
                               (f"could not start train.py: {e}", time.time(), job_id))
                raise JobError(500, f"could not start train.py: {e}") from None
            with self._db() as db:
                db.execute("UPDATE train_jobs SET pid = ? WHERE id = ?", (proc.pid, job_id))
            self.procs[job_id] = proc
        threading.Thread(target=self._watch, args=(job_id, proc, out_dir), daemon=True).start()
        return self.get(job_id)

    def _report(self, job_id, pid, out_dir):
        """The runner's report every PROGRESS_EVERY: progress and heartbeat (a job marked lost
        meanwhile is running again), and a cancel recorded by any replica carried out."""
        try:
            with self._db() as db:
                db.execute("UPDATE train_jobs SET progress = ?, heartbeat = ? WHERE id = ?",
                           (json.dumps(progress(out_dir)), time.time(), job_id))
                db.execute("UPDATE train_jobs SET status = 'running', error = NULL, finished = NULL "
                           "WHERE id = ? AND status = 'failed' AND returncode IS NULL AND error LIKE ?",
                           (job_id, RUNNER_LOST + "%"))
                if db.execute("SELECT cancel_requested FROM train_jobs WHERE id = ?", (job_id,)).fetchone()[0]:
                    os.killpg(pid, signal.SIGTERM)
        except Exception:  # the database is down for a while: the job goes on, and so does this
            pass

    def _watch(self, job_id, proc, out_dir):
        """The runner: reports (_report) until the process ends, then records the end."""
        while True:
            try:
                rc = proc.wait(timeout=PROGRESS_EVERY)
                break
            except subprocess.TimeoutExpired:
                self._report(job_id, proc.pid, out_dir)
        with self._db() as db:
            row = db.execute("SELECT cancel_requested FROM train_jobs WHERE id = ?", (job_id,)).fetchone()
            status = "cancelled" if row["cancel_requested"] else "succeeded" if rc == 0 else "failed"
            db.execute("UPDATE train_jobs SET status = ?, returncode = ?, finished = ?, error = ?, progress = ? "
                       "WHERE id = ? AND status = 'running'",
                       (status, rc, time.time(), None if status != "failed" else f"train.py exited with {rc}",
                        json.dumps(progress(out_dir)), job_id))
        self.procs.pop(job_id, None)

    def cancel(self, job_id):
        job = self.get(job_id)
        if job["status"] != "running":
            raise JobError(409, f"training job {job_id} is not running (it is {job['status']})")
        with self._db() as db:
            db.execute("UPDATE train_jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            host = db.execute("SELECT host FROM train_jobs WHERE id = ?", (job_id,)).fetchone()[0]
        if host not in (None, self.host):  # its runner, on another host, stops it within PROGRESS_EVERY
            for _ in range(int(40 / PROGRESS_EVERY)):
                if self.get(job_id)["status"] != "running":
                    break
                time.sleep(PROGRESS_EVERY)
            return self.get(job_id)
        try:
            if job["process_id"]:
                os.killpg(job["process_id"], signal.SIGTERM)
        except ProcessLookupError:
            pass
        proc = self.procs.get(job_id)
        if proc is not None:  # ours: the watcher records the end
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(job["process_id"], signal.SIGKILL)
                proc.wait()
            for _ in range(100):  # let the watcher thread write it
                if self.get(job_id)["status"] != "running":
                    break
                time.sleep(0.05)
        else:  # started by an earlier server: nobody waits on it, record it here
            with self._db() as db:
                db.execute("UPDATE train_jobs SET status = 'cancelled', finished = ? WHERE id = ? "
                           "AND status = 'running'", (time.time(), job_id))
        return self.get(job_id)

    # ---------------------------------------------------------------- status

    def get(self, job_id):
        with self._db() as db:
            row = db.execute("SELECT * FROM train_jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobError(404, f"no training job {job_id}")
        return self._describe(self._refresh(row))

    def list(self):
        with self._db() as db:
            rows = db.execute("SELECT * FROM train_jobs ORDER BY id").fetchall()
        return [self._describe(self._refresh(r), tail=0) for r in rows]

    def _refresh(self, row):
        """A job recorded as running that no thread here is watching: another host's whose runner
        stopped reporting is failed; one of this host's (the server restarted) is watched again
        while alive, and once gone it finished or failed, as its log says."""
        if row["status"] != "running" or row["id"] in self.procs or row["id"] in self.adopted:
            return row  # ended, or watched here
        if row["host"] not in (None, self.host):  # its runner records it, while it reports
            if row["heartbeat"] is None or time.time() - row["heartbeat"] < RUNNER_TIMEOUT:
                return row
            with self._db() as db:
                db.execute("UPDATE train_jobs SET status = 'failed', error = ?, finished = ? WHERE id = ? "
                           "AND status = 'running' AND heartbeat < ?",
                           (f"{RUNNER_LOST}{row['host']} stopped reporting (its replica stopped or the host is "
                            f"unreachable); the training process may have ended with it", time.time(), row["id"],
                            time.time() - RUNNER_TIMEOUT))
                return db.execute("SELECT * FROM train_jobs WHERE id = ?", (row["id"],)).fetchone()
        if row["pid"] is None:
            return row  # being launched
        if _alive(row["pid"], row["out_dir"]):
            self.adopted.add(row["id"])
            threading.Thread(target=self._adopt, args=(row["id"], row["pid"], row["out_dir"]), daemon=True).start()
            return row
        return self._ended_unwatched(row)

    def _adopt(self, job_id, pid, out_dir):
        """Watch a job an earlier server on this host started (not our child: polled, not waited)."""
        try:
            while _alive(pid, out_dir):
                self._report(job_id, pid, out_dir)
                time.sleep(PROGRESS_EVERY)
            with self._db() as db:
                row = db.execute("SELECT * FROM train_jobs WHERE id = ?", (job_id,)).fetchone()
            if row["status"] == "running":
                self._ended_unwatched(row)
        finally:  # the database down at the end: the next status request here records it instead
            self.adopted.discard(job_id)

    def _ended_unwatched(self, row):
        """A job of this host whose process is gone and was not our child: its log says how it ended."""
        done = any(r.get("event") == "done" for r in _records(row["out_dir"]))
        status = "cancelled" if row["cancel_requested"] else "succeeded" if done else "failed"
        error = None if status != "failed" else (
            "the training process, started by an earlier server (its exit code cannot be read here), ended and "
            "left no completion record; see log_tail")
        with self._db() as db:
            db.execute("UPDATE train_jobs SET status = ?, error = ?, finished = ? WHERE id = ? AND status = 'running'",
                       (status, error, time.time(), row["id"]))
            return db.execute("SELECT * FROM train_jobs WHERE id = ?", (row["id"],)).fetchone()

    def _describe(self, row, tail=20):
        """The job as the API shows it; progress from its files where they are (the runner's host),
        else from the runner's latest copy in the database."""
        here = row["host"] in (None, self.host) or os.path.exists(os.path.join(row["out_dir"], "train_config.json"))
        known = progress(row["out_dir"]) if here else json.loads(row["progress"] or "{}")
        job = {"job_id": row["id"], "status": row["status"], "process_id": row["pid"],
               "output_dir": row["output_dir"], "config": json.loads(row["config"]),
               "config_path": os.path.join(row["output_dir"], "train_config.json"),
               "created": row["created"], "finished": row["finished"], "returncode": row["returncode"],
               "error": row["error"], "iteration": None, "max_iters": None, "train_loss": None,
               "val_loss": None, "best_val_loss": None, "tokens_per_s": None, **known}
        log_tail = job.pop("log_tail", [])
        if tail:
            job["log_tail"] = log_tail[-tail:]
        return job


def launch(settings, out_dir):
    """Write the config and start train.py on it."""
    os.makedirs(out_dir, exist_ok=True)
    config_path = os.path.join(out_dir, "train_config.json")
    with open(config_path, "w") as f:
        json.dump(settings, f, indent=2)
    for stale in ("train_log.jsonl", "train_output.log"):  # progress of an earlier run here
        if os.path.exists(os.path.join(out_dir, stale)):
            os.remove(os.path.join(out_dir, stale))
    output = open(os.path.join(out_dir, "train_output.log"), "wb")
    # an argument list, no shell; its own session so cancel can stop it and its children
    proc = subprocess.Popen([sys.executable, TRAIN_PY, "--config", config_path], stdout=output,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    output.close()
    return proc


def progress(out_dir, tail=20):
    """A job's progress from the files train.py writes: iteration, losses, tokens/s, max_iters and
    the last lines of its output."""
    job = {"iteration": None, "max_iters": None, "train_loss": None, "val_loss": None, "best_val_loss": None,
           "tokens_per_s": None}
    for r in _records(out_dir):
        if r.get("event") == "iter":
            job.update(iteration=r["iter"], train_loss=r["loss"], tokens_per_s=r["tokens_per_s"])
        elif r.get("event") == "eval":
            job.update(iteration=r["iter"], val_loss=r["val_loss"])
            job["best_val_loss"] = min(r["val_loss"], job["best_val_loss"] or float("inf"))
        elif r.get("event") == "start":
            job["iteration"] = r["iter"]
    try:
        with open(os.path.join(out_dir, "train_config.json")) as f:
            job["max_iters"] = json.load(f).get("max_iters")
    except (OSError, ValueError):
        pass
    job["log_tail"] = _tail(os.path.join(out_dir, "train_output.log"), tail)
    return job


def _alive(pid, out_dir):
    """pid is still train.py running on this job's config (a recycled pid does not count)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().decode(errors="replace")
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":  # exited, not yet reaped
                return False
    except OSError:
        return False
    return "train.py" in cmdline and os.path.join(out_dir, "train_config.json") in cmdline


def _records(out_dir):
    try:
        with open(os.path.join(out_dir, "train_log.jsonl")) as f:
            lines = f.readlines()
    except OSError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written right now
            pass
    return out


def _tail(path, n):
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - 16384))
            return f.read().decode(errors="replace").splitlines()[-n:]
    except OSError:
        return []
