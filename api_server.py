"""
REST server: GPT-2 with per-user LUTs (seed API: /health, /train_lut, /generate) and the
nanoGPT-style /api/* routes, on one model owned by a continuous-batching engine.

    python api_server.py --port 5000 --model_type gpt2
    gunicorn -c gunicorn.conf.py 'api_server:create_app()'
"""
import argparse
import dataclasses
import json
import logging
import os
import threading
import time

from flask import Flask, Response, g, has_request_context, jsonify, request
from werkzeug.exceptions import HTTPException
from werkzeug.routing import IntegerConverter

import openai_api
import openapi
from access import Access, AccessError
from api_common import APIError, CHAT_STOP, body, chat_prompt, field, sampling, sse, text_events, usage
from engine import Engine, QueueFull
from generate import GenerationError
from lut import LUTError, LUTStore
from model import HUB_ORG, PRETRAINED, ModelLoadError, find_checkpoint, load_model, resolve_device
from tokenizer import get_tokenizer
from trainer import JobError, Trainer

log = logging.getLogger("api_server")

DEFAULTS = dict(
    model_type="gpt2",  # loaded at start-up unless model_path is given; None = start with no model
    model_path=None,
    device="auto",
    dtype="float32",
    lut_db="out/luts.sqlite",
    models_dir="out",
    data_dir="data",  # prepared datasets for /api/train
    state_db="out/server.sqlite",  # training jobs
    max_train_jobs=1,  # /api/train answers 409 while this many run
    max_batch=8,  # sequences decoded together
    max_queue=64,  # requests waiting beyond that get 503
    max_batch_prompts=32,  # /generate/batch
    max_body_bytes=1 << 20,  # larger bodies get 413 (LUT imports may be up to 64x this)
    request_timeout=300,  # seconds a generation may take
    rate_limit_per_minute=60,  # per API key (once keys exist), unless the key sets its own
    rate_limit_burst=10,
    public_models=None,  # JSON file: what GET /public/models says of each model (pricing, ...)
)
PUBLIC_PATHS = ("/health", "/public/models", "/openapi.json", "/docs")  # open even with API keys
ADMIN_ENDPOINTS = {"load_model_route", "models_load", "models_unload", "models_start", "models_stop", "api_train",
                   "api_train_cancel", "create_key", "list_keys", "revoke_key"}
