"""Slots and continuous batching: many requests share one model.

A *slot* is one sequence in the KV cache (one row of `KVCache`) plus the state of the request it
serves. One worker thread owns the model. Every step it builds one `Batch` holding

* the last sampled token of every slot that is generating, and
* as many prompt tokens of slots still reading their prompt as the batch budget (`n_batch`)
  allows,

runs one forward pass, and samples the next token of every slot whose logits came back. A
request thread submits a `Task` and reads `Event`s from the task's queue; setting
`task.cancelled` (a client that went away) frees the slot at the next step.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field

import numba
import numpy as np

from .engine import Engine
from .prompt_cache import PromptCache, common_prefix
from .model import Batch
from .ops import FA_TILE_Q, kv_cells, split_kv_chunk
from .pooling import first_or_last_rows, mean_pool, normalize
from .sampling import Sampler, SamplingParams, logprob, token_probabilities
from .slot_file import CacheShape, read_slot_file, write_slot_file
from .tokenizer import utf8_complete_prefix


class SlotBusy(Exception):
    """A slot operation needs an idle slot."""


class QueueFull(Exception):
    """Every slot is busy and the queue of waiting tasks is at its limit."""


class TaskEvents(queue.Queue):
    """A task's events, in order. `ended` is set once its last one (a FinalEvent, an
    EmbeddingEvent or an ErrorEvent) is in: a reader that wants only the result (a request
    that does not stream) waits for that instead of taking each token as it comes, since every
    get that waits is a wake of the reader's thread, which then takes the GIL and a core from
    the batcher (stories260K over HTTP: ~3 wakes a token)."""

    def __init__(self):
        super().__init__()
        self.ended = threading.Event()

    def put(self, item, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        if isinstance(item, LAST_EVENTS):
            self.ended.set()


@dataclass
class Task:
    prompt_tokens: list[int]
    n_predict: int = -1                  # -1: until the context is full
    params: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple = ()                     # stop strings
    n_probs: int = 0
    post_sampling_probs: bool = False
    ignore_eos: bool = False
    cache_prompt: bool = True
    id_slot: int = -1
    t_max_predict_ms: float = -1
    index: int = 0
    return_progress: bool = False        # report prompt processing batch by batch
    n_keep: int = 0                      # context shift: tokens kept at the start (-1: all)
    n_discard: int = 0                   # context shift: tokens dropped (0: half of the rest)
    # what the prompt is evaluated for: "completion" (tokens are generated), "embedding" (its
    # pooled hidden states come back, normalized by embd_normalize: engine.pooling) or "rerank"
    # (its relevance score: the rank pooling's first value)
    kind: str = "completion"
    embd_normalize: int = 2
    # the LoRA adapters applied: ((index into the scheduler's adapters, scale), ...), scales != 0
    lora: tuple = ()
    events: TaskEvents = field(default_factory=TaskEvents)
    cancelled: threading.Event = field(default_factory=threading.Event)
    completion_id: str = ""              # the API's id of the request ("chatcmpl-..."): Scheduler.end_reasoning
    end_reasoning: threading.Event = field(default_factory=threading.Event)   # asked: close the reasoning block
    id: int = 0

    def outcome(self, timeout: float | None = None):
        """Read this task's events up to its last one (a FinalEvent, an EmbeddingEvent or an
        ErrorEvent) and return that; queue.Empty if none comes within `timeout` seconds."""
        while True:
            ev = self.events.get(timeout=timeout)
            if isinstance(ev, LAST_EVENTS):
                return ev

    @property
    def batch_key(self) -> tuple:
        """Tasks batch together only when these are equal: what they are evaluated for, and with
        which LoRA adapters."""
        return self.kind, self.lora

    @property
    def needs_hidden(self) -> bool:
        """Evaluated for its hidden states (an embedding or a rerank), not for logits."""
        return self.kind != "completion"


@dataclass
class TokenEvent:
    token: int
    text: str                 # text that may now be sent (may be "" while a stop string is pending)
    probs: dict | None        # {"id", "value", "top": [(id, value), ...]} when n_probs > 0
    n_decoded: int
    n_prompt: int
    n_cached: int = 0         # of the prompt's tokens, how many came from the slot's cache


@dataclass
class ProgressEvent:
    """Prompt processing so far: tokens in the prompt, reused from the cache, processed
    (the cached ones count as processed), and milliseconds since the slot started."""
    total: int
    cache: int
    processed: int
    time_ms: float

    def as_dict(self) -> dict:
        return {"total": self.total, "cache": self.cache, "processed": self.processed,
                "time_ms": self.time_ms}

    def timings(self) -> dict:
        """Timings so far (nothing generated yet): the first update, before any batch, is 0."""
        n = self.processed - self.cache
        return {"cache_n": self.cache, "prompt_n": n, "prompt_ms": self.time_ms if n else 0.0,
                "prompt_per_token_ms": self.time_ms / n if n else 0.0,
                "prompt_per_second": n / (self.time_ms / 1000) if n and self.time_ms > 0 else 0.0,
                "predicted_n": 0, "predicted_ms": 0.0, "predicted_per_token_ms": 0.0,
                "predicted_per_second": 0.0}


@dataclass
class FinalEvent:
    content: str
    tokens: list[int]
    stop_type: str            # "eos" | "limit" | "word"
    stopping_word: str
    truncated: bool
    has_new_line: bool
    n_prompt: int             # prompt tokens in total
    n_prompt_processed: int   # prompt tokens evaluated (not reused from the cache)
    n_cached: int             # prompt tokens reused from the slot's cache
    n_decoded: int
    tokens_cached: int        # tokens in the slot's KV after the request
    prompt_ms: float
    predicted_ms: float
    probs: list               # per generated token, as TokenEvent.probs
    id_slot: int
    seed: int
    n_draft: int = 0          # speculative decoding: tokens a draft model proposed ...
    n_draft_accepted: int = 0  # ... and those the target model sampled too


@dataclass
class EmbeddingEvent:
    """An embedding or rerank task's result: one vector per token (pooling "none") or one in
    all, and how many prompt tokens were evaluated."""
    vectors: list             # [n_embd] f32 each ([n_cls_out] for a reranker's head)
    n_prompt: int

    @property
    def score(self) -> float:
        """A rerank task's relevance score (llama-server's send_rerank: the first value)."""
        return float(self.vectors[0][0])


@dataclass
class ErrorEvent:
    """The request failed inside the engine (a failed batch step, a failed draw) and has ended;
    the others go on. How to tell the client (an HTTP status) is the webapp's business."""
    message: str


