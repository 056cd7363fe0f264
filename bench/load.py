"""
Overload on one replica: a live api_server.py (GPT-2 124M shape, random weights) and 128
concurrent clients for 2 minutes, half of them streaming (the LocalLab-style API's SSE /generate), one in four
of the streaming ones hanging up after the first chunk. Checks that no answer is a 5xx other than
503 with Retry-After (the queue is full; clients wait Retry-After, capped at 1 s, and come back),
that every accepted request completes or is cancelled by its client (nothing is left running or
queued afterwards), and that the RSS of the process that serves (gunicorn's worker, which holds the
model; api_server.py itself is its master) grows less than 5% from the median of the --window
seconds after warm-up to the median of the last --window seconds; reports the p99 time to first
token of the streamed requests. A run longer than 3 minutes (a soak, docs/memory.md) also prints
that RSS minute by minute.

    python bench/load.py                                   # 128 clients, 2 minutes (+ ~1 minute set-up)
    python bench/load.py --clients 32 --duration 30 --n_layer 2
    python bench/load.py --duration 1200 --rss_log rss.csv   # the 20-minute soak of docs/memory.md
"""
import argparse
import collections
import os
import statistics
import sys
import tempfile
import threading
import time

import requests
import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from model import GPT, GPTConfig  # noqa: E402
from serve import start_server  # noqa: E402

RSS_GROWTH = 0.05


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(f.read().split("VmRSS:")[1].split()[0]) / 1024


def children(pid):
    """The processes pid started (gunicorn's master: its worker), from every thread's list."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(c) for c in f.read().split()]
    return found


def server_rss(pid):
    """(MB of the processes that serve, MB of the parent that started them): api_server.py is
    gunicorn's master and the model lives in its worker; with --dev the one process serves."""
    try:
        workers = children(pid)
        return (sum(rss_mb(w) for w in workers), rss_mb(pid)) if workers else (rss_mb(pid), 0.0)
    except (OSError, IndexError):  # a worker exiting between the listing and the read
        return None


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = collections.Counter()
        self.ttft = []
        self.bad = []  # (what, detail) that must not happen

    def add(self, what, ttft=None, bad=None):
        with self.lock:
            self.counts[what] += 1
            if ttft is not None:
                self.ttft.append(ttft)
            if bad:
                self.bad.append(bad)


