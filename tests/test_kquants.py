"""The K-quants (Q2_K .. Q6_K) in llama.cpp's orders, against NumPy twins written from ggml's C code
(ggml-cpu/arch/x86/quants.c, repack.cpp, tiled/tiled-kernel.cpp): bit for bit."""
import numpy as np
import pytest

from numllama.engine.quants import KernelOrder, blocks, linear, pack_weight, prepare, repacked_order
from kquant_cases import weights
from twins import fma_twin as fma
from twins import hsum8_twin as hsum8


def ints(name, block):
    """(unsigned quants [256], scales [8 or 16], mins [8] or None, d, dmin) of one GGUF block."""
    b = block[None, :]
    f16 = lambda at: np.float32(block[at:at + 2].view(np.float16)[0])   # noqa: E731
    if name == "Q6_K":
        q, _, _, _ = blocks.unpack_q6_k(b)
        return q[0].astype(np.int64) + 32, block[192:208].view(np.int8).astype(np.int64), None, f16(208), 0
    if name == "Q2_K":   # 16 scales and 16 mins
        q, _, _, _ = blocks.unpack_q2_k(b)
        return (q[0].astype(np.int64), (block[0:16] & 15).astype(np.int64), (block[0:16] >> 4).astype(np.int64),
                f16(80), f16(82))
    if name == "Q3_K":
        q, _, _, _ = blocks.unpack_q3_k(b)
        return q[0].astype(np.int64), blocks._q3_k_scales(b[:, 96:108])[0].astype(np.int64), None, f16(108), 0
    q, _, _, _ = (blocks.unpack_q4_k if name == "Q4_K" else blocks.unpack_q5_k)(b)
    sc, mn = blocks._k4_scales_mins(b[:, 4:16])
    return q[0].astype(np.int64), sc[0].astype(np.int64), mn[0].astype(np.int64), f16(0), f16(2)


