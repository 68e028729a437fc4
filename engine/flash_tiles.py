"""The register kernels of tiled flash attention: C += A B for its small f32 tiles, with the
accumulators in registers (`gemm_tile`), and a row's maximum by vectors (`row_max`).

ggml's tiled flash attention (ggml-cpu/ops.cpp, ggml_compute_forward_flash_attn_ext_tiled)
takes the scores of a tile of queries against 64 cache cells, and adds the weighted values,
with `simd_gemm` (ggml-cpu/simd-gemm.h): each element of C is loaded once, gets one FMA per
step of the shared dimension, in order, and is stored once:

    c[m, n] = fma(a[m, k], b[k, n], c[m, n])   for k = k_lo, k_lo + 1, ..., k_hi - 1

Written as Numba loops, the accumulators live in an array that is loaded and stored at every
step (Numba's arrays never become registers), and the products ran at a third of what the
FMA units do. `gemm_tile` emits the register-blocked kernel in LLVM IR instead: a block of
GEMM_ROWS rows by GEMM_VECTORS vectors of C stays in registers over the whole k loop, each
step loading GEMM_VECTORS vectors of b and broadcasting one element of a per row. Every element
is still the chain of FMAs above, so any blocking gives the same bits as the loops
(tests/test_attention.py compares it with plain FMA loops).

Portable: LLVM lowers the vector types to whatever the CPU has (16 lanes where it has AVX-512,
8 with AVX2, scalar code elsewhere).
"""
from __future__ import annotations

import platform

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


