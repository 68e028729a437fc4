"""Run with NUMLLAMA_PORTABLE=1 (or NUMLLAMA_NO_VNNI=1): writes every quantized type's matmul
results with the portable kernels (or the AVX2 ones without VNNI) to the .npz path given, for
test_kquants to compare with this machine's own."""
import sys

import numpy as np

from kquant_cases import CASES, outputs

import os  # noqa: E402
simd = __import__("numllama.engine.quants.simd", fromlist=["have_avx2"])
if os.environ.get("NUMLLAMA_PORTABLE") == "1":
    assert not simd.have_avx2()
else:   # NUMLLAMA_NO_VNNI=1: the vpmaddubsw kernels where the parent ran the VNNI ones
    assert simd.AVX2 and not simd.VNNI_ROWS
np.savez(sys.argv[1], **{f"{name}_{path}": outputs(name, path) for name, path in CASES})
