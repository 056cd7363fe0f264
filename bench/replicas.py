"""
Faults with two live replicas (`python api_server.py` on two loopback ports) on one PostgreSQL and
one Redis, done for real on this machine (tests/test_replicas.py does the same through relays it
cuts, in seconds):

1. kill -9 replica A in the middle of 8 clients' teaches: every acknowledged label is whole on
   B, and no partial label exists;
2. restart PostgreSQL (pg_ctlcluster stop, 6 s, start) while 8 clients generate and teach on both replicas: 503
   with Retry-After during the outage (never another 5xx), service resumes without restarting a
   replica, nothing acknowledged is lost;
3. stop Redis: requests are still served (limits per process, /metrics says so); Redis started
   again, limits are shared again.

It restarts this machine's PostgreSQL and Redis: run it where nothing else needs them meanwhile.

    python bench/replicas.py
    python bench/replicas.py --database_url postgresql://postgres@127.0.0.1:5432/test --redis_url redis://127.0.0.1:6379/0
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

import requests
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lut import build_entries  # noqa: E402
from model import GPT, GPTConfig, load_model  # noqa: E402
from serve import start_server  # noqa: E402
from store import drop_schema, fresh_schema  # noqa: E402
from tokenizer import get_tokenizer  # noqa: E402

PG_CTL = "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main {}"
OUTAGE = 6  # seconds PostgreSQL stays down in the restart (a bare `restart` is shorter than the pool's wait)
REDIS_STOP = "redis-cli -p 6379 shutdown nosave"
REDIS_START = ("redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save '' --appendonly no "
               "--dir /var/lib/redis --logfile /var/log/redis/ci.log")
LABEL = "Customer {i} of TLG is Zephyrine{i} Okonkwo."


def replica(work, name, flags):
    os.makedirs(os.path.join(work, name), exist_ok=True)
    return start_server(os.path.join(work, name), "../models/random", "--models_dir", "..", *flags)


def kill_during_teaches(kill, a, b, model, tok, clients=8):
    """`clients` threads teach new labels on replica A, each until A stops answering; `kill` is
    called once 3 are acknowledged, so it lands in the middle of the teaches. Returns what B holds:
    {"acknowledged", "cut" (teaches A never answered), "stored", "missing", "partial"}."""
    acknowledged, cut, lock = [], [], threading.Lock()

    def teach(k):
        for j in range(1000):
            i = k * 1000 + j
            try:
                r = requests.post(f"{a}/train_lut", json={"lut_name": f"k{i}", "label": LABEL.format(i=i)},
                                  timeout=120)
            except requests.RequestException:
                with lock:
                    cut.append(i)
                return
            assert r.status_code == 200, r.text
            with lock:
                acknowledged.append(i)

    threads = [threading.Thread(target=teach, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    deadline = time.time() + 120
    while len(acknowledged) < 3 and time.time() < deadline:
        time.sleep(0.005)
    kill()
    for t in threads:
        t.join()
    stored = {x["name"]: x for x in requests.get(f"{b}/luts", params={"limit": 1000}).json()["luts"]}
    whole = {n: len(build_entries(model, tok, LABEL.format(i=int(n[1:])))["target"]) for n in stored}
    return {"acknowledged": acknowledged, "cut": cut, "stored": stored,
            "missing": [i for i in acknowledged if f"k{i}" not in stored],
            "partial": [n for n, x in stored.items() if x["labels"] != 1 or x["entries"] != whole[n]]}


def database_restart(urls):
    stop, results, lock = threading.Event(), [], threading.Lock()

    def client(k):
        i = 0
        while not stop.is_set():
            i += 1
            url = urls[k % 2]
            name = f"c{k}-{i}" if k % 2 else None
            try:
                if name:
                    r = requests.post(f"{url}/train_lut", json={"lut_name": name,
                                                                "label": LABEL.format(i=k * 1000 + i)}, timeout=120)
                else:
                    r = requests.post(f"{url}/generate", json={"prompt": "Hello", "length": 4}, timeout=120)
            except requests.RequestException as e:
                r = e
            with lock:
                results.append((time.time(), getattr(r, "status_code", "error"),
                                getattr(r, "headers", {}).get("Retry-After"), name))
            if getattr(r, "status_code", None) == 503:
                time.sleep(0.2)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    time.sleep(3)
    began = time.time()
    subprocess.run(PG_CTL.format("stop"), shell=True, check=True, capture_output=True)
    time.sleep(OUTAGE)
    subprocess.run(PG_CTL.format("start"), shell=True, check=True, capture_output=True)
    ended = time.time()
    time.sleep(8)
    stop.set()
    for t in threads:
        t.join()
    codes = [s for _, s, _, _ in results]
    bad = [s for _, s, retry, _ in results if s != 200 and not (s == 503 and retry)]
    outage = [s for t, s, _, _ in results if began <= t <= ended + 5]
    late = [s for t, s, _, _ in results if t > ended + 5]
    stored = {x["name"] for x in requests.get(f"{urls[0]}/luts").json()["luts"]}
    lost = [n for _, s, _, n in results if n and s == 200 and n not in stored]
    print(f"2. PostgreSQL restarted ({ended - began:.1f} s) under 8 clients: {len(codes)} requests, "
          f"{codes.count(200)} x 200, {codes.count(503)} x 503 with Retry-After, {len(bad)} other; "
          f"{outage.count(503)} of {len(outage)} answers around the restart were 503; after it "
          f"{late.count(200)} of {len(late)} were 200; {len(lost)} acknowledged teaches lost")
    for t, s, retry, name in results:
        if s != 200 and not (s == 503 and retry):
            print(f"   {t - began:+.1f} s: {s} ({'teach' if name else 'generate'})")
    return not bad and late and all(s == 200 for s in late) and not lost


def redis_stop(urls, admin):
    auth = {"Authorization": f"Bearer {admin}"}
    subprocess.run(REDIS_STOP, shell=True, capture_output=True)
    served = [requests.get(f"{u}/luts", headers=auth).status_code for u in urls for _ in range(3)]
    down = ["gpt2lut:rate_limit_redis_up 0.0" in requests.get(f"{u}/metrics").text for u in urls]
    subprocess.run(REDIS_START, shell=True, check=True, capture_output=True)
    time.sleep(2.5)  # ratelimit.RETRY_EVERY
    for u in urls:
        requests.get(f"{u}/luts", headers=auth)
    up = ["gpt2lut:rate_limit_redis_up 1.0" in requests.get(f"{u}/metrics").text for u in urls]
    print(f"3. Redis stopped: {served.count(200)} of {len(served)} requests served, /metrics shows Redis down on "
          f"{sum(down)} of 2 replicas; Redis started again: shared again on {sum(up)} of 2")
    return served.count(200) == len(served) and all(down) and all(up)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--database_url", default="postgresql://postgres@127.0.0.1:5432/test",
                   help="the PostgreSQL this machine runs (a schema of its own is made and dropped)")
    p.add_argument("--redis_url", default="redis://127.0.0.1:6379/0", help="the Redis this machine runs")
    p.add_argument("--n_layer", type=int, default=2, help="model depth (GPT-2 124M width)")
    args = p.parse_args()
    torch.manual_seed(0)
    work = tempfile.mkdtemp()
    ckpt = os.path.join(work, "models", "random")
    os.makedirs(ckpt)
    model = GPT(GPTConfig(n_layer=args.n_layer))
    torch.save({"model_args": model.config.__dict__, "model": model.state_dict()}, os.path.join(ckpt, "ckpt.pt"))
    model, tok = load_model(ckpt, "cpu", torch.float32), get_tokenizer()  # as the replicas load it
    schema, url = fresh_schema(args.database_url)
    flags = ["--database_url", url, "--redis_url", args.redis_url]
    procs = []
    try:
        (a_proc, a), (b_proc, b) = replica(work, "a", flags), replica(work, "b", flags)
        procs += [a_proc, b_proc]
        report = kill_during_teaches(lambda: a_proc.send_signal(signal.SIGKILL), a, b, model, tok)
        print(f"1. kill -9 during 8 clients' teaches: {len(report['acknowledged'])} acknowledged before the "
              f"kill, {len(report['cut'])} cut by it, {len(report['stored'])} stored, "
              f"{len(report['missing'])} acknowledged but missing, {len(report['partial'])} partial")
        ok = [not report["missing"] and not report["partial"] and report["acknowledged"] and report["cut"]]
        a_proc, a = replica(work, "a", flags)
        procs.append(a_proc)
        ok.append(database_restart([a, b]))
        admin = requests.post(f"{a}/keys", json={"name": "admin", "admin": True}).json()["key"]
        ok.append(redis_stop([a, b], admin))
    finally:
        print(f"replica logs: {work}/a/server.log, {work}/b/server.log")
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
                proc.wait()
        drop_schema(args.database_url, schema)
    print("all faults handled" if all(ok) else "MISSED: see above")
    sys.exit(0 if all(ok) else 1)


if __name__ == "__main__":
    main()
