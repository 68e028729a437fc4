"""Hand-vectorized AVX2 inner loops for the 32-weight block types, in LLVM IR through llvmlite.

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

The layouts read (weights in tiles of ROW_TILE rows, rows innermost):
* Q4_0/Q4_1 (`_pack_q4`), read by `_make_dot`: per block, [4 slots][ROW_TILE rows][4 bytes],
  slot i holding nibble bytes 4i..4i+3 of the GGUF block (byte k: weight k in the low nibble,
  weight k + 16 in the high one). One load is 8 or 16 rows x 4 bytes; their low nibbles are
  ggml's lane i, their high nibbles lane i + 4 (see the comment above `_make_dot`).
* The int8 types (Q8_0, Q5_0, Q5_1, unpacked to int8 at load): [8 slots][ROW_TILE rows][4
  bytes], slot i holding weights 4i..4i+3 (plus 128 where the CPU has VNNI, for `_make_dot`;
  as they are for `q8_lanes`, vpmaddubsw with ggml's sign trick, elsewhere).
* The K-quants: see the comment above `_make_k_dot`.
"""
from __future__ import annotations

import os
import platform

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic


_i8, _i16, _i32, _i64 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64)
_f32 = ir.FloatType()
_V32i8, _V16i16 = ir.VectorType(_i8, 32), ir.VectorType(_i16, 16)
_V16i32, _V16f32, _V16f16 = ir.VectorType(_i32, 16), ir.VectorType(_f32, 16), ir.VectorType(ir.HalfType(), 16)


def have_avx2() -> bool:
    """True where this CPU (as LLVM sees it) runs AVX2 and F16C, unless NUMLLAMA_PORTABLE=1
    asks for the portable kernels (the tests compare the two)."""
    if os.environ.get("NUMLLAMA_PORTABLE") == "1":
        return False
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    import llvmlite.binding as llvm
    features = llvm.get_host_cpu_features().flatten().split(",")
    return "+avx2" in features and "+f16c" in features


AVX2 = have_avx2()   # decided once per process, for every kernel choice


def vnni_width() -> int:
    """Rows per vector of the VNNI kernels (q4_dot): 16 where this CPU has AVX-512 VNNI (zmm),
    8 with AVX-VNNI alone (ymm), 0 without VNNI or with NUMLLAMA_NO_VNNI=1 (which the tests use
    to compare the VNNI kernels with the vpmaddubsw ones on the same machine)."""
    if not AVX2 or os.environ.get("NUMLLAMA_NO_VNNI") == "1":
        return 0
    import llvmlite.binding as llvm
    features = set(llvm.get_host_cpu_features().flatten().split(","))
    if {"+avx512vnni", "+avx512bw", "+avx512vl", "+avx512f"} <= features:
        return 16
    return 8 if "+avxvnni" in features else 0


VNNI_ROWS = vnni_width()


def _splat(builder, scalar, vtype):
    vec = builder.insert_element(ir.Constant(vtype, ir.Undefined), scalar, ir.Constant(_i32, 0))
    return builder.shuffle_vector(vec, vec, ir.Constant(ir.VectorType(_i32, vtype.count), [0] * vtype.count))


def _load(builder, base, byte_offset, vtype):
    """An unaligned load of `vtype` at base (i8*) + byte_offset."""
    ptr = builder.gep(base, [byte_offset])
    return builder.load(builder.bitcast(ptr, vtype.as_pointer()), align=1)


class _Tile:
    """The arrays of one (tile, token) call as raw pointers and sizes, and the loop that every
    kernel here shares: for each group of `rows` rows, 8 lane accumulators (vectors of `rows`
    f32) start at zero, `block(g, b, acc)` adds block b into them, and they are stored to
    lanes[0:8, g*rows:(g+1)*rows]. The arrays are read through raw pointers, so the intrinsics
    accept C-contiguous arrays only (`_c_layout`)."""

    def __init__(self, context, builder, signature, args):
        wq, wd, tile, xq, xd, t, lanes = args
        wq_s, wd_s, _, xq_s, xd_s, _, lanes_s = signature.args
        arr = context.make_array(wq_s)(context, builder, wq)
        _, self.n_blocks, _, self.n_rows, _ = cgutils.unpack_tuple(builder, arr.shape, 5)
        i8p = _i8.as_pointer()
        self.builder = builder
        self.wq = builder.bitcast(arr.data, i8p)                                      # bytes
        self.wd = builder.bitcast(context.make_array(wd_s)(context, builder, wd).data, i8p)
        self.xq = builder.bitcast(context.make_array(xq_s)(context, builder, xq).data, i8p)
        self.xd = context.make_array(xd_s)(context, builder, xd).data                 # f32*
        self.out = context.make_array(lanes_s)(context, builder, lanes).data          # f32*
        self.tile = builder.sext(tile, _i64) if tile.type.width < 64 else tile
        self.t = builder.sext(t, _i64) if t.type.width < 64 else t

    def intrinsic(self, name, ret, params):
        return cgutils.get_or_insert_function(self.builder.module, ir.FunctionType(ret, params), name)

    def loop(self, rows: int, vtype, block):
        builder, c = self.builder, _c
        acc = [cgutils.alloca_once(builder, vtype) for _ in range(8)]
        with cgutils.for_range(builder, builder.udiv(self.n_rows, c(rows))) as group:
            g = group.index
            for a in acc:
                builder.store(ir.Constant(vtype, [0.0] * vtype.count), a)
            with cgutils.for_range(builder, self.n_blocks) as b:
                block(g, b.index, acc)
            for lane in range(8):
                dst = builder.gep(self.out, [builder.add(builder.mul(c(lane), self.n_rows), builder.mul(g, c(rows)))])
                builder.store(builder.load(acc[lane]), builder.bitcast(dst, vtype.as_pointer()), align=4)

    def x_block(self, b):
        """(byte offset of the activations' block b, its scale d_x)"""
        builder = self.builder
        tb = builder.add(builder.mul(self.t, self.n_blocks), b)
        return builder.mul(tb, _c(32)), builder.load(builder.gep(self.xd, [tb]))

    def scale_index(self, g, b, rows: int):
        """index of wd[tile, b, g * rows]"""
        builder = self.builder
        return builder.add(builder.mul(builder.add(builder.mul(self.tile, self.n_blocks), b), self.n_rows),
                           builder.mul(g, _c(rows)))

    def weight_block(self, b, bytes_per_row: int):
        """byte offset of wq[tile, b]"""
        builder = self.builder
        block_bytes = builder.mul(self.n_rows, _c(bytes_per_row))
        return builder.mul(builder.add(builder.mul(self.tile, self.n_blocks), b), block_bytes)

    def x_bytes(self, offset, itype):
        """The activation bytes at `offset` read as one integer of type itype (2 or 4 bytes)."""
        ptr = self.builder.gep(self.xq, [offset])
        return self.builder.load(self.builder.bitcast(ptr, itype.as_pointer()), align=1)


