"""POST /completion (/completions) in llama-server's format, and POST /v1/completions (OpenAI)."""
from __future__ import annotations

import queue
import time
from contextlib import closing

from flask import Blueprint, Response, current_app

from ..engine.slots import EmbeddingEvent, ErrorEvent, FinalEvent, ProgressEvent, QueueFull, Task, TokenEvent
from ..engine.tokenizer import utf8_complete_prefix

from .errors import APIError, json_response
from .http import disconnect_probe, random_id, request_json, sse
from .lora_adapters import task_lora
from .params import (N_PROBS_MAX, effective_n_predict, generation_settings, get_bool, get_number,
                     parse_prompts, parse_reasoning_budget, parse_stop, sampling_params)

bp = Blueprint("completions", __name__)

POLL_S = 0.02  # how often a waiting request checks whether its client went away
RETRY_AFTER_S = 1   # told to clients refused because every slot and the queue are full


def submit_tasks(ctx, tasks: list[Task]) -> list[Task]:
    """Queue the tasks together; every slot and the queue full is a 503 with Retry-After (a load
    balancer may retry elsewhere)."""
    try:
        return ctx.scheduler.submit_all(tasks)
    except QueueFull as e:
        raise APIError(f"server is busy: {e}", 503, headers={"Retry-After": str(RETRY_AFTER_S)}) from None


def model_generates(ctx) -> bool:
    """Whether the model makes next-token logits (an encoder, bert, makes embeddings only)."""
    return ctx.engine.model.hp.causal


def exceeds_context(n_prompt: int, n_ctx: int, at_least: bool = False):
    """llama-server's 400 for a prompt longer than a slot's context (at_least: a lower bound on
    the prompt's tokens, known without tokenizing it)."""
    raise APIError(f"request ({'at least ' if at_least else ''}{n_prompt} tokens) exceeds the available "
                   f"context size ({n_ctx} tokens), try increasing it", 400, "exceed_context_size_error",
                   n_prompt_tokens=n_prompt, n_ctx=n_ctx)


