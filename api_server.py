"""
REST server: GPT-2 with per-user LUTs, each running model owned by a continuous-batching engine.
The HTTP layer is the server/ package: one blueprint per API family (server/lut_service.py: the
LUT service's /health, /train_lut, /generate; nanogpt.py: /api/*; locallab.py; tgi.py;
openai_api.py: /v1; keys.py: API keys, usage and the per-request key checks; luts.py: LUT
management; playground.py; metrics.py), documented by server/openapi.py from each route's @api
declaration. Settings are server/config.py's ServerConfig. create_app wires it all to one
server.service.Service; main serves it on gunicorn (WSGIServer), or with --dev on Flask's
development server.

    python api_server.py --port 5000 --model_type gpt2
    gunicorn -c gunicorn.conf.py 'api_server:create_app()'
"""
import argparse
import dataclasses
import logging
import sys

from flask import Flask, current_app, jsonify, request
from gunicorn import glogging
from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from werkzeug.exceptions import HTTPException
from werkzeug.middleware.proxy_fix import ProxyFix
from werkzeug.routing import IntegerConverter

import cpu_kernels
from access import AccessError
from lut import LUTError
from model import ModelLoadError, resolve_device
from server import keys, locallab, lut_service, luts, metrics, nanogpt, openai_api, openapi, playground, tgi
from server.common import APIError, JSONProvider
from server.config import ServerConfig
from server.service import Service
from server.trainer import JobError
from storage import StoreUnavailable

log = logging.getLogger("api_server")

BLUEPRINTS = (lut_service.bp, nanogpt.bp, locallab.bp, tgi.bp, openai_api.bp, keys.bp, luts.bp, playground.bp,
              metrics.bp)


# ------------------------------------------------------------------------ the app

def create_app(config=None):
    """config: a ServerConfig, or a dict of settings over ServerConfig's defaults (tests pass
    their own). Called bare, as gunicorn does, it reads the GPT_<NAME> environment variables
    (GPT_MODEL_TYPE, GPT_LUT_DB, ...). A bad setting is a ValueError naming it."""
    if isinstance(config, ServerConfig):
        cfg = dataclasses.replace(config)  # checked again, and the app's own copy
    else:
        cfg = ServerConfig(**config) if config is not None else ServerConfig.from_env()
    app = Flask(__name__, static_folder=None)
    if cfg.trusted_proxies:  # the client's address is the one the nearest trusted proxy saw (ProxyFix)
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=cfg.trusted_proxies)
    app.url_map.converters["int"] = SQLiteInt  # before any route: ids in paths fit SQLite
    app.json = JSONProvider(app)  # a body nested too deeply is bad JSON, not a RecursionError
    app.config["MAX_CONTENT_LENGTH"] = cfg.max_body_bytes * 64  # the largest any route takes
    app.before_request(body_limit)  # before the blueprints' hooks: the first to read the body
    svc = Service(cfg)
    app.extensions["gpt"] = svc  # what the blueprints share: server.common.service()

    prepare_kernels(cfg)
    try:
        if cfg.model_path:
            svc.models.load(*svc.checkpoint(cfg.model_path))
        elif cfg.model_type:
            svc.models.load(cfg.model_type, cfg.model_type)
    except (ModelLoadError, APIError) as e:  # start anyway: /health says why, generation answers 503
        svc.models.error = getattr(e, "detail", str(e))
        log.error("no model loaded: %s", svc.models.error)

    app.register_error_handler(Exception, error_response)
    for bp in BLUEPRINTS:
        app.register_blueprint(bp)
    openapi.register(app, "GPT-2 LUT server", "1.0")  # last: it documents every route registered before it
    return app


def prepare_kernels(cfg):
    """Build or load the CPU kernels before the server reports ready: otherwise the first CPU
    request pays the build (~30 s) or waits on another process's. A build that cannot finish is
    one logged line, and generation falls back to torch's ops."""
    try:
        device, _ = resolve_device(cfg.device, cfg.dtype)
    except ModelLoadError:
        return  # the model load reports it
    if device == "cpu" and cfg.dtype == "float32":  # the only models the kernels serve
        log.info("loading the CPU kernels (their first build on a machine takes ~30 s)")
        cpu_kernels.ops()


