"""
REST server: GPT-2 with per-user LUTs on one model owned by a continuous-batching engine. The
routes live in one Flask blueprint per API surface: lut_api (seed 000: /health, /train_lut,
/generate), nanogpt_api (seed 001: /api/*), locallab_api (seed 002), tgi_api (seed 003),
openai_api (/v1), keys_api (API keys, usage, /public/models, and the per-request key checks),
luts_api (LUT management), playground (the browser page); openapi.py documents them. create_app
wires them to one Service.

    python api_server.py --port 5000 --model_type gpt2
    gunicorn -c gunicorn.conf.py 'api_server:create_app()'
"""
import argparse
import dataclasses
import logging
import os
import threading
import time

from flask import Flask, current_app, g, has_request_context, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import IntegerConverter

import keys_api
import locallab_api
import lut_api
import luts_api
import metrics
import nanogpt_api
import openai_api
import openapi
import playground
import tgi_api
from access import Access, AccessError
from api_common import APIError, resolve_model_path, trained_models
from engine import Engine, QueueFull
from generate import GenerationError
from lut import LUTError, LUTStore
from model import PRETRAINED, QUANTIZE, ModelLoadError, find_checkpoint, load_model, resolve_device
from storage import Database, StoreUnavailable
from tokenizer import get_tokenizer
from trainer import JobError, Trainer

log = logging.getLogger("api_server")

DEFAULTS = dict(
    model_type="gpt2",  # loaded at start-up unless model_path is given; None = start with no model
    model_path=None,
    device="auto",
    dtype="float32",
    quantize=None,  # "int8": int8 weights on the CPU (model.py, kernels.py)
    lut_db="out/luts.sqlite",
    models_dir="out",
    data_dir="data",  # prepared datasets for /api/train
    state_db="out/server.sqlite",  # training jobs
    database_url=None,  # postgresql://...: LUTs, keys, usage and jobs there (shared by replicas), not in the files
    redis_url=None,  # redis://...: rate-limit buckets there, shared by replicas (else per process)
    max_train_jobs=1,  # /api/train answers 409 while this many run
    max_batch=8,  # sequences decoded together
    max_queue=64,  # requests waiting beyond that get 503
    draft_tokens=8,  # speculative decoding of a greedy request decoding alone (generate.py); 0 = off
    max_batch_prompts=32,  # /generate/batch
    max_body_bytes=1 << 20,  # larger bodies get 413 (LUT imports may be up to 64x this)
    request_timeout=300,  # seconds a generation may take
    rate_limit_per_minute=60,  # per API key (once keys exist), unless the key sets its own
    rate_limit_burst=10,
    public_models=None,  # JSON file: what GET /public/models says of each model (pricing, ...)
    anonymous_rate_per_minute=60,  # seed 002: requests without an API key, per client address; 0 = no limit
    anonymous_burst=10,
    trusted_proxies=0,  # proxies in front that append to X-Forwarded-For; 0 = use the socket's address
    max_teach_labels=256,  # labels per POST /luts/<name>/labels (413 beyond)
)
BLUEPRINTS = (lut_api.bp, nanogpt_api.bp, locallab_api.bp, tgi_api.bp, openai_api.bp, keys_api.bp, luts_api.bp,
              playground.bp, metrics.bp)


