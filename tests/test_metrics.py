"""GET /metrics: parses with prometheus_client's parser, needs no key, and its counters move as
requests are served (generations, teaching, LUT cache, rate limits, store errors); under gunicorn
(multiprocess mode) too."""
import logging

import requests
from prometheus_client.parser import text_string_to_metric_families

from conftest import DEFAULT, Server, script_env

LABEL = "TLG Capital is an asset management firm."


def scrape(text):
    """{(sample name, frozenset(labels)): value} of a /metrics page."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples, name, **labels):
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= ls)


def test_metrics_parse_and_move_as_requests_are_served(client):
    c = client
    before = scrape(c.get("/metrics").get_data(as_text=True))
    assert value(before, "gpt2lut:generation_tokens_total") == 0
    assert c.post("/train_lut", json={"lut_name": "u1", "label": LABEL}).status_code == 200
    for _ in range(2):  # a miss (read from the database), then a hit (the cache, revalidated)
        r = c.post("/generate", json={"prompt": "TLG Capital is", "length": 6, "lut_name": "u1"})
        assert r.status_code == 200
    stream = c.post("/generate", json={"prompt": "Hello", "length": 4, "stream": True})
    assert stream.get_data(as_text=True).endswith("data: [DONE]\n\n")
    assert c.post("/generate", json={"prompt": ""}).status_code == 400
    admin = c.post("/keys", json={"name": "admin", "admin": True}).get_json()["key"]
    limited = c.post("/keys", json={"name": "l", "burst": 1, "rate_per_minute": 1},
                     headers={"Authorization": f"Bearer {admin}"}).get_json()["key"]
    codes = [c.get("/luts", headers={"Authorization": f"Bearer {limited}"}).status_code for _ in range(3)]
    assert codes == [200, 429, 429]

    page = c.get("/metrics")  # no key needed, though keys exist now
    assert page.status_code == 200 and page.mimetype == "text/plain"
    after = scrape(page.get_data(as_text=True))
    gen = {"route": "/generate", "method": "POST"}
    assert value(after, "gpt2lut:http_requests_total", status="200", **gen) == 3
    assert value(after, "gpt2lut:http_requests_total", status="400", **gen) == 1
    assert value(after, "gpt2lut:http_requests_total", route="/luts", status="429") == 2
    assert value(after, "gpt2lut:rate_limit_refusals_total") == 2
    assert value(after, "gpt2lut:generation_tokens_total", model_name="gpt2") == 6 + 6 + 4
    assert value(after, "gpt2lut:prompt_tokens_total", model_name="gpt2") > 0
    for histogram in ("e2e_request_latency_seconds", "time_to_first_token_seconds", "time_per_output_token_seconds"):
        assert value(after, f"gpt2lut:{histogram}_count", model_name="gpt2") == 3, histogram
    assert value(after, "gpt2lut:teach_latency_seconds_count") == 1
    assert value(after, "gpt2lut:lut_cache_misses_total") >= 1 and value(after, "gpt2lut:lut_cache_hits_total") >= 1
    assert value(after, "gpt2lut:lut_hits_total") >= 1  # the taught label fired
    assert value(after, "gpt2lut:num_requests_running") == 0 and value(after, "gpt2lut:num_requests_waiting") == 0
    assert value(after, "gpt2lut:store_errors_total") == 0
    assert ("gpt2lut:rate_limit_redis_up", frozenset()) not in after  # no --redis_url: nothing to report


def test_metrics_under_gunicorn_multiprocess(hf_tiny, tmp_path):
    server = Server(str(tmp_path), dict(script_env(), GPT_LUT_DB=str(tmp_path / "l.sqlite"),
                                        GPT_STATE_DB=str(tmp_path / "s.sqlite"), GPT_MODELS_DIR=str(tmp_path / "o"),
                                        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prom")), gunicorn=True)
    with server:
        for _ in range(3):
            assert requests.post(server.url + "/generate", json={"prompt": "Hi", "length": 2}).ok
        samples = scrape(requests.get(server.url + "/metrics").text)
        assert value(samples, "gpt2lut:http_requests_total", route="/generate", status="200") == 3
        assert value(samples, "gpt2lut:generation_tokens_total") == 6
        assert list((tmp_path / "prom").glob("*.db"))  # the workers' files that /metrics sums


def test_redis_down_is_served_with_a_warning_in_the_log_and_in_metrics(app_factory, redis_url, relay, caplog):
    proxy, proxied = relay(redis_url)
    c = app_factory(redis_url=proxied, anonymous_rate_per_minute=DEFAULT).test_client()  # its bucket is in Redis
    assert c.get("/luts").status_code == 200  # the anonymous limit's bucket, in Redis
    assert value(scrape(c.get("/metrics").get_data(as_text=True)), "gpt2lut:rate_limit_redis_up") == 1
    proxy.cut()
    with caplog.at_level(logging.WARNING, logger="api_server"):
        assert c.get("/luts").status_code == 200
    assert any("Redis" in r.message and "per process" in r.message for r in caplog.records)
    samples = scrape(c.get("/metrics").get_data(as_text=True))
    assert value(samples, "gpt2lut:rate_limit_redis_up") == 0
    assert value(samples, "gpt2lut:rate_limit_redis_errors_total") >= 1
