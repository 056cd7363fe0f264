"""
GET /metrics: Prometheus metrics (prometheus_client), named as vLLM names its own under this
project's prefix (vllm:time_to_first_token_seconds -> gpt2lut:time_to_first_token_seconds, ...):

    gpt2lut:http_requests_total{method,route,status}    every request; route is the URL rule, not the path
    gpt2lut:e2e_request_latency_seconds{model_name}     per generation: queued to last token (histogram)
    gpt2lut:time_to_first_token_seconds{model_name}     queued to first token (histogram)
    gpt2lut:time_per_output_token_seconds{model_name}   between later tokens (histogram)
    gpt2lut:num_requests_waiting / _running{model_name} the engine's queue and batch rows (gauges)
    gpt2lut:prompt_tokens_total / generation_tokens_total{model_name}
    gpt2lut:lut_hits_total                              LUT entries that fired during generation
    gpt2lut:teach_latency_seconds                       one label taught and stored (histogram)
    gpt2lut:lut_cache_hits_total / lut_cache_misses_total   LUT loads served from the cache, or read
    gpt2lut:lut_cache_bytes / lut_cache_entries         loaded LUTs kept: estimated memory (at most --lut_cache_mb), count
    gpt2lut:rate_limit_refusals_total                   429 answers
    gpt2lut:store_errors_total                          requests refused with 503: the database unreachable
    gpt2lut:rate_limit_redis_up                         with --redis_url: 1 shared in Redis, 0 Redis unreachable
    gpt2lut:rate_limit_redis_errors_total               with --redis_url: failed Redis calls (limits per process)

/metrics needs no API key, like /health (Prometheus scrapes without one) and has no rate limit; it
shows no tenant's data (routes as rules such as /luts/<lut_name>, no key ids or LUT names). Under
gunicorn, prometheus_client's multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by gunicorn.conf.py)
sums every worker's metrics.
"""
import os
import time

from flask import Blueprint, Response, g, request
from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector,
                               generate_latest, multiprocess)

from server.common import service
from server.keys import recorded
from server.openapi import api

P = "gpt2lut"
bp = Blueprint("metrics", __name__)
LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
TTFT = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 20, 40, 80)
TPOT = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1, 2.5)


def multiprocess_mode():
    return "PROMETHEUS_MULTIPROC_DIR" in os.environ