def _vector_lanes() -> int:
    """f32 lanes per register: 16 with AVX-512, else 8 (AVX2's, and a fine width elsewhere)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return 8
    import llvmlite.binding as llvm
    return 16 if "+avx512f" in llvm.get_host_cpu_features().flatten().split(",") else 8


LANES = _vector_lanes()
GEMM_ROWS = 4                                # rows of C per register block (ggml's GEMM_RM on AVX-512)
GEMM_VECTORS = 4 if LANES == 16 else 2       # vectors per row of the block (GEMM_RN): 4 x 4 + 4 + 1
                                             # of AVX-512's 32 registers, 4 x 2 + 2 + 1 of AVX2's 16

_f32, _i64 = ir.FloatType(), ir.IntType(64)


def _c(v):
    return ir.Constant(_i64, v)


def _emit_block(builder, fma_fn, vtype, c_p, a_p, b_p, n, ka, m0, n0, rows, vectors, k_lo, k_hi):
    """C[m0:m0+rows, n0:n0+vectors*lanes] += A[m0:, k_lo:k_hi] B[k_lo:k_hi, n0:...], the block
    of C in registers (allocas that LLVM promotes) for the whole k loop."""
    lanes = vtype.count

    def at(ptr, index):
        return builder.bitcast(builder.gep(ptr, [index]), vtype.as_pointer())

    def splat(x):
        v = builder.insert_element(ir.Constant(vtype, ir.Undefined), x, ir.Constant(ir.IntType(32), 0))
        return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))

    def c_index(i, v):
        return builder.add(builder.mul(builder.add(m0, _c(i)), n), builder.add(n0, _c(v * lanes)))

    acc = [[cgutils.alloca_once(builder, vtype) for _ in range(vectors)] for _ in range(rows)]
    for i in range(rows):
        for v in range(vectors):
            builder.store(builder.load(at(c_p, c_index(i, v)), align=4), acc[i][v])
    with cgutils.for_range(builder, builder.sub(k_hi, k_lo)) as loop:
        k = builder.add(k_lo, loop.index)
        b_row = builder.mul(k, n)
        bv = [builder.load(at(b_p, builder.add(b_row, builder.add(n0, _c(v * lanes)))), align=4)
              for v in range(vectors)]
        for i in range(rows):
            a = splat(builder.load(builder.gep(a_p, [builder.add(builder.mul(builder.add(m0, _c(i)), ka), k)])))
            for v in range(vectors):
                builder.store(builder.call(fma_fn, [a, bv[v], builder.load(acc[i][v])]), acc[i][v])
    for i in range(rows):
        for v in range(vectors):
            builder.store(builder.load(acc[i][v]), at(c_p, c_index(i, v)), align=4)


def _emit_rows(builder, fma_fn, vtype, c_p, a_p, b_p, n, ka, m0, k_lo, k_hi):
    """Rows m0 .. m0 + GEMM_ROWS of C, across all its columns: blocks of GEMM_VECTORS vectors,
    then single vectors."""
    wide = GEMM_VECTORS * LANES
    with cgutils.for_range(builder, builder.udiv(n, _c(wide))) as loop:
        _emit_block(builder, fma_fn, vtype, c_p, a_p, b_p, n, ka, m0, builder.mul(loop.index, _c(wide)),
                    GEMM_ROWS, GEMM_VECTORS, k_lo, k_hi)
    done = builder.mul(builder.udiv(n, _c(wide)), _c(wide))
    with cgutils.for_range(builder, builder.udiv(builder.sub(n, done), _c(LANES))) as loop:
        _emit_block(builder, fma_fn, vtype, c_p, a_p, b_p, n, ka, m0,
                    builder.add(done, builder.mul(loop.index, _c(LANES))), GEMM_ROWS, 1, k_lo, k_hi)


@intrinsic
def gemm_tile(typingctx, c, a, b, k_lo, k_hi):
    """c[m, n] = fma(a[m, k], b[k, n], c[m, n]) for k = k_lo .. k_hi - 1 in order, for every
    m < M, n < N. c: [M, N] f32 with M a multiple of GEMM_ROWS and N of LANES (the caller pads:
    the code stays two blocks, which keeps the compile short); a: [M, >= k_hi] f32; b:
    [>= k_hi, N] f32; all C-contiguous (raw pointers; the caller keeps k_lo <= k_hi within the
    arrays)."""
    if not all(isinstance(x, types.Array) and x.dtype == types.float32 and x.ndim == 2 and x.layout == "C"
               for x in (c, a, b)):
        return None

    def codegen(context, builder, signature, args):
        c_a, a_a, b_a = (context.make_array(ty)(context, builder, v) for ty, v in zip(signature.args[:3], args[:3]))
        k_lo, k_hi = (builder.sext(v, _i64) if v.type.width < 64 else v for v in args[3:])
        m, n = cgutils.unpack_tuple(builder, c_a.shape, 2)
        ka = cgutils.unpack_tuple(builder, a_a.shape, 2)[1]
        vtype = ir.VectorType(_f32, LANES)
        fma_fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vtype, [vtype] * 3),
                                                f"llvm.fma.v{LANES}f32")
        with cgutils.for_range(builder, builder.udiv(m, _c(GEMM_ROWS))) as loop:
            _emit_rows(builder, fma_fn, vtype, c_a.data, a_a.data, b_a.data, n, ka,
                       builder.mul(loop.index, _c(GEMM_ROWS)), k_lo, k_hi)
        return context.get_dummy_value()

    return types.void(c, a, b, k_lo, k_hi), codegen


@intrinsic
def row_max(typingctx, rows, i):
    """The largest element of rows[i] (rows: [M, n] f32, C-contiguous, without NaN; -inf when
    n is 0), by vectors of LANES (maxnum) and then a scalar tail: a maximum is the same in any
    order. (Row i by index, not a view: a view made per row costs two atomic reference counts.)"""
    if not (isinstance(rows, types.Array) and rows.dtype == types.float32 and rows.ndim == 2 and rows.layout == "C"
            and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        arr = context.make_array(signature.args[0])(context, builder, args[0])
        n = cgutils.unpack_tuple(builder, arr.shape, 2)[1]
        index = builder.sext(args[1], _i64) if args[1].type.width < 64 else args[1]
        data = builder.gep(arr.data, [builder.mul(index, n)])
        vtype = ir.VectorType(_f32, LANES)
        vmax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vtype, [vtype, vtype]),
                                              f"llvm.maxnum.v{LANES}f32")
        smax = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_f32, [_f32, _f32]), "llvm.maxnum.f32")
        reduce = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_f32, [vtype]),
                                                f"llvm.vector.reduce.fmax.v{LANES}f32")
        ninf = ir.Constant(_f32, float("-inf"))
        best = cgutils.alloca_once(builder, vtype)
        builder.store(ir.Constant(vtype, [float("-inf")] * LANES), best)
        with cgutils.for_range(builder, builder.udiv(n, _c(LANES))) as loop:
            p = builder.bitcast(builder.gep(data, [builder.mul(loop.index, _c(LANES))]), vtype.as_pointer())
            builder.store(builder.call(vmax, [builder.load(best), builder.load(p, align=4)]), best)
        out = cgutils.alloca_once(builder, _f32)
        builder.store(builder.call(smax, [builder.call(reduce, [builder.load(best)]), ninf]), out)
        done = builder.sub(n, builder.urem(n, _c(LANES)))
        with cgutils.for_range(builder, builder.sub(n, done)) as loop:
            x = builder.load(builder.gep(data, [builder.add(done, loop.index)]))
            builder.store(builder.call(smax, [builder.load(out), x]), out)
        return builder.load(out)

    return types.float32(rows, i), codegen

