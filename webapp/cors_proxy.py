"""GET/POST /cors-proxy?url=...: llama-server's --ui-mcp-proxy, which lets a browser page reach
a remote MCP server that sends no CORS headers.

Only headers the page names explicitly travel: `x-llama-server-proxy-header-NAME: value` is sent
upstream as `NAME: value`. Nothing else of the request (its Authorization with our API key,
cookies, Proxy-Authorization) reaches the target. Off by default: 403 "this feature is disabled".

A proxy on this machine could reach what a web page never should: this machine's own services
(`http://127.0.0.1:6379`, also spelt `http://0:6379` or `http://2130706433:6379`) and the
private network around it. So the target must be a public address: it is checked when the name
is resolved, and again on the connected socket (a name that resolves to a public address for
the check and to 127.0.0.1 for the connection, DNS rebinding, is caught there).
`--cors-proxy-allow-private` lifts this for a user whose MCP server runs locally.
What comes back is served from our origin, so it is marked as data (`nosniff`) and sandboxed
(`Content-Security-Policy: sandbox`): a proxied HTML page cannot run script as us.
"""
from __future__ import annotations

import ipaddress
import socket
import threading
from urllib.parse import urlsplit

from flask import Blueprint, Response, current_app, request

from .errors import APIError
from .http import disconnect_probe, require_agent_feature

bp = Blueprint("cors_proxy", __name__)

PREFIX = "x-llama-server-proxy-header-"
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 30          # between two pieces of the upstream's answer
MAX_CONCURRENT = 4           # proxied requests at once; each holds one of the server's threads
# hop-by-hop and framing headers describe the upstream connection, not the content; cookies
# would be set on our origin
DROP_RESPONSE_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-encoding",
                         "content-length", "proxy-authenticate", "trailer", "upgrade", "set-cookie",
                         "set-cookie2"}
SAFETY_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"}
_slots = threading.BoundedSemaphore(MAX_CONCURRENT)


class ForbiddenTarget(Exception):
    """The target resolves to an address the proxy must not reach. (Not an OSError: urllib3
    retries and wraps those, and this must reach the route as it is.)"""


def address_problem(ip: str) -> str | None:
    """Why this address is not a public one (None when it is)."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for what, bad in (("unspecified (this machine)", addr.is_unspecified), ("loopback", addr.is_loopback),
                      ("link-local", addr.is_link_local), ("multicast", addr.is_multicast),
                      ("private", addr.is_private), ("reserved", addr.is_reserved)):
        if bad:
            return what
    return None if addr.is_global else "not public"


def check_target(host: str, port: int) -> None:
    """Every address the name resolves to must be public."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as e:
        raise APIError(f"proxy request failed: cannot resolve {host!r}: {e}", 502, "server_error") from None
    for info in infos:
        ip = info[4][0]
        problem = address_problem(ip)
        if problem:
            raise ForbiddenTarget(f"target {host!r} resolves to {ip}, a {problem} address")


def _checked_connection(base):
    """An urllib3 connection class that refuses a socket connected to a non-public address."""
    class Checked(base):
        def _new_conn(self):
            sock = super()._new_conn()
            problem = address_problem(sock.getpeername()[0])
            if problem:
                sock.close()
                raise ForbiddenTarget(f"the connection reached a {problem} address")
            return sock
    return Checked


def _public_only_session():
    import requests   # only a proxying server pays for it (~6 MB)
    from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

    class HTTPPool(HTTPConnectionPool):
        ConnectionCls = _checked_connection(HTTPConnectionPool.ConnectionCls)

    class HTTPSPool(HTTPSConnectionPool):
        ConnectionCls = _checked_connection(HTTPSConnectionPool.ConnectionCls)

    class Adapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": HTTPPool, "https": HTTPSPool}

    session = requests.Session()
    session.mount("http://", Adapter())
    session.mount("https://", Adapter())
    return session


@bp.route("/cors-proxy", methods=["GET", "POST"])
def cors_proxy():
    ctx = current_app.config["NUMLLAMA"]
    require_agent_feature(ctx.ui_mcp_proxy)
    url = request.args.get("url", "")
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)   # not a number: raises here
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
    if not _slots.acquire(blocking=False):
        raise APIError(f"too many proxied requests at once (at most {MAX_CONCURRENT})", 503)
    try:
        return _proxy(url, parts.hostname, port, headers, ctx.cors_proxy_allow_private)
    except BaseException:
        _slots.release()
        raise


def _proxy(url: str, host: str, port: int, headers: dict, allow_private: bool) -> Response:
    """Forward the request; the slot taken in cors_proxy() is released when the answer ends."""
    import requests
    session = _public_only_session() if not allow_private else requests.Session()
    session.trust_env = False   # no proxy settings or ~/.netrc credentials of ours go upstream
    try:
        if not allow_private:
            check_target(host, port)
        # requests' own defaults (User-Agent, Accept: */*) stay unless the page named them
        upstream = session.request(request.method, url, headers=headers, stream=True,
                                   data=request.get_data() if request.method == "POST" else None,
                                   timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S), allow_redirects=False)
    except (ForbiddenTarget, requests.RequestException) as e:
        session.close()
        if isinstance(e, ForbiddenTarget):
            raise APIError(f"{e}: the proxy reaches public addresses only (see --cors-proxy-allow-private)",
                           403, "permission_error") from None
        if isinstance(e, requests.exceptions.InvalidURL):
            raise APIError(f"invalid target URL: {e}", 400) from None
        raise APIError(f"proxy request failed: {e}", 502, "server_error") from None
    client_gone = disconnect_probe()

    def body():
        try:
            for piece in upstream.iter_content(chunk_size=None):
                if client_gone():
                    return
                yield piece
        except requests.RequestException:
            return   # a stalled or broken upstream ends the answer; the status line is gone already

    def close():   # waitress closes every answer, also one whose client left before it began
        upstream.close()
        session.close()
        _slots.release()

    out = Response(body(), status=upstream.status_code)
    out.call_on_close(close)
    for k, v in upstream.headers.items():
        if k.lower() not in DROP_RESPONSE_HEADERS:
            out.headers[k] = v
    out.headers.update(SAFETY_HEADERS)
    return out