# /generate, /chat, /generate/batch defaults: seed 002's. A taught label is still recalled exactly
# (seed 000 sends only prompt, length, lut_name): LUT-matched positions decode greedily.
GENERATE_DEFAULTS = dict(temperature=0.7, top_k=80, top_p=0.9, repetition_penalty=1.15, do_sample=True)
SEED_002_MAX_LENGTH = 8192  # /generate's default length: an upper bound, cut to the context
# /api/train defaults: seed 001's example request (a short GPT-2 fine-tune); the rest as train.py's
TRAIN_DEFAULTS = dict(model_type="gpt2", batch_size=4, learning_rate=3e-5, max_iters=20, eval_interval=5)


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
        model = load_model(init_from, device, dtype)
        tokenizer = get_tokenizer(model.tokenizer_spec)
        engine = Engine(model, tokenizer, self.cfg["max_batch"], self.cfg["max_queue"])
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
        self.store = LUTStore(cfg["lut_db"])
        self.trainer = Trainer(cfg["state_db"], cfg["max_train_jobs"])
        self.access = Access(cfg["state_db"], cfg["rate_limit_per_minute"], cfg["rate_limit_burst"])
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
    app = Flask(__name__, static_folder=None)
    app.url_map.converters["int"] = SQLiteInt  # before any route: ids in paths fit SQLite
    app.config["MAX_CONTENT_LENGTH"] = cfg["max_body_bytes"] * 64  # per-route limits below
    svc = Service(cfg)
    slot, store, trainer, access, models_dir = svc.slot, svc.store, svc.trainer, svc.access, svc.models_dir
    app.extensions["gpt"] = svc

    try:
        if cfg["model_path"]:
            slot.load(resolve_model_path(cfg["model_path"], models_dir), os.path.basename(
                os.path.dirname(find_checkpoint(cfg["model_path"]))) or cfg["model_path"])
        elif cfg["model_type"]:
            slot.load(cfg["model_type"], cfg["model_type"])
    except (ModelLoadError, APIError) as e:  # start anyway: /health says why, generation answers 503
        slot.error = getattr(e, "detail", str(e))
        log.error("no model loaded: %s", slot.error)

    # One error handler: {"detail": ...} everywhere, OpenAI's error object under /v1.
    @app.errorhandler(Exception)
    def error(e):
        if isinstance(e, APIError):
            status, message, headers, param, code = e.status, e.detail, e.headers, e.param, e.code
        elif isinstance(e, (AccessError, JobError, LUTError)):  # each knows its status
            status, message, headers, param, code = e.status, str(e), getattr(e, "headers", {}), None, None
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

    # ---- every request: body size, API key, rate limit, admin routes, LUT ownership; then history

    @app.before_request
    def check_request():
        g.started, g.jobs, g.key = time.time(), [], None
        if (request.content_length or 0) > cfg["max_body_bytes"] and not request.path.endswith("/import"):
            raise APIError(413, f"request body larger than {cfg['max_body_bytes']} bytes")
        if request.path.startswith(PUBLIC_PATHS):
            return
        g.key = access.authenticate(request.headers.get("Authorization"))
        if g.key is None:  # no keys exist yet: open
            return
        access.check_rate(g.key)
        if request.endpoint in ADMIN_ENDPOINTS and not g.key.admin:
            raise APIError(403, f"{request.method} {request.path} needs an admin API key")
        lut_name = requested_lut()
        if isinstance(lut_name, str) and not g.key.may_use(lut_name):
            raise APIError(403, f"this API key may not use LUT {lut_name!r}", param="lut_name")

    def requested_lut():
        """The LUT a request names, in its path or its JSON body (every LUT route does one or the other)."""
        data = request.get_json(silent=True) if request.is_json else None
        return (request.view_args or {}).get("lut_name") or (data.get("lut_name") if isinstance(data, dict) else None)

    @app.after_request
    def record_query(response):
        if request.path.startswith(PUBLIC_PATHS) or "started" not in g:
            return response
        jobs, started, key = g.jobs, g.started, g.key
        lut_name = requested_lut()
        row = dict(app_id=request.headers.get("X-App-ID") or "Unknown", key_id=key.id if key else None,
                   method=request.method, route=request.path, model=slot.name,
                   lut_name=lut_name if isinstance(lut_name, str) else None, status=response.status_code)

        def save():
            try:
                access.record(**row, prompt_tokens=sum(n for _, n in jobs),
                              completion_tokens=sum(len(job.seq.out_ids) for job, _ in jobs),
                              latency_ms=(time.time() - started) * 1000)
            except Exception:  # the answer matters more than its record
                log.exception("could not record the query")

        if response.is_streamed:  # a stream is recorded once its last byte is out (or its client left)
            response.response = recorded(response.response, save)
        else:
            save()
        return response

    # ---- seed 000 (LUTs), 002 and 003: one /generate for all three (README: "One /generate")

    @app.get("/health")
    def health():
        out = {"status": "ok", "model_loaded": slot.engine is not None, "model": slot.name}
        if slot.engine is None:
            out["detail"] = slot.error
        return jsonify(out)

    @app.post("/train_lut")
    def train_lut():
        data = body()
        label = field(data, "label", str, required=True)
        context = field(data, "label_context", str)
        lut_name = field(data, "lut_name", str, required=True)
        model, tok, _ = slot.get()
        store.teach(model, tok, lut_name, label, context)
        return jsonify(status="ok", lut_name=lut_name)

    def generation_request(data):
        """The fields /generate, /chat and /generate/batch share -> (params, fit, lut_name, stream).
        The length is `length` (seed 000) or `max_new_tokens` (seeds 001, 003): exact, 413 if the
        context cannot hold it; or `max_length` (seed 002, default 8192): an upper bound, cut to
        what the context leaves."""
        given = [f for f in ("length", "max_new_tokens", "max_length") if data.get(f) is not None]
        if len(given) > 1:
            raise APIError(400, f"give only one of length, max_new_tokens or max_length (got {', '.join(given)})")
        length_field = given[0] if given else "max_length"
        params = sampling(data, length_field, SEED_002_MAX_LENGTH, GENERATE_DEFAULTS)
        lut_name, stream = field(data, "lut_name", str), field(data, "stream", bool, False)
        svc.use_model(field(data, "model_id", str))
        return params, length_field == "max_length", lut_name, stream

    @app.post("/generate")
    def generate_route():
        data = body()
        prompt = field(data, "prompt", str, required=True)
        params, fit, lut_name, stream = generation_request(data)
        if stream:
            job, _ = svc.submit(prompt, params, lut_name, fit)
            return sse(text_events(job, cfg["request_timeout"]), job)
        seq, n_prompt = svc.run(prompt, params, lut_name, fit)
        return jsonify(prompt=prompt, completion=seq.text, response=seq.text, generated_text=prompt + seq.text,
                       model_id=slot.name, lut_name=lut_name, finish_reason=seq.finish_reason,
                       usage=usage(n_prompt, [seq]))

    @app.post("/chat")
    def chat():
        data = body()
        continued = data.get("continue_final_message", False)
        prompt = chat_prompt(data.get("messages"), continued)
        params, _, lut_name, stream = generation_request(data)
        params = dataclasses.replace(params, stop=params.stop + CHAT_STOP)
        if stream:
            job, _ = svc.submit(prompt, params, lut_name, fit=True)
            return sse(text_events(job, cfg["request_timeout"]), job)
        seq, n_prompt = svc.run(prompt, params, lut_name, fit=True)
        return jsonify(choices=[{"message": {"role": "assistant",
                                             "content": seq.text.rstrip() if continued else seq.text.strip()},
                                 "finish_reason": seq.finish_reason}],
                       usage=usage(n_prompt, [seq]), model_id=slot.name, lut_name=lut_name)

    @app.post("/generate/batch")
    def generate_batch():
        data = body()
        prompts = field(data, "prompts", list, required=True)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise APIError(400, "prompts must be a non-empty list of strings")
        if len(prompts) > cfg["max_batch_prompts"]:
            raise APIError(413, f"prompts: at most {cfg['max_batch_prompts']} per request, got {len(prompts)}")
        params, fit, lut_name, stream = generation_request(data)
        if stream:
            raise APIError(400, "stream is not supported by /generate/batch")
        jobs = []
        try:  # seeded requests give prompt i the seed seed+i: reproducible, yet not all alike
            for i, p in enumerate(prompts):
                seed = None if params.seed is None else params.seed + i
                jobs.append(svc.submit(p, dataclasses.replace(params, seed=seed), lut_name, fit))
            seqs = [svc.wait(job) for job, _ in jobs]
        finally:
            for job, _ in jobs:
                job.cancel()  # a no-op for finished ones; frees the rest if one failed
        return jsonify(responses=[s.text for s in seqs], finish_reasons=[s.finish_reason for s in seqs],
                       usage=usage(sum(n for _, n in jobs), seqs), model_id=slot.name, lut_name=lut_name)

    # ---- seed 001: the nanoGPT API

    @app.get("/api/status")
    def status():
        model = slot.model
        out = {"status": "online", "model_loaded": slot.engine is not None, "model": slot.name,
               "device": str(next(model.parameters()).device) if model is not None else None,
               "timestamp": time.time(), "uptime_s": round(time.time() - svc.started, 1)}
        if slot.engine is None:
            out["detail"] = slot.error
        else:
            out["engine"] = slot.engine.load
        return jsonify(out)

    @app.get("/api/models")
    def models():
        return jsonify(pretrained_models=list(PRETRAINED), trained_models=trained_models(models_dir))

    @app.post("/api/load_model")
    def load_model_route():
        data = body()
        model_type, model_path = field(data, "model_type", str), field(data, "model_path", str)
        if bool(model_type) == bool(model_path):
            raise APIError(400, "give exactly one of model_type or model_path")
        if model_type and model_type not in PRETRAINED:
            raise APIError(404, f"unknown model_type {model_type!r}; choose one of {', '.join(PRETRAINED)}")
        try:
            if model_type:
                slot.load(model_type, model_type)
            else:
                path = resolve_model_path(model_path, models_dir)
                slot.load(path, os.path.relpath(os.path.dirname(path), models_dir))
        except ModelLoadError as e:
            raise APIError(503 if model_type else 400, str(e)) from None
        return jsonify(message="Model loaded successfully", model=slot.name)

    @app.post("/api/generate")
    def api_generate():
        data = body()
        prompt = field(data, "prompt", str, required=True)
        lut_name = field(data, "lut_name", str)
        params = sampling(data, "max_new_tokens", 100,
                          dict(temperature=0.8, top_k=200, top_p=1.0, repetition_penalty=1.0, do_sample=True))
        seq, n_prompt = svc.run(prompt, params, lut_name)
        parameters = {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
                      "top_k": params.top_k}
        return jsonify(prompt=prompt, generated_text=prompt + seq.text, parameters=parameters,
                       finish_reason=seq.finish_reason, usage=usage(n_prompt, [seq]), lut_name=lut_name)

    # ---- seeds 002 and 003: models by id, system information

    def model_list():
        loaded = slot.name if slot.engine is not None else None
        return [{"id": mid, "name": name, "hf_name": f"{HUB_ORG}/{init}" if init in PRETRAINED else
                 os.path.relpath(init), "type": "pretrained" if init in PRETRAINED else "trained",
                 "running": name == loaded} for mid, (init, name) in svc.registry().items()]

    @app.get("/")
    def index():
        return jsonify(message="GPT-2 inference API with per-user LUTs", models=list(svc.registry()),
                       running_containers=[slot.name] if slot.engine is not None else [])

    @app.get("/models")
    def models_by_id():
        return jsonify(models=model_list())

    @app.get("/models/available")
    def models_available():
        return jsonify(models=model_list())

    @app.get("/models/current")
    def models_current():
        if slot.engine is None:
            return jsonify(model_id=None, loaded=False, detail=slot.error)
        model = slot.model
        return jsonify(model_id=slot.name, loaded=True, device=str(next(model.parameters()).device),
                       dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                       parameters=model.get_num_params(), config=dataclasses.asdict(model.config))

    @app.post("/models/load")
    def models_load():
        model_id = field(body(), "model_id", str, required=True)
        svc.use_model(model_id)
        return jsonify(message=f"Model {model_id} loaded", model_id=model_id)

    @app.post("/models/unload")
    def models_unload():
        name = slot.unload()
        if name is None:
            raise APIError(404, "no model is loaded")
        return jsonify(message=f"Model {name} unloaded", model_id=name)

    @app.post("/models/<path:model_id>/start")
    def models_start(model_id):
        svc.use_model(model_id)
        return jsonify(message=f"Model {model_id} started", model_id=model_id, port=request.server[1],
                       container_name=None)  # no containers here: the model runs in this process

    @app.post("/models/<path:model_id>/stop")
    def models_stop(model_id):
        entry = svc.registry().get(model_id)
        if entry is None:
            raise APIError(404, f"unknown model_id {model_id!r}")
        if slot.engine is None or slot.name != entry[1]:
            raise APIError(404, f"model {model_id!r} is not running")
        slot.unload()
        return jsonify(message=f"Model {model_id} stopped", model_id=model_id)

    @app.get("/system/info")
    def system_info():
        import platform
        import resource
        import torch
        gpus = [{"name": torch.cuda.get_device_name(i),
                 "memory_mb": torch.cuda.get_device_properties(i).total_memory // 2**20}
                for i in range(torch.cuda.device_count())]
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        return jsonify(python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
                       cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), memory_total_mb=total,
                       process_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                       cuda_available=torch.cuda.is_available(), gpus=gpus, model=slot.name,
                       model_loaded=slot.engine is not None, engine=slot.engine.load if slot.engine else None,
                       uptime_s=round(time.time() - svc.started, 1))

    # ---- training jobs (seed 001's /api/train)

    @app.post("/api/train")
    def api_train():
        data = body()
        settings, echo = train_settings(data, models_dir, cfg["data_dir"])
        job = trainer.start(settings, data["output_dir"], settings["out_dir"], echo)
        log.info("training job %s started: pid %s, %s", job["job_id"], job["process_id"], settings["out_dir"])
        return jsonify(message="Training started", config=echo, config_path=job["config_path"],
                       process_id=job["process_id"], job_id=job["job_id"])

    @app.get("/api/train")
    def api_train_jobs():
        return jsonify(jobs=trainer.list())

    @app.get("/api/train/<int:job_id>")
    def api_train_job(job_id):
        return jsonify(trainer.get(job_id))

    @app.post("/api/train/<int:job_id>/cancel")
    def api_train_cancel(job_id):
        return jsonify(trainer.cancel(job_id))

    # ---- LUT management

    @app.get("/luts")
    def list_luts():  # a tenant's key sees its own LUTs only
        return jsonify(luts=[x for x in store.list() if g.key is None or g.key.may_use(x["name"])])

    @app.get("/luts/<lut_name>")
    def show_lut(lut_name):
        return jsonify(store.show(lut_name))

    @app.delete("/luts/<lut_name>")
    def delete_lut(lut_name):
        store.delete(lut_name)
        return jsonify(status="ok", lut_name=lut_name)

    @app.delete("/luts/<lut_name>/labels/<int:label_id>")
    def delete_label(lut_name, label_id):
        store.delete_label(lut_name, label_id)
        return jsonify(status="ok", lut_name=lut_name, label_id=label_id)

    @app.get("/luts/<lut_name>/export")
    def export_lut(lut_name):
        data = store.export(lut_name)
        return Response(data, mimetype="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{lut_name}.safetensors"'})

    @app.post("/luts/<lut_name>/import")
    def import_lut(lut_name):
        name = store.import_(request.get_data(), lut_name)
        return jsonify(status="ok", lut_name=name), 201

    # ---- API keys, usage (seed 004)

    @app.post("/keys")
    def create_key():
        data = body()
        secret, record = access.create_key(field(data, "name", str, required=True), field(data, "admin", bool, False),
                                           field(data, "luts", list, []), field(data, "rate_per_minute", int),
                                           field(data, "burst", int))
        log.info("API key %s (%s) created", record["id"], record["name"])
        return jsonify(key=secret, **record), 201

    @app.get("/keys")
    def list_keys():
        return jsonify(keys=access.list_keys())

    @app.delete("/keys/<int:key_id>")
    def revoke_key(key_id):
        return jsonify(access.revoke_key(key_id))

    def own_key_id():
        """Whose queries this request may see: None (everyone's) without keys or for an admin key."""
        return None if g.key is None or g.key.admin else g.key.id

    @app.get("/usage")
    def usage_summary():
        return jsonify(access.usage(key_id=own_key_id()))

    @app.get("/usage/history")
    def usage_history():
        limit = request.args.get("limit", "100")
        if not limit.isdigit() or not 1 <= int(limit) <= 10000:
            raise APIError(400, "limit must be an integer in [1, 10000]", param="limit")
        return jsonify(queries=access.history(own_key_id(), request.args.get("app_id"), int(limit)))

    @app.get("/public/models")
    def public_models():
        started = time.time()
        models = [{"id": mid, "provider": "openai" if init in PRETRAINED else "local", "created": int(svc.started),
                   "object": "model", "owned_by": "openai-community" if init in PRETRAINED else "local",
                   "capabilities": ["text-completion", "chat-completion"],
                   "pricing": {"input": 0.0, "output": 0.0, "unit": "token", "currency": "USD"},
                   **overrides.get("*", {}), **overrides.get(mid, {})}
                  for mid, (init, _) in svc.registry().items() if overrides.get(mid, {}).get("listed", True)]
        return jsonify(status="success", data={"models": models},
                       meta={"processing_time": round(time.time() - started, 4)})

    overrides = read_public_models(cfg["public_models"])  # at start-up: a bad file stops the server here
    openai_api.register(app, svc)
    openapi.register(app, "GPT-2 LUT server", "1.0")  # last: it documents every route registered before it
    return app


class SQLiteInt(IntegerConverter):
    """<int:...> path ids as SQLite can hold them (up to 2**63 - 1); larger ones are a 404."""

    def __init__(self, url_map, *args, **kwargs):
        kwargs.setdefault("max", 2**63 - 1)
        super().__init__(url_map, *args, **kwargs)


def recorded(chunks, save):
    """A streamed body that calls save() when it ends, however it ends."""
    try:
        yield from chunks
    finally:
        save()


def read_public_models(path):
    """{model id or "*": fields to show or override in /public/models ("listed": false hides one)}."""
    if not path:
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"public_models file {path}: {e}") from None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"public_models file {path} must map model ids (or \"*\") to objects")
    return data


