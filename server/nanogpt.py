"""
The nanoGPT API server's routes: GET /api/status, GET /api/models, POST /api/load_model,
POST /api/generate, and training jobs: POST /api/train, GET /api/train, GET /api/train/<job_id>,
POST /api/train/<job_id>/cancel.
"""
import dataclasses
import logging
import os
import time

from flask import Blueprint, jsonify

from server.common import APIError, body, field, inside, no_trace, sampling, service, trained_models, usage
from model import PRETRAINED, ModelLoadError
import train
from server.openapi import INT, NUM, SAMPLING, STR, api, obj

log = logging.getLogger("api_server")
bp = Blueprint("nanogpt", __name__)

# /api/train defaults: the nanoGPT API's example request (a short GPT-2 fine-tune); the rest as train.py's
TRAIN_DEFAULTS = dict(model_type="gpt2", batch_size=4, learning_rate=3e-5, max_iters=20, eval_interval=5)


@bp.get("/api/status")
@api("nanoGPT", "Server status")
def status():
    svc = service()
    loaded = svc.models.current()
    out = {"status": "online", "model_loaded": loaded is not None, "model": loaded and loaded.name,
           "device": loaded and loaded.device.type,  # "cuda" or "cpu", as the nanoGPT-style API shows it
           "device_index": loaded and loaded.device.index,
           "quantize": loaded and loaded.model.quantized, "running_models": svc.models.names(),
           "timestamp": time.time(), "uptime_s": round(time.time() - svc.started, 1)}
    if loaded is None:
        out["detail"] = svc.models.error
    else:
        out["engine"] = loaded.engine.load
    return jsonify(out)


@bp.get("/api/models")
@api("nanoGPT", "Pretrained and trained models")
def models():
    # model_type: what the model was trained from (a GPT-2 type, or "scratch"), as the nanoGPT-style API shows it
    trained = [{**m, "config": {"model_type": m["config"].get("init_from"), **m["config"]}}
               for m in trained_models(service().models_dir)]
    return jsonify(pretrained_models=list(PRETRAINED), trained_models=trained)


@bp.post("/api/load_model")
@api("nanoGPT", "Load a GPT-2 type or a trained checkpoint (admin)", body=obj(model_type=STR, model_path=STR),
     access="admin")
def load_model_route():
    data = body()
    model_type, model_path = field(data, "model_type", str), field(data, "model_path", str)
    if bool(model_type) == bool(model_path):
        raise APIError(400, "give exactly one of model_type or model_path")
    if model_type and model_type not in PRETRAINED:
        raise APIError(404, f"unknown model_type {model_type!r}; choose one of {', '.join(PRETRAINED)}")
    svc = service()
    try:
        loaded = svc.models.load(*((model_type, model_type) if model_type else svc.checkpoint(model_path)),
                                 make_default=True)
    except ModelLoadError as e:
        raise APIError(503 if model_type else 400, str(e)) from None
    return jsonify(message="Model loaded successfully", model=loaded.name)


@bp.post("/api/generate")
@api("nanoGPT", "Generate (nanoGPT API)", body=obj(["prompt"], prompt=STR, max_new_tokens=INT, **SAMPLING))
def api_generate():
    data = body()
    prompt = field(data, "prompt", str, required=True)
    lut_name = field(data, "lut_name", str)
    no_trace(data, "/api/generate")
    params = sampling(data, "max_new_tokens", 100,
                      dict(temperature=0.8, top_k=200, top_p=1.0, repetition_penalty=1.0, do_sample=True))
    seq, n_prompt = service().run(prompt, params, lut_name)
    parameters = {"max_new_tokens": params.max_new_tokens, "temperature": params.temperature,
                  "top_k": params.top_k}
    return jsonify(prompt=prompt, generated_text=prompt + seq.text, parameters=parameters,
                   finish_reason=seq.finish_reason, usage=usage(n_prompt, [seq]), lut_name=lut_name)


# ---- training jobs

def train_schema():
    """/api/train's body: the nanoGPT API's fields, then every train.py setting, from TrainConfig."""
    kinds = {int: INT, float: NUM, bool: {"type": "boolean"}, str: STR}
    settings = {f.name: {**kinds[f.type], "description": f.metadata["help"].replace("%%", "%")}
                for f in dataclasses.fields(train.TrainConfig) if f.name not in ("out_dir", "data_dir")}
    return obj(["dataset", "output_dir"], output_dir={**STR, "description": "inside the models directory"},
               model_type={**STR, "description": "the GPT-2 type to fine-tune (sets init_from)"}, **settings)


@bp.post("/api/train")
@api("training", "Start a training job (admin)", body=train_schema(), access="admin")
def api_train():
    data = body()
    svc = service()
    settings, echo = train_settings(data, svc.models_dir, svc.cfg.data_dir)
    job = svc.trainer.start(settings, data["output_dir"], settings["out_dir"], echo)
    log.info("training job %s started: pid %s, %s", job["job_id"], job["process_id"], settings["out_dir"])
    return jsonify(message="Training started", config=echo, config_path=job["config_path"],
                   process_id=job["process_id"], job_id=job["job_id"])


@bp.get("/api/train")
@api("training", "List training jobs")
def api_train_jobs():
    return jsonify(jobs=service().trainer.list())


@bp.get("/api/train/<int:job_id>")
@api("training", "A training job's status and progress")
def api_train_job(job_id):
    return jsonify(service().trainer.get(job_id))


@bp.post("/api/train/<int:job_id>/cancel")
@api("training", "Cancel a training job (admin)", access="admin")
def api_train_cancel(job_id):
    return jsonify(service().trainer.cancel(job_id))


def train_settings(data, models_dir, data_dir):
    """An /api/train request -> (full train.py settings, the config echoed to the client).
    Fields: the nanoGPT API's (dataset, output_dir, model_type, ...) and any other train.py setting."""
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
