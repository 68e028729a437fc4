"""GET /metrics: llama-server's `llamacpp:*` metrics in the Prometheus text format (0.0.4).

Written by hand rather than with prometheus-client: llama-server's names must be reproduced
exactly, and prometheus-client appends `_total` to every counter (llama-server's counter
`llamacpp:n_tokens_max` has no such suffix).
"""
from __future__ import annotations

import dataclasses
import threading
import time

from flask import Blueprint, Response, current_app

from .http import require_flag
from .sleep import read_only

bp = Blueprint("metrics", __name__)
PROCESS_START = int(time.time())

COUNTERS = [
    ("prompt_tokens_total", "Number of prompt tokens processed."),
    ("prompt_tokens_cached_total", "Number of prompt tokens reused from the prompt cache."),
    ("prompt_seconds_total", "Prompt process time"),
    ("tokens_predicted_total", "Number of generation tokens processed."),
    ("tokens_predicted_seconds_total", "Predict process time"),
    ("n_decode_total", "Total number of llama_decode() calls"),
    ("n_tokens_max", "Largest observed n_tokens."),
    ("spec_decode_num_draft_tokens_total", "Total number of speculative tokens drafted."),
    ("spec_decode_num_accepted_tokens_total", "Total number of speculative tokens accepted."),
    ("spec_decode_num_drafts_total", "Total number of speculative drafts."),
]
GAUGES = [
    ("prompt_tokens_seconds", "Average prompt throughput in tokens/s."),
    ("predicted_tokens_seconds", "Average generation throughput in tokens/s."),
    ("requests_processing", "Number of requests processing."),
    ("requests_deferred", "Number of requests deferred."),
    ("n_busy_slots_per_decode", "Average number of busy slots per llama_decode() call"),
]


class ScrapeWindow:
    """Throughputs since the previous scrape (llama-server resets its window per scrape): one
    per app, kept in app.extensions."""

    def __init__(self):
        self.lock = threading.Lock()
        self.prev = {"prompt_tokens_total": 0, "prompt_seconds_total": 0.0,
                     "tokens_predicted_total": 0, "tokens_predicted_seconds_total": 0.0}

    def rates(self, m: dict) -> tuple[float, float]:
        with self.lock:
            prev, self.prev = self.prev, dict(m)
        return _rates(prev, m)


def _rates(prev: dict, m: dict) -> tuple[float, float]:
    """Prompt and generation tokens per second between two snapshots of the counters."""
    dp = m["prompt_tokens_total"] - prev["prompt_tokens_total"]
    ds = m["prompt_seconds_total"] - prev["prompt_seconds_total"]
    dg = m["tokens_predicted_total"] - prev["tokens_predicted_total"]
    dgs = m["tokens_predicted_seconds_total"] - prev["tokens_predicted_seconds_total"]
    return (dp / ds if ds > 0 else 0.0), (dg / dgs if dgs > 0 else 0.0)


@bp.get("/metrics")
def metrics():
    ctx = current_app.config["NUMLLAMA"]
    require_flag(ctx.enable_metrics, "metrics endpoint", "--metrics")
    # asleep: the counters as they stood (the throughput window goes on: a scrape during sleep
    # reports what ran before it, the next one nothing)
    view = read_only(current_app, lambda sleeper: sleeper.view, lambda ctx: ctx.scheduler.view())
    m = dataclasses.asdict(view.metrics)
    window = current_app.extensions.setdefault("numllama_scrape_window", ScrapeWindow())
    prompt_rate, predicted_rate = window.rates(m)
    values = dict(m)
    values.update({"spec_decode_num_draft_tokens_total": 0, "spec_decode_num_accepted_tokens_total": 0,
                   "spec_decode_num_drafts_total": 0, "prompt_tokens_seconds": prompt_rate,
                   "predicted_tokens_seconds": predicted_rate, "requests_processing": view.n_busy,
                   "requests_deferred": view.n_waiting,
                   "n_busy_slots_per_decode": (m["n_busy_slots_total"] / m["n_decode_total"]
                                               if m["n_decode_total"] else 0.0)})
    lines = []
    for kind, table in (("counter", COUNTERS), ("gauge", GAUGES)):
        for name, help_text in table:
            full = "llamacpp:" + name
            lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}", f"{full} {float(values[name]):g}"]
    # numllama's own, under its own prefix: the host-RAM prompt cache (--cache-ram)
    for name, kind, help_text, value in (
            ("prompt_cache_bytes", "gauge", "Bytes of K/V held by the host-RAM prompt cache.",
             view.prompt_cache_bytes),
            ("prompt_cache_states", "gauge", "Prompt states held by the host-RAM prompt cache.",
             view.prompt_cache_states),
            ("prompt_cache_hits_total", "counter", "Prompt states restored from the host-RAM prompt cache.",
             view.prompt_cache_hits)):
        full = "numllama:" + name
        lines += [f"# HELP {full} {help_text}", f"# TYPE {full} {kind}", f"{full} {float(value):g}"]
    return Response("\n".join(lines) + "\n", content_type="text/plain; version=0.0.4",
                    headers={"Process-Start-Time-Unix": str(PROCESS_START)})
