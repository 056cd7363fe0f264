"""
GET /playground: the browser playground (server/static/playground.html, .css and .js), served by the
server itself so it works offline with no build step; the page calls the public API like any
other client, with the API key typed into it.
"""
import os

from flask import Blueprint, send_from_directory
from server.openapi import api

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
bp = Blueprint("playground", __name__)


@bp.get("/playground")
@api("docs", "The browser playground: teach, compare with and without the LUT, chat", access="public", limited=False)
def playground():
    return send_from_directory(STATIC, "playground.html")


@bp.get("/playground/<path:filename>")
@api("docs", "A file of the playground (CSS, JavaScript)", access="public", limited=False)
def playground_asset(filename):
    return send_from_directory(STATIC, filename)  # refuses paths outside static/ (404)
