"""
What the routes share (server.common.service() returns it): the running models, the LUT store,
the trainer, access control, metrics, and generation on the model a request chose.
"""
import dataclasses
import os
import time

from flask import g, has_request_context

from access import Access
from generate import GenerationError
from lut import LUTError
from lut_store import LUTStore
from model import HUB_ORG, PRETRAINED, ModelLoadError
from server import metrics
from server.common import APIError, resolve_model_path, trained_models
from server.engine import EngineStopped, QueueFull, apart
from server.keys import read_public_models
from server.models import Models
from server.trainer import Trainer
from storage import Database


class Service:
    """What the routes share: the running models, the LUT store, the trainer, and generation."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.models_dir = os.path.realpath(cfg.models_dir)
        os.makedirs(self.models_dir, exist_ok=True)
        self.models = Models(cfg)
        shared = Database(cfg.database_url) if cfg.database_url else None  # one pool for all three
        state = shared or Database(cfg.state_db)
        self.metrics = metrics.Metrics(redis=bool(cfg.redis_url))
        self.store = LUTStore(shared or cfg.lut_db, cache_mb=cfg.lut_cache_mb, observe=self.metrics.observe, run=apart)
        self.trainer = Trainer(state, cfg.max_train_jobs)
        self.access = Access(state, cfg.rate_limit_per_minute, cfg.rate_limit_burst, cfg.redis_url)
        self.public_models = read_public_models(cfg.public_models)  # a bad file stops start-up
        self.started = time.time()

    # ---- models by id: GPT-2 types under their Hub ids too, and trained models under models_dir

    def registry(self):
        """model id -> (init_from, canonical name), each model once."""
        ids = {t: (t, t) for t in PRETRAINED}
        for m in trained_models(self.models_dir):
            ids.setdefault(m["name"], (os.path.join(self.models_dir, m["name"]), m["name"]))
        return ids

    def find(self, model_id):
        """(init_from, canonical name) of a model id as any listing of this server shows it:
        gpt2, gpt-2 (the TGI-style name), openai-community/gpt2 and openai/gpt2 alike."""
        org, _, short = model_id.rpartition("/")
        short = "gpt2" if short == "gpt-2" else short
        if org in ("", HUB_ORG, "openai") and short in PRETRAINED:
            return short, short
        return self.registry().get(model_id)

    def checkpoint(self, model_path):
        """(checkpoint file, canonical name) of a model_path inside models_dir: the name is the
        checkpoint's folder relative to models_dir, however the path was written."""
        path = resolve_model_path(model_path, self.models_dir)
        return path, os.path.relpath(os.path.dirname(path), self.models_dir).replace(os.sep, "/")

    def use_model(self, model_id=None):
        """The model this request uses, taken once and kept (flask.g): a model named by the
        request, started if it does not run (as TGI does), else the default model."""
        if model_id is None and has_request_context() and "view" in g:
            return g.view
        loaded = self.models.get() if model_id is None else self._running(model_id)
        if has_request_context():
            g.view, g.model_id = loaded, model_id
        return loaded

    view = use_model  # read as "the request's view" where nothing is being chosen

    def _running(self, model_id):
        entry = self.find(model_id)
        if entry is None:
            raise APIError(404, f"unknown model_id {model_id!r}; GET /models lists them", param="model_id")
        loaded = self.models.get(entry[1])
        if loaded is not None:
            return loaded
        key = g.get("key") if has_request_context() else None
        if key is not None and not key.admin:
            raise APIError(403, f"model {model_id!r} is not running, and only an admin API key may start it",
                           param="model")
        return self.load(*entry)

    def load(self, init_from, name, **how):
        try:
            return self.models.load(init_from, name, **how)
        except ModelLoadError as e:
            raise APIError(503, f"model {name!r} could not be started: {e}", {"Retry-After": "30"}) from None

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
        bound, like the LocalLab-style max_length) instead of refusing with 413."""
        view = self.view()
        model, tok = view.model, view.tokenizer
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
            job = self._enqueue(view, ids, params, lut_name)
            self.metrics.track(job)
        except QueueFull as e:
            raise APIError(503, str(e), {"Retry-After": "1"}) from None
        except GenerationError as e:
            raise APIError(400, str(e)) from None
        if has_request_context():
            g.jobs.append((job, len(ids)))  # for the query history
        return job, len(ids)

    def _enqueue(self, view, ids, params, lut_name):
        """Submit to the request's model. If it stopped since the request chose it (a load made
        room), a request that has queued nothing yet chooses again, once."""
        try:
            return view.engine.submit(ids, params, self.lut(view.model, lut_name))
        except EngineStopped:
            if has_request_context() and not g.jobs:
                g.pop("view")
                again = self.use_model(g.get("model_id"))
                if again.tokenizer.vocab_size == view.tokenizer.vocab_size:  # the same token ids mean the same
                    return again.engine.submit(ids, params, self.lut(again.model, lut_name))
            raise APIError(503, f"model {view.name!r} was stopped while this request was queued; try again",
                           {"Retry-After": "1"}) from None

    def timeout(self):
        """Seconds this request's generation may take (its API's own limit, else --request_timeout)."""
        return g.get("timeout") if has_request_context() and "timeout" in g else self.cfg.request_timeout

    def wait(self, job):
        try:
            return job.wait(self.timeout())
        except TimeoutError as e:
            raise APIError(504, str(e)) from None

    def run(self, prompt, params, lut_name=None, fit=False):
        """Generate for one request; returns (Sequence, prompt token count)."""
        job, n_prompt = self.submit(prompt, params, lut_name, fit)
        return self.wait(job), n_prompt