class ModelSlot:
    """The loaded model, its tokenizer and engine, swapped as a whole by /api/load_model."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.lock = threading.Lock()
        self.model = self.tokenizer = self.engine = None
        self.name = None
        self.error = "no model loaded yet"

    def load(self, init_from, name):
        device, dtype = resolve_device(self.cfg["device"], self.cfg["dtype"])
        model = load_model(init_from, device, dtype, self.cfg["quantize"])
        tokenizer = get_tokenizer(model.tokenizer_spec)
        engine = Engine(model, tokenizer, self.cfg["max_batch"], self.cfg["max_queue"], self.cfg["draft_tokens"])
        with self.lock:
            old = self.engine
            self.model, self.tokenizer, self.engine, self.name, self.error = model, tokenizer, engine, name, None
        if old:
            old.stop()  # finishes what it is running, then its thread ends
        log.info("loaded %s on %s", name, device)

    def unload(self):
        """Free the model; returns its name (None if none was loaded)."""
        with self.lock:
            name, engine = (self.name, self.engine) if self.engine is not None else (None, None)
            self.model = self.tokenizer = self.engine = self.name = None
            self.error = "unloaded by request" if name else self.error
        if engine:
            engine.stop()
        return name

    def get(self):
        with self.lock:
            if self.engine is None:
                raise APIError(503, f"no model is loaded ({self.error}); POST /api/load_model with a model_type "
                                    f"or model_path", {"Retry-After": "30"})
            return self.model, self.tokenizer, self.engine


# ------------------------------------------------------------------------ the service

class Service:
    """What the routes share: the model slot, the LUT store, the trainer, and generation."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.models_dir = os.path.realpath(cfg["models_dir"])
        os.makedirs(self.models_dir, exist_ok=True)
        self.slot = ModelSlot(cfg)
        shared = Database(cfg["database_url"]) if cfg["database_url"] else None  # one pool for all three
        state = shared or Database(cfg["state_db"])
        self.metrics = metrics.Metrics(redis=bool(cfg["redis_url"]))
        self.store = LUTStore(shared or cfg["lut_db"], observe=self.metrics.observe)
        self.trainer = Trainer(state, cfg["max_train_jobs"])
        self.access = Access(state, cfg["rate_limit_per_minute"], cfg["rate_limit_burst"], cfg["redis_url"])
        self.public_models = keys_api.read_public_models(cfg["public_models"])  # a bad file stops start-up
        self.started = time.time()

    # ---- models by id: GPT-2 types (and seed 003's "gpt-2"), and trained models under models_dir

    def registry(self):
        """model id -> (init_from, canonical name)."""
        ids = {t: (t, t) for t in PRETRAINED}
        ids["gpt-2"] = ("gpt2", "gpt2")
        for m in trained_models(self.models_dir):
            ids.setdefault(m["name"], (os.path.join(self.models_dir, m["name"]), m["name"]))
        return ids

    def use_model(self, model_id):
        """Make model_id the loaded model (seed 003: generating with a model starts it)."""
        if model_id is None:
            return
        entry = self.registry().get(model_id)
        if entry is None:
            raise APIError(404, f"unknown model_id {model_id!r}; GET /models lists them")
        if self.slot.name != entry[1]:
            key = g.get("key") if has_request_context() else None
            if key is not None and not key.admin:
                raise APIError(403, f"model {model_id!r} is not running, and only an admin API key may start it",
                               param="model")
            try:
                self.slot.load(*entry)
            except ModelLoadError as e:
                raise APIError(503, f"model {model_id!r} could not be started: {e}", {"Retry-After": "30"}) from None

    # ---- generation

    def lut(self, model, lut_name):
        if lut_name is None:
            return None
        try:
            return self.store.load(lut_name, model)
        except LUTError as e:
            raise APIError(e.status, str(e), param="lut_name") from None

    def submit(self, prompt, params, lut_name=None, fit=False):
        """Queue one generation of prompt (text, or a list of token ids); returns (job, prompt
        token count). fit=True shortens max_new_tokens to what the context leaves (an upper
        bound, like seed 002's max_length) instead of refusing with 413."""
        model, tok, engine = self.slot.get()
        lut = self.lut(model, lut_name)
        if isinstance(prompt, str):
            try:
                ids = tok.encode(prompt)
            except ValueError as e:  # a character-level model meets a character it has never seen
                raise APIError(400, f"prompt: {e}", param="prompt") from None
        elif all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < tok.vocab_size for t in prompt):
            ids = list(prompt)
        else:
            raise APIError(400, f"prompt token ids must be integers in [0, {tok.vocab_size})", param="prompt")
        if not ids:
            raise APIError(400, "prompt must not be empty", param="prompt")
        limit = model.config.block_size
        if fit and len(ids) < limit:
            params = dataclasses.replace(params, max_new_tokens=min(params.max_new_tokens, limit - len(ids)))
        if len(ids) + params.max_new_tokens > limit:
            raise APIError(413, f"prompt ({len(ids)} tokens) plus the tokens asked for ({params.max_new_tokens}) "
                                f"exceed the model's context of {limit} tokens", param="prompt",
                           code="context_length_exceeded")
        try:
            job = engine.submit(ids, params, lut)
            self.metrics.track(job)
        except QueueFull as e:
            raise APIError(503, str(e), {"Retry-After": "1"}) from None
        except GenerationError as e:
            raise APIError(400, str(e)) from None
        if has_request_context():
            g.jobs.append((job, len(ids)))  # for the query history
        return job, len(ids)

    def wait(self, job):
        try:
            return job.wait(self.cfg["request_timeout"])
        except TimeoutError as e:
            raise APIError(504, str(e)) from None

    def run(self, prompt, params, lut_name=None, fit=False):
        """Generate for one request; returns (Sequence, prompt token count)."""
        job, n_prompt = self.submit(prompt, params, lut_name, fit)
        return self.wait(job), n_prompt