class Metrics:
    """One app's metrics (its own registry: tests run several apps in one process)."""

    def __init__(self, redis=False):
        """redis: the rate limits are in Redis (--redis_url): export whether it is reachable."""
        r = self.registry = CollectorRegistry()
        if not multiprocess_mode():
            ProcessCollector(registry=r)  # RSS, CPU, open files (not available in multiprocess mode)
        model = ["model_name"]
        self.requests = Counter(f"{P}:http_requests", "HTTP requests by route template and status",
                                ["method", "route", "status"], registry=r)
        self.e2e = Histogram(f"{P}:e2e_request_latency_seconds", "Generation latency: queued to last token",
                             model, buckets=LATENCY, registry=r)
        self.ttft = Histogram(f"{P}:time_to_first_token_seconds", "Queued to first generated token", model,
                              buckets=TTFT, registry=r)
        self.tpot = Histogram(f"{P}:time_per_output_token_seconds", "Mean time between later tokens", model,
                              buckets=TPOT, registry=r)
        self.waiting = Gauge(f"{P}:num_requests_waiting", "Generations queued for a batch row", model,
                             multiprocess_mode="livesum", registry=r)
        self.running = Gauge(f"{P}:num_requests_running", "Generations in the running batch", model,
                             multiprocess_mode="livesum", registry=r)
        self.loaded = Gauge(f"{P}:model_loaded", "1 for each running model", model, multiprocess_mode="livemax",
                            registry=r)
        self._models_seen = set()
        self.prompt_tokens = Counter(f"{P}:prompt_tokens", "Prompt tokens of generations", model, registry=r)
        self.generation_tokens = Counter(f"{P}:generation_tokens", "Generated tokens", model, registry=r)
        self.lut_hits = Counter(f"{P}:lut_hits", "LUT entries that fired during generation", registry=r)
        self.teach = Histogram(f"{P}:teach_latency_seconds", "Teaching one label: entries built and stored",
                               buckets=LATENCY, registry=r)
        self.cache_hits = Counter(f"{P}:lut_cache_hits", "LUT loads served from the cache (revalidated)", registry=r)
        self.cache_misses = Counter(f"{P}:lut_cache_misses", "LUT loads read from the database", registry=r)
        self.cache_bytes = Gauge(f"{P}:lut_cache_bytes", "Estimated memory of the loaded LUTs kept (at most "
                                 "--lut_cache_mb)", multiprocess_mode="livesum", registry=r)
        self.cache_entries = Gauge(f"{P}:lut_cache_entries", "Loaded LUTs kept", multiprocess_mode="livesum",
                                   registry=r)
        self.refusals = Counter(f"{P}:rate_limit_refusals", "Requests refused by a rate limit (429)", registry=r)
        self.store_errors = Counter(f"{P}:store_errors", "Requests refused because the database was unreachable",
                                    registry=r)
        if redis:
            self.redis_up = Gauge(f"{P}:rate_limit_redis_up", "1: rate limits shared in Redis; 0: Redis unreachable, "
                                  "limits per process", multiprocess_mode="livemin", registry=r)
            self.redis_errors = Counter(f"{P}:rate_limit_redis_errors", "Failed Redis calls (limits fell back to "
                                        "per process)", registry=r)
            self._redis_errors_seen = 0

    # ---- what the LUT store reports (LUTStore(observe=...))

    def observe(self, event, value=1):
        if event == "cache_hit":
            self.cache_hits.inc(value)
        elif event == "cache_miss":
            self.cache_misses.inc(value)
        elif event == "fired":
            self.lut_hits.inc(value)
        elif event == "teach":
            self.teach.observe(value)

    # ---- generations

    @staticmethod
    def track(job):
        """Time a submitted generation: when its first token and its last come (the engine calls
        seq.append once per token, on its own thread)."""
        seq, times = job.seq, {"submitted": time.monotonic(), "first": None, "done": None}
        append = seq.append

        def timed_append(token, fire=None):
            if times["first"] is None:
                times["first"] = time.monotonic()
            append(token, fire)
            if seq.done and times["done"] is None:
                times["done"] = time.monotonic()

        seq.append, job.times = timed_append, times

    def finish(self, job, n_prompt, model_name):
        times, n_out = getattr(job, "times", None), len(job.seq.out_ids)
        if times is None:
            return
        done = times["done"] or time.monotonic()
        self.e2e.labels(model_name).observe(done - times["submitted"])
        if times["first"] is not None:
            self.ttft.labels(model_name).observe(times["first"] - times["submitted"])
            if n_out > 1:
                self.tpot.labels(model_name).observe((done - times["first"]) / (n_out - 1))
        self.prompt_tokens.labels(model_name).inc(n_prompt)
        self.generation_tokens.labels(model_name).inc(n_out)

    def refresh(self, svc):
        """Gauges that describe now: the engine's queue, Redis's state."""
        running = svc.models.names()
        for name in self._models_seen - set(running):  # stopped since: no series left behind
            for gauge in (self.waiting, self.running, self.loaded):
                gauge.remove(name)
        self._models_seen = set(running)
        for name in running:
            loaded = svc.models.get(name)
            load = loaded.engine.load if loaded is not None else {"waiting": 0, "running": 0}
            self.waiting.labels(name).set(load["waiting"])
            self.running.labels(name).set(load["running"])
            self.loaded.labels(name).set(1)
        cache = svc.store.cache_info()
        self.cache_bytes.set(cache["bytes"])
        self.cache_entries.set(cache["entries"])
        buckets = svc.access.buckets
        if hasattr(self, "redis_up"):
            self.redis_up.set(1 if buckets.shared else 0)
            self.redis_errors.inc(buckets.errors - self._redis_errors_seen)
            self._redis_errors_seen = buckets.errors


@bp.get("/metrics")
@api("monitoring", "Prometheus metrics (no key needed; see metrics.py)", access="public", limited=False)
def metrics_route():
    svc = service()
    svc.metrics.refresh(svc)
    if multiprocess_mode():  # every worker's files, summed
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = svc.metrics.registry
    return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)


@bp.after_app_request
def count_request(response):
    """Counts every request once its answer is out (a stream: when it ends, or its client left)."""
    svc = service()
    rule = request.url_rule.rule if request.url_rule is not None else "unmatched"
    method, status, jobs, view = request.method, response.status_code, g.get("jobs", []), g.get("view")

    def save():
        m = svc.metrics
        m.requests.labels(method, rule, str(status)).inc()
        if status == 429:
            m.refusals.inc()
        for job, n_prompt in jobs:
            m.finish(job, n_prompt, view.name if view else "none")
        m.refresh(svc)

    if response.is_streamed:
        response.response = recorded(response.response, save)
    else:
        save()
    return response
