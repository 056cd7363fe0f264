"""
LUT management: GET /luts, GET and DELETE /luts/<lut_name>, DELETE /luts/<lut_name>/labels/<label_id>,
GET /luts/<lut_name>/export and POST /luts/<lut_name>/import (safetensors), and bulk teaching,
POST /luts/<lut_name>/labels. Teaching one label is lut_api's (seed 000's /train_lut).
"""
from flask import Blueprint, Response, g, jsonify, request

from api_common import APIError, body, field, service
from labelfile import check_item
from lut import teach_many

bp = Blueprint("luts_api", __name__)


@bp.get("/luts")
def list_luts():  # a tenant's key sees its own LUTs only
    return jsonify(luts=[x for x in service().store.list() if g.key is None or g.key.may_use(x["name"])])


@bp.get("/luts/<lut_name>")
def show_lut(lut_name):
    return jsonify(service().store.show(lut_name))


@bp.delete("/luts/<lut_name>")
def delete_lut(lut_name):
    service().store.delete(lut_name)
    return jsonify(status="ok", lut_name=lut_name)


@bp.delete("/luts/<lut_name>/labels/<int:label_id>")
def delete_label(lut_name, label_id):
    service().store.delete_label(lut_name, label_id)
    return jsonify(status="ok", lut_name=lut_name, label_id=label_id)


@bp.get("/luts/<lut_name>/export")
def export_lut(lut_name):
    data = service().store.export(lut_name)
    return Response(data, mimetype="application/octet-stream",
                    headers={"Content-Disposition": f'attachment; filename="{lut_name}.safetensors"'})


@bp.post("/luts/<lut_name>/import")
def import_lut(lut_name):
    name = service().store.import_(request.get_data(), lut_name)
    return jsonify(status="ok", lut_name=name), 201


@bp.post("/luts/<lut_name>/labels")
def teach_labels(lut_name):
    """Teach a list of labels (strings or {label, label_context}), up to --max_teach_labels. Each
    is taught and stored whole or not at all, in order; the answer says, per label, taught (with
    the entries added and replaced) or why not."""
    svc = service()
    items = field(body(), "labels", list, required=True)
    if not items:
        raise APIError(400, "labels must be a non-empty list", param="labels")
    if len(items) > svc.cfg["max_teach_labels"]:
        raise APIError(413, f"labels: at most {svc.cfg['max_teach_labels']} per request, got {len(items)}",
                       param="labels")
    svc.store.check_name(lut_name)
    checked = []  # (label, context), or why the item is not a label
    for i, item in enumerate(items):
        try:
            checked.append(check_item(item, f"labels[{i}]"))
        except ValueError as e:
            checked.append(str(e))
    model, tok, _ = svc.slot.get()
    taught = iter(teach_many(svc.store, model, tok, lut_name, [c for c in checked if not isinstance(c, str)]))
    results = [{"index": i, **({"taught": False, "status": 400, "detail": c} if isinstance(c, str) else next(taught))}
               for i, c in enumerate(checked)]
    n = sum(r["taught"] for r in results)
    return jsonify(lut_name=lut_name, taught=n, not_taught=len(results) - n, results=results)