class Completion:
    """A parsed completion request: one task per prompt, and how to present the results."""

    def __init__(self, body: dict, oai: bool, grammar_prefill: str = "", reasoning_tags: tuple | None = None,
                 reasoning_budget: int = -1, reasoning_forced: tuple = ()):
        """grammar_prefill, reasoning_*: the chat route's own sampling inputs (params.sampling_params);
        reasoning_tags None: the request gives its reasoning budget itself (params.parse_reasoning_budget)."""
        ctx = current_app.config["NUMLLAMA"]
        tok = ctx.engine.tokenizer
        if "prompt" not in body or body.get("prompt") is None:
            raise APIError("key 'prompt' not found" if "prompt" not in body else "\"prompt\" must not be null")
        if not model_generates(ctx):
            raise APIError("the current context does not support logits computation. skipping", 500)
        self.ctx = ctx
        self.oai = oai
        self.stream = get_bool(body, "stream", False)
        self.return_tokens = get_bool(body, "return_tokens", False)
        self.n_predict = effective_n_predict(body, ctx.defaults.n_predict)
        key = "n_probs" if body.get("n_probs") is not None else "logprobs"  # logprobs: OpenAI's name
        n_probs = body.get(key)
        if isinstance(n_probs, bool):  # OpenAI chat-style logprobs: true
            n_probs = 1 if n_probs else 0
            body = {**body, key: n_probs}
        self.n_probs = get_number(body, key, 0, int) if n_probs is not None else 0
        if self.n_probs < 0:
            raise APIError(f"Field '{key}': Value must be between 0 <= value <= 2147483647")
        self.n_probs = min(self.n_probs, N_PROBS_MAX)
        self.post_sampling = get_bool(body, "post_sampling_probs", False)
        self.ignore_eos = get_bool(body, "ignore_eos", False)
        self.cache_prompt = get_bool(body, "cache_prompt", True)
        self.backend_sampling = get_bool(body, "backend_sampling", False)
        self.timings_per_token = get_bool(body, "timings_per_token", False)
        self.return_progress = get_bool(body, "return_progress", False) and self.stream
        self.id_slot = get_number(body, "id_slot", -1, int)
        if self.id_slot >= ctx.scheduler.n_slots:
            raise APIError(f"Invalid id_slot {self.id_slot}: the server has {ctx.scheduler.n_slots} slots")
        self.t_max = get_number(body, "t_max_predict_ms", -1, int)
        self.n_keep = get_number(body, "n_keep", 0, int)
        self.n_discard = get_number(body, "n_discard", 0, int)
        self.stop = parse_stop(body.get("stop"))
        fields = body.get("response_fields")
        if fields is not None and not (isinstance(fields, list) and all(isinstance(f, str) for f in fields)):
            raise APIError("Field 'response_fields': must be an array of strings")
        self.response_fields = fields or []
        for k in ("stream_options",):
            if body.get(k) is not None and not isinstance(body[k], dict):
                raise APIError(f"Field '{k}': must be an object")
        self.include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if reasoning_tags is None:
            reasoning_tags, reasoning_budget, reasoning_forced = parse_reasoning_budget(body, tok)
        self.params = sampling_params(body, ctx.defaults, tok, self.ignore_eos, grammar_prefill, reasoning_tags,
                                      reasoning_budget, reasoning_forced)
        self.lora, lora_echo = task_lora(ctx, body)
        n_ctx = ctx.n_ctx_slot
        # a prompt that cannot fit is refused before it is tokenized (which costs memory and time)
        n_cmpl = get_number(body, "n_cmpl", 1, int) if body.get("n_cmpl") is not None else 1
        if not 1 <= n_cmpl <= ctx.scheduler.n_slots:
            raise APIError(f"Field 'n_cmpl': Value must be between 1 <= value <= "
                           f"{ctx.scheduler.n_slots}, but got {n_cmpl}")
        capacity = ctx.scheduler.capacity()
        prompts, self.is_batch = parse_prompts(
            body["prompt"], tok, max_tokens=n_ctx - 1,
            on_too_long=lambda n: exceeds_context(n, n_ctx, at_least=True),
            max_prompts=capacity // n_cmpl if capacity is not None else None)
        if n_cmpl > 1:  # several completions of each prompt, returned as a list
            prompts = [p for p in prompts for _ in range(n_cmpl)]
            self.is_batch = True
        for p in prompts:
            if len(p) >= n_ctx:
                exceeds_context(len(p), n_ctx)
        self.prompts = prompts
        self.model_name = ctx.model_alias
        self.settings = generation_settings(self.params, self.n_predict, self.stop, self.stream,
                                            self.n_probs, self.ignore_eos, self.post_sampling,
                                            self.backend_sampling, speculative=ctx.speculative, lora=lora_echo)
        self.id = random_id("chatcmpl-")
        self.created = int(time.time())

    def submit(self) -> list[Task]:
        tasks = [Task(prompt_tokens=p, n_predict=self.n_predict, params=self.params, stop=self.stop,
                      n_probs=self.n_probs, post_sampling_probs=self.post_sampling, ignore_eos=self.ignore_eos,
                      cache_prompt=self.cache_prompt, id_slot=self.id_slot, t_max_predict_ms=self.t_max,
                      index=i, return_progress=self.return_progress, n_keep=self.n_keep,
                      n_discard=self.n_discard, lora=self.lora, completion_id=self.id)
                 for i, p in enumerate(self.prompts)]
        return submit_tasks(self.ctx, tasks)

    # ------------------------------------------------------------------ presentation
    def probs_items(self, probs_list) -> list[dict]:
        tok = self.ctx.engine.tokenizer
        key, top_key = ("prob", "top_probs") if self.post_sampling else ("logprob", "top_logprobs")

        def item(tid, value, raw=None):
            raw = tok.token_bytes(tid, self.ctx.special) if raw is None else raw
            # llama-server cuts a character's first bytes off the end (validate_utf8), and its
            # JSON turns other invalid UTF-8 (a byte token on its own) into U+FFFD
            text = raw[:utf8_complete_prefix(raw)].decode("utf-8", "replace")
            return {"id": tid, "token": text, "bytes": list(raw),
                    key: value if value > -3.4e38 else -3.4028234663852886e38}
        # the chosen token shows the text it sent (llama-server's text_to_send), the others their own
        return [{**item(p["id"], p["value"], p.get("sent")), top_key: [item(i, v) for i, v in p["top"]]}
                for p in probs_list]

    @staticmethod
    def timings(fin: FinalEvent) -> dict:
        """llama-server's timings. The first generated token comes from the prompt pass's
        logits, so the generation rate is over n - 1 decode steps (0 for a single token)."""
        pm, dm = fin.prompt_ms, fin.predicted_ms
        steps = fin.n_decoded - 1
        out = {"cache_n": fin.n_cached, "prompt_n": fin.n_prompt_processed, "prompt_ms": pm,
               "prompt_per_token_ms": pm / max(fin.n_prompt_processed, 1),
               "prompt_per_second": fin.n_prompt_processed / (pm / 1000) if pm > 0 else 0.0,
               "predicted_n": fin.n_decoded, "predicted_ms": dm,
               "predicted_per_token_ms": dm / steps if steps > 0 else 0.0,
               "predicted_per_second": steps / (dm / 1000) if steps > 0 and dm > 0 else 0.0}
        if fin.n_draft > 0:   # speculative decoding: what the draft model proposed, and what was kept
            out.update(draft_n=fin.n_draft, draft_n_accepted=fin.n_draft_accepted)
        return out

    def final_object(self, task: Task, fin: FinalEvent, streamed: bool) -> dict:
        tok = self.ctx.engine.tokenizer
        settings = dict(self.settings, seed=fin.seed)
        out = {
            "index": task.index,
            "content": "" if streamed else fin.content,
            "tokens": [] if streamed or not self.return_tokens else fin.tokens,
            "id_slot": fin.id_slot, "stop": True, "model": self.model_name,
            "tokens_predicted": fin.n_decoded, "tokens_evaluated": fin.n_prompt,
            "generation_settings": settings,
            "prompt": tok.decode(task.prompt_tokens, special=True),
            "has_new_line": fin.has_new_line, "truncated": fin.truncated,
            "stop_type": fin.stop_type, "stopping_word": fin.stopping_word,
            "tokens_cached": fin.tokens_cached, "timings": self.timings(fin),
        }
        if self.n_probs > 0 and not streamed:
            out["completion_probabilities"] = self.probs_items(fin.probs)
        return out

    def select_fields(self, obj: dict) -> dict:
        if not self.response_fields:
            return obj
        out = {}
        for path in self.response_fields:
            cur = obj
            for part in path.split("/"):
                if isinstance(cur, dict) and part in cur:
                    cur = cur[part]
                else:
                    break
            else:
                out[path] = cur
        return out

    def finish_reason(self, fin: FinalEvent) -> str:
        return "stop" if fin.stop_type in ("eos", "word") else "length"

    def usage(self, fins) -> dict:
        pt = sum(f.n_prompt for f in fins)
        ct = sum(f.n_decoded for f in fins)
        return {"completion_tokens": ct, "prompt_tokens": pt, "total_tokens": pt + ct,
                "prompt_tokens_details": {"cached_tokens": sum(f.n_cached for f in fins)}}

    def oai_object(self, tasks, fins) -> dict:
        choices = []
        for t, f in zip(tasks, fins):
            logprobs = {"content": self.probs_items(f.probs)} if self.n_probs > 0 else None
            choices.append({"text": f.content, "index": t.index, "logprobs": logprobs,
                            "finish_reason": self.finish_reason(f)})
        return {"choices": choices, "created": self.created, "model": self.model_name,
                "system_fingerprint": self.ctx.build_fingerprint, "object": "text_completion",
                "usage": self.usage(fins), "id": self.id, "timings": self.timings(fins[-1])}


class DisconnectWatch:
    """Asks waitress whether the client is still there at most every POLL_S, however fast
    events arrive (a busy queue must not hide a vanished client)."""

    def __init__(self, probe):
        self.probe = probe
        self.next_check = 0.0

    def gone(self) -> bool:
        now = time.monotonic()
        if now < self.next_check:
            return False
        self.next_check = now + POLL_S
        return bool(self.probe())


def wait_event(task: Task, ctx, watch: DisconnectWatch):
    """The next event of a task, or None (task cancelled) once the client has gone away."""
    while True:
        if watch.gone():
            ctx.scheduler.cancel(task)
            return None
        try:
            return task.events.get(timeout=POLL_S)
        except queue.Empty:
            pass


def task_events(ctx, tasks: list[Task]):
    """(task, event) for every event of the tasks (ctx: the ServerContext whose scheduler runs
    them), one task after the other, each up to its FinalEvent (EmbeddingEvent). It ends early, after yielding it, at an ErrorEvent, and silently when the client
    goes away. However it ends (closed by a hung-up stream too), every task is cancelled, so no
    slot keeps working for nobody. Every route that waits for results reads them through here.
    Call it while handling the request: a stream's body is read after the request context ends,
    so the disconnect probe is taken now."""
    watch = DisconnectWatch(disconnect_probe())

    def events():
        try:
            for t in tasks:
                while True:
                    ev = wait_event(t, ctx, watch)
                    if ev is None:
                        return
                    yield t, ev
                    if isinstance(ev, ErrorEvent):
                        return
                    if isinstance(ev, (FinalEvent, EmbeddingEvent)):
                        break
        finally:
            for t in tasks:
                ctx.scheduler.cancel(t)

    return events()


def engine_error(ev: ErrorEvent) -> APIError:
    """A failure inside the engine is the server's: 500, as llama-server reports one."""
    return APIError(ev.message, 500, "server_error")


def collect_finals(ctx, tasks: list[Task]) -> list:
    """Wait for every task's final result (a FinalEvent, or an EmbeddingEvent); a vanished
    client or a failed task cancels them all. Each task is waited for as a whole (its
    events' `ended`), not token by token: nothing here reads the tokens, and each wake of this
    thread would take the GIL and a core from the batcher."""
    watch = DisconnectWatch(disconnect_probe())
    fins: list = []
    try:
        for t in tasks:
            while not t.events.ended.wait(POLL_S):
                if watch.gone():
                    raise APIError("client disconnected", 400)
            ev = t.outcome(timeout=0)   # (all its events are in)
            if isinstance(ev, ErrorEvent):
                raise engine_error(ev)
            fins.append(ev)
    finally:
        for t in tasks:
            ctx.scheduler.cancel(t)
    return fins


def run_blocking(c: Completion) -> Response:
    tasks = c.submit()
    fins = collect_finals(c.ctx, tasks)
    if c.oai:
        return json_response(c.oai_object(tasks, fins))
    objs = [c.select_fields(c.final_object(t, f, streamed=False)) for t, f in zip(tasks, fins)]
    return json_response(objs if c.is_batch else objs[0])


def run_stream(c: Completion) -> Response:
    tasks = c.submit()
    task_evs = task_events(c.ctx, tasks)

    def events():
        finished = 0
        with closing(task_evs):
            for t, ev in task_evs:
                if isinstance(ev, ErrorEvent):
                    yield sse(engine_error(ev).body())
                    return
                if isinstance(ev, ProgressEvent):
                    if not c.oai:
                        chunk = {"index": t.index, "content": "", "tokens": [], "stop": False,
                                 "id_slot": -1, "prompt_progress": ev.as_dict()}
                        if c.timings_per_token:
                            chunk["timings"] = ev.timings()
                        yield sse(chunk)
                elif isinstance(ev, TokenEvent):
                    yield sse(token_chunk(c, t, ev))
                else:   # the FinalEvent
                    if c.oai:
                        chunk = oai_chunk(c, t, "", c.finish_reason(ev))
                        chunk["usage"] = c.usage([ev])
                        chunk["timings"] = c.timings(ev)
                        yield sse(chunk)
                    else:
                        yield sse(c.select_fields(c.final_object(t, ev, streamed=True)))
                    finished += 1
        if c.oai and finished == len(tasks):   # not after a hang-up
            yield "data: [DONE]\n\n"

    return Response(events(), content_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def oai_chunk(c: Completion, t: Task, text: str, finish_reason, logprobs=None) -> dict:
    return {"choices": [{"text": text, "index": t.index, "logprobs": logprobs, "finish_reason": finish_reason}],
            "created": c.created, "model": c.model_name, "system_fingerprint": c.ctx.build_fingerprint,
            "object": "text_completion", "id": c.id}


def token_chunk(c: Completion, t: Task, ev: TokenEvent) -> dict:
    if c.oai:
        lp = {"content": c.probs_items([ev.probs])} if ev.probs else None
        return oai_chunk(c, t, ev.text, None, lp)
    out = {"index": t.index, "content": ev.text, "tokens": [ev.token], "stop": False, "id_slot": -1,
           "tokens_predicted": ev.n_decoded, "tokens_evaluated": ev.n_prompt}
    if ev.probs:
        out["completion_probabilities"] = c.probs_items([ev.probs])
    return out


def handle(oai: bool) -> Response:
    c = Completion(request_json(), oai)
    return run_stream(c) if c.stream else run_blocking(c)


@bp.post("/completion")
@bp.post("/completions")
def completion():
    return handle(oai=False)


@bp.post("/v1/completions")
def v1_completions():
    return handle(oai=True)
