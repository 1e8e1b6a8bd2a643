"""The 8-bit moment codec (docs/state8.md) in Triton: csrc/state8.h's formulas in ``tl`` ops, for the ``QUANT``
specialisation of triton_kernels/adam_decay.py. A block is handled as rows of :data:`QBLOCK` elements with one
scale per row; codes travel as int32, moments as fp32. Encoding is integer arithmetic on fp32 bit patterns and
IEEE products, so under the interpreter the codes equal the reference codec's bit for bit.
"""
import triton
import triton.language as tl

QBLOCK = 128  # elements per scale (csrc/state8.h kBlock)
QBLOCK_C = tl.constexpr(QBLOCK)
_ROUND_MAGIC = tl.constexpr(8388608.0)  # 2^23: (t + 2^23) − 2^23 rounds 0 ≤ t < 2^23 to nearest even
_MIN_SCALE = tl.constexpr(2.0 ** -126)


def _f8_constants(exp_bits: int, mantissa_bits: int = 3):
    """(exponent rebase in code units, smallest normal, subnormal scale 2^(bias−1+M), its inverse, largest code)
    of the F8 format with ``exp_bits`` exponent bits (csrc/state8.h F8Format)."""
    bias = 2 ** exp_bits - 1
    sub_exp = bias - 1 + mantissa_bits
    return tuple(tl.constexpr(c) for c in ((127 - bias) << mantissa_bits, 2.0 ** (1 - bias), 2.0 ** sub_exp,
                                           2.0 ** -sub_exp, 2 ** (exp_bits + mantissa_bits) - 1))


_M_OFFSET, _M_MIN_NORMAL, _M_SUB_SCALE, _M_SUB_STEP, _M_MAX_CODE = _f8_constants(4)  # exp_avg: sign + e4m3
_V_OFFSET, _V_MIN_NORMAL, _V_SUB_SCALE, _V_SUB_STEP, _V_MAX_CODE = _f8_constants(5)  # exp_avg_sq (√v): e5m3


@triton.jit
def row_max_abs(x):
    """max |x| per row of a [rows, QBLOCK] block, on the bit patterns (csrc/state8.h abs_bits)."""
    bits = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    return tl.max(bits, axis=1).to(tl.float32, bitcast=True)


@triton.jit
def _encode_factor(s):
    """1/s, or 0 where s < 2^−126."""
    return tl.where(s >= _MIN_SCALE, tl.div_rn(tl.full(s.shape, 1.0, tl.float32), s), 0.0)


@triton.jit
def _f8_encode(x, OFFSET: tl.constexpr, MIN_NORMAL: tl.constexpr, SUB_SCALE: tl.constexpr,
               MAX_CODE: tl.constexpr):
    """F8(x) of x ≥ 0 as int32 codes (3 mantissa bits): the fp32 bit pattern rounded to nearest even and
    rebased, or a subnormal code below MIN_NORMAL; NaN → MAX_CODE (csrc/state8.h f8_encode)."""
    u = x.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
    normal = ((u + 0x7FFFF + ((u >> 20) & 1)) >> 20).to(tl.int32) - OFFSET
    tiny = x < MIN_NORMAL
    subnormal = ((tl.where(tiny, x, 0.0) * SUB_SCALE + _ROUND_MAGIC) - _ROUND_MAGIC).to(tl.int32)
    return tl.minimum(tl.where(tiny, subnormal, normal), MAX_CODE)


@triton.jit
def _f8_decode(c, OFFSET: tl.constexpr, SUB_STEP: tl.constexpr):
    """V(c): the exact float32 value of int32 F8 codes (csrc/state8.h f8_decode)."""
    normal = ((c + OFFSET) << 20).to(tl.float32, bitcast=True)
    return tl.where(c < 8, c.to(tl.float32) * SUB_STEP, normal)


@triton.jit
def decode_exp_avg(codes, s_m):
    """m = sign(c)·V(|c|)·s_m, ``s_m`` one scale per row."""
    c = codes.to(tl.int32)
    a = _f8_decode(tl.abs(c), _M_OFFSET, _M_SUB_STEP) * s_m[:, None]
    return tl.where(c < 0, -a, a)


@triton.jit
def decode_exp_avg_sq(codes, s_w):
    """v = (V(c)·s_w)², ``s_w`` one scale per row."""
    w = _f8_decode(codes.to(tl.int32), _V_OFFSET, _V_SUB_STEP) * s_w[:, None]
    return w * w


@triton.jit
def encode_exp_avg(m, s_m):
    """int32 codes sign(m)·F8(|m|·r_m) of the rows of m, ``s_m`` their maxima."""
    q = _f8_encode(tl.abs(m) * _encode_factor(s_m)[:, None], _M_OFFSET, _M_MIN_NORMAL, _M_SUB_SCALE, _M_MAX_CODE)
    return tl.where(m < 0.0, -q, q)


@triton.jit
def encode_exp_avg_sq(w, s_w):
    """int32 codes F8(√v·r_w) of the rows of w = √v, ``s_w`` their maxima."""
    return _f8_encode(w * _encode_factor(s_w)[:, None], _V_OFFSET, _V_MIN_NORMAL, _V_SUB_SCALE, _V_MAX_CODE)
