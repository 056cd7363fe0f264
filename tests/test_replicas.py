"""Replicas: shared rate limits in Redis (two Access objects, as two replicas), Redis going away
and coming back, and end to end two live `python api_server.py` replicas on one PostgreSQL and
one Redis (teach on A recalled on B, a key revoked on A refused by B, burst 10 across both)."""
import logging
import threading
from urllib.parse import urlsplit

import pytest
import requests

from access import Access, AccessError
from conftest import Proxy, Server, script_env
from ratelimit import LocalBuckets

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
    # any bucket key, e.g. seed 002's per-address limit for requests without a key
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


def test_redis_down_means_per_process_limits_and_a_warning_then_shared_again(tmp_path, redis_url, caplog):
    url = urlsplit(redis_url)
    proxy = Proxy(url.hostname, url.port or 6379)
    a = Access(str(tmp_path / "s.sqlite"), rate_per_minute=1, burst=4,
               redis_url=redis_url.replace(f"{url.hostname}:{url.port}", f"127.0.0.1:{proxy.port}"))
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