def _c(v):
    return ir.Constant(_i64, v)


def _c_layout(*arrays) -> bool:
    return all(isinstance(a, types.Array) and a.layout == "C" for a in arrays)


# VNNI (vpdpbusd: 4 unsigned bytes times 4 signed bytes, summed into a 32-bit lane, in one
# instruction) and a tile of prompt tokens per pass over the weights: the 32-weight block
# kernels on CPUs that have it. Layouts read (pack_weight when VNNI_ROWS), per tile and block:
# * Q4 (`_pack_q4`): [4 slots][ROW_TILE rows][4 bytes], slot i holding bytes 4i..4i+3 of the
#   GGUF block, so one load is VNNI_ROWS rows x 4 bytes: their low nibbles are weights
#   4i..4i+3, ggml's lane i, their high nibbles weights 16+4i..16+4i+3, lane i + 4.
# * int8 (Q8_0, Q5_0, Q5_1): [8 slots][ROW_TILE rows][4 bytes], slot i weights 4i..4i+3 (lane
#   i), stored plus 128 as unsigned bytes (vpdpbusd's unsigned side).
# Weights stored with an offset (a Q4_0 nibble is weight + 8, a biased byte weight + 128) give
# sum (w + off) x = sum w x + off * sum x: each integer sum starts from minus the second term,
# precomputed per token (kernels.offset_sums). The integer of a lane (or of a whole block)
# is exact whichever instruction adds it, so the float sums, and the result, are those of
# q4_lanes and q8_lanes bit for bit.
def _dot4(builder, rows: int):
    """dot4(acc, w, x) = acc + sum of 4 (unsigned bytes of w) x (signed bytes of x) in each of
    `rows` 32-bit lanes: vpdpbusd with VNNI, else vpmaddubsw (pairs into 16 bits, exact while
    2 * w * 128 fits: w below 128) then vpmaddwd with ones (AVX2, rows = 8)."""
    v_i32 = ir.VectorType(_i32, rows)
    if VNNI_ROWS:
        dpbusd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v_i32, [v_i32] * 3),
                                                f"llvm.x86.avx512.vpdpbusd.{32 * rows}")

        def dot4(acc, w, x):
            return builder.call(dpbusd, [acc, builder.bitcast(w, v_i32), builder.bitcast(x, v_i32)])
        return dot4
    maddubs = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16i16, [_V32i8, _V32i8]),
                                             "llvm.x86.avx2.pmadd.ub.sw")
    madd = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8i32, [_V16i16, _V16i16]),
                                          "llvm.x86.avx2.pmadd.wd")
    ones = ir.Constant(_V16i16, [1] * 16)

    def dot4(acc, w, x):
        return builder.add(acc, builder.call(madd, [builder.call(maddubs, [w, x]), ones]))
    return dot4


def _nibbles(builder, v):
    """(low, high) nibbles of each byte of the vector v, as bytes 0..15."""
    return (builder.and_(v, ir.Constant(v.type, [0x0F] * v.type.count)),
            builder.lshr(v, ir.Constant(v.type, [4] * v.type.count)))


PROMPT_TOKEN_TILE = 8   # prompt tokens that share each load of weights (1B Q4_0 prefill, 2
# threads: 1 token 42 tok/s (vpmaddubsw), 4 tokens 143 GMAC/s on its FFN, 8 tokens 158, 16 129)
INT8_BIAS = 128   # added to int8 weights to make them vpdpbusd's unsigned operand