LAST_EVENTS = (FinalEvent, EmbeddingEvent, ErrorEvent)   # a task's events end with one of these


@dataclass(eq=False)
class Slot:
    """One sequence of the KV cache and the request it serves. Between requests it keeps its
    cached tokens (a later prompt may share their prefix) and what /slots tells of its last task."""
    id: int
    n_ctx: int
    cache_tokens: list[int] = field(default_factory=list)   # tokens whose K/V are in this slot's row
    # where llama-server would have checkpointed this slot's sliding-window cache: (n_tokens,
    # pos_min, pos_max) each (sliding-window models only; see Checkpoints)
    checkpoints: list[tuple] = field(default_factory=list)
    # the sliding-window cache holds nothing before this position, whatever its ring would
    # (a state restored from a file keeps only the window's cells, as llama-server's does)
    swa_pos_min: int = 0
    lora: tuple = ()                     # the LoRA adapters (Task.lora) cache_tokens were computed with
    last_used: float = 0.0
    last_task_id: int | None = None
    last_prompt: list[int] = field(default_factory=list)
    last_generated: str = ""
    params: SamplingParams | None = None
    # the request being served; `start` sets all of these
    task: Task | None = None
    sampler: Sampler | None = None
    n_cached: int = 0                    # prompt tokens reused from cache_tokens
    to_eval: list[int] = field(default_factory=list)   # prompt tokens not yet evaluated
    prompt_pass: bool = False            # see Batch.prompt_pass
    generated: list[int] = field(default_factory=list)
    pending_bytes: bytes = b""           # the start of a character whose other bytes are to come
    unsent_bytes: bytes = b""            # bytes turned into text since the last token was sent
    text: str = ""                       # generated text so far
    n_sent: int = 0                      # characters of text already sent
    probs: list = field(default_factory=list)   # per generated token: its n_probs entry or None
    next_token: int | None = None        # sampled, to be evaluated in the next batch
    t_start: float = 0.0
    t_prompt_done: float | None = None
    has_new_line: bool = False
    truncated: bool = False              # a context shift dropped tokens
    n_draft: int = 0                     # speculative decoding: draft tokens proposed, accepted
    n_draft_accepted: int = 0

    @property
    def busy(self) -> bool:
        return self.task is not None

    def report_progress(self) -> None:
        total = len(self.task.prompt_tokens)
        self.task.events.put(ProgressEvent(total, self.n_cached, total - len(self.to_eval),
                                           (time.perf_counter() - self.t_start) * 1000))

    def start(self, task: Task, engine: Engine, checkpoints: "Checkpoints | None" = None) -> None:
        self.task = task
        self.params = task.params
        prompt = task.prompt_tokens
        if task.lora != self.lora:   # K/V computed with other adapters are no use to this task
            self.cache_tokens, self.checkpoints, self.lora = [], [], task.lora
        # an embedding is evaluated from its first token (llama-server's stateless tasks)
        n_past = common_prefix(self.cache_tokens, prompt) if task.cache_prompt and not task.needs_hidden else 0
        if checkpoints is not None:   # a sliding-window model: what llama-server can reuse
            n_past = checkpoints.reusable(self, n_past, len(prompt))
        n_past = min(n_past, len(prompt) - 1)  # at least one token is evaluated, for its logits
        self.cache_tokens = self.cache_tokens[:n_past]
        if n_past == 0:
            self.swa_pos_min = 0
        self.n_cached = n_past
        self.to_eval = list(prompt[n_past:])
        # how llama.cpp would see this prompt: one pass of >= 2 tokens, or a single token
        # (kernel order follows it; see Batch.prompt_pass), whatever chunks we cut it into
        self.prompt_pass = len(self.to_eval) >= 2
        self.sampler = None if task.needs_hidden else Sampler(
            task.params, engine.tokenizer.n_vocab, prompt, token_text=engine.tokenizer.token_text,
            eog_ids=engine.tokenizer.eog_ids, token_piece=engine.tokenizer.token_bytes)
        if task.ignore_eos and self.sampler is not None:
            self.sampler.bias[list(engine.tokenizer.eog_ids)] = -np.inf
        self.generated = []
        self.pending_bytes = b""
        self.unsent_bytes = b""
        self.text = ""
        self.n_sent = 0
        self.probs = []
        self.next_token = None
        self.t_start = time.perf_counter()
        self.t_prompt_done = None
        self.last_prompt = list(prompt)
        self.last_task_id = task.id
        self.has_new_line = False
        self.truncated = False
        self.n_draft = self.n_draft_accepted = 0

    def view(self) -> "SlotView":
        busy = self.busy
        return SlotView(self.id, self.n_ctx, busy, self.last_task_id, tuple(self.last_prompt),
                        self.n_cached, self.params, busy and self.has_new_line,
                        len(self.generated) if busy else 0, self.last_generated)


@dataclass(frozen=True)
class SlotView:
    """What the HTTP side may see of a slot (/slots), copied at one moment."""
    id: int
    n_ctx: int
    busy: bool
    last_task_id: int | None
    last_prompt: tuple
    n_cached: int
    params: SamplingParams | None
    has_new_line: bool
    n_decoded: int             # of the running task (an idle slot carries none of its last)
    last_generated: str


@dataclass
class SchedulerMetrics:
    """llama-server's counters (/metrics), kept by the worker."""
    n_decode_total: int = 0
    n_busy_slots_total: int = 0
    n_tokens_max: int = 0
    prompt_tokens_total: int = 0
    prompt_tokens_cached_total: int = 0
    tokens_predicted_total: int = 0
    prompt_seconds_total: float = 0.0
    tokens_predicted_seconds_total: float = 0.0


@dataclass(frozen=True)
class SchedulerView:
    """A read-only copy of the scheduler's state for the HTTP side (/slots, /metrics)."""
    slots: tuple
    n_waiting: int
    metrics: SchedulerMetrics
    prompt_cache_bytes: int
    prompt_cache_states: int
    prompt_cache_hits: int

    @property
    def n_busy(self) -> int:
        return sum(s.busy for s in self.slots)


