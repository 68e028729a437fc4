"""Hand-vectorized AVX2 inner loops for Q4_0/Q4_1, written in LLVM IR through llvmlite.

Why by hand: Numba types every integer product as int64, and from Numba's IR LLVM's
vectorizer then multiplies nibbles by activations in 64-bit lanes (4 per register). ggml's
AVX2 kernel instead uses `vpmaddubsw`, which multiplies 32 unsigned bytes by 32 signed bytes
and adds neighbouring products into 16-bit lanes: 32 multiply-adds in one instruction. This
module emits that instruction (`llvm.x86.avx2.pmadd.ub.sw`) from a Numba `@intrinsic`, so the
kernel in kernels.py stays a plain Numba loop around it.

The arithmetic is the one `kernels.matmul_q4_lanes` (the portable twin) does, element for
element: lane i of a block is the exact integer sum of 4 nibble x int8 products (at most
15 * 127 * 4 = 7620, so 16-bit lanes are exact), turned into f32 and added with one FMA,
`lane = fma(d_w * d_x, float(sum), lane)`. Only the number of rows computed per instruction
changes, so results are bit-identical (tests compare the two).

Layout read (see `pack_q4`): per tile of ROW_TILE rows and per block, 16 x ROW_TILE bytes as
[8 slots][ROW_TILE rows][2 bytes]. Slot 2i + q holds, for every row, nibble bytes 4i + 2q and
4i + 2q + 1 of the GGUF block (byte k: weight k in the low nibble, weight k + 16 in the high
one). A 32-byte load then gives 16 rows x one byte pair, and `vpmaddubsw` against the matching
pair of activations, repeated 16 times, gives 16 rows' partial sums at once.
"""
from __future__ import annotations

import platform

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

ROWS = 16   # rows per 256-bit vector of byte pairs

_i8, _i16, _i32, _i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_f32 = ir.FloatType()
_V32i8, _V16i16 = ir.VectorType(_i8, 32), ir.VectorType(_i16, 16)
_V16i32, _V16f32, _V16f16 = ir.VectorType(_i32, 16), ir.VectorType(_f32, 16), ir.VectorType(ir.HalfType(), 16)


