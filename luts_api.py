"""
LUT management: GET /luts, GET and DELETE /luts/<lut_name>, DELETE /luts/<lut_name>/labels/<label_id>,
GET /luts/<lut_name>/export and POST /luts/<lut_name>/import (safetensors). Teaching is lut_api's.
"""
from flask import Blueprint, Response, g, jsonify, request

from api_common import service

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
