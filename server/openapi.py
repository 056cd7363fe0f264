"""
The OpenAPI 3.0 document of the whole server (GET /openapi.json) and interactive docs (GET /docs,
Swagger UI). The UI's files come from the swagger-ui-bundle package and are served from here:
no CDN, so the docs work offline.

Paths and methods are read from the app's URL map, so no route can be missing. Each view says
what it is with the @api decorator: its tag and summary, the body and query it takes, and who may
call it. The key checks (server/keys.py) read the same declaration, so a route's documentation and
its access cannot disagree; a view without one stops the server at start-up.
"""
import dataclasses
import re

from flask import Response, current_app, jsonify, send_from_directory

ACCESS = ("public", "key", "admin")


@dataclasses.dataclass(frozen=True)
class Doc:
    tag: str  # the API family, as /docs groups it
    summary: str
    body: object = None  # the JSON body's schema, "binary", or None
    query: dict = dataclasses.field(default_factory=dict)  # query parameter -> schema
    access: str = "key"  # public: no key needed, even once keys exist; key: any valid key; admin: an admin key
    limited: bool = True  # False: no rate limit (liveness, static pages, scrapes)


def api(tag, summary, body=None, query=None, access="key", limited=True):
    """Declares a view: @bp.get(...) above it, @api(...) below. Read by build() and by the key checks."""
    assert access in ACCESS, access
    doc = Doc(tag, summary, body, query or {}, access, limited)

    def declare(view):
        view.api = doc
        return view
    return declare


def doc_of(endpoint, app=None):
    """The Doc of an endpoint (None for no route: a 404)."""
    view = (app or current_app).view_functions.get(endpoint)
    return view and view.api

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
GENERATE = dict(length={**INT, "description": "tokens to generate, exactly (the LUT service's field)"},
                max_new_tokens={**INT, "description": "tokens to generate, exactly (nanoGPT and TGI-style)"},
                max_length={**INT, "description": "at most this many tokens, cut to the context (LocalLab-style)"},
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

ERROR = obj(detail=STR, error=obj(message=STR, type=STR, param=STR, code=STR))
PARAM = re.compile(r"<(?:(\w+):)?(\w+)>")


def build(app, title, version):
    """The OpenAPI document of every route app serves."""
    paths = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        name = rule.endpoint.rpartition(".")[2]  # a blueprint's routes by function name: stable operationIds
        doc = getattr(app.view_functions[rule.endpoint], "api", None)
        assert doc is not None, f"route {rule.rule} ({rule.endpoint}) has no @api declaration"
        tag, summary, body, query = doc.tag, doc.summary, doc.body, doc.query
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
            if doc.access == "public":
                op["security"] = []
            elif doc.access == "admin":
                op["description"] = "Needs an admin API key once keys exist."
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
    @api("docs", "This document", access="public")
    def openapi_json():
        return jsonify(document)

    @app.get("/docs")
    @api("docs", "Interactive API docs (Swagger UI)", access="public", limited=False)
    def docs():
        return Response(DOCS_PAGE.format(title=title), mimetype="text/html")

    @app.get("/docs/<path:filename>")
    @api("docs", "A file of the Swagger UI", access="public", limited=False)
    def docs_asset(filename):
        if filename == "swagger-init.js":  # the page's own script: no inline JS, so a strict CSP can hold
            return Response(DOCS_INIT, mimetype="text/javascript")
        return send_from_directory(swagger_ui_path, filename)  # refuses paths outside that folder

    document = build(app, title, version)
