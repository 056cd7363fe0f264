"""
The TGI-style multi-model routes, whose models run in TGI containers there and in this process
here: GET /, GET /models, POST /models/<model_id>/start, POST /models/<model_id>/stop. That API
calls GPT-2 124M "gpt-2" (Hugging Face name "gpt2"); these routes list it so, and every route
of this server accepts that id. Its /generate is lut_service's.
"""
from flask import Blueprint, jsonify, request

from server.common import APIError, body, field, service
from model import PRETRAINED, QUANTIZE
from server.openapi import api

bp = Blueprint("tgi", __name__)


def tgi_id(name):
    return "gpt-2" if name == "gpt2" else name


@bp.get("/")
@api("TGI", "Service information")
def index():
    svc = service()
    return jsonify(message="GPT-2 inference API with per-user LUTs", models=[tgi_id(n) for n in svc.registry()],
                   running_containers=[tgi_id(n) for n in svc.models.names()])


@bp.get("/models")
@api("TGI", "Models by id")
def models_by_id():
    svc = service()
    running = set(svc.models.names())
    return jsonify(models=[{"id": tgi_id(name), "name": tgi_id(name), "hf_name": init if init in PRETRAINED else name,
                            "running": name in running} for init, name in svc.registry().values()])


@bp.post("/models/<path:model_id>/start")
@api("TGI", "Start (load) a model (admin)", access="admin")
def models_start(model_id):
    """Start a model beside those running (409 beyond --max_loaded_models or --max_model_memory_mb);
    a running one is answered as it is. An optional body {"quantize": "int8"} sets its weights."""
    svc = service()
    entry = svc.find(model_id)
    if entry is None:
        raise APIError(404, f"unknown model_id {model_id!r}; GET /models lists them")
    quantize = field(body(), "quantize", str) if request.get_data(cache=True) else None
    if quantize is not None and quantize not in QUANTIZE:
        raise APIError(400, f"quantize must be one of {', '.join(QUANTIZE)}, or absent", param="quantize")
    loaded = svc.load(*entry, make_room=False, quantize=quantize)
    return jsonify(message=f"Container for {model_id} started", model_id=model_id, port=request.server[1],
                   container_name=loaded.name)  # no containers here: the name the model runs under


@bp.post("/models/<path:model_id>/stop")
@api("TGI", "Stop (unload) a model (admin)", access="admin")
def models_stop(model_id):
    svc = service()
    entry = svc.find(model_id)
    if entry is None:
        raise APIError(404, f"unknown model_id {model_id!r}")
    if svc.models.unload(entry[1]) is None:
        raise APIError(404, f"model {model_id!r} is not running")
    return jsonify(message=f"Container for {model_id} stopped", model_id=model_id, container_name=entry[1])
