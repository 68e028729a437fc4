"""The CUDA path on a real GPU (not run by CI, which has none): run it on any CUDA machine.

    python3 tests/cuda_device_check.py STORIES.gguf [--layers N]

1. every kernel against its CPU twin (tests/cuda_sim_check.py, on the device this time);
2. whole random-weight models of the SmolLM2 and 1B shapes, written here (nothing large has
   to be copied to the GPU machine), all layers on the GPU: logits against the CPU's, for a
   prompt pass and for single-token decode steps, bit for bit;
3. decode steps per second, CPU and GPU, from the same process.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))


def compare(path: str, n_decode: int) -> bool:
    from numllama.engine.engine import Engine
    from numllama.engine.model import Batch
    e = Engine.load(path)
    ids = [1, 15, 27, 300, 42, 7, 99, 150]

    def run() -> tuple[list, float]:
        cache = e.model.new_cache(1, 64)
        out = [e.model.forward(Batch.single(ids, 0), cache)]
        tok, t0 = int(np.argmax(out[-1])), time.perf_counter()
        for i in range(n_decode):
            out.append(e.model.forward(Batch.single([tok], len(ids) + i), cache))
            tok = int(np.argmax(out[-1]))
        return out, (time.perf_counter() - t0) / n_decode
    cpu, cpu_s = run()
    device = e.model.use_gpu(10 ** 6)
    run()   # compile and upload
    gpu, gpu_s = run()
    diffs = [float(np.abs(a - b).max()) for a, b in zip(cpu, gpu)]
    same = all(np.array_equal(a, b) for a, b in zip(cpu, gpu))
    print(f"{os.path.basename(path)} on {device}: prompt |diff| {diffs[0]:.2e}, decode max |diff| "
          f"{max(diffs[1:]):.2e}, bit-identical {same}, argmax agree "
          f"{all(int(np.argmax(a)) == int(np.argmax(b)) for a, b in zip(cpu, gpu))}; "
          f"decode {1 / cpu_s:.1f} tok/s CPU, {1 / gpu_s:.1f} tok/s GPU", flush=True)
    return same


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("stories")
    ap.add_argument("--layers", type=int, default=4, help="layers of each random model (the shapes' own counts are larger)")
    ap.add_argument("--decode", type=int, default=8)
    a = ap.parse_args()
    pythonpath = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH")) if p)   # numllama need not be installed
    r = subprocess.run([sys.executable, os.path.join(REPO, "tests", "cuda_sim_check.py"), a.stories],
                       cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": pythonpath})
    print(r.stdout + r.stderr[-3000:], flush=True)
    ok = r.returncode == 0 and r.stdout.count("bit-identical True") == 21
    from random_gguf import SHAPES, write
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("smollm2", "1b"):
            embd, _, heads, kv, ffn = SHAPES[name]
            path = write(os.path.join(tmp, f"{name}-q4_0.gguf"), a.stories, embd, a.layers, heads, kv, ffn, "Q4_0")
            ok = compare(path, a.decode) and ok
    print("ALL BIT-IDENTICAL" if ok else "DIFFERENCES FOUND")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