CHECKPOINT_TAIL = 4   # prompt tokens llama-server evaluates last, alone, for a checkpoint before them


@dataclass(frozen=True)
class Checkpoints:
    """llama-server's context checkpoints, for models with sliding-window layers: its small
    sliding-window cache cannot go back to an earlier position, so while it reads a prompt it
    saves that cache just before the last batches (record), and a later request that shares the
    prefix resumes from the last such checkpoint, or from scratch (reusable), not from the end
    of the shared prefix (server-context.cpp). numllama's cache can go back anywhere; it follows
    the same rule because the batches a prompt is read in decide the kernels' summation order.
    The sliding-window cache holds swa_cache_size cells, reused as a ring (positions before
    n - swa_cache_size are gone)."""
    n_swa: int
    swa_cache_size: int
    n_ubatch: int
    n_batch: int
    max_checkpoints: int = 32   # llama-server's --ctx-checkpoints

    def cut(self, n_left: int, n: int) -> int:
        """Of a prompt's n_left tokens, n would fit in this batch: llama-server stops filling its
        batch when exactly CHECKPOINT_TAIL + n_ubatch or CHECKPOINT_TAIL prompt tokens remain,
        to checkpoint there (server-context.cpp, checkpoint_offsets; llama.cpp PR 20288)."""
        for tail in (CHECKPOINT_TAIL + self.n_ubatch, CHECKPOINT_TAIL):
            n_last = min(self.n_batch, tail)
            if n_left - n < n_last < n_left:
                return n_left - n_last
        return n

    def pos_min(self, n_cells: int, floor: int = 0) -> int:
        """The oldest position the sliding-window cache still holds, -1 when it is empty
        (floor: Slot.swa_pos_min)."""
        return max(0, n_cells - self.swa_cache_size, floor) if n_cells else -1

    def record(self, slot: "Slot", n_left_after: int) -> None:
        """Before a prompt chunk is evaluated: the checkpoint llama-server makes there, if any (a
        chunk near the prompt's end, once the cache holds something)."""
        n = len(slot.cache_tokens)
        if not n or n_left_after >= self.n_ubatch:
            return
        slot.checkpoints = [c for c in slot.checkpoints if c[0] != n][-(self.max_checkpoints - 1):]
        slot.checkpoints.append((n, self.pos_min(n, slot.swa_pos_min), n - 1))

    def reusable(self, slot: "Slot", n_past: int, n_prompt: int) -> int:
        """How much of a shared prefix of n_past tokens llama-server can reuse (the checkpoints
        after that point are forgotten)."""
        pos_next = n_past
        if n_past > 0:
            threshold = max(0, pos_next - self.n_swa - (0 if n_past < n_prompt else 1))
            if self.pos_min(len(slot.cache_tokens), slot.swa_pos_min) >= threshold:   # the window it needs is gone
                usable = [c for c in slot.checkpoints if c[2] <= pos_next and (c[1] < threshold or c[1] == 0)]
                if usable:
                    n_tokens, c_min, c_max = usable[-1]
                    pos_next = min(pos_next, max(c_min + 1, c_max))
                    n_past = min(pos_next, n_tokens)
                else:
                    pos_next = n_past = 0
        slot.checkpoints = [c for c in slot.checkpoints if c[2] <= pos_next]
        return n_past




def tiled_attention_rows(n_tokens: int, n_ubatch: int) -> np.ndarray:
    """[n_tokens] bool: the tokens whose ubatch (llama.cpp cuts a batch into ubatches of
    n_ubatch tokens, in order) is big enough for ggml's tiled flash attention."""
    sizes = np.minimum(n_ubatch, n_tokens - np.arange(0, n_tokens, n_ubatch))
    return np.repeat(sizes >= FA_TILE_Q, sizes)