# ------------------------------------------------------------------------ the app

def create_app(config=None):
    """config: overrides of DEFAULTS (tests pass their own); environment variables GPT_<KEY>
    (e.g. GPT_MODEL_TYPE, GPT_LUT_DB) override DEFAULTS when create_app() is called bare, as gunicorn does."""
    cfg = dict(DEFAULTS)
    if config is None:
        for key, value in DEFAULTS.items():
            env = os.environ.get(f"GPT_{key.upper()}")
            if env is not None:
                cfg[key] = type(value)(env) if isinstance(value, int) else (env or None)
    else:
        cfg.update(config)
    if cfg["anonymous_rate_per_minute"] < 0 or cfg["anonymous_burst"] < 1 or cfg["trusted_proxies"] < 0:
        raise ValueError("anonymous_rate_per_minute and trusted_proxies must be >= 0, anonymous_burst >= 1")
    if cfg["draft_tokens"] < 0:
        raise ValueError("draft_tokens must be >= 0 (0 turns speculative decoding off)")
    app = Flask(__name__, static_folder=None)
    if cfg["trusted_proxies"]:  # the client's address is the one the nearest trusted proxy saw (ProxyFix)
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=cfg["trusted_proxies"])
    app.url_map.converters["int"] = SQLiteInt  # before any route: ids in paths fit SQLite
    app.config["MAX_CONTENT_LENGTH"] = cfg["max_body_bytes"] * 64  # per-route limits: keys_api.check_request
    svc = Service(cfg)
    app.extensions["gpt"] = svc  # what the blueprints share: api_common.service()

    try:
        if cfg["model_path"]:
            svc.slot.load(resolve_model_path(cfg["model_path"], svc.models_dir), os.path.basename(
                os.path.dirname(find_checkpoint(cfg["model_path"]))) or cfg["model_path"])
        elif cfg["model_type"]:
            svc.slot.load(cfg["model_type"], cfg["model_type"])
    except (ModelLoadError, APIError) as e:  # start anyway: /health says why, generation answers 503
        svc.slot.error = getattr(e, "detail", str(e))
        log.error("no model loaded: %s", svc.slot.error)

    app.register_error_handler(Exception, error_response)
    for bp in BLUEPRINTS:
        app.register_blueprint(bp)
    openapi.register(app, "GPT-2 LUT server", "1.0")  # last: it documents every route registered before it
    return app


def error_response(e):
    """The one error handler: {"detail": ...} everywhere, OpenAI's error object under /v1."""
    if isinstance(e, APIError):
        status, message, headers, param, code = e.status, e.detail, e.headers, e.param, e.code
    elif isinstance(e, (AccessError, JobError, LUTError, StoreUnavailable)):  # each knows its status
        status, message, headers, param, code = e.status, str(e), getattr(e, "headers", {}), None, None
        if isinstance(e, StoreUnavailable):
            log.warning("%s %s: %s", request.method, request.path, e)
            current_app.extensions["gpt"].metrics.store_errors.inc()
    elif isinstance(e, HTTPException):
        reason = {413: "request body too large", 404: "no such route", 405: "method not allowed"}.get(e.code, e.name)
        status, message, headers, param, code = e.code, f"{reason}: {request.method} {request.path}", {}, None, None
    else:
        log.exception("unhandled error on %s %s", request.method, request.path)
        status, message, headers, param, code = 500, "internal error; see the server log", {}, None, None
    if not request.path.startswith("/v1/"):
        return jsonify(detail=message), status, headers
    if code == "context_length_exceeded":
        status = 400  # what OpenAI answers, and what its clients expect
    code = code or {401: "invalid_api_key", 429: "rate_limit_exceeded"}.get(status)
    kind = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
            429: "rate_limit_error"}.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return jsonify(error={"message": message, "type": kind, "param": param, "code": code}), status, headers


