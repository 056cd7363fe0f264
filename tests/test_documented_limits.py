"""The LocalLab-style API's rate limit for every client (per address for requests without an API key; per key
keyed ones) and the TGI-style API's model_id echoed as sent. The in-process tests read the buckets'
own clock (frozen, moved by hand), and the live server refills one request a minute: however slowly
this machine serves a burst, nothing refills during it."""
import os
import types

import pytest
import requests

from api_server import create_app
from conftest import DEFAULT, Server, script_env


@pytest.fixture
def clock(monkeypatch):
    """The rate limiter's clock (server.ratelimit's time.monotonic), stopped: advance(s) moves it."""
    from server import ratelimit
    now = [1000.0]
    monkeypatch.setattr(ratelimit, "time", types.SimpleNamespace(monotonic=lambda: now[0]))

    class Clock:
        def advance(self, seconds):
            now[0] += seconds
    return Clock()


def get(client, path, address, **kwargs):
    return client.get(path, environ_base={"REMOTE_ADDR": address}, **kwargs)


def test_anonymous_limit_is_on_by_default(app_factory, clock):
    c = app_factory(anonymous_rate_per_minute=DEFAULT).test_client()  # the defaults: 60 per minute, burst 10
    assert [get(c, "/api/status", "10.0.0.1").status_code for _ in range(10)] == [200] * 10
    r = get(c, "/v1/models", "10.0.0.1")
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"  # one request refills in 1 s
    assert r.get_json()["error"]["code"] == "rate_limit_exceeded"  # OpenAI's error object under /v1
    r = get(c, "/api/status", "10.0.0.1")
    assert r.status_code == 429 and "60 requests per minute (burst 10)" in r.get_json()["detail"]
    assert get(c, "/api/status", "10.0.0.2").status_code == 200  # another client has its own bucket
    for path in ("/health", "/playground", "/playground/playground.js", "/docs"):  # liveness, static pages
        assert get(c, path, "10.0.0.1").status_code == 200, path
    assert get(c, "/openapi.json", "10.0.0.1").status_code == 429  # public, but not exempt
    clock.advance(1.0)  # one request's worth refilled, no more
    assert [get(c, "/api/status", "10.0.0.1").status_code for _ in range(2)] == [200, 429]


def test_x_forwarded_for_counts_only_behind_trusted_proxies(app_factory, tmp_path, clock):
    c = app_factory(anonymous_rate_per_minute=60, anonymous_burst=3).test_client()
    spoofed = [get(c, "/api/status", "10.0.0.1", headers={"X-Forwarded-For": f"1.2.3.{i}"}).status_code
               for i in range(4)]
    assert spoofed == [200, 200, 200, 429]  # ignored by default: the socket's address is the client
    c = app_factory(tmp_path / "proxied", anonymous_rate_per_minute=60, anonymous_burst=3,
                    trusted_proxies=1).test_client()
    via_proxy = lambda chain: get(c, "/api/status", "10.0.0.9", headers={"X-Forwarded-For": chain}).status_code
    assert [via_proxy("1.1.1.1") for _ in range(4)] == [200, 200, 200, 429]
    assert via_proxy("6.6.6.6, 1.1.1.1") == 429  # what the client wrote before the proxy's entry is not trusted
    assert via_proxy("2.2.2.2") == 200


def test_keyed_requests_are_limited_per_key_not_per_address(app_factory, clock):
    app = app_factory(anonymous_rate_per_minute=60, anonymous_burst=2, rate_limit_burst=4)
    c = app.test_client()
    assert [get(c, "/api/status", "10.0.0.1").status_code for _ in range(3)] == [200, 200, 429]
    secret, _ = app.extensions["gpt"].access.create_key("root", admin=True)
    auth = {"Authorization": f"Bearer {secret}"}
    keyed = [get(c, "/api/status", "10.0.0.1", headers=auth).status_code for _ in range(5)]
    assert keyed == [200, 200, 200, 200, 429]  # the key's own bucket (burst 4), not the address's
    assert get(c, "/api/status", "10.0.0.2").status_code == 401  # keys exist now: a key is needed
    assert get(c, "/public/models", "10.0.0.1").status_code == 429  # keyless public routes: per address


def test_limit_off_and_bad_settings(app_factory, tmp_path, monkeypatch, clock):
    c = app_factory(anonymous_rate_per_minute=0).test_client()
    assert all(get(c, "/api/status", "10.0.0.1").status_code == 200 for _ in range(30))
    with pytest.raises(ValueError, match="anonymous_burst"):
        app_factory(tmp_path / "bad", anonymous_burst=0)
    monkeypatch.chdir(tmp_path)  # create_app() with no config reads GPT_* variables, as gunicorn runs it
    monkeypatch.setenv("GPT_ANONYMOUS_BURST", "2")
    monkeypatch.setenv("GPT_DEVICE", "cpu")
    c = create_app().test_client()
    assert [get(c, "/api/status", "10.0.0.1").status_code for _ in range(3)] == [200, 200, 429]


def test_live_server_11th_request_of_a_burst_is_429(hf_tiny, tmp_path):
    """One request a minute refills: the 11th of a burst of 11 is refused unless the burst took a minute."""
    with Server(str(tmp_path), script_env(), args=["--anonymous_rate_per_minute", "1"]) as s:
        with requests.Session() as http:
            answers = [http.get(s.url + "/api/status") for _ in range(11)]
            assert [r.status_code for r in answers[:10]] == [200] * 10
            assert answers[10].status_code == 429 and int(answers[10].headers["Retry-After"]) >= 1
            assert "1 requests per minute (burst 10)" in answers[10].json()["detail"]
            assert http.get(s.url + "/health").status_code == 200


def test_generate_echoes_model_id_as_sent(client, tmp_path):
    c = client
    ask = {"prompt": "Once upon a time", "max_new_tokens": 4}
    assert c.post("/generate", json={**ask, "model_id": "gpt-2"}).get_json()["model_id"] == "gpt-2"  # the TGI-style API
    assert c.post("/generate", json={**ask, "model_id": "gpt2"}).get_json()["model_id"] == "gpt2"
    assert c.post("/generate", json=ask).get_json()["model_id"] == "gpt2"  # none sent: the running model
    r = c.post("/generate", json={**ask, "model_id": 7})
    assert r.status_code == 400 and r.get_json()["detail"] == "model_id must be a string"
    assert os.path.exists(tmp_path / "luts.sqlite")


def test_per_address_buckets_do_not_pile_up(monkeypatch):
    from server.ratelimit import LocalBuckets
    buckets = LocalBuckets()
    monkeypatch.setattr(LocalBuckets, "PRUNE_AT", 100)
    assert buckets.take("anon:busy", 1e-9, 1) == (True, 0)  # empty, and stays so (refills in ~30 years)
    for i in range(250):  # one request each from many addresses: their buckets refill at once
        buckets.take(f"anon:10.0.0.{i}", 1e9, 10)
    assert len(buckets._buckets) <= 100
    assert buckets.take("anon:busy", 1e-9, 1)[0] is False  # a bucket still in use is kept