class Scheduler:
    SAVE_BELOW_KEEP = np.float32(0.5)   # llama-server: a reused slot about to lose more than half its state saves it first

    def __init__(self, engine: Engine, n_slots: int, n_ctx_slot: int, n_batch: int = 512,
                 n_predict_default: int = -1, context_shift: bool = False, cache_ram_mib: float = 0,
                 cache_idle_slots: bool = True, kv_unified: bool = False, max_waiting: int | None = None,
                 slot_prompt_similarity: float = 0.1, n_ubatch: int = 512, n_threads: int = 1,
                 metrics: "SchedulerMetrics | None" = None, pooling: str = "none", drafter=None,
                 loras: tuple = (), special: bool = False):
        """max_waiting: tasks that may wait for a slot (None: no limit); submit refuses more.
        cache_ram_mib: budget of the host-RAM prompt cache (0: none, < 0: unlimited).
        cache_idle_slots: also keep idle slots' states there when a task starts (and, with a
        unified KV pool, clear them), as llama-server does.
        slot_prompt_similarity: llama-server's -sps; a slot whose cached tokens cover more than
        this share of a prompt serves it (0: the least recently used slot always does).
        metrics: the counters to go on from (a scheduler that replaces a closed one).
        pooling: how embedding and rerank tasks pool their hidden states (engine.pooling).
        drafter: a speculative.Drafter whose guesses the generating slots verify (None: none).
        loras: the lora.LoraAdapters loaded, which tasks apply by index (Task.lora).
        special: control tokens are written into the output as their text (llama-server's -sp)."""
        self.similarity = np.float32(slot_prompt_similarity)
        self.engine = engine
        self.context_shift = context_shift
        self.log = logging.getLogger("numllama.slots")
        # llama-server's token budget for the cache: the server's whole context
        n_ctx_total = n_ctx_slot if kv_unified else n_ctx_slot * n_slots
        self.prompt_cache = PromptCache(cache_ram_mib, n_ctx_total) if cache_ram_mib != 0 else None
        self.cache_idle_slots = cache_idle_slots and self.prompt_cache is not None
        self.kv_unified = kv_unified
        if self.cache_idle_slots:
            self.log.debug("idle slots will be saved to the prompt cache upon starting a new task "
                           "__TEST_TAG_CACHE_IDLE_SLOTS_ENABLED__")
        self.n_batch = max(1, n_batch)
        self.n_ubatch = max(1, n_ubatch)
        # llama.cpp's thread count splits a lone decode token's attention (ops.split_kv_chunk);
        # its cache holds the context rounded up to KV_PAD cells
        self.n_threads = max(1, n_threads)
        self.kv_size = kv_cells(n_ctx_slot)
        # llama-server evaluates the last few tokens of a prompt in batches of their own where it
        # makes context checkpoints (models with sliding-window layers): cut our chunks there too,
        # since the batch a token is evaluated in decides its summation order
        hp = engine.model.hp
        # its sliding-window cache: the window of every sequence it holds plus a ubatch, at most
        # the whole cache, in KV_PAD cells (llama_kv_cache_iswa)
        swa_cells = kv_cells(min(self.kv_size, hp.n_swa * (n_slots if kv_unified else 1) + n_ubatch))
        self.checkpoints = Checkpoints(hp.n_swa, swa_cells, n_ubatch, self.n_batch) if hp.n_swa > 0 else None
        self.max_waiting = max_waiting
        self.pooling = pooling
        self.drafter = drafter
        self._steps = 0                                   # batches run, and when each batch key
        self._last_served: dict[tuple, int] = {}          # was last served (_next_key)
        self.loras = tuple(loras)
        self.special = special
        self.n_predict_default = n_predict_default
        self.slots = [Slot(i, n_ctx_slot) for i in range(n_slots)]
        self.cache = engine.model.new_cache(n_slots, n_ctx_slot)
        self.waiting: list[Task] = []
        self.lock = threading.Condition()
        self._next_id = 0
        self.metrics = metrics if metrics is not None else SchedulerMetrics()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="numllama-batcher", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- request side
    def submit(self, task: Task) -> Task:
        return self.submit_all([task])[0]

    def submit_all(self, tasks: list[Task]) -> list[Task]:
        """Queue tasks together, or none of them (QueueFull) when the tasks that would have to
        wait for a slot exceed max_waiting."""
        for task in tasks:
            if task.needs_hidden and not self.can_split_hidden and len(task.prompt_tokens) > self.n_batch:
                raise ValueError(f"input ({len(task.prompt_tokens)} tokens) is too large to process. increase "
                                 f"the physical batch size (current batch size: {self.n_batch})")
        with self.lock:
            if self.max_waiting is not None:
                n_idle = sum(not s.busy for s in self.slots)
                n_queued = self._n_waiting()
                if n_queued + len(tasks) - n_idle > self.max_waiting:
                    raise QueueFull(f"all {len(self.slots)} slots are busy and {n_queued} tasks are "
                                    f"waiting (the limit is {self.max_waiting})")
            for task in tasks:
                self._next_id += 1
                task.id = self._next_id
                self.waiting.append(task)
            self.lock.notify_all()
        return tasks

    @property
    def can_split_hidden(self) -> bool:
        """Whether an embedding's prompt may span batches: only when one token's row is pooled
        (the last one, for last pooling and a causal model's rank pooling) and the model is
        causal (an encoder sees the whole prompt at once); otherwise it is evaluated in one
        batch, as llama-server's can_split decides."""
        return self.pooling in ("last", "rank") and self.engine.model.hp.causal

    def capacity(self) -> int | None:
        """Tasks the scheduler can hold at once (running and waiting); None: no limit."""
        return None if self.max_waiting is None else self.n_slots + self.max_waiting

    def cancel(self, task: Task) -> None:
        task.cancelled.set()
        with self.lock:
            self.lock.notify_all()

    def close(self) -> None:
        """Stop the worker once it is idle and let go of the KV cache and slots (the server's
        sleep); a closed scheduler takes no more tasks."""
        with self.lock:
            self._closed = True
            self.lock.notify_all()
        self._thread.join()
        self.cache = None
        self.slots = []
        self.prompt_cache = None

    @property
    def n_slots(self) -> int:
        return len(self.slots)

    def _n_waiting(self) -> int:
        """Tasks queued for a slot and not cancelled (call under the lock)."""
        return sum(not t.cancelled.is_set() for t in self.waiting)

    def view(self) -> SchedulerView:
        """A consistent copy of what the HTTP side may show (taken under the lock, so no task
        starts or is queued meanwhile)."""
        with self.lock:
            cache = self.prompt_cache
            return SchedulerView(
                slots=tuple(s.view() for s in self.slots),
                n_waiting=self._n_waiting(),
                metrics=dataclasses.replace(self.metrics),
                prompt_cache_bytes=cache.n_bytes if cache else 0,
                prompt_cache_states=len(cache.entries) if cache else 0,
                prompt_cache_hits=cache.hits if cache else 0)

    # ---------------------------------------------------------------- slot state files
    def end_reasoning(self, completion_id: str) -> str | None:
        """llama-server's control action reasoning_end on the request with this completion id,
        in a slot now: its reasoning block, if the model is in one, is closed before its next
        token (the budget message and end tag are forced, as when a budget is spent). None when
        asked, else why not (llama-server's words)."""
        with self.lock:
            slot = next((s for s in self.slots if s.busy and completion_id and s.task.completion_id == completion_id),
                        None)
            if slot is None:
                return "no active completion for this id"
            if not slot.task.params.reasoning_control:
                return "reasoning control not enabled for this completion"
            slot.task.end_reasoning.set()
            return None

    def _idle_slot(self, slot_id: int) -> Slot:
        slot = self.slots[slot_id]
        if slot.busy:
            raise SlotBusy(f"slot {slot_id} is processing a request")
        return slot

    def save_slot(self, slot_id: int, path: str) -> tuple[int, int]:
        """Write an idle slot's cached tokens and their K/V cells to `path` (engine.slot_file).
        Returns (tokens saved, bytes written)."""
        with self.lock:   # the worker only starts a slot under this lock: it stays idle
            slot = self._idle_slot(slot_id)
            n = len(slot.cache_tokens)
            k, v = self.cache.cells(slot_id, n)
            with open(path, "wb") as f:
                write_slot_file(f, slot.cache_tokens, k, v, self._cache_shape(slot_id))
            return n, os.path.getsize(path)

    def _cache_shape(self, slot_id: int) -> CacheShape:
        """What a slot file says of the cache: llama-server's layout for the same options (one
        KV stream per slot, or one for a unified cache; the sliding-window layers apart)."""
        hp = self.engine.model.hp
        return CacheShape(hp.n_layer, hp.n_head_kv, hp.head_dim,
                          swa_layers=tuple(il for il in range(hp.n_layer) if hp.layer_window(il) > 0),
                          n_swa=hp.n_swa, n_stream=1 if self.kv_unified else len(self.slots),
                          stream=0 if self.kv_unified else slot_id, seq_id=slot_id)

    def restore_slot(self, slot_id: int, path: str) -> tuple[int, int]:
        """Load a state file into an idle slot: its prompt cache becomes the saved tokens."""
        shape = self._cache_shape(slot_id)
        with open(path, "rb") as f:
            tokens, k, v = read_slot_file(f.read(), shape)
        n = len(tokens)
        with self.lock:
            slot = self._idle_slot(slot_id)
            if n > slot.n_ctx:
                raise ValueError(f"the state holds {n} tokens, more than the slot's context ({slot.n_ctx})")
            self.cache.put_cells(slot_id, k, v)
            slot.cache_tokens = list(tokens)
            slot.checkpoints = []   # (llama-server's slot->prompt.clear())
            slot.swa_pos_min = max(0, n - shape.n_swa) if shape.swa_layers else 0
        return n, os.path.getsize(path)

    def erase_slot(self, slot_id: int) -> int:
        with self.lock:
            slot = self._idle_slot(slot_id)
            n = len(slot.cache_tokens)
            slot.cache_tokens = []
            return n

    # ---------------------------------------------------------------- worker side
    def _assign(self) -> None:
        """Give waiting tasks to idle slots (_choose_slot). A slot whose state is about to go
        saves it to the RAM prompt cache, and the best cached state for the prompt comes back."""
        still = []
        for task in self.waiting:
            if task.cancelled.is_set():
                continue
            idle = [s for s in self.slots if not s.busy]
            if task.id_slot >= 0:
                idle = [s for s in idle if s.id == task.id_slot]
            if not idle:
                still.append(task)
                continue
            slot, update_cache = self._choose_slot(task, idle)
            if update_cache and self.prompt_cache is not None:
                self.log.debug("updating prompt cache")
                self._save_to_ram(slot)
                self._load_from_ram(slot, task.prompt_tokens)
                self.prompt_cache.update()
            try:
                slot.start(task, self.engine, self.checkpoints)
            except Exception as e:  # a request that cannot start (its sampler refused) ends alone
                self.log.warning("slot %d: start failed: %s: %s", slot.id, type(e).__name__, e)
                task.events.put(ErrorEvent(f"{type(e).__name__}: {e}"))
                self._release(slot)
                continue
            if task.return_progress:
                slot.report_progress()
            if self.cache_idle_slots:
                for other in self.slots:
                    if other.busy:
                        continue
                    if self._save_to_ram(other):
                        self.log.debug("slot %d saved to the prompt cache __TEST_TAG_CACHE_IDLE_SLOT__", other.id)
                        self.prompt_cache.update()
                    if self.kv_unified:
                        other.cache_tokens = []
        self.waiting = still

    def _choose_slot(self, task: Task, idle: list[Slot]) -> tuple[Slot, bool]:
        """llama-server's get_available_slot, step for step (the slot ids it reports depend on
        it): the slot asked for (id_slot; `idle` holds only it then), or the idle slot whose
        cached tokens cover the largest share of the prompt above `similarity` (the first on
        ties), else the least recently used one (the last on ties). Returns the slot and whether
        its state goes to the RAM prompt cache first: always after an LRU pick, and after a
        reuse that keeps less than half of it. Whether the task uses the cache (cache_prompt)
        plays no part, as in llama-server."""
        n_prompt = np.float32(max(len(task.prompt_tokens), 1))
        chosen = idle[0] if task.id_slot >= 0 else None
        if self.similarity != 0:
            f_sim_best = np.float32(0)
            for s in idle:
                if not s.cache_tokens:
                    continue
                f_sim = np.float32(common_prefix(s.cache_tokens, task.prompt_tokens)) / n_prompt
                if f_sim > f_sim_best and f_sim > self.similarity:
                    f_sim_best, chosen = f_sim, s
            if chosen is not None:
                if not chosen.cache_tokens:   # llama-server's f_keep is 0/0 then: no reason to save
                    return chosen, False
                f_keep = f_sim_best * n_prompt / np.float32(len(chosen.cache_tokens))
                return chosen, bool(f_keep < self.SAVE_BELOW_KEEP)
        if chosen is not None:   # asked for by id, similarity off: llama-server saves nothing
            return chosen, False
        t_last = 0.0
        for s in idle:
            if chosen is None or s.last_used <= t_last:
                chosen, t_last = s, s.last_used
        return chosen, True

    def _save_to_ram(self, slot: Slot) -> bool:
        n = len(slot.cache_tokens)
        if not n or self.prompt_cache.holds(slot.cache_tokens):   # kept already: no copy to make
            return False
        return self.prompt_cache.save(slot.cache_tokens, *self.cache.cells(slot.id, n), extra=tuple(slot.checkpoints))

    def _load_from_ram(self, slot: Slot, prompt: list[int]) -> None:
        """Resume from a cached state if one beats what the slot holds (it moves into the slot)."""
        found = self.prompt_cache.load(slot.cache_tokens, prompt)
        if found is None:
            return
        key, k, v, checkpoints = found
        n = min(len(key), slot.n_ctx)
        self.cache.put_cells(slot.id, k[:, :, :n], v[:, :, :n])
        slot.cache_tokens = list(key[:n])
        slot.checkpoints = list(checkpoints)
        self.log.debug("slot %d: %d tokens restored from the prompt cache", slot.id, n)

    def _run(self) -> None:
        # Numba's thread count belongs to the thread that sets it: the batcher's kernels run with
        # the server's -t (Engine.load set it in the thread that loaded the model, not here)
        numba.set_num_threads(min(self.n_threads, numba.config.NUMBA_NUM_THREADS))
        self.compute_threads = numba.get_num_threads()
        while True:
            with self.lock:
                while True:
                    self._assign()
                    for s in self.slots:
                        if s.busy and s.task.cancelled.is_set():
                            self._release(s)
                    if any(s.busy for s in self.slots):
                        break
                    if self._closed and not self.waiting:
                        return
                    self.lock.wait()
            try:
                self._step()
            except Exception as e:  # a failed step fails its requests, never the server
                for s in self.slots:
                    if s.busy:
                        s.task.events.put(ErrorEvent(f"{type(e).__name__}: {e}"))
                        self._release(s)

    def _release(self, slot: Slot) -> None:
        slot.task = None
        slot.last_used = time.time()

    def _step(self) -> None:
        tokens, positions, seq_ids, want, prompt_pass, owners = [], [], [], [], [], []
        budget = self.n_batch
        active = [s for s in self.slots if s.busy]
        # what the batch is for (Task.batch_key: its kind and LoRA adapters): only tasks with
        # the same key share a batch (llama-server's can_batch_with); embeddings and reranks are
        # evaluated for their hidden states, completions for logits
        key = self._next_key(active)
        if key is None:
            return
        kind, lora = key
        hidden = kind != "completion"
        drafts: dict[int, list[int]] = {}   # slot id -> the draft tokens it verifies in this batch
        for s in active:  # generating slots first: one token each, and its draft's guesses
            if s.next_token is not None and not s.to_eval:
                if s.task.batch_key != key:
                    continue
                drafts[s.id] = draft = self._draft(s)
                run = [s.next_token, *draft]
                tokens += run
                positions += range(len(s.cache_tokens), len(s.cache_tokens) + len(run))
                seq_ids += [s.id] * len(run)
                want += [True] * len(run)
                prompt_pass += [False] * len(run)   # verified rows: a lone decode step's order
                owners.append((s, [s.next_token], True))
                budget -= 1   # (draft tokens do not take from the prompts' share: their chunks stay the same)
        for s in active:  # then prompt chunks, as far as the batch allows
            if not s.to_eval or budget <= 0 or s.task.batch_key != key:
                continue
            if hidden and not self.can_split_hidden and len(s.to_eval) > budget:
                continue   # pooled over its whole prompt: it waits for a batch with room for all of it
            chunk = s.to_eval[:self._chunk_length(len(s.to_eval), budget)]
            if self.checkpoints is not None:
                self.checkpoints.record(s, len(s.to_eval) - len(chunk))
            last = len(chunk) == len(s.to_eval)
            start = len(s.cache_tokens)
            tokens += chunk
            positions += range(start, start + len(chunk))
            seq_ids += [s.id] * len(chunk)
            # an embedding's every token is an output (its row may be pooled)
            want += [hidden] * (len(chunk) - 1) + [last or hidden]
            prompt_pass += [s.prompt_pass] * len(chunk)
            owners.append((s, chunk, last))
            budget -= len(chunk)
        if not tokens:
            return
        self._steps += 1
        self._last_served[key] = self._steps
        loras = tuple((self.loras[i], scale) for i, scale in lora)
        tiled, kv_chunk = self._attention_paths(positions, drafts)
        batch = Batch(np.array(tokens, np.int32), np.array(positions, np.int32),
                      np.array(seq_ids, np.int32), np.array(want, bool), np.array(prompt_pass, bool),
                      attn_tiled=tiled, attn_kv_chunk=kv_chunk)
        out = self.engine.model.forward(batch, self.cache, hidden=hidden, loras=loras)   # [n_wanted, n_vocab or n_embd]
        pooled = self._pool(batch, out) if hidden else None
        m = self.metrics
        m.n_decode_total += 1
        m.n_busy_slots_total += len(active)
        m.n_tokens_max = max(m.n_tokens_max, len(tokens))
        row = 0
        for s, chunk, has_logits in owners:
            s.cache_tokens += chunk
            if s.to_eval:
                s.to_eval = s.to_eval[len(chunk):]
                if s.task.return_progress:
                    s.report_progress()
            elif s.task.return_progress and s.next_token is None:
                s.report_progress()
            if has_logits and hidden:
                try:
                    self._send_embedding(s, batch, out, pooled)
                except Exception as e:  # this request's failure ends this request, no other
                    self.log.warning("slot %d: embedding failed: %s: %s", s.id, type(e).__name__, e)
                    s.task.events.put(ErrorEvent(f"embedding failed: {type(e).__name__}: {e}"))
                    self._release(s)
            elif has_logits:
                if s.t_prompt_done is None:
                    s.t_prompt_done = time.perf_counter()
                draft = drafts.get(s.id, [])
                try:
                    self._verify(s, out[row:row + 1 + len(draft)], draft)
                except Exception as e:  # this request's failure ends this request, no other
                    self.log.warning("slot %d: sampling failed: %s: %s", s.id, type(e).__name__, e)
                    s.task.events.put(ErrorEvent(f"sampling failed: {type(e).__name__}: {e}"))
                    s.next_token = None
                    self._release(s)
                row += 1 + len(draft)

    def _next_key(self, active: list[Slot]) -> tuple:
        """The batch key this step serves. With one kind of task running (the usual case) it is
        theirs, as in llama-server, where the first slot's key decides; with several, the one
        served longest ago, so that no kind waits for another to finish (llama-server would let a
        long generation hold every embedding back until its end)."""
        keys = list(dict.fromkeys(s.task.batch_key for s in active))
        return min(keys, key=lambda k: self._last_served.get(k, 0)) if keys else None

    def _draft(self, s: Slot) -> list[int]:
        """The draft model's guesses to follow a generating slot's next token: as many as its
        context and n_predict leave room for (llama-server's bounds), none without a drafter."""
        if self.drafter is None:   # (only completions generate: no other kind asks)
            return []
        n_max = s.n_ctx - len(s.cache_tokens) - 2
        if s.task.n_predict is not None and s.task.n_predict >= 0:
            n_max = min(n_max, max(s.task.n_predict, 1) - len(s.generated) - 1)
        return self.drafter.draft(s.id, s.cache_tokens + [s.next_token], n_max) if n_max > 0 else []

    def _attention_paths(self, positions: list[int], drafts: dict) -> tuple[np.ndarray, np.ndarray]:
        """Which tokens take ggml's tiled attention (their ubatch has >= FA_TILE_Q tokens) and,
        for a lone decode token, how ggml splits its cells among threads. Draft tokens are
        verified as if each were its slot's lone decode step: they take the path of the batch
        without them, so their rows are those decoding without a draft computes."""
        n = len(positions)
        is_draft = np.zeros(n, bool)
        at = 0
        for draft in drafts.values():   # (each run: the slot's decode token, then its draft)
            is_draft[at + 1:at + 1 + len(draft)] = True
            at += 1 + len(draft)
        n_plain = n - int(is_draft.sum())
        tiled = np.empty(n, bool)
        tiled[~is_draft] = tiled_attention_rows(n_plain, self.n_ubatch)
        for t in np.nonzero(is_draft)[0]:
            tiled[t] = tiled[t - 1]
        kv_chunk = np.zeros(n, np.int32)
        if n_plain == 1:   # one slot decoding alone: ggml splits its cells among threads
            kv_chunk[:] = [split_kv_chunk(p, self.kv_size, self.n_threads) for p in positions]
        return tiled, kv_chunk

    def _verify(self, s: Slot, rows: np.ndarray, draft: list[int]) -> None:
        """Sample the slot's tokens from its verified rows (rows[i]: the logits after its next
        token and draft[:i]), in order, while each sample equals the draft's guess: a guess
        the target also drew is kept (its K/V are in the cache already), and the first sample
        that differs becomes the next token to evaluate. Without a draft: one plain sample."""
        s.n_draft += len(draft)
        for i, logits in enumerate(rows):
            self._sample(s, logits)
            if s.task is None or i == len(draft) or s.next_token != draft[i]:
                return
            s.cache_tokens.append(draft[i])
            s.n_draft_accepted += 1

    def _pool(self, batch: Batch, hidden: np.ndarray) -> dict:
        """Every sequence of an embedding batch pooled (none: nothing to pool), as llama.cpp
        pools a ubatch: all its sequences in one product. hidden: [T, n_embd] (every row is an
        output). Returns {seq_id: [n_embd] f32, or [n_cls_out] through a reranker's head}."""
        if self.pooling == "none":
            return {}
        seqs = list(dict.fromkeys(batch.seq_ids.tolist()))
        if self.pooling == "mean":
            rows = mean_pool(hidden, batch.seq_ids, seqs)                       # [n_seqs, n_embd]
        else:   # cls (and an encoder's rank): the first token's row; last (a decoder's rank): the last's
            last = self.pooling == "last" or (self.pooling == "rank" and self.engine.model.hp.causal)
            picked = first_or_last_rows(batch.positions, batch.seq_ids, seqs, last=last)
            rows = hidden[picked]
        if self.pooling == "rank":
            rows = self.engine.model.classify(rows)                              # [n_seqs, n_cls_out]
        return dict(zip(seqs, rows))

    def _send_embedding(self, s: Slot, batch: Batch, hidden: np.ndarray, pooled: dict) -> None:
        """An embedding or rerank task whose prompt is evaluated: its result, and the slot is free
        (llama-server's send_embedding and send_rerank). Pooled vectors of an embedding are
        normalized; a rerank's score and pooling none's rows are left as they are."""
        task = s.task
        if self.pooling == "none":
            vectors = list(hidden[batch.seq_ids == s.id])
        elif task.kind == "embedding":
            vectors = [normalize(pooled[s.id], task.embd_normalize)]
        else:
            vectors = [pooled[s.id]]
        task.events.put(EmbeddingEvent(vectors, len(task.prompt_tokens)))
        self._release(s)

    def _chunk_length(self, n_left: int, budget: int) -> int:
        """How many of a prompt's n_left tokens go into this batch: as many as the budget allows,
        but for a sliding-window model no further than llama-server's chunk (Checkpoints.cut)."""
        n = min(n_left, budget)
        return self.checkpoints.cut(n_left, n) if self.checkpoints is not None else n

    def _sample(self, s: Slot, logits: np.ndarray) -> None:
        """A slot's next token: draw it, extend the text, decide whether the request stops, send
        what may be sent, and finish the request if it stopped. A token after which the text
        ends inside a character is, as in llama-server, neither sent nor reported (n_probs), and
        no stop string is looked for until the character is complete."""
        task = s.task
        if task.end_reasoning.is_set():   # (asked from another thread: applied between tokens)
            task.end_reasoning.clear()
            if s.sampler.budget is not None:
                s.sampler.budget.force()
        token = s.sampler.sample(logits)
        s.sampler.accept(token)
        s.generated.append(token)
        is_eog = token in self.engine.tokenizer.eog_ids and not task.ignore_eos
        if not is_eog:
            self._append_text(s, token)
        complete = not s.pending_bytes
        probs = self._probs(s, logits, token) if task.n_probs > 0 and complete else None
        if probs is not None:   # the bytes this token sends (with earlier tokens' held-back bytes)
            probs["sent"] = s.unsent_bytes
        s.probs.append(probs)   # aligned with s.generated; None: not reported
        stop_type, stopping_word, truncated, send_upto = None, "", False, len(s.text)
        if is_eog:
            stop_type = "eos"
        elif complete:
            stop_type, stopping_word, send_upto = self._match_stop(s)
        shown_upto = send_upto   # (what llama-server's text_to_send holds, the last token's too)
        if stop_type is None:
            stop_type, truncated = self._limit(s)
        if stop_type not in (None, "word"):   # it ends here: no stop string can complete now
            send_upto = len(s.text)
        if complete:
            if probs is not None:
                shown = s.text[s.n_sent:shown_upto] if shown_upto > s.n_sent else ""
                if shown != s.unsent_bytes.decode("utf-8", "replace"):
                    # text held back for a stop string, or sent late: a token shows what it sent
                    probs["sent"] = shown.encode("utf-8")
            piece = s.text[s.n_sent:send_upto] if send_upto > s.n_sent else ""
            s.n_sent = max(s.n_sent, send_upto)
            task.events.put(TokenEvent(token, piece, probs, len(s.generated), len(task.prompt_tokens), s.n_cached))
            s.unsent_bytes = b""
        if stop_type is None:
            s.next_token = token
        else:
            self._finish(s, stop_type, stopping_word, truncated or s.truncated)

    def token_text(self, task: Task, token: int) -> bytes:
        """What a generated token adds to the output: control tokens add nothing, unless the
        server shows them (-sp) or the request preserves them (llama-server's accept_special_token)."""
        return self.engine.tokenizer.token_bytes(token, self.special or token in task.params.preserved_tokens)

    def _append_text(self, s: Slot, token: int) -> None:
        """Add a token's bytes to the text, holding back a character's first bytes until the
        rest of it has come."""
        s.pending_bytes += self.token_text(s.task, token)
        n = utf8_complete_prefix(s.pending_bytes)
        s.unsent_bytes += s.pending_bytes[:n]
        s.text += s.pending_bytes[:n].decode("utf-8", "replace")
        s.pending_bytes = s.pending_bytes[n:]
        if "\n" in s.text:
            s.has_new_line = True

    def _match_stop(self, s: Slot) -> tuple[str | None, str, int]:
        """Stop strings: a full match ends the request there ("word", the word, where the text
        now ends); a partial match at the end of the text is held back. Returns (stop type or
        None, stopping word, how far the text may be sent)."""
        stops = s.task.stop
        if not stops:
            return None, "", len(s.text)
        hit = self._find_stop(s.text, stops, s.n_sent)
        if hit is None:
            return None, "", len(s.text) - self._partial_stop(s.text, stops)
        pos, word = hit
        s.text = s.text[:pos]
        return "word", word, pos

    def _limit(self, s: Slot) -> tuple[str | None, bool]:
        """The request's limits: n_predict, the slot's context (unless a context shift makes
        room), t_max_predict_ms. Returns ("limit" or None, whether the context cut it short)."""
        task = s.task
        if task.n_predict is not None and task.n_predict >= 0 and len(s.generated) >= max(task.n_predict, 1):
            return "limit", False
        if len(s.cache_tokens) + 1 >= s.n_ctx:
            if self.context_shift and self._shift(s):
                s.truncated = True
                return None, False
            return "limit", True
        if (task.t_max_predict_ms > 0 and s.has_new_line and
                (time.perf_counter() - s.t_start) * 1000 > task.t_max_predict_ms):
            return "limit", False
        return None, False

    def _finish(self, s: Slot, stop_type: str, stopping_word: str, truncated: bool) -> None:
        """Count the request in the metrics, send its FinalEvent and free the slot."""
        task = s.task
        now = time.perf_counter()
        # the whole text, with the first bytes of a character that never came (llama-server's
        # generated_text, whose JSON turns them into U+FFFD); a stream never sends these
        content = s.text + s.pending_bytes.decode("utf-8", "replace")
        probs_out = s.probs
        if stop_type == "word":  # the stop word's tokens are not reported
            kept, acc = [], b""
            for p, t in zip(s.probs, s.generated):
                if len(acc.decode("utf-8", "ignore")) >= len(content):
                    break
                acc += self.token_text(task, t)
                kept.append(p)
            probs_out = kept
        probs_out = [p for p in probs_out if p is not None]
        s.last_generated = content
        n_prompt, n_decoded = len(task.prompt_tokens), len(s.generated)
        m = self.metrics
        m.prompt_tokens_total += n_prompt - s.n_cached
        m.prompt_tokens_cached_total += s.n_cached
        m.tokens_predicted_total += n_decoded
        m.prompt_seconds_total += s.t_prompt_done - s.t_start
        m.tokens_predicted_seconds_total += now - s.t_prompt_done
        task.events.put(FinalEvent(
            content=content, tokens=list(s.generated), stop_type=stop_type,
            stopping_word=stopping_word, truncated=truncated, has_new_line=s.has_new_line,
            n_prompt=n_prompt, n_prompt_processed=n_prompt - s.n_cached,
            n_cached=s.n_cached, n_decoded=n_decoded, tokens_cached=len(s.cache_tokens),
            prompt_ms=(s.t_prompt_done - s.t_start) * 1000, predicted_ms=(now - s.t_prompt_done) * 1000,
            probs=probs_out, id_slot=s.id, seed=s.sampler.seed,
            n_draft=s.n_draft, n_draft_accepted=s.n_draft_accepted))
        s.next_token = None
        self._release(s)

    def _shift(self, s: Slot) -> bool:
        """Make room in a full slot as llama-server's --context-shift does: keep n_keep tokens
        (and BOS), drop n_discard after them (default: half the rest). False if nothing can go."""
        task = s.task
        n_past = len(s.cache_tokens)
        add_bos = 1 if self.engine.gguf.vocab.add_bos else 0
        n_keep = n_past if task.n_keep < 0 else min(n_past, task.n_keep + add_bos)
        n_left = n_past - n_keep
        n_discard = task.n_discard if task.n_discard > 0 else n_left // 2
        n_discard = min(n_discard, n_left)
        if n_discard <= 0:
            return False
        self.cache.shift(s.id, n_keep, n_discard, n_past)
        s.cache_tokens = s.cache_tokens[:n_keep] + s.cache_tokens[n_keep + n_discard:]
        return True

    @staticmethod
    def _find_stop(text: str, stops, n_sent: int):
        best = None
        for word in stops:
            i = text.find(word, max(0, n_sent - len(word)))
            if i >= 0 and (best is None or i < best[0]):
                best = (i, word)
        return best

    @staticmethod
    def _partial_stop(text: str, stops) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        longest = 0
        for word in stops:
            for k in range(min(len(word) - 1, len(text)), 0, -1):
                if text.endswith(word[:k]):
                    longest = max(longest, k)
                    break
        return longest

    def _probs(self, s: Slot, logits: np.ndarray, token: int) -> dict:
        n = s.task.n_probs
        if s.task.post_sampling_probs:
            c = s.sampler.last_candidates
            order = np.argsort(-c.p, kind="stable")
            ids, p = c.ids[order], c.p[order]
            top = [(int(i), float(v)) for i, v in zip(ids[:n], p[:n]) if v > 0]
            chosen = dict(zip(ids.tolist(), p.tolist())).get(token, 0.0)
            return {"id": token, "value": float(chosen), "top": top}
        ids, p = token_probabilities(np.ascontiguousarray(logits, np.float32), n)
        chosen = p[np.flatnonzero(ids == token)[0]]
        return {"id": token, "value": logprob(chosen),
                "top": [(int(i), logprob(v)) for i, v in zip(ids[:n], p[:n])]}
