"""
The LUT service's routes (the GPT-2 x LUT personalization API): GET /health, POST /train_lut and the
one POST /generate that serves the LUT service, LocalLab-style and TGI-style shapes alike (docs/api.md, "One /generate for three request shapes").
"""

from flask import Blueprint, g, jsonify

from lut import recall_mode

from server.common import APIError, body, field, lut_trace, sampling, service, sse, text_events, trace_requested, usage
from server.openapi import api, GENERATE, LUT_NAME, LUT_TRACE, STR, obj

bp = Blueprint("lut_service", __name__)

# /generate, /chat, /generate/batch defaults: the LocalLab-style API's. A taught label is still recalled exactly
# (the LUT service API sends only prompt, length, lut_name): LUT-matched positions decode greedily.
GENERATE_DEFAULTS = dict(temperature=0.7, top_k=80, top_p=0.9, repetition_penalty=1.15, do_sample=True)
LOCALLAB_MAX_LENGTH = 8192  # /generate's default length: an upper bound, cut to the context
TGI_DEFAULTS = dict(temperature=0.7, top_k=0, top_p=0.95, repetition_penalty=1.0, do_sample=True)
TGI_MAX_NEW_TOKENS = 200  # a default, so an upper bound: a small model's context may be shorter
TGI_TIMEOUT = 60  # seconds, then 504


@bp.get("/health")
@api("LUT service", "Liveness, and whether a model is loaded", access="public", limited=False)
def health():
    models = service().models
    out = {"status": "ok", "model_loaded": models.default is not None, "model": models.default,
           "running_models": models.names()}
    if models.default is None:
        out["detail"] = models.error
    return jsonify(out)


@bp.post("/train_lut")
@api("LUT service", "Teach a user's LUT a label; the answer adds how it is recalled (recall: subject, "
     "context or text_start) and by what (trigger)",
     body=obj(["label", "lut_name"], label=STR, label_context=STR, lut_name=LUT_NAME))
def train_lut():
    data = body()
    label = field(data, "label", str, required=True)
    context = field(data, "label_context", str)
    lut_name = field(data, "lut_name", str, required=True)
    svc = service()
    view = svc.use_model(field(data, "model_id", str))
    svc.store.teach(view.model, view.tokenizer, lut_name, label, context)
    recall, trigger = recall_mode(label, context)
    return jsonify(status="ok", lut_name=lut_name, recall=recall, trigger=trigger)


def generation_request(data):
    """The fields /generate, /chat and /generate/batch share -> (params, fit, lut_name, stream).
    The length is `length` (LUT service) or `max_new_tokens` (nanoGPT, TGI-style): exact, 413 if the
    context cannot hold it; or `max_length` (LocalLab-style, default 8192): an upper bound, cut to
    what the context leaves. A request naming a model_id has the TGI-style API's shape and
    defaults: at most 200 new tokens, temperature 0.7, top_p 0.95, 60 s before a 504."""
    given = [f for f in ("length", "max_new_tokens", "max_length") if data.get(f) is not None]
    if len(given) > 1:
        raise APIError(400, f"give only one of length, max_new_tokens or max_length (got {', '.join(given)})")
    svc, model_id = service(), field(data, "model_id", str)
    if model_id is None:
        length_field = given[0] if given else "max_length"
        params = sampling(data, length_field, LOCALLAB_MAX_LENGTH, GENERATE_DEFAULTS)
    else:
        length_field = given[0] if given else "max_new_tokens"
        params = sampling(data, length_field, TGI_MAX_NEW_TOKENS, TGI_DEFAULTS)
        g.timeout = min(TGI_TIMEOUT, svc.cfg.request_timeout)
    lut_name, stream = field(data, "lut_name", str), field(data, "stream", bool, False)
    svc.use_model(model_id)
    return params, length_field == "max_length" or not given, lut_name, stream


@bp.post("/generate")
@api("LUT service", "Generate (the LUT service, LocalLab and TGI-style shapes in one route)",
     body=obj(["prompt"], prompt=STR, lut_trace=LUT_TRACE, **GENERATE))
def generate_route():
    data = body()
    prompt = field(data, "prompt", str, required=True)
    params, fit, lut_name, stream = generation_request(data)
    trace = trace_requested(data, lut_name)
    svc = service()
    if stream:
        job, _ = svc.submit(prompt, params, lut_name, fit)
        return sse(text_events(job, svc.timeout(), trace), job)
    seq, n_prompt = svc.run(prompt, params, lut_name, fit)
    extra = {"lut_trace": lut_trace(seq, seq.text)} if trace else {}
    return jsonify(prompt=prompt, completion=seq.text, response=seq.text, generated_text=prompt + seq.text,
                   model_id=data.get("model_id") or svc.view().name,  # the TGI-style API: the id as sent ("gpt-2")
                   lut_name=lut_name, finish_reason=seq.finish_reason,
                   usage=usage(n_prompt, [seq]), **extra)