def inside(path, root, name):
    """A client's path (relative to the server's working directory) resolved, links and '..'
    included, only if it lies inside root: no request reaches files elsewhere."""
    full = os.path.realpath(path if os.path.isabs(path) else os.path.join(os.getcwd(), path))
    if not full.startswith(os.path.realpath(root) + os.sep):
        raise APIError(400, f"{name} must be inside the models directory ({root})")
    return full


def resolve_model_path(model_path, models_dir):
    path = find_checkpoint(inside(model_path, models_dir, "model_path"))
    if not os.path.isfile(path):
        raise APIError(404, f"no checkpoint at model_path {model_path!r}")
    return path


def train_settings(data, models_dir, data_dir):
    """An /api/train request -> (full train.py settings, the config echoed to the client).
    Fields: the seed's (dataset, output_dir, model_type, ...) and any other train.py setting."""
    import train
    types = {f.name: f.type for f in dataclasses.fields(train.TrainConfig) if f.name not in ("out_dir", "data_dir")}
    unknown = sorted(set(data) - set(types) - {"output_dir", "model_type"})
    if unknown:
        raise APIError(400, f"unknown field {unknown[0]!r}; /api/train takes output_dir, model_type and the "
                            f"train.py settings: {', '.join(types)}")
    output_dir = field(data, "output_dir", str, required=True)
    field(data, "dataset", str, required=True)
    model_type = field(data, "model_type", str, TRAIN_DEFAULTS["model_type"])
    if model_type not in PRETRAINED:
        raise APIError(400, f"model_type must be one of {', '.join(PRETRAINED)}")
    given = {name: field(data, name, kind) for name, kind in types.items() if data.get(name) is not None}
    echo = {"dataset": given["dataset"], "output_dir": output_dir, "model_type": model_type,
            **{k: v for k, v in TRAIN_DEFAULTS.items() if k != "model_type"}, **given}
    settings = {**dataclasses.asdict(train.TrainConfig()), "init_from": model_type, **echo,
                "out_dir": inside(output_dir, models_dir, "output_dir"), "data_dir": os.path.abspath(data_dir)}
    del settings["output_dir"], settings["model_type"]
    try:
        train.TrainConfig(**settings).validate()
    except ValueError as e:
        raise APIError(400, str(e)) from None
    if settings["init_from"] == "resume" and not os.path.isfile(os.path.join(settings["out_dir"], "ckpt.pt")):
        raise APIError(400, f"init_from resume needs a checkpoint in output_dir {output_dir!r}")
    return settings, echo


