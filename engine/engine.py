"""`Engine`: a loaded model and its tokenizer, the one object the CLI and the server hold."""
from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np

from . import compile_ahead
from .encoder import EncoderModel
from .gguf_file import ENCODER_ARCHS, GGUFModel, ModelLoadError, load_gguf  # noqa: F401 (ModelLoadError: re-exported)
from .model import CPU_OPS, Batch, LlamaModel
from .quants import PARALLEL_ROWS
from .ops import kv_cells, split_kv_chunk
from .sampling import Sampler, SamplingParams
from .tokenizer import Tokenizer, utf8_complete_prefix


def physical_cores() -> int:
    """CPU cores, not counting hyper-threads: llama.cpp's default thread count (cpu_get_num_math),
    which decides how its attention splits a long cache among threads."""
    import glob
    siblings = set()
    for path in glob.glob("/sys/devices/system/cpu/cpu[0-9]*/topology/thread_siblings_list"):
        try:
            with open(path) as f:
                siblings.add(f.read().strip())
        except OSError:
            pass
    return len(siblings) or os.cpu_count() or 1


def in_passing_thread(fn) -> None:
    """fn() in a new thread, with the caller's Numba thread count; returns when that thread
    has ended, raising what fn raised.
    Why: Numba's OpenMP layer keeps a pool of workers for each thread that has run a parallel
    kernel, for as long as that thread lives. With two pools on the machine's cores (say the
    thread that woke a sleeping server and warmed the model up, beside the batcher) libgomp
    counts more threads than CPUs, lets its workers spin only briefly and then puts them to
    sleep, and every parallel kernel the batcher starts waits for one to wake: on 2 cores a
    tiny parallel kernel followed by 5 us of other work took 58 us a round instead of 6, and
    SmolLM2's decode fell from ~150 to ~60 tok/s once a sleeping server had woken. A thread
    that has ended leaves no pool behind."""
    import numba
    n_threads = numba.get_num_threads()
    failure = []

    def run():
        numba.set_num_threads(n_threads)
        try:
            fn()
        except BaseException as e:  # (re-raised in the caller's thread)
            failure.append(e)

    thread = threading.Thread(target=run, name="numllama-warm-up")
    thread.start()
    thread.join()
    if failure:
        raise failure[0]


@dataclass
class Engine:
    gguf: GGUFModel
    model: LlamaModel | EncoderModel
    tokenizer: Tokenizer

    @classmethod
    def load(cls, path: str, n_threads: int | None = None, warm_up: bool = False,
             progress: bool = False) -> "Engine":
        """Open the model. With warm_up, also run a short prompt and a decode step so every
        kernel is compiled (or loaded from Numba's cache) before the first real request.
        With progress, show a bar (tqdm) while layers are packed and kernels compiled."""
        if n_threads:
            import numba
            numba.set_num_threads(max(1, min(n_threads, numba.config.NUMBA_NUM_THREADS)))
        gguf = load_gguf(path)
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=gguf.hparams.n_layer + 2, desc="loading model", unit="step", leave=False)
        network = EncoderModel if gguf.hparams.arch in ENCODER_ARCHS else LlamaModel   # (bert: engine/encoder.py)
        engine = cls(gguf, network(gguf, on_layer=bar.update if bar else None), Tokenizer(gguf.vocab))
        if warm_up:
            if bar:
                bar.set_description("compiling kernels (cached after the first start)")
            engine.warm_up()
        if bar:
            bar.update(2)
            bar.close()
        return engine

    def warm_up(self) -> None:
        """Compile every kernel a request can reach: a prompt pass long enough for the row-wise
        ops' parallel variants (quants.PARALLEL_ROWS tokens), a decode step, the samplers.
        The passes run in a thread of their own that ends with them (in_passing_thread), so the
        caller keeps no OpenMP pool beside the one of the thread that will serve requests."""
        in_passing_thread(self._warm_up)

    def _warm_up(self) -> None:
        helper = compile_ahead.start() if isinstance(self.model, LlamaModel) else None
        if helper is not None:   # a cold start: attention compiles in a second process meanwhile
            compile_ahead.compile_share()
            self.model.cpu_ops = compile_ahead.WithoutAttention
            try:
                self._warm_up_passes()
            finally:
                self.model.cpu_ops = CPU_OPS
            compile_ahead.finish(helper)
        self._warm_up_passes()
        for mirostat in (0, 1, 2):   # (mirostat's f32 arithmetic is compiled too)
            Sampler(SamplingParams(seed=0, mirostat=mirostat),
                    self.tokenizer.n_vocab).sample(np.arange(self.tokenizer.n_vocab, dtype=np.float32))

    def _warm_up_passes(self) -> None:
        n_prompt = max(2, PARALLEL_ROWS)
        cache = self.model.new_cache(1, n_prompt + 2)
        self.model.forward(Batch.single([self.tokenizer.bos_id if self.tokenizer.bos_id >= 0 else 0] * n_prompt, 0), cache)
        self.model.forward(Batch.single([0], n_prompt), cache)

    def generate_tokens(self, prompt_ids: list[int], n_predict: int, params: SamplingParams,
                        ignore_eos: bool = False):
        """Yield sampled token ids, one forward pass per token (a single sequence)."""
        n_ctx = min(self.gguf.hparams.n_ctx_train, len(prompt_ids) + max(n_predict, 0) + 1)
        cache = self.model.new_cache(1, n_ctx)
        sampler = Sampler(params, self.tokenizer.n_vocab, prompt_ids)
        if ignore_eos:
            sampler.bias[list(self.tokenizer.eog_ids)] = -np.inf
        logits = self.model.forward(Batch.single(prompt_ids, 0), cache)[0]
        pos = len(prompt_ids)
        kv_size, n_threads = kv_cells(n_ctx), physical_cores()   # what llama.cpp's split depends on
        for _ in range(n_predict):
            token = sampler.sample(logits)
            sampler.accept(token)
            yield token
            if token in self.tokenizer.eog_ids and not ignore_eos:
                return
            if pos >= n_ctx:
                return
            step = Batch.single([token], pos)
            # past 256 cells llama.cpp splits a lone token's attention among its threads
            step.attn_kv_chunk = np.array([split_kv_chunk(pos, kv_size, n_threads)], np.int32)
            logits = self.model.forward(step, cache)[0]
            pos += 1

    def generate_text(self, prompt: str, n_predict: int, params: SamplingParams, ignore_eos=False):
        """Yield UTF-8 bytes as tokens arrive, never half a character."""
        pending = b""
        ids = self.tokenizer.encode(prompt, add_special=True)
        for token in self.generate_tokens(ids, n_predict, params, ignore_eos):
            if token in self.tokenizer.eog_ids:
                break
            pending += self.tokenizer.token_bytes(token, special=False)
            n = utf8_complete_prefix(pending)
            if n:
                yield pending[:n]
                pending = pending[n:]
        if pending:
            yield pending
