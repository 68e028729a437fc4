"""GET/POST /cors-proxy?url=...: llama-server's --ui-mcp-proxy, which lets a browser page reach
a remote MCP server that sends no CORS headers.

Only headers the page names explicitly travel: `x-llama-server-proxy-header-NAME: value` is sent
upstream as `NAME: value`. Nothing else of the request (its Authorization with our API key,
cookies, Proxy-Authorization) reaches the target. Off by default: 403 "this feature is disabled".
"""
from __future__ import annotations

from urllib.parse import urlsplit

from flask import Blueprint, Response, current_app, request

from .errors import APIError

bp = Blueprint("cors_proxy", __name__)

PREFIX = "x-llama-server-proxy-header-"
TIMEOUT_S = 600
# hop-by-hop and framing headers describe the upstream connection, not the content
DROP_RESPONSE_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-encoding",
                         "content-length", "proxy-authenticate", "trailer", "upgrade"}


@bp.route("/cors-proxy", methods=["GET", "POST"])
def cors_proxy():
    if not current_app.config["NUMLLAMA"].ui_mcp_proxy:
        raise APIError("this feature is disabled", 403, "feature_disabled")
    url = request.args.get("url", "")
    try:
        parts = urlsplit(url)
        parts.port   # a port that is not a number raises here, not upstream
    except ValueError as e:
        raise APIError(f"invalid target URL: {e}", 400) from None
    if parts.scheme not in ("http", "https"):
        raise APIError(f"unsupported URL scheme in target URL: {parts.scheme}", 400)
    if not parts.hostname:
        raise APIError("invalid target URL: missing host", 400)
    if parts.password:
        raise APIError("authentication in target URL is not supported", 400)
    headers = {k[len(PREFIX):]: v for k, v in request.headers.items()
               if k.lower().startswith(PREFIX) and len(k) > len(PREFIX)}
    import requests   # only a proxying server pays for it (~6 MB)
    session = requests.Session()
    session.trust_env = False   # no proxy settings or ~/.netrc credentials of ours go upstream
    # requests' own defaults (User-Agent, Accept: */*) stay unless the page named them
    try:
        upstream = session.request(request.method, url, headers=headers, stream=True,
                                   data=request.get_data() if request.method == "POST" else None,
                                   timeout=(30, TIMEOUT_S), allow_redirects=False)
    except requests.exceptions.InvalidURL as e:
        raise APIError(f"invalid target URL: {e}", 400) from None
    except requests.RequestException as e:
        raise APIError(f"proxy request failed: {e}", 502, "server_error") from None

    def body():
        try:
            yield from upstream.iter_content(chunk_size=None)
        finally:
            upstream.close()
            session.close()

    out = Response(body(), status=upstream.status_code)
    for k, v in upstream.headers.items():
        if k.lower() not in DROP_RESPONSE_HEADERS:
            out.headers[k] = v
    return out