def trained_models(models_dir):
    """Checkpoints under models_dir (out/<name>/ckpt.pt, at any depth) with their training config."""
    found = []
    for dirpath, dirnames, filenames in os.walk(models_dir):
        dirnames.sort()
        if "ckpt.pt" in filenames:
            config = {}
            try:
                with open(os.path.join(dirpath, "train_config.json")) as f:
                    config = json.load(f)
            except (OSError, ValueError):
                pass
            found.append({"name": os.path.relpath(dirpath, models_dir),
                          "path": os.path.relpath(os.path.join(dirpath, "ckpt.pt")), "config": config})
    return found


def main(argv=None):
    p = argparse.ArgumentParser(description="GPT-2 + per-user LUT API server (Flask's server; see README for gunicorn).")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=5000, help="port to listen on")
    p.add_argument("--model_type", default="gpt2", help="GPT-2 type to load at start-up (gpt2, gpt2-medium, ...)")
    p.add_argument("--model_path", default=None, help="checkpoint to load instead (inside --models_dir)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    p.add_argument("--lut_db", default="out/luts.sqlite", help="SQLite file holding the LUTs")
    p.add_argument("--models_dir", default="out", help="directory of trained models; model_path must be inside")
    p.add_argument("--data_dir", default="data", help="prepared datasets that /api/train may use")
    p.add_argument("--state_db", default="out/server.sqlite", help="SQLite file recording training jobs")
    p.add_argument("--max_batch", type=int, default=8, help="sequences decoded together")
    p.add_argument("--max_queue", type=int, default=64, help="waiting requests before 503")
    p.add_argument("--request_timeout", type=int, default=300, help="seconds a generation may take before 504")
    p.add_argument("--rate_limit_per_minute", type=int, default=60, help="requests per minute per API key")
    p.add_argument("--rate_limit_burst", type=int, default=10, help="requests an API key may make at once")
    p.add_argument("--public_models", default=None, help="JSON file of what GET /public/models shows per model "
                   "(pricing, capabilities, ...; see README)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app = create_app({k: v for k, v in vars(args).items() if k not in ("host", "port")})
    except ValueError as e:  # a bad setting, e.g. the public_models file
        raise SystemExit(f"error: {e}")
    app.run(host=args.host, port=args.port, threaded=True)


if __name__ == "__main__":
    main()