def _make_dot(kind: str, n_tok: int):
    """The dot intrinsic for `kind` "q4" or "int8", for n_tok tokens at a time. What it sums
    follows the type of corr, so that a caller compiles only the variant it uses: for "q4",
    1 dimension (empty) Q4_1's lanes (no offset), 2 Q4_0's whole blocks (the repacked kernels'
    one sum per block), 3 Q4_0's lanes; for "int8" always 3, the lanes of weights plus 128."""
    rows = VNNI_ROWS or 8
    v_i8, v_i32 = ir.VectorType(_i8, 4 * rows), ir.VectorType(_i32, rows)
    v_f32, v_f16 = ir.VectorType(_f32, rows), ir.VectorType(ir.HalfType(), rows)
    n_slots = 4 if kind == "q4" else 8

    @intrinsic
    def dot(typingctx, wq, wd, tile, xq, xd, corr, t0, lanes):
        """lanes[j, i, r] = ggml's lane i of row r of `tile` for token t0 + j (j < n_tok),
        summed over all blocks (whole_blocks: the block sums in lanes[j, 0]).

        wq: [n_tiles, NB, n_slots, R, 4] uint8 (see above); wd: [n_tiles, NB, R] the blocks'
        scales, f16 bits (uint16, Q4) or f32 (int8 types); xq: [T, NB, 32] int8; xd: [T, NB] f32
        corr: [T, NB, 8] int32, minus offset times the sum of each lane's 4 activations, or
        [T, NB], of the block's 32 (whole_blocks): where each integer sum starts; or [0];
        lanes: [n_tok, 8, R] f32 (written)
        """
        if not isinstance(corr, types.Array):
            return None
        offset = corr.ndim > 1
        whole_blocks = kind == "q4" and corr.ndim == 2

        def codegen(context, builder, signature, args):
            wq_v, wd_v, tile_v, xq_v, xd_v, corr_v, t0_v, lanes_v = args
            wq_s, wd_s, _, xq_s, xd_s, corr_s, _, lanes_s = signature.args
            arr = context.make_array(wq_s)(context, builder, wq_v)
            _, n_blocks, _, n_rows, _ = cgutils.unpack_tuple(builder, arr.shape, 5)
            i8p = _i8.as_pointer()
            wq_p = builder.bitcast(arr.data, i8p)
            wd_p = builder.bitcast(context.make_array(wd_s)(context, builder, wd_v).data, i8p)
            xq_p = builder.bitcast(context.make_array(xq_s)(context, builder, xq_v).data, i8p)
            xd_p = context.make_array(xd_s)(context, builder, xd_v).data                 # f32*
            corr_p = context.make_array(corr_s)(context, builder, corr_v).data           # i32*
            out_p = context.make_array(lanes_s)(context, builder, lanes_v).data          # f32*
            ext = lambda v: builder.sext(v, _i64) if v.type.width < 64 else v   # noqa: E731
            tile, t0 = ext(tile_v), ext(t0_v)
            n_corr = 1 if whole_blocks else 8
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v_f32, [v_f32] * 3),
                                                 f"llvm.fma.v{rows}f32")
            assert VNNI_ROWS or kind == "q4"   # vpmaddubsw would saturate on bytes plus 128
            dot4 = _dot4(builder, rows)
            zero_i, zero_f = ir.Constant(v_i32, [0] * rows), ir.Constant(v_f32, [0.0] * rows)
            n_lanes = 1 if whole_blocks else 8
            acc = [[cgutils.alloca_once(builder, v_f32) for _ in range(n_lanes)] for _ in range(n_tok)]
            with cgutils.for_range(builder, builder.udiv(n_rows, _c(rows))) as group:
                r0 = builder.mul(group.index, _c(rows))
                for per_token in acc:
                    for a in per_token:
                        builder.store(zero_f, a)
                with cgutils.for_range(builder, n_blocks) as block:
                    tb_w = builder.add(builder.mul(tile, n_blocks), block.index)          # wq[tile, b]
                    w_at = builder.add(builder.mul(tb_w, builder.mul(n_rows, _c(4 * n_slots))), builder.mul(r0, _c(4)))
                    lanes_w = [None] * 8   # this block's weights for `rows` rows, per lane, loaded once
                    for i in range(n_slots):
                        v = _load(builder, wq_p, builder.add(w_at, builder.mul(_c(i), builder.mul(n_rows, _c(4)))), v_i8)
                        if kind == "q4":
                            lanes_w[i], lanes_w[i + 4] = _nibbles(builder, v)
                        else:
                            lanes_w[i] = v
                    wd_row = builder.add(builder.mul(tb_w, n_rows), r0)
                    if kind == "q4":   # f16 scales, widened by vcvtph2ps
                        d_w = builder.fpext(_load(builder, wd_p, builder.mul(wd_row, _c(2)), v_f16), v_f32)
                    else:
                        d_w = _load(builder, wd_p, builder.mul(wd_row, _c(4)), v_f32)
                    for j in range(n_tok):
                        tb = builder.add(builder.mul(builder.add(t0, _c(j)), n_blocks), block.index)
                        xb = builder.mul(tb, _c(32))
                        d = builder.fmul(d_w, _splat(builder, builder.load(builder.gep(xd_p, [tb])), v_f32))

                        def x4(lane):   # the 4 activations of a lane, in every row's slot
                            at = 4 * lane if kind == "int8" or lane < 4 else 16 + 4 * (lane - 4)
                            ptr = builder.bitcast(builder.gep(xq_p, [builder.add(xb, _c(at))]), _i32.as_pointer())
                            return builder.bitcast(_splat(builder, builder.load(ptr, align=1), v_i32), v_i8)

                        def start(lane):   # an integer sum starts at minus the offset's term
                            if not offset:
                                return zero_i
                            c = builder.load(builder.gep(corr_p, [builder.add(builder.mul(tb, _c(n_corr)), _c(lane))]))
                            return _splat(builder, c, v_i32)
                        if whole_blocks:
                            s = start(0)
                            for lane in range(8):
                                s = dot4(s, lanes_w[lane], x4(lane))
                            f = builder.sitofp(s, v_f32)
                            builder.store(builder.call(fma, [f, d, builder.load(acc[j][0])]), acc[j][0])
                            continue
                        for lane in range(8):
                            f = builder.sitofp(dot4(start(lane), lanes_w[lane], x4(lane)), v_f32)
                            builder.store(builder.call(fma, [d, f, builder.load(acc[j][lane])]), acc[j][lane])
                for j in range(n_tok):
                    for lane in range(n_lanes):
                        dst = builder.gep(out_p, [builder.add(builder.mul(_c(8 * j + lane), n_rows), r0)])
                        builder.store(builder.load(acc[j][lane]), builder.bitcast(dst, v_f32.as_pointer()), align=4)
            return context.get_dummy_value()

        if not _c_layout(wq, wd, xq, xd, corr, lanes):
            return None
        return types.void(wq, wd, tile, xq, xd, corr, t0, lanes), codegen

    return dot


