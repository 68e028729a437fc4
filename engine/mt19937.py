"""The Mersenne Twister `std::mt19937`, and libstdc++'s `uniform_real_distribution<double>`.

llama.cpp's `dist` sampler draws one double per token from `std::mt19937` seeded with the
request's seed. Reproducing that stream bit for bit is what makes a seeded request give
llama.cpp's very tokens.
"""
from __future__ import annotations

_N, _M = 624, 397
_MASK32 = 0xFFFFFFFF


class MT19937:
    def __init__(self, seed: int):
        mt = [0] * _N
        mt[0] = seed & _MASK32
        for i in range(1, _N):
            prev = mt[i - 1]
            mt[i] = (1812433253 * (prev ^ (prev >> 30)) + i) & _MASK32
        self._mt = mt
        self._index = _N

    def _twist(self) -> None:
        mt = self._mt
        for i in range(_N):
            y = (mt[i] & 0x80000000) | (mt[(i + 1) % _N] & 0x7FFFFFFF)
            v = mt[(i + _M) % _N] ^ (y >> 1)
            if y & 1:
                v ^= 0x9908B0DF
            mt[i] = v
        self._index = 0

    def next_u32(self) -> int:
        if self._index >= _N:
            self._twist()
        y = self._mt[self._index]
        self._index += 1
        y ^= y >> 11
        y ^= (y << 7) & 0x9D2C5680
        y ^= (y << 15) & 0xEFC60000
        y ^= y >> 18
        return y & _MASK32

    def uniform(self) -> float:
        """A double in [0, 1), as libstdc++'s generate_canonical<double, 53>: two 32-bit
        outputs, low word first, divided by 2^64."""
        lo = self.next_u32()
        hi = self.next_u32()
        r = (lo + hi * 4294967296.0) / 18446744073709551616.0
        return r if r < 1.0 else 0.9999999999999999
