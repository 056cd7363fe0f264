"""
OpenAI-compatible routes on the server's model, engine and LUTs: GET /v1/models,
POST /v1/completions and POST /v1/chat/completions. The official `openai` package works unchanged:

    client = OpenAI(base_url="http://127.0.0.1:5000/v1", api_key="<key, or anything while none exist>")
    client.completions.create(model="gpt2", prompt="TLG Capital is", extra_body={"lut_name": "u1"})

Fields follow OpenAI's API reference. Extras, passed with extra_body: lut_name (the user's LUT),
lut_trace (each choice then carries the spans of its text that the LUT produced, with their labels;
streamed, in the choice's last chunk), top_k and repetition_penalty. Fields this server cannot honour (tools, logit_bias, suffix,
best_of > 1, echo with logprobs, logprobs while streaming) are refused with a 400 naming them.
"""
import dataclasses
import json
import time
import uuid

from flask import Blueprint

from server.common import (APIError, CHAT_STOP, body, chat_prompt, field, live_deltas, lut_trace, sampling, service, sse,
                        trace_requested, usage)
from model import PRETRAINED
from server.openapi import api, BOOL, INT, MESSAGES, OPENAI, PROMPT, STR, obj

bp = Blueprint("openai", __name__)

AS_MANY_AS_FIT = 1 << 20  # chat's default max_tokens: cut to what the context leaves
OPENAI_DEFAULTS = dict(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, do_sample=True)
COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stop", "seed", "presence_penalty",
                 "frequency_penalty", "stream", "stream_options", "user", "logit_bias", "logprobs",
                 "metadata", "store", "service_tier", "lut_name", "lut_trace", "top_k", "repetition_penalty"}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "top_logprobs", "max_completion_tokens", "response_format",
                               "parallel_tool_calls", "continue_final_message"}
# Accepted only with the value that changes nothing.
NEUTRAL = {"best_of": (1,), "suffix": ("",), "logit_bias": ({},), "response_format": ({"type": "text"},)}


@bp.get("/v1/models")
@api("OpenAI", "List models")
def v1_models():
    svc = service()
    return {"object": "list", "data": [model_card(mid, svc) for mid in svc.registry()]}


@bp.get("/v1/models/<path:model_id>")
@api("OpenAI", "One model")
def v1_model(model_id):
    svc = service()
    if svc.find(model_id) is None:
        raise APIError(404, f"the model {model_id!r} does not exist", param="model", code="model_not_found")
    return model_card(model_id, svc)


@bp.post("/v1/completions")
@api("OpenAI", "Completions (lut_name selects the LUT)",
     body=obj(["model", "prompt"], prompt=PROMPT, echo=BOOL, logprobs=INT, best_of=INT, suffix=STR, **OPENAI))
def v1_completions():
    svc = service()
    data = request_body(COMPLETION_FIELDS)
    model_id = use_model(svc, data)
    prompts = prompt_list(data.get("prompt"))
    echo = field(data, "echo", bool, False)
    logprobs = field(data, "logprobs", int)
    if echo and logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported: prompt log-probabilities are not computed",
                       param="echo")
    params, n, lut_name, stream, include_usage = request_settings(data, 16, logprobs, svc.cfg)
    trace = trace_requested(data, lut_name)
    runs = submit_all(svc, prompts, n, params, lut_name)
    reply = Reply("cmpl", "text_completion", model_id)
    tok = svc.view().tokenizer
    if stream:
        return sse(completion_events(runs, n, reply, include_usage, echo, svc, trace), *[job for job, _, _ in runs])
    seqs = wait_all(svc, runs)
    choices = []
    for i, (s, (_, _, p)) in enumerate(zip(seqs, runs)):
        echoed = prompt_text(p, tok) if echo else ""
        choices.append({"index": i, "text": echoed + s.text,
                        "logprobs": legacy_logprobs(s, tok) if logprobs is not None else None,
                        "finish_reason": finish_reason(s)})
        if trace:  # offsets into the choice's text
            choices[-1]["lut_trace"] = lut_trace(s, choices[-1]["text"], len(echoed))
    return reply.body(choices=choices, usage=run_usage(runs, seqs, n))


@bp.post("/v1/chat/completions")
@api("OpenAI", "Chat completions (lut_name selects the LUT)",
     body=obj(["model", "messages"], messages=MESSAGES, logprobs=BOOL, top_logprobs=INT,
              max_completion_tokens=INT, continue_final_message=BOOL, **OPENAI))
