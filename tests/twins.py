"""NumPy twins of the float building blocks the tests re-derive ggml's arithmetic with."""
import ctypes
import ctypes.util

import numpy as np

f32 = np.float32
_libm = ctypes.CDLL(ctypes.util.find_library("m"))
_libm.expf.restype, _libm.expf.argtypes = ctypes.c_float, [ctypes.c_float]
_libm.tanhf.restype, _libm.tanhf.argtypes = ctypes.c_float, [ctypes.c_float]


def fma_twin(a, b, c):
    """f32 FMA of the f32 values of a, b, c, emulated in float64: a*b is exact there, so only the
    final sum rounds (twice, which differs from one rounding with probability ~2^-29: never in
    these tests)."""
    return f32(np.float64(f32(a)) * np.float64(f32(b)) + np.float64(f32(c)))


def hsum8_twin(l):
    """ggml's hsum_float_8: ((0+4)+(2+6)) + ((1+5)+(3+7)), in f32."""
    return f32(f32(f32(l[0] + l[4]) + f32(l[2] + l[6])) + f32(f32(l[1] + l[5]) + f32(l[3] + l[7])))


def expf(x):
    """libm's expf, as ggml calls it (NumPy's float32 exp differs in the last bit)."""
    return f32(_libm.expf(float(x)))


def tanhf(x):
    """libm's tanhf, as ggml calls it."""
    return f32(_libm.tanhf(float(x)))
