"""GET /: a one-page completion playground (llama-server serves its web UI here). --no-ui
turns it off. The page is public, like llama-server's static assets: it holds no data, and the
requests it makes carry the API key the user types."""
from __future__ import annotations

from flask import Blueprint, Response, current_app

from .errors import APIError

bp = Blueprint("ui", __name__)

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>numllama</title>
<style>body{font:15px system-ui;max-width:46em;margin:2em auto}textarea{width:100%;height:8em}
#out{white-space:pre-wrap;border:1px solid #ccc;padding:.5em;min-height:4em}</style></head>
<body><h1>numllama</h1>
<p>A llama-server compatible completion server. API: <code>/completion</code>,
<code>/v1/completions</code>, <code>/v1/chat/completions</code>, <code>/tokenize</code>, <code>/props</code>.</p>
<textarea id="prompt">Once upon a time</textarea><br>
<label>tokens <input id="n" type="number" value="64" min="1"></label>
<label>API key <input id="key" type="password"></label>
<button id="go">Complete</button>
<div id="out"></div>
<script>
document.getElementById('go').onclick = async () => {
  const out = document.getElementById('out'); out.textContent = '';
  const headers = {'Content-Type': 'application/json'};
  const key = document.getElementById('key').value; if (key) headers['Authorization'] = 'Bearer ' + key;
  const r = await fetch('/completion', {method: 'POST', headers, body: JSON.stringify({
    prompt: document.getElementById('prompt').value, n_predict: +document.getElementById('n').value, stream: true})});
  if (!r.ok) { out.textContent = (await r.json()).error.message; return; }
  const reader = r.body.getReader(); const dec = new TextDecoder(); let buf = '';
  for (;;) { const {value, done} = await reader.read(); if (done) break;
    buf += dec.decode(value, {stream: true}); const parts = buf.split('\\n\\n'); buf = parts.pop();
    for (const p of parts) if (p.startsWith('data: ')) out.textContent += JSON.parse(p.slice(6)).content; }
};
</script></body></html>
"""


@bp.get("/")
def index():
    ctx = current_app.config["NUMLLAMA"]
    if ctx is not None and not ctx.ui:
        raise APIError("File Not Found", 404)
    return Response(PAGE, content_type="text/html; charset=utf-8")