def v1_chat_completions():
    svc = service()
    data = request_body(CHAT_FIELDS)
    model_id = use_model(svc, data)
    continued = data.get("continue_final_message", False)
    prompt = chat_prompt(data.get("messages"), continued)
    if data.get("max_completion_tokens") is not None:  # newer clients' name for max_tokens
        if data.get("max_tokens") is not None:
            raise APIError(400, "give max_tokens or max_completion_tokens, not both", param="max_tokens")
        data = {**data, "max_tokens": data["max_completion_tokens"]}
    want_logprobs = field(data, "logprobs", bool, False)
    top = field(data, "top_logprobs", int)
    if top is not None and not want_logprobs:
        raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    # No max_tokens: as much as the context leaves, as OpenAI does; an explicit one is exact.
    fit = data.get("max_tokens") is None
    params, n, lut_name, stream, include_usage = request_settings(
        {**data, "logprobs": None}, AS_MANY_AS_FIT, (top or 0) if want_logprobs else None, svc.cfg)
    params = dataclasses.replace(params, stop=params.stop + CHAT_STOP)
    trace = trace_requested(data, lut_name)
    runs = submit_all(svc, [prompt], n, params, lut_name, fit)
    reply = Reply("chatcmpl", "chat.completion", model_id)
    if stream:
        return sse(chat_events(runs, n, reply, include_usage, svc, continued, trace), *[job for job, _, _ in runs])
    seqs = wait_all(svc, runs)
    tok = svc.view().tokenizer
    choices = []
    for i, s in enumerate(seqs):
        content = s.text if continued else s.text.lstrip()
        choices.append({"index": i, "message": {"role": "assistant", "content": content},
                        "logprobs": chat_logprobs(s, tok) if want_logprobs else None,
                        "finish_reason": finish_reason(s)})
        if trace:  # offsets into the message's content
            choices[-1]["lut_trace"] = lut_trace(s, content, len(content) - len(s.text))
    return reply.body(choices=choices, usage=run_usage(runs, seqs, n))


# ------------------------------------------------------------------------ requests

def request_body(allowed):
    data = body()
    for name, value in data.items():
        if name not in allowed:
            raise APIError(400, f"unrecognized request argument supplied: {name}", param=name)
        if name in NEUTRAL and value is not None and value not in NEUTRAL[name]:
            raise APIError(400, f"{name} is not supported by this server", param=name)
    return data


def use_model(svc, data):
    model_id = field(data, "model", str, required=True)
    try:
        svc.use_model(model_id)  # like the TGI-style API: asking for a model that is not running starts it
    except APIError as e:
        if e.status == 404:
            raise APIError(404, f"the model {model_id!r} does not exist; GET /v1/models lists them",
                           param="model", code="model_not_found") from None
        raise
    return model_id


def prompt_list(prompt):
    """OpenAI's prompt forms: a string, a list of strings, a list of token ids, or a list of those."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt)):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and all(type(t) is int for t in p)) for p in prompt):
        return prompt
    raise APIError(400, "prompt must be a string, a list of strings, or token ids", param="prompt")


def request_settings(data, default_length, logprobs, cfg):
    """The fields both endpoints share -> (SamplingParams, n, lut_name, stream, include_usage)."""
    temperature = field(data, "temperature", float, 1.0)
    if not 0 <= temperature <= 2:
        raise APIError(400, "temperature must be between 0 and 2", param="temperature")
    n = field(data, "n", int, 1)
    if not 1 <= n <= cfg.max_batch_prompts:
        raise APIError(400, f"n must be between 1 and {cfg.max_batch_prompts}", param="n")
    params = sampling(data, "max_tokens", default_length, OPENAI_DEFAULTS, logprobs=logprobs,
                      presence_penalty=field(data, "presence_penalty", float, 0.0),
                      frequency_penalty=field(data, "frequency_penalty", float, 0.0))
    stream = field(data, "stream", bool, False)
    options = data.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise APIError(400, "stream_options must be an object like {\"include_usage\": true}", param="stream_options")
    if stream and params.logprobs is not None:
        raise APIError(400, "logprobs are not supported with stream", param="logprobs")
    field(data, "user", str)  # accepted (OpenAI's end-user id); recorded with the request
    return params, n, field(data, "lut_name", str), stream, options.get("include_usage", False)


def submit_all(svc, prompts, n, params, lut_name, fit=False):
    """n generations per prompt -> [(job, prompt tokens, prompt)]; choice k = prompt k // n.
    A seeded request gives choice k the seed seed + k: reproducible, yet not all alike."""
    if len(prompts) * n > svc.cfg.max_batch_prompts:
        raise APIError(400, f"prompts x n must be at most {svc.cfg.max_batch_prompts}", param="n")
    runs = []
    try:
        for k in range(len(prompts) * n):
            seed = None if params.seed is None else params.seed + k
            job, n_prompt = svc.submit(prompts[k // n], dataclasses.replace(params, seed=seed), lut_name, fit)
            runs.append((job, n_prompt, prompts[k // n]))
    except APIError:
        for job, _, _ in runs:
            job.cancel()
        raise
    return runs


def wait_all(svc, runs):
    try:
        return [svc.wait(job) for job, _, _ in runs]
    finally:
        for job, _, _ in runs:
            job.cancel()  # a no-op for finished ones; frees the rest if one failed


# ------------------------------------------------------------------------ answers

class Reply:
    """The id, object type, time and model that every answer and stream chunk of one request carries."""

    def __init__(self, prefix, kind, model_id):
        self.id, self.kind, self.model = f"{prefix}-{uuid.uuid4().hex}", kind, model_id
        self.created = int(time.time())

    def body(self, **fields):
        return {"id": self.id, "object": self.kind, "created": self.created, "model": self.model,
                "system_fingerprint": None, **fields}

    def chunk(self, **fields):
        kind = self.kind + ".chunk" if self.kind == "chat.completion" else self.kind
        return f"data: {json.dumps({**self.body(**fields), 'object': kind})}\n\n"


def model_card(model_id, svc):
    init, _ = svc.find(model_id)
    return {"id": model_id, "object": "model", "created": int(svc.started),
            "owned_by": "openai-community" if init in PRETRAINED else "local"}


def finish_reason(seq):
    return "stop" if seq.finish_reason == "stop" else "length"


def run_usage(runs, seqs, n):
    """Each prompt's tokens count once, however many choices it has (n)."""
    return usage(sum(n_prompt for _, n_prompt, _ in runs[::n]), seqs)


