"""8-bit blockwise optimizer state: the readable definition of the codec (contract: docs/state8.md).

``exp_avg`` (m) and ``exp_avg_sq`` (v) of an eligible tensor are stored as one byte per element plus one
float32 scale per block of :data:`BLOCK` consecutive elements (row-major order). The scale is the block's
largest magnitude and the byte an 8-bit float of the element relative to it:

* m: ``s_m = max|m|``; int8 code ``c = sign(m)·F8(|m|/s_m; E=4, M=3)``; decoded ``m = sign(c)·V(|c|)·s_m``;
* v: coded through w = √v (what the update divides by): ``s_w = max √v``; uint8 code
  ``c = F8(√v/s_w; E=5, M=3)``; decoded ``√v = V(c)·s_w``, ``v = (√v)²``.

F8(x; E, M) rounds x ∈ [0, 1] to the nearest (ties to even) float with E exponent bits (bias 2^E − 1, so
1.0 is the code (2^E − 1)·2^M), M mantissa bits and subnormals; V(code) is its exact value. "/s" is
"·(1/s)", with 1/s taken as 0 when s is below 2^−126 (an all-zero block, a NaN scale, a block of
subnormals). With 3 mantissa bits every value keeps a relative error ≤ 1/16 over 14 binades below the
block's largest |m| and 30 below its largest √v, so a small v is not rounded to 0 (a division by ε alone)
unless it is below 2^−60 of its block's largest. The code is computed on the float32 bit pattern of x with
integer adds and shifts, like rounding a float32 to a narrower float: no 256-entry table to search
(bitsandbytes' dynamic map), no square root or division per element (companded codes).

This module is written in float32 / integer ops on purpose: the formulas define stored bits, and every
kernel (CPU, CUDA, Triton) performs the same operations, so codes and scales agree bit for bit with these
functions (tests/test_state8.py checks F8 against the nearest representable value in float64).

Eligibility (:func:`eligible`): at least 2 dims, at least :data:`MIN_NUMEL` elements, and a dim-0 row
(``prod(shape[1:])`` elements) that is a multiple of :data:`BLOCK`. Then blocks never straddle rows, so
a tensor split by rows — FSDP2's ``Shard(0)`` at any world size, even uneven — splits its blocks
whole, and the scales, shaped ``(shape[0], row // BLOCK)``, shard along dim 0 exactly like the codes.
Other tensors keep full-precision state.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple

import torch
from torch import Tensor

BLOCK = 128
MIN_NUMEL = 4096
MANTISSA_BITS = 3
EXP_BITS_M = 4   # exp_avg codes: sign + e4m3 (|code| ≤ 120 for |m| ≤ s_m)
EXP_BITS_V = 5   # exp_avg_sq codes: e5m3 of √v (code ≤ 248)
MIN_SCALE = 2.0 ** -126  # smallest normal float32: 1/s is finite from here on


def eligible(shape: Sequence[int]) -> bool:
    """Whether a tensor of this (global) shape gets 8-bit state."""
    shape = tuple(shape)
    if len(shape) < 2:
        return False
    return math.prod(shape) >= MIN_NUMEL and math.prod(shape[1:]) % BLOCK == 0


def scale_shape(shape: Sequence[int]) -> Tuple[int, int]:
    """Shape of the per-block scales of an eligible tensor: one row of scales per dim-0 row."""
    shape = tuple(shape)
    return (shape[0], math.prod(shape[1:]) // BLOCK)


def _blocks(x: Tensor) -> Tensor:
    return x.detach().to(torch.float32).contiguous().reshape(-1, BLOCK)


def _block_max_abs(blocks: Tensor) -> Tensor:
    """max |x| per block, taken on the bit patterns (exact; NaN anywhere gives a NaN scale)."""
    return (blocks.view(torch.int32) & 0x7FFFFFFF).amax(dim=1).view(torch.float32)


def _encode_factor(s: Tensor) -> Tensor:
    """r = 1/s, or 0 where s < 2^−126 (an all-zero block, a NaN scale, a block of subnormals)."""
    return torch.where(s >= MIN_SCALE, torch.ones_like(s) / s, torch.zeros_like(s))


def f8_encode(x: Tensor, exp_bits: int) -> Tensor:
    """F8(x) of float32 x ≥ 0 as int64 codes in [0, 2^(E+M) − 1] (NaN → the largest code).

    Normal range (x ≥ 2^(1 − bias)): round the float32 bit pattern to M mantissa bits, ties to even (the
    carry of a rounded-up mantissa moves into the exponent), and rebase the exponent from float32's bias
    127 to F8's. Below it: subnormal codes, x in steps of 2^(1 − bias − M)."""
    bias, shift = 2 ** exp_bits - 1, 23 - MANTISSA_BITS
    u = x.view(torch.int32).to(torch.int64) & 0x7FFFFFFF
    normal = ((u + (1 << (shift - 1)) - 1 + ((u >> shift) & 1)) >> shift) - ((127 - bias) << MANTISSA_BITS)
    tiny = x < 2.0 ** (1 - bias)
    subnormal = torch.round(torch.where(tiny, x, torch.zeros_like(x)) * 2.0 ** (bias - 1 + MANTISSA_BITS))
    codes = torch.where(tiny, subnormal.to(torch.int64), normal)
    return codes.clamp(max=2 ** (exp_bits + MANTISSA_BITS) - 1)


