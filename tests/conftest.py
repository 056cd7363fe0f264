"""
Shared fixtures. No GPT-2 weights can be downloaded here, so the tests write tiny GPT-2s in the
Hugging Face Hub cache layout into a private HF_HOME and load them offline through the real
from_pretrained path. The GPT-2 tokenizer comes from ../shared/tiktoken-cache when present.
"""
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
# Set before huggingface_hub is imported anywhere: it reads these once.
HF_HOME = tempfile.mkdtemp(prefix="hf_home_")
os.environ["HF_HOME"] = HF_HOME
os.environ["HF_HUB_OFFLINE"] = "1"
_shared_cache = os.path.join(ROOT, "..", "shared", "tiktoken-cache")
if os.path.isdir(_shared_cache) and "TIKTOKEN_CACHE_DIR" not in os.environ:
    os.environ["TIKTOKEN_CACHE_DIR"] = os.path.abspath(_shared_cache)

import pytest  # noqa: E402
import requests  # noqa: E402
import torch  # noqa: E402

TINY = dict(n_layer=2, n_head=4, n_embd=64, n_positions=128, vocab_size=50257)


def write_hub_model(model_type, state, config, commit="0" * 40):
    """Lay out files as huggingface_hub's cache does: refs/main -> snapshots/<commit>/..."""
    from safetensors.torch import save_file
    repo_dir = os.path.join(HF_HOME, "hub", f"models--openai-community--{model_type}")
    snap = os.path.join(repo_dir, "snapshots", commit)
    os.makedirs(snap, exist_ok=True)
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    with open(os.path.join(repo_dir, "refs", "main"), "w") as f:
        f.write(commit)
    with open(os.path.join(snap, "config.json"), "w") as f:
        json.dump({"model_type": "gpt2", "layer_norm_epsilon": 1e-5, **config}, f)
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(snap, "model.safetensors"))
    return snap


@pytest.fixture(scope="session")
def hf_tiny():
    """A tiny random transformers GPT2LMHeadModel, saved as 'gpt2' in the Hub's own naming (no
    'transformer.' prefix, mask buffers included, no lm_head) and as 'gpt2-medium' in
    save_pretrained's naming (with the prefix)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    hf = GPT2LMHeadModel(GPT2Config(**TINY)).eval()
    state = hf.state_dict()
    hub_style = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
    T = TINY["n_positions"]
    for i in range(TINY["n_layer"]):  # the buffers the original GPT-2 files carry
        hub_style[f"h.{i}.attn.bias"] = torch.tril(torch.ones(T, T)).view(1, 1, T, T)
        hub_style[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    write_hub_model("gpt2", hub_style, TINY)
    write_hub_model("gpt2-medium", {k: v for k, v in state.items() if k != "lm_head.weight"}, TINY)
    return hf


@pytest.fixture(scope="session")
def tiny(hf_tiny):
    """Our GPT loaded offline from the Hub cache, and the GPT-2 tokenizer."""
    from model import load_model
    from tokenizer import get_tokenizer
    model = load_model("gpt2")
    return model, get_tokenizer(model.tokenizer_spec)


def script_env():
    """Environment for running the project's scripts as subprocesses."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT
    return env


@pytest.fixture
def cli_env():
    return script_env()


