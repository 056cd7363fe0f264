"""
Seed 000's routes, the GPT-2 x LUT personalization service: GET /health, POST /train_lut and the
one POST /generate that serves seeds 000, 002 and 003 alike (README: "One /generate").
"""

from flask import Blueprint, jsonify

from lut import recall_mode

from api_common import APIError, body, field, lut_trace, sampling, service, sse, text_events, trace_requested, usage

bp = Blueprint("lut_api", __name__)

# /generate, /chat, /generate/batch defaults: seed 002's. A taught label is still recalled exactly
# (seed 000 sends only prompt, length, lut_name): LUT-matched positions decode greedily.
GENERATE_DEFAULTS = dict(temperature=0.7, top_k=80, top_p=0.9, repetition_penalty=1.15, do_sample=True)
SEED_002_MAX_LENGTH = 8192  # /generate's default length: an upper bound, cut to the context


@bp.get("/health")
def health():
    slot = service().slot
    out = {"status": "ok", "model_loaded": slot.engine is not None, "model": slot.name}
    if slot.engine is None:
        out["detail"] = slot.error
    return jsonify(out)


@bp.post("/train_lut")
def train_lut():
    data = body()
    label = field(data, "label", str, required=True)
    context = field(data, "label_context", str)
    lut_name = field(data, "lut_name", str, required=True)
    svc = service()
    model, tok, _ = svc.slot.get()
    svc.store.teach(model, tok, lut_name, label, context)
    recall, trigger = recall_mode(label, context)
    return jsonify(status="ok", lut_name=lut_name, recall=recall, trigger=trigger)


def generation_request(data):
    """The fields /generate, /chat and /generate/batch share -> (params, fit, lut_name, stream).
    The length is `length` (seed 000) or `max_new_tokens` (seeds 001, 003): exact, 413 if the
    context cannot hold it; or `max_length` (seed 002, default 8192): an upper bound, cut to
    what the context leaves."""
    given = [f for f in ("length", "max_new_tokens", "max_length") if data.get(f) is not None]
    if len(given) > 1:
        raise APIError(400, f"give only one of length, max_new_tokens or max_length (got {', '.join(given)})")
    length_field = given[0] if given else "max_length"
    params = sampling(data, length_field, SEED_002_MAX_LENGTH, GENERATE_DEFAULTS)
    lut_name, stream = field(data, "lut_name", str), field(data, "stream", bool, False)
    service().use_model(field(data, "model_id", str))
    return params, length_field == "max_length", lut_name, stream


@bp.post("/generate")
def generate_route():
    data = body()
    prompt = field(data, "prompt", str, required=True)
    params, fit, lut_name, stream = generation_request(data)
    trace = trace_requested(data, lut_name)
    svc = service()
    if stream:
        job, _ = svc.submit(prompt, params, lut_name, fit)
        return sse(text_events(job, svc.cfg["request_timeout"], trace), job)
    seq, n_prompt = svc.run(prompt, params, lut_name, fit)
    extra = {"lut_trace": lut_trace(seq, seq.text)} if trace else {}
    return jsonify(prompt=prompt, completion=seq.text, response=seq.text, generated_text=prompt + seq.text,
                   model_id=data.get("model_id") or svc.slot.name,  # seed 003: the id as sent ("gpt-2")
                   lut_name=lut_name, finish_reason=seq.finish_reason,
                   usage=usage(n_prompt, [seq]), **extra)
