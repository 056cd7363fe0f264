"""
The hosted-API side (Bearer keys, usage, public models): API keys (POST /keys, GET /keys, DELETE /keys/<key_id>), usage
(GET /usage, GET /usage/history) and the public model list (GET /public/models); and, for every
request of the app, the checks that keys imply (body size, key, rate limit, admin routes, LUT
ownership) before it runs and its record in the query history after.
"""
import ipaddress
import json
import logging
import time

from flask import Blueprint, g, jsonify, request

from model import PRETRAINED
from server.common import APIError, body, field, service
from server.openapi import BOOL, INT, STR, Doc, api, doc_of, obj

log = logging.getLogger("api_server")
bp = Blueprint("keys", __name__)
NO_ROUTE = Doc("", "", access="public")  # no route (a 404, 405 or redirect): nothing to guard, still rate-limited

# ---- every request: body size, API key, rate limit, admin routes, LUT ownership; then history

@bp.before_app_request
def check_request():
    """Who may call this route is what its @api declaration says (server/openapi.py)."""
    cfg, access = service().cfg, service().access
    g.started, g.jobs, g.key = time.time(), [], None
    doc = doc_of(request.endpoint) or NO_ROUTE
    if doc.access == "public":
        return check_anonymous(cfg, access, doc)
    g.key = access.authenticate(request.headers.get("Authorization"))
    if g.key is None:  # access control is off: open, limited per client address
        return check_anonymous(cfg, access, doc)
    access.check_rate(g.key)
    if doc.access == "admin" and not g.key.admin:
        raise APIError(403, f"{request.method} {request.path} needs an admin API key")
    lut_name = requested_lut()
    if isinstance(lut_name, str) and not g.key.may_use(lut_name):
        raise APIError(403, f"this API key may not use LUT {lut_name!r}", param="lut_name")


def check_anonymous(cfg, access, doc):
    """The LocalLab-style rate limit for requests without an API key, per client address (which
    --trusted_proxies takes from X-Forwarded-For). Liveness, scrapes and the static pages are exempt."""
    if cfg.anonymous_rate_per_minute and doc.limited:
        access.check_anonymous(request.remote_addr, cfg.anonymous_rate_per_minute, cfg.anonymous_burst)


def requested_lut():
    """The LUT a request names, in its path or its JSON body (every LUT route does one or the other)."""
    data = request.get_json(silent=True) if request.is_json else None
    return (request.view_args or {}).get("lut_name") or (data.get("lut_name") if isinstance(data, dict) else None)


@bp.after_app_request
def record_query(response):
    if "started" not in g or (doc_of(request.endpoint) or NO_ROUTE).access == "public":
        return response
    svc = service()
    jobs, started, key, access = g.jobs, g.started, g.key, svc.access
    lut_name = requested_lut()
    row = dict(app_id=request.headers.get("X-App-ID") or "Unknown", key_id=key.id if key else None,
               method=request.method, route=request.path, model=g.view.name if "view" in g else svc.models.default,
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


def recorded(chunks, save):
    """A streamed body that calls save() when it ends, however it ends."""
    try:
        yield from chunks
    finally:
        save()


# ---- API keys, usage

@bp.post("/keys")
@api("access", "Create an API key (admin; while access is open, from the loopback interface only)", access="admin",
     body=obj(["name"], name=STR, admin=BOOL, luts={"type": "array", "items": STR}, rate_per_minute=INT, burst=INT))
def create_key():
    if g.key is None and not from_loopback(service().cfg):  # whoever makes the first key owns the server
        raise APIError(403, "access control is off, and the first API key may be created only on the server's "
                            "machine: POST /keys from 127.0.0.1 or ::1, or run `python access.py create --name "
                            "admin --admin` there")
    data = body()
    secret, record = service().access.create_key(
        field(data, "name", str, required=True), field(data, "admin", bool, False), field(data, "luts", list, []),
        field(data, "rate_per_minute", int), field(data, "burst", int))
    log.info("API key %s (%s) created", record["id"], record["name"])
    return jsonify(key=secret, **record), 201


@bp.get("/keys")
@api("access", "List API keys (admin)", access="admin")
def list_keys():
    return jsonify(keys=service().access.list_keys())


@bp.delete("/keys/<int:key_id>")
@api("access", "Revoke an API key (admin)", access="admin")
def revoke_key(key_id):
    return jsonify(service().access.revoke_key(key_id))


def from_loopback(cfg):
    """Whether the client itself, not just a proxy in front, is on this machine. Without
    --trusted_proxies a forwarding header means a local proxy may be relaying anyone; with them,
    X-Forwarded-For must name every trusted hop, or ProxyFix leaves the proxy's own address."""
    forwarded = request.headers.get("X-Forwarded-For")
    if cfg.trusted_proxies:
        if len([hop for hop in (forwarded or "").split(",") if hop.strip()]) < cfg.trusted_proxies:
            return False
    elif forwarded is not None or "Forwarded" in request.headers or "X-Real-IP" in request.headers:
        return False
    try:
        address = ipaddress.ip_address(request.remote_addr or "")
    except ValueError:  # what a proxy wrote in X-Forwarded-For need not be an address
        return False
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 from a dual-stack socket
    return address.is_loopback or bool(mapped and mapped.is_loopback)


def own_key_id():
    """Whose queries this request may see: None (everyone's) without keys or for an admin key."""
    return None if g.key is None or g.key.admin else g.key.id


@bp.get("/usage")
@api("access", "Requests and tokens per app and per key")
def usage_summary():
    return jsonify(service().access.usage(key_id=own_key_id()))


@bp.get("/usage/history")
@api("access", "The latest queries", query={"limit": INT, "app_id": STR})
def usage_history():
    limit = request.args.get("limit", "100")
    if not limit.isdigit() or not 1 <= int(limit) <= 10000:
        raise APIError(400, "limit must be an integer in [1, 10000]", param="limit")
    return jsonify(queries=service().access.history(own_key_id(), request.args.get("app_id"), int(limit)))


# ---- the public model list

@bp.get("/public/models")
@api("access", "Models with capabilities and pricing (no key needed)", access="public")
def public_models():
    started = time.time()
    svc = service()
    overrides = svc.public_models
    models = [{"id": mid, "provider": "openai" if init in PRETRAINED else "local", "created": int(svc.started),
               "object": "model", "owned_by": "openai-community" if init in PRETRAINED else "local",
               "capabilities": ["text-completion", "chat-completion"],
               "pricing": {"input": 0.0, "output": 0.0, "unit": "token", "currency": "USD"},
               **overrides.get("*", {}), **overrides.get(mid, {})}
              for mid, (init, _) in svc.registry().items() if overrides.get(mid, {}).get("listed", True)]
    return jsonify(status="success", data={"models": models},
                   meta={"processing_time": round(time.time() - started, 4)})


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