def prompt_text(prompt, tok):
    return prompt if isinstance(prompt, str) else tok.decode(prompt)


def legacy_logprobs(seq, tok):
    """/v1/completions' logprobs object: each generated token, its log-probability, the top
    alternatives, and where the token starts in the text."""
    tokens, offsets, offset = [], [], 0
    for t in seq.out_ids:
        tokens.append(tok.decode([t]))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [lp for lp, _ in seq.logprobs],
            "top_logprobs": [{tok.decode([a]): alp for a, alp in alts} for _, alts in seq.logprobs],
            "text_offset": offsets}


def chat_logprobs(seq, tok):
    def entry(t, lp):
        return {"token": tok.decode([t]), "logprob": lp, "bytes": list(tok.token_bytes(t))}
    return {"content": [{**entry(t, lp), "top_logprobs": [entry(a, alp) for a, alp in alts]}
                        for t, (lp, alts) in zip(seq.out_ids, seq.logprobs)]}


def stream_choice(job, timeout, reply, make_delta, finish_fields, trace=None):
    """The chunks of one choice: its deltas as they come, then its finish_reason (and, where
    trace(seq) is given, its lut_trace). A generation that fails or runs out of time ends the
    stream with OpenAI's error object."""
    for delta in live_deltas(job, timeout):
        yield reply.chunk(choices=[make_delta(delta)]) if delta else ": keep-alive\n\n"
    last = finish_fields(finish_reason(job.seq))
    if trace:
        last["lut_trace"] = trace(job.seq)
    yield reply.chunk(choices=[last])


def events(choices, reply, runs, n, include_usage):
    try:
        for chunks in choices:
            yield from chunks
    except (TimeoutError, RuntimeError) as e:
        yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error', 'param': None, 'code': None}})}\n\n"
    else:
        if include_usage:  # a last chunk with no choices, as OpenAI sends it
            yield reply.chunk(choices=[], usage=run_usage(runs, [job.seq for job, _, _ in runs], n))
    yield "data: [DONE]\n\n"


def completion_events(runs, n, reply, include_usage, echo, svc, trace=False):
    timeout, tok = svc.cfg.request_timeout, svc.view().tokenizer

    def choice(i, job, prompt):
        echoed = prompt_text(prompt, tok) if echo else ""
        if echo:
            yield reply.chunk(choices=[{"index": i, "text": echoed, "logprobs": None, "finish_reason": None}])
        yield from stream_choice(job, timeout, reply,
                                 lambda d: {"index": i, "text": d, "logprobs": None, "finish_reason": None},
                                 lambda r: {"index": i, "text": "", "logprobs": None, "finish_reason": r},
                                 trace and (lambda s: lut_trace(s, echoed + s.text, len(echoed))))
    return events((choice(i, job, p) for i, (job, _, p) in enumerate(runs)), reply, runs, n, include_usage)


def chat_events(runs, n, reply, include_usage, svc, continued=False, trace=False):
    timeout = svc.cfg.request_timeout

    def choice(i, job):
        yield reply.chunk(choices=[{"index": i, "delta": {"role": "assistant", "content": ""},
                                    "logprobs": None, "finish_reason": None}])
        started = continued  # a new turn leaves a space before the answer: drop it; a continuation keeps it

        def delta(d):
            nonlocal started
            d = d if started else d.lstrip()
            started = started or bool(d)
            return {"index": i, "delta": {"content": d}, "logprobs": None, "finish_reason": None}
        shown = (lambda s: lut_trace(s, s.text, 0)) if continued else \
            (lambda s: lut_trace(s, s.text.lstrip(), len(s.text.lstrip()) - len(s.text)))
        yield from stream_choice(job, timeout, reply, delta,
                                 lambda r: {"index": i, "delta": {}, "logprobs": None, "finish_reason": r},
                                 trace and shown)
    return events((choice(i, job) for i, (job, _, _) in enumerate(runs)), reply, runs, n, include_usage)
