"""
What the server's route modules (api_server.py and its blueprints: lut_service, nanogpt,
locallab, tgi, openai_api, keys, luts) share: the app's service,
the API error, request parsing that names the field at fault, sampling settings, usage counts,
server-sent events, the chat transcript template, and paths confined to the models directory.
"""
import json
import os
import time

from flask import Response, current_app, request
from flask.json.provider import DefaultJSONProvider

from generate import GenerationError, SamplingParams
from model import find_checkpoint


def service():
    """The app's api_server.Service (model slot, LUT store, trainer, access), set by create_app."""
    return current_app.extensions["gpt"]


class APIError(Exception):
    """Any failure a client should see: an HTTP status and a message naming the field or resource."""

    def __init__(self, status, detail, headers=None, param=None, code=None):
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}
        self.param, self.code = param, code  # the field at fault, a machine-readable reason (/v1 errors)


class JSONProvider(DefaultJSONProvider):
    """Flask's JSON, but a body nested deeper than the parser goes is invalid JSON (a ValueError,
    which get_json(silent=True) answers with None) rather than a RecursionError, which would be a
    500 wherever a body is read, the after-request hooks included."""

    def loads(self, s, **kwargs):
        try:
            return super().loads(s, **kwargs)
        except RecursionError:
            raise ValueError("JSON nested too deeply") from None


def body():
    """The request's JSON object, every string in it valid Unicode; a 400 saying what is wrong otherwise."""
    data = request.get_json(silent=True)
    if data is None and request.is_json:
        try:
            json.loads(request.get_data())
        except RecursionError:
            raise APIError(400, "request body is JSON nested too deeply", param="body") from None
        except ValueError:
            pass
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object (Content-Type: application/json)")
    where = not_unicode(data)
    if where:
        raise APIError(400, f"{where} must be valid Unicode text: it holds a lone surrogate (\\ud800-\\udfff), "
                            f"which cannot be encoded or stored", param=where)
    return data


def not_unicode(data):
    """Where in a parsed JSON body a string (or a key) holds a lone surrogate, which a \\ud800
    escape makes and no UTF-8 text can: "labels[0].label", or None if nowhere."""
    todo = [("", data)]
    while todo:  # a loop, not recursion: the body may be as deep as the parser allows
        where, value = todo.pop()
        if isinstance(value, str) and not _encodes(value):
            return where or "request body"
        if isinstance(value, dict):
            for key, item in value.items():
                inner = f"{where}.{key}" if where else key
                if not _encodes(key):
                    return f"a field name in {where or 'the request body'}"
                todo.append((inner, item))
        elif isinstance(value, list):
            todo.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
    return None


def _encodes(text):
    try:
        text.encode()
        return True
    except UnicodeEncodeError:
        return False


def field(data, name, kind, default=None, required=False):
    """data[name] checked against kind (int, float, str, bool, list); missing -> default."""
    if name not in data or data[name] is None:
        if required:
            raise APIError(400, f"{name} is required", param=name)
        return default
    value = data[name]
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str), bool: lambda v: isinstance(v, bool),
          list: lambda v: isinstance(v, list)}[kind](value)
    if not ok:
        what = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}[kind]
        raise APIError(400, f"{name} must be {what}", param=name)
    return float(value) if kind is float else value


def sampling(data, length_field, default_length, defaults, **extra):
    """The sampling fields of a request -> validated SamplingParams; extra: settings the route
    has already read (OpenAI's penalties and logprobs)."""
    stop = field(data, "stop", (str if isinstance(data.get("stop"), str) else list), [])
    params = SamplingParams(
        max_new_tokens=field(data, length_field, int, default_length),
        temperature=field(data, "temperature", float, defaults["temperature"]),
        top_k=field(data, "top_k", int, defaults["top_k"]),
        top_p=field(data, "top_p", float, defaults["top_p"]),
        repetition_penalty=field(data, "repetition_penalty", float, defaults["repetition_penalty"]),
        do_sample=field(data, "do_sample", bool, defaults["do_sample"]),
        seed=field(data, "seed", int, None),
        stop=[stop] if isinstance(stop, str) else stop, **extra)
    try:
        params.validate()
    except GenerationError as e:  # its message starts with the field's name
        name, rest = str(e).split(" ", 1)
        name = length_field if name == "max_new_tokens" else name
        raise APIError(400, f"{name} {rest}", param=name) from None
    return params


def trace_requested(data, lut_name):
    """The lut_trace field: whether the answer names, for each span a LUT produced, its label."""
    want = field(data, "lut_trace", bool, False)
    if want and not lut_name:
        raise APIError(400, "lut_trace needs lut_name: it traces what that LUT produced", param="lut_trace")
    return want


def no_trace(data, route):
    if data.get("lut_trace") is not None:
        raise APIError(400, f"lut_trace is not available on {route}; ask /generate, /chat, /v1/completions "
                            f"or /v1/chat/completions", param="lut_trace")


def lut_trace(seq, shown, offset=0):
    """seq's LUT spans as the client sees its text: `shown`, in which seq.text starts at offset
    (a negative offset: that much of its start is not shown)."""
    spans = []
    for span in seq.lut_trace():
        start, end = max(0, span["start"] + offset), min(len(shown), span["end"] + offset)
        if start < end:
            spans.append({**span, "start": start, "end": end, "text": shown[start:end]})
    return spans


def usage(n_prompt, seqs):
    n_out = sum(len(s.out_ids) for s in seqs)
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


