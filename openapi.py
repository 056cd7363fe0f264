"""
The OpenAPI 3.0 document of the whole server (GET /openapi.json) and interactive docs (GET /docs,
Swagger UI). The UI's files come from the swagger-ui-bundle package and are served from here:
no CDN, so the docs work offline.

Paths and methods are read from the app's URL map, so no route can be missing; what each
endpoint takes (body, query) and its summary are written down in ROUTES below, and a route
without an entry there stops the server at start-up.
"""
import re

from flask import Response, jsonify, send_from_directory

# ------------------------------------------------------------------------ schema building blocks


def obj(required=(), **properties):
    schema = {"type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    return schema


STR, BOOL = {"type": "string"}, {"type": "boolean"}
INT, NUM = {"type": "integer"}, {"type": "number"}
LUT_NAME = {"type": "string", "pattern": "^[A-Za-z0-9_.:@-]{1,128}$", "description": "the user's LUT"}
STOP = {"oneOf": [STR, {"type": "array", "items": STR, "maxItems": 8}]}
LUT_TRACE = {"type": "boolean", "default": False, "description": (
    "with lut_name: the answer (each choice; in a stream, its last chunk, or an `event: lut_trace` before "
    "[DONE] on the text streams) carries lut_trace, one object per span of generated text the LUT produced: "
    "start and end (offsets into the text shown), text, label_id, label, label_context, and how it fired: "
    "verbatim, normalized (case, Unicode, spacing, hyphens), insertion, verb_form, subject_part, possessive "
    "(joined with + when several apply), question or text_start")}
SAMPLING = dict(temperature=NUM, top_k=INT, top_p=NUM, repetition_penalty=NUM, do_sample=BOOL, seed=INT, stop=STOP,
                lut_name=LUT_NAME)
GENERATE = dict(length={**INT, "description": "tokens to generate, exactly (seed 000)"},
                max_new_tokens={**INT, "description": "tokens to generate, exactly (seeds 001, 003)"},
                max_length={**INT, "description": "at most this many tokens, cut to the context (seed 002)"},
                model_id={**STR, "description": "generate with this model, starting it if needed"},
                stream={**BOOL, "description": "server-sent events, ending with data: [DONE]"}, **SAMPLING)
MESSAGES = {"type": "array", "minItems": 1, "items": obj(
    ["role", "content"], role={"type": "string", "enum": ["system", "developer", "user", "assistant"]},
    content={"oneOf": [STR, {"type": "array", "items": obj(["type", "text"], type=STR, text=STR)}]})}
OPENAI = dict(model=STR, max_tokens=INT, temperature=NUM, top_p=NUM, n=INT, stop=STOP, seed=INT,
              presence_penalty=NUM, frequency_penalty=NUM, stream=BOOL, stream_options=obj(include_usage=BOOL),
              user=STR, lut_name=LUT_NAME, lut_trace=LUT_TRACE, top_k=INT, repetition_penalty=NUM)
PROMPT = {"oneOf": [STR, {"type": "array", "items": STR}, {"type": "array", "items": INT},
                    {"type": "array", "items": {"type": "array", "items": INT}}]}

# endpoint's function name -> (tag, summary, request body schema or None, query parameters {name: schema})
ROUTES = {
    "health": ("seed 000", "Liveness, and whether a model is loaded", None, {}),
    "train_lut": ("seed 000", "Teach a user's LUT a label; the answer adds how it is recalled (recall: subject, "
                  "context or text_start) and by what (trigger)",
                  obj(["label", "lut_name"], label=STR, label_context=STR, lut_name=LUT_NAME), {}),
    "generate_route": ("seed 000", "Generate (seeds 000, 002, 003 in one route)",
                       obj(["prompt"], prompt=STR, lut_trace=LUT_TRACE, **GENERATE), {}),
    "chat": ("seed 002", "Chat on a plain transcript template", obj(["messages"], messages=MESSAGES,
                                                                    continue_final_message=BOOL, lut_trace=LUT_TRACE,
                                                                    **GENERATE), {}),
    "generate_batch": ("seed 002", "Generate for several prompts", obj(
        ["prompts"], prompts={"type": "array", "items": STR, "minItems": 1}, **GENERATE), {}),
    "status": ("seed 001", "Server status", None, {}),
    "models": ("seed 001", "Pretrained and trained models", None, {}),
    "load_model_route": ("seed 001", "Load a GPT-2 type or a trained checkpoint (admin)",
                         obj(model_type=STR, model_path=STR), {}),
    "api_generate": ("seed 001", "Generate (nanoGPT API)", obj(["prompt"], prompt=STR, max_new_tokens=INT,
                                                               **SAMPLING), {}),
    "index": ("seed 003", "Service information", None, {}),
    "models_by_id": ("seed 003", "Models by id", None, {}),
    "models_available": ("seed 002", "Models by id", None, {}),
    "models_current": ("seed 002", "The loaded model", None, {}),
    "models_load": ("seed 002", "Load a model by id (admin)", obj(["model_id"], model_id=STR), {}),
    "models_unload": ("seed 002", "Unload the model (admin)", None, {}),
    "models_start": ("seed 003", "Start (load) a model (admin)", None, {}),
    "models_stop": ("seed 003", "Stop (unload) a model (admin)", None, {}),
    "system_info": ("seed 002", "Machine, torch and engine information", None, {}),
    "api_train": ("training", "Start a training job (admin)", obj(
        ["dataset", "output_dir"], dataset=STR, output_dir=STR, model_type=STR, batch_size=INT, learning_rate=NUM,
        max_iters=INT, eval_interval=INT, eval_iters=INT, block_size=INT, init_from=STR, n_layer=INT, n_head=INT,
        n_embd=INT, dropout=NUM, gradient_accumulation_steps=INT, warmup_iters=INT, device=STR), {}),
    "api_train_jobs": ("training", "List training jobs", None, {}),
    "api_train_job": ("training", "A training job's status and progress", None, {}),
    "api_train_cancel": ("training", "Cancel a training job (admin)", None, {}),
    "list_luts": ("LUTs", "List the LUTs this key may use", None, {}),
    "show_lut": ("LUTs", "A LUT's labels and entries", None, {}),
    "delete_lut": ("LUTs", "Delete a LUT", None, {}),
    "delete_label": ("LUTs", "Delete one label of a LUT", None, {}),
    "export_lut": ("LUTs", "Download a LUT (safetensors)", None, {}),
    "import_lut": ("LUTs", "Upload a LUT (safetensors)", "binary", {}),
    "teach_labels": ("LUTs", "Teach many labels, each whole or not at all; the answer says per label", obj(
        ["labels"], labels={"type": "array", "minItems": 1, "maxItems": 256, "items": {"oneOf": [
            STR, obj(["label"], label=STR, label_context=STR)]}}), {}),
    "create_key": ("access", "Create an API key (admin; open while none exists)", obj(
        ["name"], name=STR, admin=BOOL, luts={"type": "array", "items": STR}, rate_per_minute=INT, burst=INT), {}),
    "list_keys": ("access", "List API keys (admin)", None, {}),
    "revoke_key": ("access", "Revoke an API key (admin)", None, {}),
    "usage_summary": ("access", "Requests and tokens per app and per key", None, {}),
    "usage_history": ("access", "The latest queries", None, {"limit": INT, "app_id": STR}),
    "public_models": ("seed 004", "Models with capabilities and pricing (no key needed)", None, {}),
    "v1_models": ("OpenAI", "List models", None, {}),
    "v1_model": ("OpenAI", "One model", None, {}),
    "v1_completions": ("OpenAI", "Completions (lut_name selects the LUT)", obj(
        ["model", "prompt"], prompt=PROMPT, echo=BOOL, logprobs=INT, best_of=INT, suffix=STR, **OPENAI), {}),
    "v1_chat_completions": ("OpenAI", "Chat completions (lut_name selects the LUT)", obj(
        ["model", "messages"], messages=MESSAGES, logprobs=BOOL, top_logprobs=INT, max_completion_tokens=INT,
        continue_final_message=BOOL, **OPENAI), {}),
    "metrics_route": ("monitoring", "Prometheus metrics (no key needed; see metrics.py)", None, {}),
    "openapi_json": ("docs", "This document", None, {}),
    "docs": ("docs", "Interactive API docs (Swagger UI)", None, {}),
    "docs_asset": ("docs", "A file of the Swagger UI", None, {}),
    "playground": ("docs", "The browser playground: teach, compare with and without the LUT, chat", None, {}),
    "playground_asset": ("docs", "A file of the playground (CSS, JavaScript)", None, {}),
}
PUBLIC = {"health", "public_models", "openapi_json", "docs", "docs_asset", "playground", "playground_asset",
          "metrics_route"}
ERROR = obj(detail=STR, error=obj(message=STR, type=STR, param=STR, code=STR))
PARAM = re.compile(r"<(?:(\w+):)?(\w+)>")


def build(app, title, version):
    """The OpenAPI document of every route app serves."""
    paths = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        name = rule.endpoint.rpartition(".")[2]  # a blueprint's routes by function name: stable operationIds
        assert name in ROUTES, f"route {rule.rule} ({rule.endpoint}) is not described in openapi.ROUTES"
        tag, summary, body, query = ROUTES[name]
        path = PARAM.sub(lambda m: "{" + m.group(2) + "}", rule.rule)
        params = [{"name": name, "in": "path", "required": True,
                   "schema": INT if conv == "int" else {"type": "string", "minLength": 1}}
                  for conv, name in PARAM.findall(rule.rule)]
        params += [{"name": name, "in": "query", "required": False, "schema": schema} for name, schema in query.items()]
        for method in sorted(rule.methods - {"HEAD", "OPTIONS"}):
            op = {"tags": [tag], "summary": summary, "operationId": name, "parameters": params,
                  "responses": {"200": {"description": "success"},
                                "default": {"description": "an error: {detail} ({error: {...}} under /v1)",
                                            "content": {"application/json": {"schema": ERROR}}}}}
            if body == "binary":
                op["requestBody"] = {"required": True, "content": {"application/octet-stream": {
                    "schema": {"type": "string", "format": "binary"}}}}
            elif body is not None:
                op["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
            if name in PUBLIC:
                op["security"] = []
            paths.setdefault(path, {})[method.lower()] = op
    return {"openapi": "3.0.3",
            "info": {"title": title, "version": version,
                     "description": "GPT-2 with per-user LUTs. API keys (Authorization: Bearer) are needed once the "
                                    "first key exists; until then every route is open."},
            "paths": paths,
            "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{"bearer": []}, {}]}


DOCS_PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title>
<link rel="stylesheet" href="/docs/swagger-ui.css"></head>
<body><div id="swagger-ui"></div>
<script src="/docs/swagger-ui-bundle.js"></script>
<script src="/docs/swagger-init.js"></script>
</body></html>"""
DOCS_INIT = 'window.ui = SwaggerUIBundle({url: "/openapi.json", dom_id: "#swagger-ui"});\n'


def register(app, title, version):
    """Adds /openapi.json and /docs; call it after every other route is registered."""
    from swagger_ui_bundle import swagger_ui_path  # the UI's JS and CSS, installed with the server

    @app.get("/openapi.json")
    def openapi_json():
        return jsonify(document)

    @app.get("/docs")
    def docs():
        return Response(DOCS_PAGE.format(title=title), mimetype="text/html")

    @app.get("/docs/<path:filename>")
    def docs_asset(filename):
        if filename == "swagger-init.js":  # the page's own script: no inline JS, so a strict CSP can hold
            return Response(DOCS_INIT, mimetype="text/javascript")
        return send_from_directory(swagger_ui_path, filename)  # refuses paths outside that folder

    document = build(app, title, version)
