"""What a replica behind a load balancer needs of its life: knowing which requests are in flight,
and a graceful drain on SIGTERM.

In flight: a request that needs the model, from the gate (it passed the key check) to its end,
a stream's end when its body closes, not when its view returns. Every task a slot runs belongs
to one of them.

Drain (SIGTERM): new requests, /health included, get 503 with llama-server's error shape and
Retry-After, so that a balancer takes the replica out and retries elsewhere; /live still says
the process is alive; the MCP servers stop (a tool call in flight answers that it was
cancelled), the requests in flight run to their end; then the process exits, after
--drain-timeout seconds at most.
"""
from __future__ import annotations

import logging
import os
import threading
import time

from .errors import APIError

log = logging.getLogger("numllama.lifecycle")
RETRY_AFTER_S = 1
# what needs no model, and is not counted in flight (nor wakes a sleeping server): llama-server's
# routes that bypass its sleep
MODEL_FREE = {("GET", "/health"), ("GET", "/v1/health"), ("GET", "/props"), ("GET", "/models"),
              ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/"), ("GET", "/live")}


class InFlight:
    """The requests in flight: how many, and when that last changed. One per app, in
    app.extensions["numllama_inflight"]."""

    def __init__(self):
        self.changed = threading.Condition()
        self.n = 0
        self.last_change = time.monotonic()

    def enter(self) -> None:
        with self.changed:
            self.n += 1
            self.last_change = time.monotonic()

    def leave(self) -> None:
        with self.changed:
            self.n -= 1
            self.last_change = time.monotonic()
            self.changed.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """True once none is in flight, False if the timeout came first."""
        with self.changed:
            return self.changed.wait_for(lambda: self.n == 0, timeout)


class Drain:
    """SIGTERM's graceful end."""

    def __init__(self, inflight: InFlight, timeout_s: float, cleanup=None, unsent=lambda: 0):
        """cleanup(): run as the drain starts (it stops the MCP servers: a tool call in flight
        then answers at once that it was cancelled, as llama-server's do at shutdown).
        unsent(): bytes the connections have yet to send (serving.unsent_bytes)."""
        self.inflight = inflight
        self.timeout_s = timeout_s
        self.cleanup = cleanup
        self.unsent = unsent
        self.draining = threading.Event()

    def check(self, path: str) -> None:
        """The gate's question: refuse everything but /live while draining."""
        if self.draining.is_set() and path != "/live":
            raise APIError("Server is shutting down", 503, headers={"Retry-After": str(RETRY_AFTER_S)})

    def start(self, *_signal) -> None:
        if self.draining.is_set():
            return
        self.draining.set()
        print(f"numllama-server: draining: {self.inflight.n} requests in flight, new ones get 503 "
              f"(at most {self.timeout_s:g} s)", flush=True)
        if self.cleanup is not None:
            self.cleanup()
        threading.Thread(target=self._finish, name="numllama-drain", daemon=True).start()

    def _finish(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        done = self.inflight.wait_idle(self.timeout_s)
        while done and self.unsent() and time.monotonic() < deadline:   # the last bytes reach their clients
            time.sleep(0.02)
        if not done:
            log.warning("drain timed out with %d requests in flight", self.inflight.n)
        print("numllama-server: drained, exiting", flush=True)
        os._exit(0 if done else 1)