def have_avx2() -> bool:
    """True where this CPU (as LLVM sees it) runs AVX2 and F16C."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    import llvmlite.binding as llvm
    features = llvm.get_host_cpu_features().flatten().split(",")
    return "+avx2" in features and "+f16c" in features


def _splat(builder, scalar, vtype):
    vec = builder.insert_element(ir.Constant(vtype, ir.Undefined), scalar, ir.Constant(_i32, 0))
    return builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(_i32, vtype.count), [0] * vtype.count))


def _load(builder, base, byte_offset, vtype):
    """An unaligned load of `vtype` at base (i8*) + byte_offset."""
    ptr = builder.gep(base, [byte_offset])
    return builder.load(builder.bitcast(ptr, vtype.as_pointer()), align=1)


def _make_q4_lanes(offset: int):
    """The intrinsic for Q4_0 (weight = nibble - 8: offset 8) or Q4_1 (offset 0)."""

    @intrinsic
    def q4_lanes(typingctx, wq, wd, tile, xq, xd, t, lanes):
        """lanes[i, r] (i < 8, r < ROW_TILE) = ggml's 8 AVX2 accumulators of row r of `tile`
        for token t, summed over all blocks of the row (see the module docstring).

        wq: [n_tiles, NB, 8, R, 2] uint8; wd: [n_tiles, NB, R] uint16 (f16 scales)
        xq: [T, NB, 32] int8; xd: [T, NB] f32; lanes: [8, R] f32 (written)
        """
        sig = types.void(wq, wd, tile, xq, xd, t, lanes)

        def codegen(context, builder, signature, args):
            wq_a, wd_a, tile_v, xq_a, xd_a, t_v, lanes_a = args
            wq_s, wd_s, _, xq_s, xd_s, _, lanes_s = signature.args
            wq_arr = context.make_array(wq_s)(context, builder, wq_a)
            _, n_blocks, _, n_rows, _ = cgutils.unpack_tuple(builder, wq_arr.shape, 5)
            i8p = _i8.as_pointer()
            wq_p = builder.bitcast(wq_arr.data, i8p)
            wd_p = builder.bitcast(context.make_array(wd_s)(context, builder, wd_a).data, i8p)
            xq_p = builder.bitcast(context.make_array(xq_s)(context, builder, xq_a).data, i8p)
            xd_p = context.make_array(xd_s)(context, builder, xd_a).data       # f32*
            out_p = context.make_array(lanes_s)(context, builder, lanes_a).data  # f32*
            tile_v = builder.sext(tile_v, _i64) if tile_v.type.width < 64 else tile_v
            t_v = builder.sext(t_v, _i64) if t_v.type.width < 64 else t_v

            mod = builder.module
            maddubs = cgutils.get_or_insert_function(mod, ir.FunctionType(_V16i16, [_V32i8, _V32i8]),
                                                     "llvm.x86.avx2.pmadd.ub.sw")
            fma = cgutils.get_or_insert_function(mod, ir.FunctionType(_V16f32, [_V16f32] * 3), "llvm.fma.v16f32")
            low_mask = ir.Constant(_V32i8, [0x0F] * 32)
            four = ir.Constant(_V32i8, [4] * 32)
            c = lambda v: ir.Constant(_i64, v)   # noqa: E731
            acc = [cgutils.alloca_once(builder, _V16f32) for _ in range(8)]

            block_bytes = builder.mul(n_rows, c(16))                       # 16 bytes per row
            tile_base = builder.mul(builder.mul(tile_v, n_blocks), block_bytes)
            n_groups = builder.udiv(n_rows, c(ROWS))
            with cgutils.for_range(builder, n_groups) as group:
                g = group.index
                for a in acc:
                    builder.store(ir.Constant(_V16f32, [0.0] * 16), a)
                with cgutils.for_range(builder, n_blocks) as block:
                    b = block.index
                    xb = builder.mul(builder.add(builder.mul(t_v, n_blocks), b), c(32))   # byte offset of x block
                    xd_b = builder.load(builder.gep(xd_p, [builder.add(builder.mul(t_v, n_blocks), b)]))
                    # d = d_w * d_x for 16 rows: the f16 scales widened by vcvtph2ps
                    wd_off = builder.mul(builder.add(builder.mul(builder.add(builder.mul(tile_v, n_blocks), b),
                                                                 n_rows), builder.mul(g, c(ROWS))), c(2))
                    d = builder.fmul(builder.fpext(_load(builder, wd_p, wd_off, _V16f16), _V16f32),
                                     _splat(builder, xd_b, _V16f32))
                    wb = builder.add(tile_base, builder.mul(b, block_bytes))
                    for i in range(4):
                        s_lo = s_hi = None
                        for q in range(2):
                            slot = builder.add(wb, builder.add(builder.mul(c(2 * i + q), builder.mul(n_rows, c(2))),
                                                               builder.mul(g, c(2 * ROWS))))
                            pairs = _load(builder, wq_p, slot, _V32i8)          # 16 rows x 2 bytes
                            lo = builder.and_(pairs, low_mask)                   # weights 4i+2q, 4i+2q+1
                            hi = builder.lshr(pairs, four)                       # weights 16 + the same
                            k = 4 * i + 2 * q
                            x_lo = builder.bitcast(_splat(builder, builder.load(builder.bitcast(
                                builder.gep(xq_p, [builder.add(xb, c(k))]), _i16.as_pointer()), align=1), _V16i16), _V32i8)
                            x_hi = builder.bitcast(_splat(builder, builder.load(builder.bitcast(
                                builder.gep(xq_p, [builder.add(xb, c(16 + k))]), _i16.as_pointer()), align=1), _V16i16), _V32i8)
                            p_lo = builder.call(maddubs, [lo, x_lo])
                            p_hi = builder.call(maddubs, [hi, x_hi])
                            s_lo = p_lo if s_lo is None else builder.add(s_lo, p_lo)
                            s_hi = p_hi if s_hi is None else builder.add(s_hi, p_hi)
                        if offset:   # sum (n - off) x = sum n x - off * sum x, exactly, in 16 bits
                            for which, base in ((0, 4 * i), (1, 16 + 4 * i)):
                                total = ir.Constant(_i16, 0)
                                for m in range(4):
                                    xv = builder.load(builder.gep(xq_p, [builder.add(xb, c(base + m))]))
                                    total = builder.add(total, builder.sext(xv, _i16))
                                corr = _splat(builder, builder.mul(total, ir.Constant(_i16, offset)), _V16i16)
                                if which == 0:
                                    s_lo = builder.sub(s_lo, corr)
                                else:
                                    s_hi = builder.sub(s_hi, corr)
                        for lane, s in ((i, s_lo), (i + 4, s_hi)):
                            f = builder.sitofp(builder.sext(s, _V16i32), _V16f32)
                            builder.store(builder.call(fma, [d, f, builder.load(acc[lane])]), acc[lane])
                for lane in range(8):
                    dst = builder.gep(out_p, [builder.add(builder.mul(c(lane), n_rows), builder.mul(g, c(ROWS)))])
                    builder.store(builder.load(acc[lane]), builder.bitcast(dst, _V16f32.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return q4_lanes


q4_0_lanes = _make_q4_lanes(8)
q4_1_lanes = _make_q4_lanes(0)
