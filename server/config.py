"""
The server's settings, written once: each field of ServerConfig is a flag of `python api_server.py`
(--name), an environment variable (GPT_NAME: what gunicorn's `create_app()` reads, and the flags'
defaults), and a checked value.
"""
import dataclasses
import os
from dataclasses import dataclass, field


def setting(default, help, choices=None, minimum=None):
    return field(default=default, metadata={"help": help, "choices": choices, "minimum": minimum})


@dataclass
class ServerConfig:
    model_type: str | None = setting("gpt2", "GPT-2 type to load at start-up (gpt2, gpt2-medium, ...); empty: none")
    model_path: str | None = setting(None, "a checkpoint to load at start-up instead (inside --models_dir)")
    device: str = setting("auto", "cpu, cuda, cuda:N or auto (CUDA when present)")
    dtype: str = setting("float32", "model dtype", ["float32", "bfloat16", "float16"])
    quantize: str | None = setting(None, "int8: int8 weights on the CPU, 3-4x faster decoding", ["int8"])
    lut_db: str = setting("out/luts.sqlite", "SQLite file holding the LUTs")
    lut_cache_mb: int = setting(256, "memory for loaded LUTs kept between requests, in MB (estimated from their "
                                     "tensors); least recently used out; 0 = each use reads the LUT", minimum=0)
    models_dir: str = setting("out", "directory of trained models; model_path and output_dir must be inside")
    data_dir: str = setting("data", "prepared datasets that /api/train may use")
    state_db: str = setting("out/server.sqlite", "SQLite file of training jobs, API keys and the query history")
    database_url: str | None = setting(None, "postgresql://user@host/db: keep LUTs, API keys, usage and training "
                                             "jobs there instead of --lut_db/--state_db, shared by every replica")
    redis_url: str | None = setting(None, "redis://host:6379/0: keep the rate limits there, shared by every replica; "
                                          "if Redis is down, limits fall back to per process")
    max_train_jobs: int = setting(1, "training jobs at once; /api/train answers 409 beyond", minimum=1)
    max_loaded_models: int = setting(1, "models running at once, each with its own engine: POST "
                                        "/models/<id>/start beyond it is a 409; loading a model (/api/load_model, "
                                        "/models/load, a request naming a model) stops the least recently used "
                                        "one instead", minimum=1)
    max_model_memory_mb: int = setting(0, "cap on the running models' weights in MB, enforced like "
                                          "--max_loaded_models (0 = no cap)", minimum=0)
    max_batch: int = setting(8, "sequences decoded together", minimum=1)
    max_queue: int = setting(64, "waiting requests before 503", minimum=1)
    draft_tokens: int = setting(8, "speculative decoding: tokens drafted (a LUT's taught continuation, or prompt "
                                   "lookup) and verified in one pass for a greedy request decoding alone; 0 = off",
                                minimum=0)
    prefill_chunk: int = setting(48, "chunked prefill: while requests decode, prompt tokens prefilled per engine step "
                                     "beside their decode step; a longer prompt is spread over several steps, so "
                                     "running streams keep their pace; 0 = whole prompts at once", minimum=0)
    max_batch_prompts: int = setting(32, "prompts (times n) one /generate/batch or /v1 request may send", minimum=1)
    max_body_bytes: int = setting(1 << 20, "larger request bodies get 413 (LUT imports may be 64x this)", minimum=1)
    request_timeout: int = setting(300, "seconds a generation may take before 504", minimum=1)
    rate_limit_per_minute: int = setting(60, "requests per minute per API key (once keys exist)", minimum=1)
    rate_limit_burst: int = setting(10, "requests an API key may make at once", minimum=1)
    public_models: str | None = setting(None, "JSON file of what GET /public/models shows per model (pricing, "
                                              "capabilities, ...)")
    anonymous_rate_per_minute: int = setting(60, "requests per minute per client address for requests without an "
                                                 "API key (0 = no limit; /health is exempt)", minimum=0)
    anonymous_burst: int = setting(10, "requests without an API key one address may make at once", minimum=1)
    trusted_proxies: int = setting(0, "how many proxies in front of the server append to X-Forwarded-For; the "
                                      "client address is taken from it only when this is set", minimum=0)
    max_teach_labels: int = setting(256, "labels one POST /luts/<name>/labels may teach", minimum=1)

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if f.type is int and (not isinstance(value, int) or isinstance(value, bool)):
                raise ValueError(f"{f.name} must be an integer, got {value!r}")
            if meta["minimum"] is not None and value < meta["minimum"]:
                raise ValueError(f"{f.name} must be >= {meta['minimum']}, got {value}")
            if meta["choices"] and value is not None and value not in meta["choices"]:
                raise ValueError(f"{f.name} must be one of {', '.join(meta['choices'])}, got {value!r}")

    @classmethod
    def from_env(cls, environ=os.environ, **overrides):
        """Defaults, then GPT_<NAME> variables, then overrides. An empty variable means None."""
        values = {}
        for f in dataclasses.fields(cls):
            env = environ.get(f"GPT_{f.name.upper()}")
            if env is not None:
                try:
                    values[f.name] = int(env) if f.type is int else (env or None)
                except ValueError:
                    raise ValueError(f"GPT_{f.name.upper()} must be an integer, got {env!r}") from None
        return cls(**{**values, **overrides})

    @classmethod
    def add_arguments(cls, parser, environ=os.environ):
        """One flag per field; its default is GPT_<NAME> where set."""
        for f in dataclasses.fields(cls):
            env = f"GPT_{f.name.upper()}"
            default = environ.get(env, f.default)
            default = (int(default) if f.type is int else default or None) if default is not None else None
            parser.add_argument(f"--{f.name}", type=int if f.type is int else str, default=default,
                                choices=f.metadata["choices"], help=f"{f.metadata['help']} (default: "
                                f"{f.default!r}; ${env} when set)")

    @classmethod
    def from_args(cls, args):
        return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