q4_dot, q4_dot_tokens = _make_dot("q4", 1), _make_dot("q4", PROMPT_TOKEN_TILE)
int8_dot, int8_dot_tokens = _make_dot("int8", 1), _make_dot("int8", PROMPT_TOKEN_TILE)


_V8i32, _V8f32 = ir.VectorType(_i32, 8), ir.VectorType(_f32, 8)
QUAD_ROWS = 8   # rows per 256-bit vector of 4-byte groups


@intrinsic
def q8_lanes(typingctx, wq, wd, tile, xq, xd, t, lanes):
    """The int8 twin of q4_lanes, for 32-weight blocks unpacked to int8 (Q8_0, Q5_0, Q5_1):
    lanes[i, r] = ggml's 8 AVX2 accumulators of row r, summed over all blocks.

    Per block, lane i is the exact sum of weights 4i..4i+3 times the activations, as ggml's
    mul_sum_i8_pairs_float computes it: vpmaddubsw of |w| and the activations with w's sign
    (pairs, at most 2 * 128 * 127, no saturation), then vpmaddwd with ones (the 4-sums).

    wq: [n_tiles, NB, 8, R, 4] int8 (slot i: weights 4i..4i+3 of each of the R rows)
    wd: [n_tiles, NB, R] f32; xq: [T, NB, 32] int8; xd: [T, NB] f32; lanes: [8, R] f32
    """
    def codegen(context, builder, signature, args):
        k = _Tile(context, builder, signature, args)
        maddubs = k.intrinsic("llvm.x86.avx2.pmadd.ub.sw", _V16i16, [_V32i8, _V32i8])
        madd = k.intrinsic("llvm.x86.avx2.pmadd.wd", _V8i32, [_V16i16, _V16i16])
        fma = k.intrinsic("llvm.fma.v8f32", _V8f32, [_V8f32] * 3)
        zero = ir.Constant(_V32i8, [0] * 32)
        ones = ir.Constant(_V16i16, [1] * 16)

        def block(g, b, acc):
            xb, xd_b = k.x_block(b)
            wd_v = _load(builder, k.wd, builder.mul(k.scale_index(g, b, QUAD_ROWS), _c(4)), _V8f32)
            d = builder.fmul(wd_v, _splat(builder, xd_b, _V8f32))
            wb = k.weight_block(b, 32)
            for i in range(8):
                slot = builder.add(wb, builder.add(builder.mul(_c(i), builder.mul(k.n_rows, _c(4))),
                                                   builder.mul(g, _c(4 * QUAD_ROWS))))
                w = _load(builder, k.wq, slot, _V32i8)                                # 8 rows x 4 bytes
                y = builder.bitcast(_splat(builder, k.x_bytes(builder.add(xb, _c(4 * i)), _i32), _V8i32),
                                    _V32i8)                                             # x[4i..4i+3] x 8
                negative = builder.icmp_signed("<", w, zero)
                w_abs = builder.select(negative, builder.sub(zero, w), w)
                y_signed = builder.select(negative, builder.sub(zero, y), y)
                quads = builder.call(madd, [builder.call(maddubs, [w_abs, y_signed]), ones])  # lane i, 8 rows
                f = builder.sitofp(quads, _V8f32)
                builder.store(builder.call(fma, [d, f, builder.load(acc[i])]), acc[i])

        k.loop(QUAD_ROWS, _V8f32, block)
        return context.get_dummy_value()

    if not _c_layout(wq, wd, xq, xd, lanes):
        return None
    return types.void(wq, wd, tile, xq, xd, t, lanes), codegen


