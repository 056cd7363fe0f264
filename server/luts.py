"""
LUT management: GET /luts (a page at a time), GET and DELETE /luts/<lut_name>, DELETE
/luts/<lut_name>/labels/<label_id>, GET /luts/<lut_name>/export and POST /luts/<lut_name>/import
(safetensors), and bulk teaching, POST /luts/<lut_name>/labels. Teaching one label is
lut_service's (the LUT service API's /train_lut).
"""
from flask import Blueprint, Response, g, jsonify, request

from server.common import APIError, body, field, service
from labelfile import check_item
from lut import NAME_RE
from lut_store import teach_many
from server.openapi import api, INT, LUT_NAME, STR, obj

bp = Blueprint("luts", __name__)


LIST_LIMIT, MAX_LIST_LIMIT = 100, 1000


@bp.get("/luts")
@api("LUTs", "List the LUTs this key may use, by name, a page at a time", query={
    "limit": {**INT, "minimum": 1, "maximum": MAX_LIST_LIMIT, "default": LIST_LIMIT,
              "description": "LUTs per page"},
    "after": {**LUT_NAME, "description": "the previous page's `next`: the LUTs named after it"}})
def list_luts():
    """One page of LUTs in name order; `next` is the `after` of the following page (null after
    the last). A tenant's key sees its own LUTs only."""
    svc = service()
    limit = request.args.get("limit", str(LIST_LIMIT))
    if not (limit.isascii() and limit.isdigit()) or not 1 <= int(limit) <= MAX_LIST_LIMIT:
        raise APIError(400, f"limit must be an integer in [1, {MAX_LIST_LIMIT}]", param="limit")
    after = request.args.get("after")
    if after is not None and not NAME_RE.fullmatch(after):
        raise APIError(400, "after must be a LUT name (1-128 characters of letters, digits and _.:@-): the "
                            "previous page's next", param="after")
    luts, cursor = svc.store.page(int(limit), after, None if g.key is None else g.key.may_use)
    return jsonify(luts=luts, next=cursor)


@bp.get("/luts/<lut_name>")
@api("LUTs", "A LUT's labels and entries")
def show_lut(lut_name):
    return jsonify(service().store.show(lut_name))


@bp.delete("/luts/<lut_name>")
@api("LUTs", "Delete a LUT")
def delete_lut(lut_name):
    service().store.delete(lut_name)
    return jsonify(status="ok", lut_name=lut_name)


@bp.delete("/luts/<lut_name>/labels/<int:label_id>")
@api("LUTs", "Delete one label of a LUT")
def delete_label(lut_name, label_id):
    service().store.delete_label(lut_name, label_id)
    return jsonify(status="ok", lut_name=lut_name, label_id=label_id)


@bp.get("/luts/<lut_name>/export")
@api("LUTs", "Download a LUT (safetensors)")
def export_lut(lut_name):
    data = service().store.export(lut_name)
    return Response(data, mimetype="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{lut_name}.safetensors"'})


@bp.post("/luts/<lut_name>/import")
@api("LUTs", "Upload a LUT (safetensors)", body="binary")
def import_lut(lut_name):
    name = service().store.import_(request.get_data(), lut_name)
    return jsonify(status="ok", lut_name=name), 201


@bp.post("/luts/<lut_name>/labels")
@api("LUTs", "Teach many labels, each whole or not at all; the answer says per label",
     body=obj(["labels"], labels={"type": "array", "minItems": 1, "maxItems": 256, "items": {"oneOf": [
         STR, obj(["label"], label=STR, label_context=STR)]}}))
def teach_labels(lut_name):
    """Teach a list of labels (strings or {label, label_context}), up to --max_teach_labels. Each
    is taught and stored whole or not at all, in order; the answer says, per label, taught (with
    the entries added and replaced) or why not."""
    svc = service()
    items = field(body(), "labels", list, required=True)
    if not items:
        raise APIError(400, "labels must be a non-empty list", param="labels")
    if len(items) > svc.cfg.max_teach_labels:
        raise APIError(413, f"labels: at most {svc.cfg.max_teach_labels} per request, got {len(items)}",
                       param="labels")
    svc.store.check_name(lut_name)
    checked = []  # (label, context), or why the item is not a label
    for i, item in enumerate(items):
        try:
            checked.append(check_item(item, f"labels[{i}]"))
        except ValueError as e:
            checked.append(str(e))
    view = svc.view()
    taught = iter(teach_many(svc.store, view.model, view.tokenizer, lut_name, [c for c in checked if not isinstance(c, str)]))
    results = [{"index": i, **({"taught": False, "status": 400, "detail": c} if isinstance(c, str) else next(taught))}
               for i, c in enumerate(checked)]
    n = sum(r["taught"] for r in results)
    return jsonify(lut_name=lut_name, taught=n, not_taught=len(results) - n, results=results)