def f8_decode(codes: Tensor, exp_bits: int) -> Tensor:
    """V(code): the float32 value of F8 codes in [0, 2^(E+M) − 1] (exact)."""
    bias, shift = 2 ** exp_bits - 1, 23 - MANTISSA_BITS
    c = codes.to(torch.int64)
    normal = ((c + ((127 - bias) << MANTISSA_BITS)) << shift).to(torch.int32).view(torch.float32)
    subnormal = c.to(torch.float32) * 2.0 ** (1 - bias - MANTISSA_BITS)
    return torch.where(c < 2 ** MANTISSA_BITS, subnormal, normal)


def quantize_exp_avg(m: Tensor) -> Tuple[Tensor, Tensor]:
    """(int8 codes shaped like m, float32 scales of :func:`scale_shape`) of the first moment."""
    blocks = _blocks(m)
    s = _block_max_abs(blocks)                                           # s_m
    q = f8_encode(blocks.abs() * _encode_factor(s)[:, None], EXP_BITS_M)
    c = torch.where(blocks < 0, -q, q)
    return c.to(torch.int8).reshape(m.shape), s.reshape(scale_shape(m.shape))


def dequantize_exp_avg(codes: Tensor, scales: Tensor) -> Tensor:
    """m = sign(c)·V(|c|)·s_m (float32, shaped like the codes)."""
    c = codes.reshape(-1, BLOCK).to(torch.int64)
    a = f8_decode(c.abs(), EXP_BITS_M) * scales.reshape(-1, 1).to(torch.float32)
    return torch.where(c < 0, -a, a).reshape(codes.shape)


def ieee_sqrt(x: Tensor) -> Tensor:
    """The correctly rounded float32 square root (as the kernels' sqrt instructions compute it). torch's CPU
    float32 sqrt is not always correctly rounded; rounding the float64 root to float32 is (53 ≥ 2·24 + 2 bits)."""
    return x.to(torch.float64).sqrt().to(torch.float32)


def quantize_exp_avg_sq(v: Tensor) -> Tuple[Tensor, Tensor]:
    """(uint8 codes shaped like v, float32 scales) of the second moment, coded through w = √v."""
    w = ieee_sqrt(_blocks(v))
    s = _block_max_abs(w)                                                # s_w = max √v
    q = f8_encode(w * _encode_factor(s)[:, None], EXP_BITS_V)
    return q.to(torch.uint8).reshape(v.shape), s.reshape(scale_shape(v.shape))


def dequantize_exp_avg_sq(codes: Tensor, scales: Tensor) -> Tensor:
    """v = (V(c)·s_w)² (float32, shaped like the codes)."""
    w = f8_decode(codes.reshape(-1, BLOCK), EXP_BITS_V) * scales.reshape(-1, 1).to(torch.float32)   # √v
    return (w * w).reshape(codes.shape)
