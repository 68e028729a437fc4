"""The web pages (llama-server serves its web UI at /): static files under webapp/static/, no
build step, no library fetched from the network.

    /            chat: conversations kept in the browser, streamed replies, stop, regenerate,
                 edit-and-resend, settings, the chat template's output (chat.js)
    /sampling    each generated token shaded by its probability, its alternatives before and
                 after the sampler chain (sampling.js)
    /operator    slots, queue, tokens per second and the /metrics counters, live (operator.js)

--no-ui turns them off. The pages are public, like llama-server's static assets: they hold no
data, and the requests they make carry the API key the user types, which stays in the browser.
Their Content-Security-Policy lets them run only their own scripts and talk only to this server,
so text from the model can never run as code even if it reached the page as HTML (the Markdown
renderer escapes it first anyway).
"""
from __future__ import annotations

import os

from flask import Blueprint, current_app, send_from_directory

from .errors import APIError

bp = Blueprint("ui", __name__)
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
PAGES = {"/": "index.html", "/sampling": "sampling.html", "/operator": "operator.html"}
ASSETS = frozenset(name for name in os.listdir(STATIC) if name.endswith((".js", ".css")))
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _require_ui() -> None:
    ctx = current_app.config["NUMLLAMA"]
    if ctx is not None and not ctx.ui:
        raise APIError("File Not Found", 404)


def _serve(name: str):
    _require_ui()
    resp = send_from_directory(STATIC, name, max_age=0)
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


def _page_view(name: str):
    def view():
        return _serve(name)
    view.__name__ = "page_" + name.split(".")[0]
    return view


for _path, _name in PAGES.items():
    bp.add_url_rule(_path, view_func=_page_view(_name))


@bp.get("/static/<name>")
def asset(name: str):
    if name not in ASSETS:   # only the files shipped: no path ever reaches the file system
        raise APIError("File Not Found", 404)
    return _serve(name)
