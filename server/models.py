"""
The running models: a registry of loaded models by name, each with its own engine, and the
frozen view (Loaded) that one request keeps from start to end whatever loads or stops meanwhile.
"""
import collections
import dataclasses
import itertools
import logging
import os
import threading

from model import ModelLoadError, load_model, resolve_device
from server.common import APIError
from server.engine import Engine, apart
from tokenizer import get_tokenizer

log = logging.getLogger("api_server")


@dataclasses.dataclass(frozen=True)
class Loaded:
    """A running model as one request sees it from start to end, whatever loads or stops meanwhile."""
    name: str
    model: object
    tokenizer: object
    engine: Engine

    @property
    def device(self):
        return next(self.model.parameters()).device


class Models:
    """The running models by name, each with its own engine. Loads run one at a time (two never
    compete for memory); at most cfg.max_loaded_models run, within cfg.max_model_memory_mb."""

    def __init__(self, cfg):
        self.cfg = cfg
        self._lock = threading.Lock()  # guards running and default
        self._loading = threading.Lock()
        self.running = collections.OrderedDict()  # name -> Loaded, least recently used first
        self.default = None  # the model of requests that name none
        self.error = "no model loaded yet"

    def get(self, name=None):
        """The Loaded of name (the default model if None); None if name does not run."""
        with self._lock:
            if name is None and self.default is None:
                raise APIError(503, f"no model is loaded ({self.error}); POST /api/load_model with a model_type "
                                    f"or model_path", {"Retry-After": "30"})
            loaded = self.running.get(name or self.default)
            if loaded is not None:
                self.running.move_to_end(loaded.name)
            return loaded

    def load(self, init_from, name, make_default=False, make_room=True, quantize=None):
        """Start `name` unless it runs, and return it. When the budget is full, make_room stops
        the least recently used other models once this one is up; otherwise the answer is 409."""
        with self._loading:
            loaded = self.get(name)
            if loaded is None:
                if not make_room and len(self.running) >= self.cfg.max_loaded_models:
                    raise APIError(409, f"{len(self.running)} models are running, the most --max_loaded_models "
                                        f"allows; stop one first (POST /models/<model_id>/stop)")
                loaded = self._start(init_from, name, quantize or self.cfg.quantize, make_room)
            with self._lock:
                if make_default or self.default not in self.running:
                    self.default = name
            return loaded

    def _start(self, init_from, name, quantize, make_room):
        device, dtype = resolve_device(self.cfg.device, self.cfg.dtype)
        try:
            model = apart(load_model, init_from, device, dtype, quantize)  # no OpenMP pool left here
        except ModelLoadError as e:  # clients see it: checkpoints named relative to the models directory
            raise ModelLoadError(str(e).replace(os.path.realpath(self.cfg.models_dir) + os.sep, "")) from None
        cap = self.cfg.max_model_memory_mb << 20
        if not make_room and cap and model_bytes(model) + sum(model_bytes(m.model) for m in self.running.values()) > cap:
            raise APIError(409, f"model {name!r} ({model_bytes(model) >> 20} MB) does not fit beside the running "
                                f"models within --max_model_memory_mb {self.cfg.max_model_memory_mb}; stop one first")
        tokenizer = get_tokenizer(model.tokenizer_spec)
        loaded = Loaded(name, model, tokenizer, Engine(model, tokenizer, self.cfg.max_batch, self.cfg.max_queue,
                                                       self.cfg.draft_tokens, self.cfg.prefill_chunk))
        with self._lock:
            self.running[name] = loaded
            stopped = []
            others = [n for n in self.running if n != name]  # least recently used first
            while others and (len(self.running) > self.cfg.max_loaded_models or
                              cap and sum(model_bytes(m.model) for m in self.running.values()) > cap):
                stopped.append(self.running.pop(others.pop(0)))
            if self.default not in self.running:  # in the same step: a request never finds the default gone
                self.default = name
            self.error = None
        for old in stopped:
            old.engine.stop()  # finishes what it is running, then its thread ends
            log.info("stopped %s to make room for %s", old.name, name)
        log.info("loaded %s on %s", name, device)
        return loaded

    def unload(self, name=None):
        """Stop name (the default model if None); returns the name stopped, None if it did not run."""
        with self._lock:
            loaded = self.running.pop(name or self.default, None) if (name or self.default) else None
            if loaded is None:
                return None
            if self.default == loaded.name:
                self.default = next(reversed(self.running), None)  # the most recently used, if any
            if not self.running:
                self.error = "unloaded by request"
        loaded.engine.stop()
        log.info("stopped %s", loaded.name)
        return loaded.name

    def current(self):
        """The default model's Loaded, or None."""
        with self._lock:
            return self.running.get(self.default) if self.default else None

    def names(self):
        with self._lock:
            return list(self.running)


def model_bytes(model):
    return sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
