"""
Seed 003's routes, the multi-model inference API whose models run in TGI containers there and in
this process here: GET /, GET /models, POST /models/<model_id>/start, POST /models/<model_id>/stop.
"""
from flask import Blueprint, jsonify, request

from api_common import APIError, service
from locallab_api import model_list

bp = Blueprint("tgi_api", __name__)


@bp.get("/")
def index():
    svc = service()
    return jsonify(message="GPT-2 inference API with per-user LUTs", models=list(svc.registry()),
                   running_containers=[svc.slot.name] if svc.slot.engine is not None else [])


@bp.get("/models")
def models_by_id():
    return jsonify(models=model_list())


@bp.post("/models/<path:model_id>/start")
def models_start(model_id):
    service().use_model(model_id)
    return jsonify(message=f"Model {model_id} started", model_id=model_id, port=request.server[1],
                   container_name=None)  # no containers here: the model runs in this process


@bp.post("/models/<path:model_id>/stop")
def models_stop(model_id):
    svc = service()
    entry = svc.registry().get(model_id)
    if entry is None:
        raise APIError(404, f"unknown model_id {model_id!r}")
    if svc.slot.engine is None or svc.slot.name != entry[1]:
        raise APIError(404, f"model {model_id!r} is not running")
    svc.slot.unload()
    return jsonify(message=f"Model {model_id} stopped", model_id=model_id)