def sse(events, *jobs):
    """A text/event-stream response from an iterator of already framed events. If the client goes
    away, the server closes the iterator; the finally clause then stops the generations."""
    def body():
        try:
            yield from events
        finally:
            for job in jobs:
                job.cancel()
    return Response(body(), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def live_deltas(job, timeout):
    """job's text as it is generated, and "" after 5 s of silence (a streaming route writes a
    keep-alive then, which keeps proxies open and finds out whether its client is still there).
    Past timeout seconds the job is cancelled and TimeoutError raised."""
    deadline = time.time() + timeout
    for delta in job.deltas(heartbeat=5):
        yield delta
        if time.time() > deadline:
            job.cancel()
            raise TimeoutError("generation took longer than the time limit")


def sse_text(text):
    """One SSE event carrying raw text (LocalLab-style); a newline inside becomes a second data line,
    which SSE clients join back with a newline."""
    return "".join(f"data: {line}\n" for line in text.split("\n")) + "\n"


def text_events(job, timeout, trace=False, shown=None):
    """The LocalLab-style API streaming: the text as it is generated, then data: [DONE]. With trace, an
    `event: lut_trace` whose data is the JSON list of LUT spans comes before [DONE]; shown(text)
    gives the text the client has been sent and where the generated text starts in it."""
    try:
        for delta in live_deltas(job, timeout):
            yield sse_text(delta) if delta else ": keep-alive\n\n"
        if trace:
            yield f"event: lut_trace\ndata: {json.dumps(lut_trace(job.seq, *(shown or _as_is)(job.seq.text)))}\n\n"
    except (TimeoutError, RuntimeError) as e:  # RuntimeError: the engine failed this request
        yield f"event: error\ndata: {e}\n\n"
    yield "data: [DONE]\n\n"


def _as_is(text):
    return text, 0


CHAT_ROLES = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}


def chat_prompt(messages, continue_final=False):
    """A chat as a plain transcript that a base GPT-2 continues (docs/api.md, "Chat on a base model"):
    'System: ...\nUser: ...\nAssistant:'; generation stops where the next turn would begin.
    content is a string or OpenAI's list of {"type": "text", "text": ...} parts. With
    continue_final (vLLM's continue_final_message) the last message, an assistant's, is continued
    where it ends instead of answered by a new turn."""
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list of {role, content} objects", param="messages")
    lines = []
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            content = "".join(p["text"] for p in content)
        if not isinstance(m, dict) or m.get("role") not in CHAT_ROLES or not isinstance(content, str):
            raise APIError(400, f"messages[{i}] must be an object with role (system, user or assistant) and "
                                f"content (a string or a list of text parts)", param=f"messages[{i}]")
        lines.append(f"{CHAT_ROLES[m['role']]}: {content.strip()}")
    if not isinstance(continue_final, bool):
        raise APIError(400, "continue_final_message must be true or false", param="continue_final_message")
    if not continue_final:
        return "\n".join(lines) + "\nAssistant:"
    if messages[-1]["role"] != "assistant":
        raise APIError(400, "continue_final_message needs the last message to be the assistant's",
                       param="continue_final_message")
    partial = content.lstrip() if isinstance(content, str) else ""  # as written: its last space matters
    return "\n".join(lines[:-1] + [f"Assistant: {partial}"])


CHAT_STOP = ["\nUser:", "\nSystem:", "\nAssistant:"]


# ------------------------------------------------------------------------ models directory

def inside(path, root, name):
    """A client's path (relative to the server's working directory) resolved, links and '..'
    included, only if it lies inside root: no request reaches files elsewhere. Errors name the
    path as the client gave it, never the server's directories."""
    if "\0" in path:  # os.path would raise ValueError
        raise APIError(400, f"{name} must not contain a NUL byte", param=name)
    full = os.path.realpath(path if os.path.isabs(path) else os.path.join(os.getcwd(), path))
    if not within(full, root):
        raise APIError(400, f"{name} must be inside the models directory; {path!r} is not", param=name)
    return full


def within(path, root):
    """Whether path, its links resolved, lies inside root."""
    return os.path.realpath(path).startswith(os.path.realpath(root) + os.sep)


def resolve_model_path(model_path, models_dir):
    """The checkpoint file that model_path names, resolved. The file is checked, not only the
    folder named: its ckpt.pt may be a link to anywhere."""
    path = os.path.realpath(find_checkpoint(inside(model_path, models_dir, "model_path")))
    if not within(path, models_dir):
        raise APIError(400, f"model_path must be inside the models directory; {model_path!r} links outside it",
                       param="model_path")
    if not os.path.isfile(path):
        raise APIError(404, f"no checkpoint at model_path {model_path!r}", param="model_path")
    return path


def trained_models(models_dir):
    """Checkpoints under models_dir (out/<name>/ckpt.pt, at any depth) with their training config."""
    found = []
    for dirpath, dirnames, filenames in os.walk(models_dir):
        dirnames.sort()
        if "ckpt.pt" in filenames and within(os.path.join(dirpath, "ckpt.pt"), models_dir):  # not a link out
            config = {}
            try:
                with open(os.path.join(dirpath, "train_config.json")) as f:
                    config = json.load(f)
            except (OSError, ValueError):
                pass
            found.append({"name": os.path.relpath(dirpath, models_dir),
                          "path": os.path.relpath(os.path.join(dirpath, "ckpt.pt")), "config": config})
    return found