def client(k, url, deadline, new_tokens, tally):
    streaming, hang_up = k % 2 == 0, k % 8 == 0
    session = requests.Session()
    i = 0
    while time.time() < deadline:
        i += 1
        body = {"prompt": f"Client {k} request {i}: the history of the city begins", "length": new_tokens,
                "seed": k * 100000 + i, "stream": streaming}
        t0 = time.perf_counter()
        try:
            r = session.post(url + "/generate", json=body, stream=streaming, timeout=300)
        except requests.RequestException as e:
            tally.add("connection error", bad=("connection error", str(e)))
            continue
        if r.status_code == 503:
            retry = r.headers.get("Retry-After")
            r.close()
            if retry is None:
                tally.add("503 without Retry-After", bad=("503 without Retry-After", r.text[:200]))
            else:
                tally.add("503 (queue full)")
            time.sleep(min(float(retry or 1), 1.0))
            continue
        if r.status_code != 200:
            tally.add(f"{r.status_code}", bad=(r.status_code, r.text[:200]))
            r.close()
            continue
        if not streaming:
            n = r.json()["usage"]["completion_tokens"]
            tally.add("completed" if n == new_tokens else "short", bad=None if n == new_tokens else ("short", n))
            continue
        first, done = None, False
        try:
            for line in r.iter_lines():
                if line.startswith(b"data: ") and line != b"data: [DONE]" and first is None:
                    first = time.perf_counter() - t0
                    if hang_up:
                        break  # the client leaves: its generation must stop
                if line == b"data: [DONE]":
                    done = True
        except requests.RequestException as e:
            tally.add("stream broken", bad=("stream broken", str(e)))
            continue
        finally:
            r.close()
        tally.add("cancelled by its client" if hang_up else "completed" if done else "stream without [DONE]",
                  ttft=first, bad=None if hang_up or done else ("stream without [DONE]", k))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=128, help="concurrent clients")
    p.add_argument("--duration", type=float, default=120, help="seconds of load")
    p.add_argument("--warmup", type=float, default=20, help="seconds of load before the RSS baseline is taken")
    p.add_argument("--window", type=float, default=10, help="seconds of RSS samples (their median) for the "
                                                            "baseline after warm-up and for the end")
    p.add_argument("--rss_log", help="write every RSS sample here (CSV: seconds, serving MB, parent MB)")
    p.add_argument("--new_tokens", type=int, default=32, help="tokens per request")
    p.add_argument("--n_layer", type=int, default=12, help="model depth (12 = GPT-2 124M shape)")
    args = p.parse_args()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=args.n_layer))
    work = tempfile.mkdtemp()
    ckpt_dir = os.path.join(work, "models", "random")
    os.makedirs(ckpt_dir)
    torch.save({"model_args": model.config.__dict__, "model": model.state_dict()}, os.path.join(ckpt_dir, "ckpt.pt"))
    del model
    proc, url = start_server(work, "models/random")
    tally, rss = Tally(), []
    started = time.time()
    deadline = started + args.duration
    try:
        threads = [threading.Thread(target=client, args=(k, url, deadline, args.new_tokens, tally), daemon=True)
                   for k in range(args.clients)]
        for t in threads:
            t.start()
        while time.time() < deadline:
            sample = server_rss(proc.pid)
            if sample:
                rss.append((time.time() - started, *sample))
            time.sleep(1)
        for t in threads:
            t.join(timeout=360)
        left = None
        for _ in range(60):  # every accepted request finished or was cancelled: nothing stays behind
            left = requests.get(url + "/api/status").json()["engine"]
            if left["running"] == 0 and left["waiting"] == 0:
                break
            time.sleep(0.5)
        finished = left["finished"]
    finally:
        proc.terminate()
        proc.wait()

    if args.rss_log:
        with open(args.rss_log, "w") as f:
            f.write("seconds,serving_mb,parent_mb\n" + "".join(f"{t:.1f},{mb:.1f},{pmb:.1f}\n" for t, mb, pmb in rss))
    # medians over windows: RSS moves by a few MB with the requests in flight at the moment sampled
    after_warmup = [mb for t, mb, _ in rss if args.warmup <= t < args.warmup + args.window] or [rss[0][1]]
    at_end = [mb for t, mb, _ in rss if t >= args.duration - args.window] or [rss[-1][1]]
    base, end = statistics.median(after_warmup), statistics.median(at_end)
    growth = end / base - 1
    parent = statistics.median(pmb for _, _, pmb in rss[-max(1, int(args.window)):])
    ttft = sorted(tally.ttft)
    p99 = ttft[min(len(ttft) - 1, int(0.99 * len(ttft)))] if ttft else float("nan")
    print(f"{args.clients} clients for {args.duration:.0f} s, {args.new_tokens} tokens per request, "
          f"n_layer={args.n_layer}: {dict(tally.counts)}")
    print(f"engine afterwards: running {left['running']}, waiting {left['waiting']}; finished by reason {finished}")
    print(f"time to first token (streamed): p50 {statistics.median(ttft) * 1e3:.0f} ms, p99 {p99 * 1e3:.0f} ms "
          f"over {len(ttft)} streams" if ttft else "no stream got a first token")
    print(f"server RSS (the serving process): {base:.0f} MB after {args.warmup:.0f} s warm-up, {end:.0f} MB at the "
          f"end: {growth:+.1%} (target < {RSS_GROWTH:.0%})" + (f"; its parent (gunicorn's master) {parent:.0f} MB"
                                                              if parent else ""))
    marks = [m * 60 for m in range(1, int(args.duration // 60) + 1)] if args.duration > 180 else []
    if marks:  # a long run (a soak): the serving process's RSS minute by minute
        by_minute = [next((mb for t, mb, _ in rss if t >= m - 1), rss[-1][1]) for m in marks]
        print("server RSS by minute (MB): " + " ".join(f"{mb:.0f}" for mb in by_minute))
    checks = [("no 5xx but 503 with Retry-After, no 4xx, no broken stream or connection", not tally.bad),
              ("nothing left running or queued", left["running"] == 0 and left["waiting"] == 0),
              ("requests were accepted and completed", tally.counts["completed"] > 0),
              (f"RSS growth < {RSS_GROWTH:.0%}", growth < RSS_GROWTH)]
    for what, ok in checks:
        print(f"{'ok    ' if ok else 'MISSED'} {what}")
    for bad in tally.bad[:10]:
        print("  ", bad)
    sys.exit(0 if all(ok for _, ok in checks) else 1)


if __name__ == "__main__":
    main()
