"""Start numllama-server as a user would: a subprocess on a free port, polled on /health."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import requests

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# llama.cpp's tinyllama2 preset (tools/server/tests/utils.py)
TINYLLAMA2 = ["--temp", "0.8", "--seed", "42", "--batch-size", "32", "--no-slots", "--alias", "tinyllama-2",
              "--ctx-size", "512", "--parallel", "2", "--n-predict", "64", "--no-jinja"]


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Server:
    def __init__(self, args: list[str], env: dict | None = None, model: str | None = None,
                 health_path: str = "/health"):
        self.port = free_port()
        cmd = [sys.executable, "-m", "numllama.webapp.server", "--port", str(self.port)]
        if env and "AIP_HTTP_PORT" in env:   # a Vertex AI container listens there, whatever --port says
            self.port = int(env["AIP_HTTP_PORT"])
        self.url = f"http://127.0.0.1:{self.port}"
        if "--host" not in args:
            cmd += ["--host", "127.0.0.1"]
        if model:
            cmd += ["-m", model]
        # a file, not a pipe: a pipe nobody reads fills up and then blocks the server's logging
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd + args, cwd=REPO, env={**os.environ, **(env or {})},
                                     stdout=self.log, stderr=subprocess.STDOUT, text=True)
        deadline = time.time() + 120
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server died: {self.output()}")
            try:
                if requests.get(self.url + health_path, timeout=1).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError("server did not become healthy")

    def post(self, path, data=None, **kw):
        return requests.post(self.url + path, json=data, timeout=kw.pop("timeout", 300), **kw)

    def get(self, path, **kw):
        return requests.get(self.url + path, timeout=kw.pop("timeout", 60), **kw)

    def delete(self, path, **kw):
        return requests.delete(self.url + path, timeout=kw.pop("timeout", 60), **kw)

    def stream(self, path, data, headers=None):
        """Yield the parsed `data:` events of an SSE response (stops at [DONE])."""
        r = requests.post(self.url + path, json=data, stream=True, timeout=300, headers=headers)
        assert r.status_code == 200, r.text
        assert r.headers["Content-Type"].startswith("text/event-stream")
        for line in r.iter_lines(decode_unicode=True):
            if not line or not line.startswith("data: "):
                continue
            if "[DONE]" in line:
                return
            yield json.loads(line[6:])

    def output(self) -> str:
        """Everything the server has printed so far."""
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def rss_mb(self) -> float:
        """The server process's resident memory (Linux)."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
