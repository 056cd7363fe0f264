"""
The LocalLab-style routes: POST /chat, POST /generate/batch, GET /models/available,
GET /models/current, POST /models/load, POST /models/unload, GET /system/info. Its streaming
/generate is lut_service's.
"""
import dataclasses
import os
import time

from flask import Blueprint, jsonify

from server.common import (APIError, CHAT_STOP, body, chat_prompt, field, lut_trace, no_trace, service, sse,
                        text_events, trace_requested, usage)
from server.lut_service import generation_request
from model import HUB_ORG, PRETRAINED
from server.openapi import api, BOOL, GENERATE, LUT_TRACE, MESSAGES, STR, obj

bp = Blueprint("locallab", __name__)


def model_list():
    """Every model id with what the LocalLab-style and TGI-style APIs say of it, and whether it is the running one."""
    svc = service()
    running = set(svc.models.names())
    return [{"id": mid, "name": name, "hf_name": f"{HUB_ORG}/{init}" if init in PRETRAINED else
             os.path.relpath(init), "type": "pretrained" if init in PRETRAINED else "trained",
             "running": name in running} for mid, (init, name) in svc.registry().items()]


@bp.post("/chat")
@api("LocalLab", "Chat on a plain transcript template", body=obj(
    ["messages"], messages=MESSAGES, continue_final_message=BOOL, lut_trace=LUT_TRACE, **GENERATE))
def chat():
    data = body()
    continued = data.get("continue_final_message", False)
    prompt = chat_prompt(data.get("messages"), continued)
    params, _, lut_name, stream = generation_request(data)
    trace = trace_requested(data, lut_name)
    params = dataclasses.replace(params, stop=params.stop + CHAT_STOP)
    svc = service()
    if stream:
        job, _ = svc.submit(prompt, params, lut_name, fit=True)
        return sse(text_events(job, svc.cfg.request_timeout, trace), job)
    seq, n_prompt = svc.run(prompt, params, lut_name, fit=True)
    content = seq.text.rstrip() if continued else seq.text.strip()
    choice = {"message": {"role": "assistant", "content": content}, "finish_reason": seq.finish_reason}
    if trace:  # offsets into content
        choice["lut_trace"] = lut_trace(seq, content, len(content) - len(seq.text.rstrip()))
    return jsonify(choices=[choice], usage=usage(n_prompt, [seq]), model_id=svc.view().name, lut_name=lut_name)


@bp.post("/generate/batch")
@api("LocalLab", "Generate for several prompts",
     body=obj(["prompts"], prompts={"type": "array", "items": STR, "minItems": 1}, **GENERATE))
def generate_batch():
    data = body()
    svc = service()
    limit = svc.cfg.max_batch_prompts
    prompts = field(data, "prompts", list, required=True)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise APIError(400, "prompts must be a non-empty list of strings")
    if len(prompts) > limit:
        raise APIError(413, f"prompts: at most {limit} per request, got {len(prompts)}")
    params, fit, lut_name, stream = generation_request(data)
    no_trace(data, "/generate/batch")
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
                   usage=usage(sum(n for _, n in jobs), seqs), model_id=svc.view().name, lut_name=lut_name)


@bp.get("/models/available")
@api("LocalLab", "Models by id")
def models_available():
    return jsonify(models=model_list())


@bp.get("/models/current")
@api("LocalLab", "The loaded model")
def models_current():
    svc = service()
    loaded = svc.models.current()
    if loaded is None:
        return jsonify(model_id=None, loaded=False, detail=svc.models.error)
    model = loaded.model
    return jsonify(model_id=loaded.name, loaded=True, device=str(next(model.parameters()).device),
                   dtype=str(next(model.parameters()).dtype).removeprefix("torch."), quantize=model.quantized,
                   parameters=model.get_num_params(), config=dataclasses.asdict(model.config))


@bp.post("/models/load")
@api("LocalLab", "Load a model by id (admin)", body=obj(["model_id"], model_id=STR), access="admin")
def models_load():
    model_id = field(body(), "model_id", str, required=True)
    svc = service()
    entry = svc.find(model_id)
    if entry is None:
        raise APIError(404, f"unknown model_id {model_id!r}; GET /models/available lists them", param="model_id")
    svc.load(*entry, make_default=True)
    return jsonify(message=f"Model {model_id} loaded", model_id=model_id)


@bp.post("/models/unload")
@api("LocalLab", "Unload the model (admin)", access="admin")
def models_unload():
    name = service().models.unload()
    if name is None:
        raise APIError(404, "no model is loaded")
    return jsonify(message=f"Model {name} unloaded", model_id=name)


@bp.get("/system/info")
@api("LocalLab", "Machine, torch and engine information")
def system_info():
    import platform
    import resource
    import torch
    svc = service()
    loaded = svc.models.current()
    gpus = [{"name": torch.cuda.get_device_name(i),
             "memory_mb": torch.cuda.get_device_properties(i).total_memory // 2**20}
            for i in range(torch.cuda.device_count())]
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return jsonify(python=platform.python_version(), torch=torch.__version__, platform=platform.platform(),
                   cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(), memory_total_mb=total,
                   process_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
                   cuda_available=torch.cuda.is_available(), gpus=gpus, model=loaded and loaded.name,
                   model_loaded=loaded is not None, engine=loaded and loaded.engine.load,
                   running_models=svc.models.names(),
                   uptime_s=round(time.time() - svc.started, 1))
