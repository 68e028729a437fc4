"""Run with NUMLLAMA_PORTABLE=1: writes every quantized type's matmul results with the
portable kernels to the .npz path given, for test_kquants to compare with the AVX2 ones."""
import sys

import numpy as np

from kquant_cases import CASES, outputs

assert not __import__("numllama.engine.quants.simd", fromlist=["have_avx2"]).have_avx2()
np.savez(sys.argv[1], **{f"{name}_{path}": outputs(name, path) for name, path in CASES})