def run_script(script, *args, cwd=ROOT, env=None, timeout=300, input=None):
    """One of the project's top-level scripts (sample.py, train.py, lut.py, api_client.py,
    data/<name>/prepare.py, ...; relative to the repository root) run as a user runs it: a
    subprocess of this Python with the test environment. `script` may also be "-c" or "-m" for
    code or a module. Returns the CompletedProcess (text stdout and stderr); checks nothing."""
    if not script.startswith("-") and not os.path.isabs(script):
        script = os.path.join(ROOT, script)
    return subprocess.run([sys.executable, script, *args], cwd=cwd, env=env or script_env(), input=input,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def script(hf_tiny):
    """run_script, with the tiny GPT-2 in the Hub cache that the scripts load offline."""
    return run_script


DEFAULT = object()  # an app_factory value that leaves ServerConfig's own default in place


@pytest.fixture
def app_factory(hf_tiny, tmp_path):
    """make(root=tmp_path, **settings) -> api_server.create_app(...): the tiny GPT-2 on the CPU,
    its LUT, state and models files under root (luts.sqlite, state.sqlite, out/), and the
    anonymous rate limit off (as the test servers run; DEFAULT restores ServerConfig's default
    for any setting). A second app in one test takes another root (or its own paths)."""
    from api_server import create_app

    def make(root=None, **settings):
        root = tmp_path if root is None else root
        config = {"model_type": "gpt2", "device": "cpu", "lut_db": str(root / "luts.sqlite"),
                  "state_db": str(root / "state.sqlite"), "models_dir": str(root / "out"),
                  "anonymous_rate_per_minute": 0, **settings}
        return create_app({k: v for k, v in config.items() if v is not DEFAULT})
    return make


@pytest.fixture
def app(app_factory):
    """The default app of app_factory."""
    return app_factory()


@pytest.fixture
def client(app):
    """A Flask test client of the default app."""
    return app.test_client()


def bench_module(name):
    """A bench/ script imported as a module, for the tests that assert what it measures."""
    import importlib.util
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "bench", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wait_for(condition, timeout=60, interval=0.05, what=None):
    """Poll condition() until it returns something true (returned) or timeout seconds pass
    (AssertionError naming what, or the last value seen)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}: last {value!r}")
        time.sleep(interval)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A live server on a free loopback port: `python api_server.py`, or gunicorn with the
    project's gunicorn.conf.py and GPT_* settings."""

    def __init__(self, workdir, env, gunicorn=False, args=()):
        """args: more api_server.py flags. The LocalLab-style API's anonymous rate limit is off unless args set it
        (tests make many keyless requests from one address)."""
        self.workdir, self.env = workdir, env
        args = ["--anonymous_rate_per_minute", "0", *args]
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = None
        self.log = os.path.join(workdir, "server.log")  # a file, not a pipe: the access log never blocks it
        if gunicorn:
            self.argv = [sys.executable, "-m", "gunicorn", "-c", os.path.join(ROOT, "gunicorn.conf.py"),
                         "api_server:create_app()"]
            self.env = dict(env, GUNICORN_BIND=f"127.0.0.1:{self.port}", GPT_DEVICE="cpu", GPT_MODEL_TYPE="gpt2",
                            GPT_ANONYMOUS_RATE_PER_MINUTE="0")
        else:
            self.argv = [sys.executable, os.path.join(ROOT, "api_server.py"), "--port", str(self.port),
                         "--device", "cpu", "--model_type", "gpt2", *args]  # the last of a repeated flag wins

    def start(self, timeout=180):
        """Start it and wait for /health (a first start on a machine builds the CPU kernels, ~30 s,
        first); a server that is not up in time is stopped, and the error shows its log's tail."""
        self.proc = subprocess.Popen(self.argv, cwd=self.workdir, env=self.env, stdout=subprocess.DEVNULL,
                                     stderr=open(self.log, "a"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if requests.get(self.url + "/health", timeout=1).ok:
                    return self
            except (requests.ConnectionError, requests.Timeout):  # gunicorn accepts before its app exists
                time.sleep(0.1)
            if self.proc.poll() is not None:
                raise RuntimeError(open(self.log).read()[-2000:])
        self.stop()
        raise RuntimeError(f"server did not start within {timeout} s: {open(self.log).read()[-2000:]}")

    def stop(self):
        """Terminate it (kill it if it does not go within 30 s); a no-op once it has ended."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def __enter__(self):
        return self if self.proc is not None else self.start()

    def __exit__(self, *exc):
        self.stop()


@pytest.fixture
def server(hf_tiny, tmp_path):
    """A live `python api_server.py` in tmp_path (its out/ there), stopped after the test."""
    with Server(str(tmp_path), script_env()) as s:
        yield s


@pytest.fixture(scope="module")
def module_server(hf_tiny, tmp_path_factory):
    """One live `python api_server.py` shared by a test module's tests (and their state)."""
    with Server(str(tmp_path_factory.mktemp("server")), script_env()) as s:
        yield s



# ---- PostgreSQL and Redis (the storage and rate-limit tests): real servers, as in CI. Absent on a
# laptop: those tests skip, saying how to start them; absent in CI (CI=true): they fail.
PG_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
HOW_TO_START = {
    "PostgreSQL": "start one with trust auth and a database named test (Debian: apt-get install postgresql; "
                  "pg_ctlcluster 15 main start; createdb -U postgres test), or set TEST_DATABASE_URL",
    "Redis": "start one (Debian: apt-get install redis-server; redis-server --daemonize yes --port 6379), "
             "or set TEST_REDIS_URL"}


def require(what, error):
    message = f"{what} is not reachable ({error}); {HOW_TO_START[what]}"
    if os.environ.get("CI") == "true":
        pytest.fail(message + " (CI must run these tests, not skip them)", pytrace=False)
    pytest.skip(message)


def need_kernels():
    """Skip a test of the CPU kernels where they cannot be built; under CI=true fail instead: a
    broken kernels build must not pass as a skip (nor as addmm compared with addmm)."""
    import cpu_kernels
    if cpu_kernels.ops() is None:
        message = "the CPU kernels could not be built here (the log says why; python -m cpu_kernels retries)"
        if os.environ.get("CI") == "true":
            pytest.fail(message + " (CI must run these tests, not skip them)", pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def pg_server():
    import psycopg
    try:
        psycopg.connect(PG_URL, connect_timeout=3).close()
    except psycopg.Error as e:
        require("PostgreSQL", e)
    return PG_URL


@pytest.fixture
def pg_url(pg_server):
    """A URL whose tables live in a fresh schema, dropped afterwards: every test starts empty."""
    import uuid

    import psycopg
    schema = f"test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in pg_server else "?"
    yield f"{pg_server}{sep}options=-csearch_path%3D{schema}"
    with psycopg.connect(pg_server, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def redis_url():
    """The test Redis, emptied of this project's rate-limit buckets."""
    import redis
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_timeout=3)
        client.ping()
    except redis.RedisError as e:
        require("Redis", e)
    for key in client.scan_iter("gpt2:bucket:*"):
        client.delete(key)
    return REDIS_URL


@pytest.fixture(params=["sqlite", "postgresql"])
def db_target(request, tmp_path):
    """Each storage test runs on both engines: a SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        return str(tmp_path / "store.sqlite")
    return request.getfixturevalue("pg_url")


class Proxy:
    """A TCP relay in front of PostgreSQL or Redis that can be cut and restored: an outage on demand.
    Tests take one through the `relay` fixture, which also closes it."""

    def __init__(self, host, port):
        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.up, self.conns = True, []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            if not self.up:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while data := a.recv(65536):
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def cut(self):
        self.up = False
        for s in self.conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.conns = []

    def restore(self):
        self.up = True

    def close(self):
        self.cut()
        self.listener.close()


def relayed(url, default_port):
    """(Proxy, url through it): a PostgreSQL or Redis URL whose host:port is replaced by a relay's."""
    from urllib.parse import urlsplit
    parts = urlsplit(url)
    proxy = Proxy(parts.hostname, parts.port or default_port)
    netloc = parts.netloc.rsplit("@", 1)
    netloc[-1] = f"127.0.0.1:{proxy.port}"
    return proxy, parts._replace(netloc="@".join(netloc)).geturl()


@pytest.fixture
def relay():
    """relay(url) -> (Proxy, the same URL through it), for PostgreSQL (postgresql://) and Redis
    (redis://) alike; the relays are closed after the test."""
    made = []

    def make(url):
        proxy, through = relayed(url, 6379 if url.startswith("redis") else 5432)
        made.append(proxy)
        return proxy, through
    yield make
    for proxy in made:
        proxy.close()