def twin(name, raw_row, yq, yd, ybs, path):
    """One output element, path in "vec_dot", "tiled", "gemv", "gemm"."""
    acc, acc_min = np.float32(0), np.float32(0)
    lanes, mins = np.zeros(8, np.float32), np.zeros(4, np.float32)
    bb, _ = blocks.BLOCK_SIZES[name]
    for s in range(len(yd)):
        q, sc, mn, d, dmin = ints(name, raw_row[s * bb:(s + 1) * bb])
        y = yq[s * 256:(s + 1) * 256].astype(np.int64)
        group = 16 if name in ("Q2_K", "Q3_K", "Q6_K") else 32
        scaled = q * sc[np.arange(256) // group] * y
        lane = [int(scaled[(np.arange(256) % 32) // 4 == l].sum()) for l in range(8)]
        ysum = [int(ybs[s, 2 * g] + ybs[s, 2 * g + 1]) for g in range(8)]
        if name == "Q6_K":   # the -32 offset, taken out per lane as ggml does
            lane = [lane[l] - 32 * int(ybs[s, 2 * l] * sc[2 * l] + ybs[s, 2 * l + 1] * sc[2 * l + 1]) for l in range(8)]
            m_total = 0
        elif name == "Q3_K":
            m_total = 0
        elif name == "Q2_K":   # mins per 16, against bsums of 16
            min_lane = [int(mn[2 * l] * ybs[s, 2 * l] + mn[2 * l + 1] * ybs[s, 2 * l + 1]) for l in range(8)]
            m_total = sum(min_lane)
        else:
            m_total = sum(int(mn[g]) * ysum[g] for g in range(8))
        if path == "vec_dot":
            if name == "Q2_K":   # the mins enter the lanes first
                for l in range(8):
                    lanes[l] = fma(np.float32(-yd[s] * dmin), min_lane[l], lanes[l])
            for l in range(8):
                lanes[l] = fma(np.float32(yd[s] * d), lane[l], lanes[l])
            if name == "Q4_K":
                for m in range(4):
                    mins[m] = fma(np.float32(-yd[s] * dmin), mn[2 * m] * ysum[2 * m] + mn[2 * m + 1] * ysum[2 * m + 1], mins[m])
            elif name == "Q5_K":
                acc_min = fma(np.float32(-yd[s] * dmin), m_total, acc_min)
        elif path == "tiled":
            res = np.float32(d * np.float32(sum(lane)))
            if name in ("Q2_K", "Q4_K", "Q5_K"):
                res = fma(-dmin, m_total, res)
            acc = fma(res, yd[s], acc)
        elif path == "gemv":
            acc = fma(sum(lane), np.float32(d * yd[s]), acc)
            acc_min = fma(m_total, np.float32(dmin * yd[s]), acc_min)
        else:   # gemm: one FMA per two sub-blocks
            for c in range(4):
                i1 = sum(int(sc[g] * (q[32 * g:32 * g + 32] * y[32 * g:32 * g + 32]).sum()) for g in (2 * c, 2 * c + 1))
                m1 = sum(int(mn[g]) * ysum[g] for g in (2 * c, 2 * c + 1))
                acc = fma(i1, np.float32(d * yd[s]), acc)
                acc_min = fma(m1, np.float32(dmin * yd[s]), acc_min)
    if path == "vec_dot":
        if name == "Q4_K":
            return np.float32(hsum8(lanes) + np.float32(np.float32(mins[0] + mins[2]) + np.float32(mins[1] + mins[3])))
        return np.float32(hsum8(lanes) + acc_min)
    return np.float32(acc - acc_min) if path in ("gemv", "gemm") else acc


@pytest.mark.parametrize("name,n_rows,path", [
    ("Q4_K", 12, "vec_dot"), ("Q4_K", 12, "tiled"), ("Q4_K", 16, "gemv"), ("Q4_K", 16, "gemm"),
    ("Q5_K", 12, "vec_dot"), ("Q5_K", 16, "tiled"), ("Q6_K", 16, "vec_dot"), ("Q6_K", 12, "tiled"),
    ("Q3_K", 16, "vec_dot"), ("Q3_K", 12, "tiled"), ("Q2_K", 16, "vec_dot"), ("Q2_K", 12, "tiled")])
def test_kquant_orders_equal_numpy_twins(name, n_rows, path):
    rng = np.random.default_rng(n_rows)
    n_cols = 512
    raw = weights(name, n_rows, n_cols)
    w = pack_weight(name, raw, n_rows, n_cols)
    assert repacked_order(name, n_rows) == (path in ("gemv", "gemm"))
    x = (rng.standard_normal((2, n_cols)) * 2).astype(np.float32)
    flag = np.full(2, path in ("tiled", "gemm"))
    (out,) = linear(x, w, order=KernelOrder.of(2, tiled=flag if path == "tiled" else None,
                                               grouped=flag if path == "gemm" else None))
    act = prepare(x, w.act_format, w.group)
    for t in range(2):
        for r in range(n_rows):
            want = twin(name, raw[r], act.q[t], act.d[t], act.s[t], path)
            assert out[t, r] == want, (t, r, out[t, r], want)


def test_q8_k_activations_are_ggmls():
    """quantize_row_q8_K_ref: iscale = -127 / (the value of largest magnitude), round half to
    even, d = 1 / iscale, and bsums of 16."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((1, 512)) * 3).astype(np.float32)
    act = prepare(x, "q8_k_rows", 256)
    for s in range(2):
        v = x[0, s * 256:(s + 1) * 256]
        vmax = v[np.argmax(np.abs(v))]
        iscale = np.float32(-127.0) / vmax
        q = np.minimum(127, np.rint(iscale * v)).astype(np.int8)
        np.testing.assert_array_equal(act.q[0, s * 256:(s + 1) * 256], q)
        assert act.d[0, s] == np.float32(1) / iscale
        np.testing.assert_array_equal(act.s[0, s], q.astype(np.int32).reshape(16, 16).sum(1))


@pytest.mark.parametrize("other", ["NUMLLAMA_PORTABLE", "NUMLLAMA_NO_VNNI"])
def test_avx2_and_portable_kernels_agree(tmp_path, other):
    """Every quantized type, every path: the AVX2 kernels (simd.py, with VNNI where the CPU has
    it) in this process, and in a child the portable ones (NUMLLAMA_PORTABLE=1) or the AVX2
    ones without VNNI (NUMLLAMA_NO_VNNI=1), bit for bit."""
    import os
    import subprocess
    import sys
    from numllama.engine.quants.simd import VNNI_ROWS, have_avx2
    from kquant_cases import CASES, outputs
    if not have_avx2():
        pytest.skip("no AVX2 here: the portable kernels are the only ones")
    if other == "NUMLLAMA_NO_VNNI" and not VNNI_ROWS:
        pytest.skip("no VNNI on this CPU: its AVX2 kernels are compared with the portable ones")
    here = os.path.dirname(os.path.abspath(__file__))
    out = tmp_path / "portable.npz"
    r = subprocess.run([sys.executable, os.path.join(here, "portable_check.py"), str(out)], cwd=here,
                       env={**os.environ, other: "1", "PYTHONPATH": os.path.dirname(here)},
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    portable = np.load(out)
    for name, path in CASES:
        np.testing.assert_array_equal(outputs(name, path), portable[f"{name}_{path}"], err_msg=f"{name} {path}")