# The K-quants' integers with vpdpbusd (VNNI; vpmaddubsw + vpmaddwd without it, exact since
# every K-quant weight is stored unsigned and below 64: 2 * 63 * 128 fits 16 bits) and a tile
# of prompt tokens per load of the weights. Layouts read (kquants.pack_k on AVX2), per tile and
# super-block: int8 [8 groups of 32][8 lanes][ROW_TILE rows][4 weights] (Q2_K, Q3_K plus 4,
# Q5_K, Q6_K plus 32), or, for Q4_K, its nibble bytes [4 chunks][8 lanes][ROW_TILE rows][4
# bytes]: byte 4l + k of chunk c holds weight 64c + 4l + k (group 2c) in its low nibble and
# 64c + 32 + 4l + k (group 2c + 1) in its high one, as in the GGUF block.
K_TOKEN_TILE = 4   # prompt tokens per call of k_dot


def _make_k_dot(group: int, lanes_out: bool, n_tok: int):
    """k_dot for one super-block s of a tile and n_tok tokens from t0. The quad of (group g,
    lane l) is the exact sum of weights 32g+4l..32g+4l+3 times the activations (with an offset,
    from a start of corr: minus the stored weights' offset times the activations' sum). The
    layout follows wq's type: uint8, Q4_K's nibbles; int8, one weight a byte; and the offset
    corr's: 2 dimensions, read; 1, none (so a caller compiles only the kind it uses). lanes_out: ggml's
    lanes, out[j, l, r] = sum over g of scale(g, l) * quad(g, l), the scale wsub[idx] with idx
    = g (group 32) or 2g + (l >= 4) (group 16); else sub-block sums, out[j, idx, r] = the sum of
    the quads with that idx (8 or 16 of them)."""
    rows = VNNI_ROWS or 8
    v_i8, v_i32 = ir.VectorType(_i8, 4 * rows), ir.VectorType(_i32, rows)

    @intrinsic
    def k_dot(typingctx, wq, wsub, tile, s, xq, corr, t0, out):
        """wq: see above (uint8 or int8, 6 dimensions); wsub: [n_tiles, n_super, NS, R] int8;
        xq: [T, K] int8; corr: [T, K / 4] int32, or [0] (no offset); out: [n_tok, 8 or 16, R] int32"""
        nibbles = isinstance(wq, types.Array) and wq.dtype == types.uint8
        offset = isinstance(corr, types.Array) and corr.ndim == 2

        def codegen(context, builder, signature, args):
            wq_v, wsub_v, tile_v, s_v, xq_v, corr_v, t0_v, out_v = args
            wq_s, wsub_s, _, _, xq_s, corr_s, _, out_s = signature.args
            arr = context.make_array(wq_s)(context, builder, wq_v)
            _, n_super, _, _, n_rows, _ = cgutils.unpack_tuple(builder, arr.shape, 6)
            sub_arr = context.make_array(wsub_s)(context, builder, wsub_v)
            n_scales = cgutils.unpack_tuple(builder, sub_arr.shape, 4)[2]
            x_arr = context.make_array(xq_s)(context, builder, xq_v)
            n_cols = cgutils.unpack_tuple(builder, x_arr.shape, 2)[1]
            out_arr = context.make_array(out_s)(context, builder, out_v)
            n_out = cgutils.unpack_tuple(builder, out_arr.shape, 3)[1]
            wq_p = builder.bitcast(arr.data, _i8.as_pointer())
            sub_p, out_p = sub_arr.data, out_arr.data                           # i8*, i32*
            xq_p = builder.bitcast(x_arr.data, _i8.as_pointer())
            corr_p = context.make_array(corr_s)(context, builder, corr_v).data         # i32*
            ext = lambda v: builder.sext(v, _i64) if v.type.width < 64 else v   # noqa: E731
            tile, s_i, t0 = ext(tile_v), ext(s_v), ext(t0_v)
            dot4 = _dot4(builder, rows)
            zero = ir.Constant(v_i32, [0] * rows)
            ts = builder.add(builder.mul(tile, n_super), s_i)
            w_base = builder.mul(ts, builder.mul(n_rows, _c(128 if nibbles else 256)))   # bytes
            n_acc = 8 if lanes_out else 0
            acc = [[cgutils.alloca_once(builder, v_i32) for _ in range(n_acc)] for _ in range(n_tok)]
            with cgutils.for_range(builder, builder.udiv(n_rows, _c(rows))) as rg_loop:
                r0 = builder.mul(rg_loop.index, _c(rows))
                for per_token in acc:
                    for a in per_token:
                        builder.store(zero, a)

                def weights(g):   # the 8 lanes of group g for `rows` rows, as unsigned bytes
                    out = []
                    for lane in range(8):
                        slot = (g // 2 if nibbles else g) * 8 + lane
                        at = builder.add(w_base, builder.add(builder.mul(_c(slot), builder.mul(n_rows, _c(4))),
                                                             builder.mul(r0, _c(4))))
                        v = _load(builder, wq_p, at, v_i8)
                        if nibbles:
                            v = _nibbles(builder, v)[g % 2]
                        out.append(v)
                    return out

                def scale(idx):
                    at = builder.add(builder.mul(builder.add(builder.mul(ts, n_scales), _c(idx)), n_rows), r0)
                    v = builder.load(builder.bitcast(builder.gep(sub_p, [at]), ir.VectorType(_i8, rows).as_pointer()), align=1)
                    return builder.sext(v, v_i32)

                for g in range(8):
                    w = weights(g)
                    idx_of = [g if group == 32 else 2 * g + (lane >= 4) for lane in range(8)]
                    scales = {idx: scale(idx) for idx in set(idx_of)} if lanes_out else {}
                    for j in range(n_tok):
                        x_at = builder.add(builder.mul(builder.add(t0, _c(j)), n_cols), builder.mul(s_i, _c(256)))

                        def x4(lane):
                            ptr = builder.gep(xq_p, [builder.add(x_at, _c(32 * g + 4 * lane))])
                            word = builder.load(builder.bitcast(ptr, _i32.as_pointer()), align=1)
                            return builder.bitcast(_splat(builder, word, v_i32), v_i8)

                        def start(lanes):   # where the sum of these lanes' quads starts
                            if not offset:
                                return zero
                            total = ir.Constant(_i32, 0)
                            for lane in lanes:
                                at = builder.add(builder.udiv(x_at, _c(4)), _c(8 * g + lane))
                                total = builder.add(total, builder.load(builder.gep(corr_p, [at])))
                            return _splat(builder, total, v_i32)
                        if lanes_out:
                            for lane in range(8):
                                quad = dot4(start([lane]), w[lane], x4(lane))
                                a = acc[j][lane]
                                builder.store(builder.add(builder.load(a), builder.mul(quad, scales[idx_of[lane]])), a)
                            continue
                        for idx in sorted(set(idx_of)):
                            members = [lane for lane in range(8) if idx_of[lane] == idx]
                            total = start(members)
                            for lane in members:
                                total = dot4(total, w[lane], x4(lane))
                            dst = builder.gep(out_p, [builder.add(builder.mul(builder.add(builder.mul(_c(j), n_out), _c(idx)),
                                                                              n_rows), r0)])
                            builder.store(total, builder.bitcast(dst, v_i32.as_pointer()), align=4)
                for j in range(n_tok):
                    for lane in range(n_acc):
                        dst = builder.gep(out_p, [builder.add(builder.mul(builder.add(builder.mul(_c(j), n_out), _c(lane)),
                                                                          n_rows), r0)])
                        builder.store(builder.load(acc[j][lane]), builder.bitcast(dst, v_i32.as_pointer()), align=4)
            return context.get_dummy_value()

        if not _c_layout(wq, wsub, xq, corr, out):
            return None
        return types.void(wq, wsub, tile, s, xq, corr, t0, out), codegen

    return k_dot


FLOAT_ROWS = 8   # rows per 256-bit vector of f32
FLOAT_K_CHUNK = 64   # weights of a row taken at a time by float_lanes (a multiple of 8)


@intrinsic
def float_lanes(typingctx, wt, tile, x, t, lanes):
    """tinyBLAS's 8 k-lanes of every row of one row tile, for one token, with the accumulators
    in registers: lanes[l, r] = sum over k = l mod 8, in k order, of fma(w[r, k], x[t, k], .)
    (kernels._dot_tinyblas, before its hsum8), 8 rows per vector. The portable loop in
    kernels.matmul_float_tiles stores and reloads its lanes at every k; this keeps 8 vectors of
    lanes in registers across the whole row, which is the same arithmetic in the same order.

    wt: [n_tiles, K, R] f32, or f16 bits (uint16, widened by vcvtph2ps); K % 8 == 0, R % 8 == 0
    x: [T, K] f32; lanes: [8, R] f32 (written)
    """
    def codegen(context, builder, signature, args):
        wt_v, tile_v, x_v, t_v, lanes_v = args
        wt_s, _, x_s, _, lanes_s = signature.args
        arr = context.make_array(wt_s)(context, builder, wt_v)
        _, n_cols, n_rows = cgutils.unpack_tuple(builder, arr.shape, 3)
        half = isinstance(wt_s.dtype, types.Integer)
        elem = ir.IntType(16) if half else _f32
        w_base = builder.bitcast(arr.data, elem.as_pointer())
        x_base = context.make_array(x_s)(context, builder, x_v).data
        out = context.make_array(lanes_s)(context, builder, lanes_v).data
        tile = builder.sext(tile_v, _i64) if tile_v.type.width < 64 else tile_v
        t = builder.sext(t_v, _i64) if t_v.type.width < 64 else t_v
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V8f32, [_V8f32] * 3), "llvm.fma.v8f32")
        wvec = ir.VectorType(elem, FLOAT_ROWS)
        c = _c
        acc = [cgutils.alloca_once(builder, _V8f32) for _ in range(8)]
        tile_base = builder.mul(builder.mul(tile, n_cols), n_rows)             # wt[tile, 0, 0]
        x_row = builder.mul(t, n_cols)                                          # x[t, 0]
        n_groups = builder.udiv(n_rows, c(FLOAT_ROWS))

        def lanes_at(lane, r0):
            return builder.bitcast(builder.gep(out, [builder.add(builder.mul(c(lane), n_rows), r0)]),
                                   _V8f32.as_pointer())
        with cgutils.for_range(builder, n_groups) as group:      # every lane starts at zero
            for lane in range(8):
                builder.store(ir.Constant(_V8f32, [0.0] * FLOAT_ROWS), lanes_at(lane, builder.mul(group.index, c(FLOAT_ROWS))))
        # K in chunks of FLOAT_K_CHUNK: a chunk of the tile stays in L1 while every group of
        # rows takes its FMAs from it (the tile is read down its columns); a lane's sum still
        # runs over k in order, chunk after chunk
        n_chunks = builder.udiv(builder.add(n_cols, c(FLOAT_K_CHUNK - 1)), c(FLOAT_K_CHUNK))
        with cgutils.for_range(builder, n_chunks) as chunk:
            k_start = builder.mul(chunk.index, c(FLOAT_K_CHUNK))
            k_blocks = builder.udiv(builder.sub(builder.select(
                builder.icmp_unsigned("<", builder.add(k_start, c(FLOAT_K_CHUNK)), n_cols),
                builder.add(k_start, c(FLOAT_K_CHUNK)), n_cols), k_start), c(8))
            with cgutils.for_range(builder, n_groups) as group:
                r0 = builder.mul(group.index, c(FLOAT_ROWS))
                for lane in range(8):
                    builder.store(builder.load(lanes_at(lane, r0), align=4), acc[lane])
                with cgutils.for_range(builder, k_blocks) as kb:
                    k0 = builder.add(k_start, builder.mul(kb.index, c(8)))
                    for lane in range(8):
                        k = builder.add(k0, c(lane))
                        at = builder.add(tile_base, builder.add(builder.mul(k, n_rows), r0))
                        w = builder.load(builder.bitcast(builder.gep(w_base, [at]), wvec.as_pointer()),
                                         align=2 if half else 4)
                        if half:
                            w = builder.fpext(builder.bitcast(w, ir.VectorType(ir.HalfType(), FLOAT_ROWS)), _V8f32)
                        xk = builder.load(builder.gep(x_base, [builder.add(x_row, k)]))
                        builder.store(builder.call(fma, [w, _splat(builder, xk, _V8f32), builder.load(acc[lane])]),
                                      acc[lane])
                for lane in range(8):
                    builder.store(builder.load(acc[lane]), lanes_at(lane, r0), align=4)
        return context.get_dummy_value()

    if not _c_layout(wt, x, lanes) or wt.ndim != 3 or not isinstance(wt.dtype, (types.Float, types.Integer)):
        return None
    return types.void(wt, tile, x, t, lanes), codegen