class SQLiteInt(IntegerConverter):
    """<int:...> path ids as SQLite can hold them (up to 2**63 - 1); larger ones are a 404."""

    def __init__(self, url_map, *args, **kwargs):
        kwargs.setdefault("max", 2**63 - 1)
        super().__init__(url_map, *args, **kwargs)


def main(argv=None):
    p = argparse.ArgumentParser(description="GPT-2 + per-user LUT API server (Flask's server; see README for gunicorn).")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=5000, help="port to listen on")
    p.add_argument("--model_type", default="gpt2", help="GPT-2 type to load at start-up (gpt2, gpt2-medium, ...)")
    p.add_argument("--model_path", default=None, help="checkpoint to load instead (inside --models_dir)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    p.add_argument("--quantize", default=None, choices=QUANTIZE, help="int8: int8 weights on the CPU, 3-4x faster "
                   "decoding (default: none; $GPT_QUANTIZE under gunicorn)")
    p.add_argument("--lut_db", default="out/luts.sqlite", help="SQLite file holding the LUTs")
    p.add_argument("--models_dir", default="out", help="directory of trained models; model_path must be inside")
    p.add_argument("--data_dir", default="data", help="prepared datasets that /api/train may use")
    p.add_argument("--state_db", default="out/server.sqlite", help="SQLite file recording training jobs")
    p.add_argument("--database_url", default=os.environ.get("GPT_DATABASE_URL"), help="postgresql://user@host/db: "
                   "keep LUTs, API keys, usage and training jobs there instead of --lut_db/--state_db, shared by "
                   "every replica (default: $GPT_DATABASE_URL)")
    p.add_argument("--redis_url", default=os.environ.get("GPT_REDIS_URL"), help="redis://host:6379/0: keep the "
                   "rate limits there, shared by every replica; if Redis is down, limits fall back to per process "
                   "(default: $GPT_REDIS_URL)")
    p.add_argument("--max_batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max_queue", type=int, default=64, help="waiting requests before 503")
    p.add_argument("--draft_tokens", type=int, default=8, help="speculative decoding: tokens drafted (a LUT's taught "
                   "continuation, or prompt lookup) and verified in one pass for a greedy request decoding alone; "
                   "0 = off")
    p.add_argument("--request_timeout", type=int, default=300, help="seconds a generation may take before 504")
    p.add_argument("--rate_limit_per_minute", type=int, default=60, help="requests per minute per API key")
    p.add_argument("--rate_limit_burst", type=int, default=10, help="requests an API key may make at once")
    p.add_argument("--public_models", default=None, help="JSON file of what GET /public/models shows per model "
                   "(pricing, capabilities, ...; see README)")
    p.add_argument("--anonymous_rate_per_minute", type=int, default=60, help="requests per minute per client address "
                   "for requests without an API key (seed 002; 0 = no limit; /health is exempt)")
    p.add_argument("--anonymous_burst", type=int, default=10, help="requests without an API key one address may "
                   "make at once")
    p.add_argument("--trusted_proxies", type=int, default=0, help="how many proxies in front of the server append "
                   "to X-Forwarded-For; the client address is taken from it only when this is set (default 0: never)")
    p.add_argument("--max_teach_labels", type=int, default=256, help="labels one POST /luts/<name>/labels may teach")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app({k: v for k, v in vars(args).items() if k not in ("host", "port")})
    except ValueError as e:  # a bad setting, e.g. the public_models file
        raise SystemExit(f"error: {e}")
    app.run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()