def body_limit():
    """This route's body limit (a LUT import's is 64x --max_body_bytes), on the length declared
    and on the bytes read: a chunked body declares none. Reads stop one byte past the limit;
    werkzeug's would stop at it without an error, cutting the body short."""
    limit = current_app.extensions["gpt"].cfg.max_body_bytes
    doc = openapi.doc_of(request.endpoint)
    limit *= 64 if doc and doc.body == "binary" else 1  # an uploaded file (a LUT import), declared by its @api
    request.max_content_length = limit + 1
    if (request.content_length or 0) > limit or request.content_length is None and len(request.get_data()) > limit:
        raise APIError(413, f"request body larger than {limit} bytes")


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


def check_settings(cfg):
    """What create_app refuses in the settings, checked without a model, a database or torch: the
    gunicorn master runs it before its worker starts, so a bad setting stops start-up with one line."""
    keys.read_public_models(cfg.public_models)


class StderrLogger(glogging.Logger):
    """gunicorn's logger with its access log on stderr, beside everything else the server logs
    (gunicorn writes accesslog "-" to stdout)."""

    def setup(self, cfg):
        super().setup(cfg)
        for handler in self.access_log.handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
                handler.setStream(sys.stderr)


class WSGIServer(BaseApplication):
    """gunicorn run from here: one gthread worker (one process holds the models; its engines batch
    the concurrent requests) with `threads` request threads, a stream holding one while it lasts.
    The app is created in the worker, after the fork, so no torch state crosses it; create_app
    builds or loads the CPU kernels before the worker takes requests. SIGTERM lets requests in
    flight finish for up to 30 s; Ctrl-C (SIGINT) stops at once."""

    def __init__(self, cfg, host, port, threads):
        self.app_cfg = cfg
        self.options = {
            "bind": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
            "workers": 1, "worker_class": "gthread", "threads": threads,
            "timeout": 600,  # the worker's start-up (a first kernel build, a large model) must not get it killed
            "graceful_timeout": 30, "keepalive": 5, "preload_app": False,
            "accesslog": "-", "errorlog": "-", "logger_class": StderrLogger, "proc_name": "api_server",
            # gunicornc's control socket: one path per user, which servers side by side would share
            "control_socket_disable": True}
        super().__init__()

    def load_config(self):
        for key, value in self.options.items():
            self.cfg.set(key, value)

    def load(self):
        try:
            app = create_app(self.app_cfg)
        except ValueError as e:  # a bad setting check_settings could not see: one line, and the master stops
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(Arbiter.APP_LOAD_ERROR)
        log.info("Running on http://%s (gunicorn: one gthread worker, %d threads)", self.options["bind"],
                 self.options["threads"])
        return app


def main(argv=None):
    p = argparse.ArgumentParser(description="GPT-2 + per-user LUT API server, on gunicorn (one gthread worker; "
                                            "docs/deploy.md runs several). Every setting is also a GPT_<NAME> "
                                            "environment variable.")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=5000, help="port to listen on")
    p.add_argument("--threads", type=int, default=32, help="request threads; each stream holds one while it lasts "
                                                            "(default: 32)")
    p.add_argument("--dev", action="store_true", help="Flask's development server (threaded) instead of gunicorn")
    ServerConfig.add_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.threads < 1:
            raise ValueError(f"threads must be >= 1, got {args.threads}")
        cfg = ServerConfig.from_args(args)
        if args.dev:
            app = create_app(cfg)
        else:
            check_settings(cfg)
    except ValueError as e:  # a bad setting, e.g. the public_models file
        raise SystemExit(f"error: {e}")
    if args.dev:
        app.run(host=args.host, port=args.port, threaded=True)
    else:
        WSGIServer(cfg, args.host, args.port, args.threads).run()


if __name__ == "__main__":
    main()
