"""Exact float building blocks for Numba kernels: fused multiply-add and bit casts.

ggml's SIMD code calls _mm256_fmadd_ps explicitly and much of its C is compiled with
floating-point contraction; where it fuses, we must too, or the last bit differs, and 8-bit
activation quantization amplifies that bit into different tokens. Where it does not (the scalar
tail of ggml_vec_dot_f32 rounds the product first), neither do we: which is which was read off
an AVX2 build, tensor by tensor, not assumed. `expf_ggml` is ggml's
vectorised exp (ggml_v_expf), which SiLU uses instead of libm's expf.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload


@intrinsic
def _fma_f32(typingctx, a, b, c):
    sig = types.float32(types.float32, types.float32, types.float32)

    def codegen(context, builder, signature, args):
        f32 = ir.FloatType()
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(f32, [f32, f32, f32]),
                                            "llvm.fma.f32")
        return builder.call(fn, args)
    return sig, codegen


@intrinsic
def _f32_to_bits(typingctx, x):
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return sig, codegen


@intrinsic
def _bits_to_f32(typingctx, x):
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return sig, codegen


@njit(cache=True, nogil=True, inline="always")
def fma(a, b, c):
    """float32(a) * float32(b) + float32(c), rounded once."""
    return _fma_f32(np.float32(a), np.float32(b), np.float32(c))


@njit(cache=True, nogil=True, inline="always")
def f32_bits(x):
    return _f32_to_bits(np.float32(x))


@njit(cache=True, nogil=True, inline="always")
def bits_f32(i):
    return _bits_to_f32(np.int32(i))


@njit(cache=True, nogil=True, inline="always")
def f16_to_f32_soft(h):
    """IEEE half (as uint16 bits) -> f32, exactly: normals by re-biasing the exponent,
    subnormals (and zero) as mantissa * 2^-24, inf/nan kept."""
    em = np.int32(h) & np.int32(0x7FFF)
    sign = (np.int32(h) & np.int32(0x8000)) << np.int32(16)
    normal = (em + np.int32(0x1C000)) << np.int32(13)
    sub = f32_bits(np.float32(em) * np.float32(5.960464477539063e-08))   # 2^-24
    r = normal if em >= np.int32(0x400) else sub
    r = ((em + np.int32(0x38000)) << np.int32(13)) if em >= np.int32(0x7C00) else r
    return bits_f32(r | sign)


@njit(cache=True, nogil=True, inline="always")
def round_f16_soft(x):
    """f32 -> nearest f16 (ties to even) -> f32, without branches so loops vectorize.
    Normal f16 range: keep 10 mantissa bits of the f32 (round-half-even on the bits).
    Subnormal f16 range (|x| < 2^-14): (|x| + 0.5) - 0.5 rounds to multiples of 2^-24 because
    f32's spacing at 0.5 is exactly 2^-24, f16's subnormal step."""
    u = f32_bits(x)
    a = u & np.int32(0x7FFFFFFF)
    sign = u & np.int32(-2147483648)
    normal = (a + np.int32(0xFFF) + ((a >> np.int32(13)) & np.int32(1))) & np.int32(-8192)
    ax = bits_f32(a)
    sub = f32_bits((ax + np.float32(0.5)) - np.float32(0.5))
    r = normal if a >= np.int32(0x38800000) else sub
    r = np.int32(0x7F800000) if a >= np.int32(0x477FF000) else r   # past 65504: inf
    r = a if a > np.int32(0x7F800000) else r                       # nan stays nan
    return bits_f32(r | sign)


@njit(cache=True, nogil=True, inline="always")
def f16_bits_of_soft(x):
    """The IEEE half bits of the f16 nearest to x (ties to even), as uint16."""
    r = f32_bits(round_f16_soft(x))
    sign = (r >> np.int32(16)) & np.int32(0x8000)
    a = r & np.int32(0x7FFFFFFF)
    if a >= np.int32(0x7F800000):                     # inf / nan
        return np.uint16(sign | np.int32(0x7C00) | (np.int32(0x200) if a > np.int32(0x7F800000) else np.int32(0)))
    if a < np.int32(0x38800000):                      # f16 subnormal (or zero): value / 2^-24
        return np.uint16(sign | np.int32(bits_f32(a) * np.float32(16777216.0)))
    return np.uint16(sign | (((a >> np.int32(13)) - np.int32(0x1C000)) & np.int32(0x7FFF)))


@intrinsic
def _half_to_f32(typingctx, h):
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())
    return sig, codegen


@intrinsic
def _f32_to_half(typingctx, x):
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
    return sig, codegen


@intrinsic
def _f32_through_half(typingctx, x):
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())
    return sig, codegen


def _hardware_f16() -> bool:
    """LLVM turns half<->float conversions into F16C instructions (x86, 8 lanes at a time) or
    native ones (ARM). An x86 CPU without F16C would need compiler-rt calls that Numba's JIT
    does not link, so there the bit-twiddling versions serve."""
    import platform
    import llvmlite.binding as llvm
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686"):
        return True
    return "+f16c" in llvm.get_host_cpu_features().flatten().split(",")


if _hardware_f16():
    @njit(cache=True, nogil=True, inline="always")
    def f16_to_f32(h):
        """IEEE half (as uint16 bits) -> f32, exactly (one vcvtph2ps)."""
        return _half_to_f32(np.uint16(h))

    @njit(cache=True, nogil=True, inline="always")
    def round_f16(x):
        """f32 -> nearest f16 (ties to even) -> f32 (vcvtps2ph, vcvtph2ps)."""
        return _f32_through_half(np.float32(x))

    @njit(cache=True, nogil=True, inline="always")
    def f16_bits_of(x):
        """The IEEE half bits of the f16 nearest to x (ties to even), as uint16."""
        return _f32_to_half(np.float32(x))
else:
    f16_to_f32, round_f16, f16_bits_of = f16_to_f32_soft, round_f16_soft, f16_bits_of_soft


# ggml_v_expf's constants, exactly as written in ggml (hex floats)
_C = {name: np.float32(float.fromhex(h)) for name, h in {
    "round": "0x1.8p23", "log2e": "0x1.715476p+0", "ln2_hi": "0x1.62e4p-1", "ln2_lo": "0x1.7f7d1cp-20",
    "p5": "0x1.0e4020p-7", "p4": "0x1.573e2ep-5", "p3": "0x1.555e66p-3", "p2": "0x1.fffdb6p-2",
    "p1": "0x1.ffffecp-1"}.items()}
_ROUND, _LOG2E, _LN2_HI, _LN2_LO = _C["round"], _C["log2e"], _C["ln2_hi"], _C["ln2_lo"]
_P5, _P4, _P3, _P2, _P1 = _C["p5"], _C["p4"], _C["p3"], _C["p2"], _C["p1"]
_ONE_BITS = np.int32(0x3F800000)


@njit(cache=True, nogil=True, inline="always")
def expf_ggml(x):
    """ggml_v_expf (AVX2), one lane: exp(x) = 2^n * (1 + p(b)) with n = round(x / ln 2), the
    same constants and FMAs as ggml, so results equal ggml's bit for bit."""
    z = fma(x, _LOG2E, _ROUND)
    n = z - _ROUND
    b = fma(-n, _LN2_LO, fma(-n, _LN2_HI, np.float32(x)))
    e = f32_bits(z) << np.int32(23)
    k = bits_f32(e + _ONE_BITS)
    u = b * b
    j = fma(fma(fma(_P5, b, _P4), u, fma(_P3, b, _P2)), u, _P1 * b)
    an = abs(n)
    if not an > np.float32(126.0):
        return fma(j, k, k)
    g = np.int32(-2113929216) if n <= 0 else np.int32(0)    # 0x82000000 where n <= 0
    s1 = bits_f32(g + np.int32(0x7F000000))
    if an > np.float32(192.0):
        return s1 * s1
    s2 = bits_f32(e - g)
    return fma(s2, j, s2) * s1