k_lanes_32, k_lanes_16 = _make_k_dot(32, True, 1), _make_k_dot(16, True, 1)
k_groups_32, k_groups_16 = _make_k_dot(32, False, 1), _make_k_dot(16, False, 1)
k_groups_32_tokens, k_groups_16_tokens = _make_k_dot(32, False, K_TOKEN_TILE), _make_k_dot(16, False, K_TOKEN_TILE)


def _make_q4_k_repacked(grouped: bool, n_tok: int):
    """The whole of llama.cpp's repacked Q4_K product (ggml_gemv_q4_K_8x8_q8_K, or with grouped
    ggml_gemm_q4_K_8x8_q8_K's one FMA per 64 weights) for n_tok tokens from t0, in one call:
    per super-block the sub-block sums come from vpdpbusd (k_dot's), and the scaling and the
    float accumulators stay in registers, where matmul_q4_k would loop over them in Numba.
    The same integers and the same float operations in the same order (kquants docstring, 2)."""
    rows = VNNI_ROWS or 8
    v_i8, v_i32 = ir.VectorType(_i8, 4 * rows), ir.VectorType(_i32, rows)
    v_f32 = ir.VectorType(_f32, rows)

    @intrinsic
    def q4_k_repacked(typingctx, wq, wsub, wd, wdmin, tile, xq, xd, bsums, t0, out):
        """wq: [n_tiles, n_super, 4, 8, R, 4] uint8 (Q4_K's nibbles, pack_k); wsub: [n_tiles,
        n_super, 16, R] int8 (8 scales, 8 mins); wd, wdmin: [n_tiles, n_super, R] f32;
        xq: [T, K] int8; xd: [T, n_super] f32; bsums: [T, n_super, 16] int32;
        out: [n_tok, R] f32 (written: acc - acc_min of each row)"""
        def codegen(context, builder, signature, args):
            arrays = [context.make_array(ty)(context, builder, v) if isinstance(ty, types.Array) else None
                      for ty, v in zip(signature.args, args)]
            wq_a, sub_a, wd_a, wdmin_a, _, xq_a, xd_a, bs_a, _, out_a = arrays
            _, n_super, _, _, n_rows, _ = cgutils.unpack_tuple(builder, wq_a.shape, 6)
            n_cols = cgutils.unpack_tuple(builder, xq_a.shape, 2)[1]
            ext = lambda v: builder.sext(v, _i64) if v.type.width < 64 else v   # noqa: E731
            tile, t0 = ext(args[4]), ext(args[8])
            wq_p = builder.bitcast(wq_a.data, _i8.as_pointer())
            sub_p, xq_p = sub_a.data, builder.bitcast(xq_a.data, _i8.as_pointer())
            wd_p, wdmin_p, xd_p, bs_p, out_p = wd_a.data, wdmin_a.data, xd_a.data, bs_a.data, out_a.data
            dot4 = _dot4(builder, rows)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v_f32, [v_f32] * 3),
                                                 f"llvm.fma.v{rows}f32")
            zero_i, zero_f = ir.Constant(v_i32, [0] * rows), ir.Constant(v_f32, [0.0] * rows)
            acc = [cgutils.alloca_once(builder, v_f32) for _ in range(n_tok)]
            acc_min = [cgutils.alloca_once(builder, v_f32) for _ in range(n_tok)]

            def vec(ptr, at, vtype):
                return builder.load(builder.bitcast(builder.gep(ptr, [at]), vtype.as_pointer()), align=1)

            with cgutils.for_range(builder, builder.udiv(n_rows, _c(rows))) as rg_loop:
                r0 = builder.mul(rg_loop.index, _c(rows))
                for a in acc + acc_min:
                    builder.store(zero_f, a)
                with cgutils.for_range(builder, n_super) as s_loop:
                    s = s_loop.index
                    ts = builder.add(builder.mul(tile, n_super), s)
                    row_at = builder.add(builder.mul(ts, n_rows), r0)
                    d_w, dmin_w = vec(wd_p, row_at, v_f32), vec(wdmin_p, row_at, v_f32)

                    def sub(i):   # scale (i < 8) or min (8 + g) of each row, widened
                        at = builder.add(builder.mul(builder.add(builder.mul(ts, _c(16)), _c(i)), n_rows), r0)
                        return builder.sext(vec(sub_p, at, ir.VectorType(_i8, rows)), v_i32)
                    ts_tok = [builder.add(builder.mul(builder.add(t0, _c(j)), n_super), s) for j in range(n_tok)]
                    y_d = [_splat(builder, builder.load(builder.gep(xd_p, [ts_tok[j]])), v_f32) for j in range(n_tok)]
                    dy = [builder.fmul(d_w, y_d[j]) for j in range(n_tok)]          # d_w * d_y
                    dminy = [builder.fmul(dmin_w, y_d[j]) for j in range(n_tok)]    # dmin_w * d_y

                    def ysum(j, g):   # the activations' sum over sub-block g: two bsums of 16
                        at = builder.mul(ts_tok[j], _c(16))
                        pair = [builder.load(builder.gep(bs_p, [builder.add(at, _c(2 * g + k))])) for k in (0, 1)]
                        return _splat(builder, builder.add(pair[0], pair[1]), v_i32)
                    s1 = [zero_i] * n_tok
                    s2 = [zero_i] * n_tok
                    for c in range(4):   # chunk c: sub-blocks 2c (low nibbles) and 2c + 1 (high)
                        halves = ([], [])
                        for lane in range(8):
                            at = builder.add(builder.mul(builder.add(builder.mul(ts, _c(32)), _c(8 * c + lane)),
                                                         builder.mul(n_rows, _c(4))), builder.mul(r0, _c(4)))
                            v = _load(builder, wq_p, at, v_i8)
                            low, high = _nibbles(builder, v)
                            halves[0].append(low)
                            halves[1].append(high)
                        scales = [sub(2 * c), sub(2 * c + 1)]
                        mins = [sub(8 + 2 * c), sub(8 + 2 * c + 1)]
                        for j in range(n_tok):
                            x_at = builder.add(builder.mul(builder.add(t0, _c(j)), n_cols), builder.mul(s, _c(256)))
                            for h, g in enumerate((2 * c, 2 * c + 1)):
                                gd = zero_i
                                for lane in range(8):
                                    word = builder.load(builder.bitcast(builder.gep(xq_p, [builder.add(x_at, _c(32 * g + 4 * lane))]),
                                                                        _i32.as_pointer()), align=1)
                                    gd = dot4(gd, halves[h][lane], builder.bitcast(_splat(builder, word, v_i32), v_i8))
                                s1[j] = builder.add(s1[j], builder.mul(scales[h], gd))
                                s2[j] = builder.add(s2[j], builder.mul(mins[h], ysum(j, g)))
                            if grouped:   # one FMA per 64 weights
                                builder.store(builder.call(fma, [builder.sitofp(s1[j], v_f32), dy[j], builder.load(acc[j])]), acc[j])
                                builder.store(builder.call(fma, [builder.sitofp(s2[j], v_f32), dminy[j],
                                                                 builder.load(acc_min[j])]), acc_min[j])
                                s1[j], s2[j] = zero_i, zero_i
                    if not grouped:   # one FMA per super-block
                        for j in range(n_tok):
                            builder.store(builder.call(fma, [builder.sitofp(s1[j], v_f32), dy[j], builder.load(acc[j])]), acc[j])
                            builder.store(builder.call(fma, [builder.sitofp(s2[j], v_f32), dminy[j],
                                                             builder.load(acc_min[j])]), acc_min[j])
                for j in range(n_tok):
                    dst = builder.gep(out_p, [builder.add(builder.mul(_c(j), n_rows), r0)])
                    builder.store(builder.fsub(builder.load(acc[j]), builder.load(acc_min[j])),
                                  builder.bitcast(dst, v_f32.as_pointer()), align=4)
            return context.get_dummy_value()

        if not _c_layout(wq, wsub, wd, wdmin, xq, xd, bsums, out):
            return None
        return types.void(wq, wsub, wd, wdmin, tile, xq, xd, bsums, t0, out), codegen

    return q4_k_repacked


q4_k_gemv, q4_k_gemv_tokens = _make_q4_k_repacked(False, 1), _make_q4_k_repacked(False, K_TOKEN_TILE)
q4_k_gemm, q4_k_gemm_tokens = _make_q4_k_repacked(True, 1), _make_q4_k_repacked(True, K_TOKEN_TILE)
