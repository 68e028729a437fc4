"""--sleep-idle-seconds: after that long without work the server lets go of the model (its
weights, KV cache and prompt cache), as llama-server does, and loads it again when a request
needs it.

While it sleeps, the read-only routes answer without waking it: /health, /props (from a copy
taken on falling asleep, with "is_sleeping": true), /models, and /metrics (from the counters as
they stood, their throughput window going on as llama-server's does). Any other request wakes it
first and then runs as usual; waking takes what loading took, less the compiling.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import threading
import time

from flask import Flask

log = logging.getLogger("numllama.sleep")
POLL_S = 0.1


class Sleeper:
    """Watches for idleness and puts the server to sleep; wakes it for a request that needs
    the model. `load(metrics)` builds a new ServerContext whose scheduler goes on from those
    counters. One per app, in app.extensions["numllama_sleep"]."""

    def __init__(self, app: Flask, idle_s: float, load):
        self.app = app
        self.idle_s = idle_s
        self.load = load
        self.inflight = app.extensions["numllama_inflight"]   # lifecycle.InFlight
        self.lock = threading.Condition()
        self.sleeping = False
        self.waking = False
        self.view = None           # the scheduler's SchedulerView when it fell asleep
        self.props = None          # /props and /models as they were then
        self.models = None
        app.extensions["numllama_sleep"] = self

    def start(self) -> None:
        threading.Thread(target=self._watch, name="numllama-sleep", daemon=True).start()

    # ------------------------------------------------------------ the request side
    def wake_if_asleep(self) -> None:
        """A request that needs the model passed the gate (it is counted in flight already, so
        the server does not fall asleep under it): wake the server if it sleeps."""
        with self.lock:
            while self.waking:
                self.lock.wait()
            if not self.sleeping:
                return
            self.waking = True
        try:
            self._wake()
        finally:
            with self.lock:
                self.waking = False
                self.lock.notify_all()

    # ------------------------------------------------------------ sleeping and waking
    def _watch(self) -> None:
        while True:
            time.sleep(POLL_S)
            ctx = self.app.config["NUMLLAMA"]
            with self.lock:
                if self.sleeping or self.waking or self.inflight.n or ctx is None:
                    continue
                if time.monotonic() - self.inflight.last_change < self.idle_s:
                    continue
                view = ctx.scheduler.view()
                if view.n_waiting or any(s.busy for s in view.slots):   # (a task whose client left)
                    continue
                self._fall_asleep(ctx, view)

    def _fall_asleep(self, ctx, view) -> None:
        """(under the lock, so no request starts meanwhile)"""
        with self.app.test_request_context("/props"):
            props = json.loads(self.app.view_functions["info.props"]().get_data())
            models = json.loads(self.app.view_functions["info.models"]().get_data())
        self.props, self.models, self.view = {**props, "is_sleeping": True}, models, view
        self.sleeping = True   # (first: from now on the read-only routes answer from the copies)
        ctx.scheduler.close()
        ctx.scheduler.engine = None
        ctx.engine = ctx.scheduler = None   # (nothing else holds the model: it can go)
        gc.collect()
        log.warning("server is entering sleeping state (idle for %g s)", self.idle_s)
        print("numllama-server: sleeping (the model is unloaded until a request needs it)", flush=True)

    def _wake(self) -> None:
        log.warning("server is exiting sleeping state")
        ctx = self.load(self.view.metrics)
        self.app.config["NUMLLAMA"] = ctx
        with self.lock:
            self.sleeping = False
            self.view = self.props = self.models = None
        print("numllama-server: awake", flush=True)


def sleeper_of(app: Flask) -> Sleeper | None:
    return app.extensions.get("numllama_sleep")


def read_only(app: Flask, asleep, awake):
    """A read-only route's answer: asleep(sleeper) from the copies a sleeping server keeps, else
    awake(ctx). The server neither falls asleep nor wakes meanwhile (the sleeper's lock is held;
    it is re-entrant: falling asleep renders /props under it)."""
    sleeper = sleeper_of(app)
    with sleeper.lock if sleeper is not None else contextlib.nullcontext():
        if sleeper is not None and sleeper.sleeping:
            return asleep(sleeper)
        return awake(app.config["NUMLLAMA"])