@njit(cache=True, nogil=True)
def expf_array(x):
    """exp of every element of an f32 array with libm's expf (NumPy's own SIMD exp differs from
    it in the last bit, and the sampler's softmax must equal llama.cpp's).  x: [n] f32"""
    out = np.empty(x.shape[0], np.float32)
    for i in range(x.shape[0]):
        out[i] = np.exp(x[i])
    return out


@njit(cache=True, nogil=True)
def tanhf_array(x):
    """tanh of every element of an f32 array with libm's tanhf (ggml_vec_tanh_f32's).  x: [n] f32"""
    out = np.empty(x.shape[0], np.float32)
    for i in range(x.shape[0]):
        out[i] = np.tanh(x[i])
    return out


def widen(w):
    """A stored weight as f32: f32 as it is, f16 bits (uint16) through f16_to_f32. Numba
    compiles a kernel calling it once per weight dtype (see the overload below)."""
    return np.float32(w) if not isinstance(w, (np.uint16, int)) else np.float32(np.uint16(w).view(np.float16))


@overload(widen, inline="always")
def _widen_overload(w):
    if isinstance(w, types.Float):
        return lambda w: w
    if isinstance(w, types.Integer):
        return lambda w: f16_to_f32(w)
    return None


@njit(cache=True, nogil=True, inline="always")
def widen_f16(bits, out):
    """out[i] = the f16 value of bits[i] (uint16), as f32.  bits: [n] uint16; out: [n] f32"""
    for i in range(len(bits)):
        out[i] = f16_to_f32(bits[i])


@njit(cache=True, nogil=True, parallel=True)
def round_f16_array(x, out):
    """out = x rounded to the nearest f16 (ties to even), element by element (NumPy's own
    f32 -> f16 cast gives the same values some 14x slower).  x, out: [n] f32"""
    for i in prange(x.shape[0]):
        out[i] = round_f16(x[i])
