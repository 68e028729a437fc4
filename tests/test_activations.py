"""The gated FFN's GELU path (gemma3) and the logit soft-cap, each against a plain NumPy twin
written from ggml's C, bit for bit; and the GELU table against ggml's own."""
import hashlib

import numpy as np

from numllama.engine.ops import GELU_TABLE_LIMIT, geglu, gelu_f16_table, softcap
from twins import fma_twin, tanhf

f32 = np.float32
# sha256 of ggml_table_gelu_f16 as ggml_cpu_init fills it, read out of libggml-cpu.so of the
# AVX2 llama.cpp build (llama-cpp-python 0.3.36's tree, GGML_NATIVE=OFF, AVX2/FMA/F16C=ON)
GGML_GELU_TABLE_SHA256 = "5eceda6f287dec9dc0bcfa24516d6744a031a5c52d1984688b4558aeb1daf909"


def gelu_twin(x):
    """ggml_gelu_f32 as compiled with FP contraction: the inner 1 + a*x*x is one FMA."""
    x = f32(x)
    inner = f32(f32(f32(0.79788456080286535587989211986876) * x) * fma_twin(f32(0.044715) * x, x, 1.0))
    return f32(f32(f32(0.5) * x) * f32(f32(1.0) + tanhf(inner)))


def test_gelu_table_is_ggmls():
    table = gelu_f16_table()
    assert hashlib.sha256(table.tobytes()).hexdigest() == GGML_GELU_TABLE_SHA256


def test_gelu_table_equals_twin():
    table = gelu_f16_table()
    rng = np.random.default_rng(0)
    for bits in rng.integers(0, 1 << 16, 3000):
        x = np.uint16(bits).view(np.float16)
        if not np.isfinite(x):
            continue
        with np.errstate(all="ignore"):
            want = np.float16(gelu_twin(f32(x))).view(np.uint16)
        assert table[bits] == want, (bits, float(x))


def test_geglu_equals_ggml_vec_geglu():
    rng = np.random.default_rng(1)
    gate = (rng.standard_normal((3, 70)) * 6).astype(f32)   # some past +-10, where the table is not used
    gate[0, :4] = [-10.0, 10.0, -12.5, 11.0]
    up = rng.standard_normal((3, 70)).astype(f32)
    table = gelu_f16_table()
    out = np.empty_like(gate)
    geglu(gate, up, table, out)
    for t in range(3):
        for i in range(70):
            g = gate[t, i]
            if g <= -GELU_TABLE_LIMIT:
                want = f32(0.0)
            elif g >= GELU_TABLE_LIMIT:
                want = f32(g * up[t, i])
            else:
                want = f32(np.float16(table[np.float16(g).view(np.uint16)].view(np.float16)).astype(f32) * up[t, i])
            assert out[t, i] == want, (t, i)


def test_softcap_equals_scale_tanh_scale():
    rng = np.random.default_rng(2)
    x = (rng.standard_normal((2, 50)) * 40).astype(f32)
    want = np.array([[f32(tanhf(f32(v * (f32(1.0) / f32(30.0))))) * f32(30.0) for v in row] for row in x], f32)
    softcap(x, 30.0)
    np.testing.assert_array_equal(x, want)
