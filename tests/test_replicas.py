"""Replicas: shared rate limits in Redis (two Access objects, as two replicas), Redis going away
and coming back, and end to end two live `python api_server.py` replicas on one PostgreSQL and
one Redis (teach on A recalled on B, a key revoked on A refused by B, burst 10 across both)."""
import logging
import signal
import threading
import time

import pytest
import requests

from access import Access, AccessError
from conftest import Server, bench_module, script_env, wait_for
from server.ratelimit import LocalBuckets

LABEL_TEMPLATE = "Customer {i} of TLG is Zephyrine{i} Okonkwo."


def taken(access, key, n):
    """How many of n requests the key gets through."""
    ok = 0
    for _ in range(n):
        try:
            access.check_rate(key)
            ok += 1
        except AccessError as e:
            assert e.status == 429 and int(e.headers["Retry-After"]) >= 1
    return ok


def test_redis_bucket_is_shared_by_replicas(tmp_path, redis_url):
    a = Access(str(tmp_path / "a.sqlite"), rate_per_minute=1, burst=10, redis_url=redis_url)
    b = Access(str(tmp_path / "b.sqlite"), rate_per_minute=1, burst=10, redis_url=redis_url)
    secret, _ = a.create_key("k")
    key = a.authenticate(f"Bearer {secret}")
    results = []
    threads = [threading.Thread(target=lambda acc=acc: results.append(taken(acc, key, 10))) for acc in (a, b) * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(results) == 10  # not 20 (or 40): one bucket for both replicas
    assert a.buckets.shared and b.buckets.shared
    # any bucket key, e.g. the LocalLab-style API's per-address limit for requests without a key
    for i in range(3):
        (a if i % 2 else b).check_anonymous("10.0.0.7", 60, 3)
    with pytest.raises(AccessError):
        a.check_anonymous("10.0.0.7", 60, 3)


def test_without_redis_limits_are_per_process(tmp_path):
    a = Access(str(tmp_path / "s.sqlite"), rate_per_minute=1, burst=10)
    b = Access(str(tmp_path / "s.sqlite"), rate_per_minute=1, burst=10)
    assert isinstance(a.buckets, LocalBuckets)
    secret, _ = a.create_key("k")
    key = a.authenticate(f"Bearer {secret}")
    assert taken(a, key, 12) == 10 and taken(b, key, 12) == 10  # each process its own bucket


def test_redis_down_means_per_process_limits_and_a_warning_then_shared_again(tmp_path, redis_url, relay, caplog):
    proxy, proxied = relay(redis_url)
    a = Access(str(tmp_path / "s.sqlite"), rate_per_minute=1, burst=4, redis_url=proxied)
    secret, _ = a.create_key("k")
    key = a.authenticate(f"Bearer {secret}")
    assert taken(a, key, 2) == 2 and a.buckets.shared
    proxy.cut()
    with caplog.at_level(logging.WARNING, logger="api_server"):
        assert taken(a, key, 6) == 4  # served, limited by this process's own bucket
    assert not a.buckets.shared and a.buckets.errors >= 1
    assert any("rate limits are per process" in r.message for r in caplog.records)
    proxy.restore()
    a.buckets._retry_at = 0  # do not wait RETRY_EVERY seconds for the next attempt
    assert taken(a, key, 3) == 2 and a.buckets.shared  # the shared bucket again: 2 of burst 4 were left


# ---- two live replicas (`python api_server.py` on two loopback ports), one PostgreSQL, one Redis;
# both reached through relays that a test can cut, for outages on demand.

class Replicas:
    def __init__(self, tmp_path, pg_url, redis_url, relay, n=2):
        self.pg, self.redis = relay(pg_url), relay(redis_url)
        self.servers = []
        for i in range(n):
            workdir = tmp_path / f"replica{i}"
            workdir.mkdir()
            env = dict(script_env(), OMP_NUM_THREADS="1")  # a tiny model: more threads only contend
            self.servers.append(Server(str(workdir), env, args=[
                "--database_url", self.pg[1], "--redis_url", self.redis[1], "--models_dir", str(workdir)]))
        starting = [threading.Thread(target=s.start) for s in self.servers]  # at once: migrations take turns
        for t in starting:
            t.start()
        for t in starting:
            t.join()
        for s in self.servers:
            assert s.proc.poll() is None, open(s.log).read()[-2000:]

    @property
    def urls(self):
        return [s.url for s in self.servers]

    def stop(self):
        for s in self.servers:
            if s.proc.poll() is None:
                s.stop()


@pytest.fixture
def replicas(hf_tiny, tmp_path, pg_url, redis_url, relay):
    r = Replicas(tmp_path, pg_url, redis_url, relay)
    yield r
    r.stop()


def recalled(url, lut_name, label):
    """Generate from the label's trigger on one replica: does the label come out?"""
    trigger = requests.get(f"{url}/luts/{lut_name}").json()["labels"][0]["trigger"]
    r = requests.post(f"{url}/generate", json={"prompt": trigger, "lut_name": lut_name, "max_new_tokens": 24})
    assert r.status_code == 200, r.text
    return (trigger + r.json()["completion"]).startswith(label)


def test_two_replicas_one_database(replicas):
    a, b = replicas.urls
    # taught on A, recalled by the very next /generate on B
    hits = 0
    for i in range(100):
        label = LABEL_TEMPLATE.format(i=i)
        assert requests.post(f"{a}/train_lut", json={"lut_name": f"t{i}", "label": label}).status_code == 200
        hits += recalled(b, f"t{i}", label)
    assert hits == 100

    # a key revoked through A is refused by B on its next request
    admin = requests.post(f"{a}/keys", json={"name": "admin", "admin": True}).json()["key"]
    auth = lambda key: {"Authorization": f"Bearer {key}"}
    tenant = requests.post(f"{b}/keys", json={"name": "tenant", "luts": ["t*"]}, headers=auth(admin)).json()
    assert requests.get(f"{b}/luts", headers=auth(tenant["key"])).status_code == 200
    assert requests.delete(f"{a}/keys/{tenant['id']}", headers=auth(admin)).status_code == 200
    r = requests.get(f"{b}/luts", headers=auth(tenant["key"]))
    assert r.status_code == 401 and "revoked" in r.json()["detail"]

    # burst 10: exactly 10 requests through across both replicas, then 429
    limited = requests.post(f"{a}/keys", json={"name": "burst10", "burst": 10, "rate_per_minute": 1},
                            headers=auth(admin)).json()["key"]
    codes = [requests.get(f"{(a, b)[i % 2]}/luts", headers=auth(limited)).status_code for i in range(14)]
    assert codes == [200] * 10 + [429] * 4
    metrics = requests.get(f"{b}/metrics").text
    assert "gpt2lut:rate_limit_refusals_total" in metrics and "gpt2lut:rate_limit_redis_up 1.0" in metrics


def test_kill_9_during_concurrent_teaches_leaves_only_whole_labels(replicas, tiny):
    replicas_bench = bench_module("replicas")  # the fault bench/replicas.py measures, asserted here
    a, b = replicas.urls
    report = replicas_bench.kill_during_teaches(
        lambda: replicas.servers[0].proc.send_signal(signal.SIGKILL), a, b, *tiny)
    assert len(report["acknowledged"]) >= 3 and report["cut"], report  # the kill came mid-way
    assert not report["missing"] and not report["partial"], report
    assert set(report["stored"]) >= {f"k{i}" for i in report["acknowledged"]}


def test_database_outage_under_load_then_resume_and_redis_down(replicas, tiny):
    """8 clients generate and teach on both replicas while the database goes away for a while:
    503 with Retry-After (never another 5xx), then service resumes without a restart, nothing
    acknowledged is lost. Then Redis goes away: requests are still served."""
    from lut import build_entries
    urls = replicas.urls
    stop, results, lock = threading.Event(), [], threading.Lock()

    def client(k):
        i = 0
        while not stop.is_set():
            url, i = urls[k % 2], i + 1
            started = time.time()
            if k % 2:
                name, label = f"c{k}-{i}", LABEL_TEMPLATE.format(i=k * 1000 + i)
                r = requests.post(f"{url}/train_lut", json={"lut_name": name, "label": label}, timeout=60)
            else:
                name, label = None, None
                r = requests.post(f"{url}/generate", json={"prompt": "Hello", "length": 4}, timeout=60)
            with lock:
                results.append((k, started, r.status_code, r.headers.get("Retry-After"), name, label))

    def seen(condition):
        with lock:
            return [x for x in results if condition(*x)]

    def back(k, since, n=3):
        """Client k's last n requests started after `since` and all succeeded."""
        mine = seen(lambda c, t, *_: c == k and t > since)
        return len(mine) >= n and all(s == 200 for _, _, s, *_ in mine[-n:])

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: all(seen(lambda c, t, s, *_: c == k and s == 200) for k in range(8)), timeout=120,
                 what="every client served once before the outage")
        cut_at = time.time()
        replicas.pg[0].cut()
        wait_for(lambda: seen(lambda c, t, s, *_: t >= cut_at and s == 503), timeout=60,
                 what="a 503 during the outage")  # the outage was seen
        restored_at = time.time()
        replicas.pg[0].restore()
        wait_for(lambda: all(back(k, restored_at) for k in range(8)), timeout=120,
                 what="every client served again after the outage")  # no restart needed
    finally:
        stop.set()
        for t in threads:
            t.join()
    statuses = {s for _, _, s, *_ in results}
    assert statuses <= {200, 503}, statuses
    assert all(retry for _, _, s, retry, _, _ in results if s == 503)
    stored = {x["name"]: x for x in requests.get(f"{urls[0]}/luts").json()["luts"]}
    model, tok = tiny
    for _, _, s, _, name, label in results:
        if name and s == 200:  # nothing acknowledged lost: the label is there, whole
            whole = len(build_entries(model, tok, label)["target"])
            assert stored[name]["labels"] == 1 and stored[name]["entries"] == whole, (stored[name], whole)

    key = requests.post(f"{urls[0]}/keys", json={"name": "a", "admin": True}).json()["key"]
    admin = {"Authorization": f"Bearer {key}"}
    replicas.redis[0].cut()
    for url in urls:  # a key's rate limit, per process now
        assert requests.get(f"{url}/luts", headers=admin).status_code == 200
        assert "gpt2lut:rate_limit_redis_up 0.0" in requests.get(f"{url}/metrics").text
