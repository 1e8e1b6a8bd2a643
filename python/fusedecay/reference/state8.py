"""8-bit blockwise optimizer state: the readable definition of the codec (contract: docs/state8.md).

``exp_avg`` (m) and ``exp_avg_sq`` (v) of an eligible tensor are stored as one byte per element plus one
float32 scale per block of :data:`BLOCK` consecutive elements (row-major order):

* m: int8 code ``c = sign(m)·rne(min(127·sqrt(|m|/s_m), 127))`` with ``s_m = max|m|`` over the block;
  decoded as ``m = (c·|c|·K_m)·s_m``, ``K_m = fp32(1/127²)``;
* v: uint8 code of √v, ``c = rne(min(255·sqrt(√v/s_w), 255))`` with ``s_w = max √v`` over the block;
  decoded as ``√v = (c²·K_v)·s_w``, ``K_v = fp32(1/255²)``, ``v = (√v)²``.

rne = round to nearest, ties to even; "/s" is "·(1/s)", with 1/s taken as 0 when s is below 2^−126 (an
all-zero block, a NaN scale, a block of subnormals). 127²·K_m and 255²·K_v round to exactly 1, so the
largest code decodes to its scale and encoding decoded state gives back the same codes and scales. Both
codes are square-root companded (m's code is linear in sqrt|m|, v's in v^¼), which spends the 8 bits
where Adam needs them: small moments keep a relative resolution (the smallest non-zero |m| is
(0.5/127)²·s_m ≈ 1.6e-5·s_m; the smallest non-zero √v ≈ 3.8e-6·s_w, so v is not rounded to 0 — a
division by ε alone — unless it is that small against its block's largest), and encoding is a square
root and a multiply per element, not a search in a 256-entry table.

This module is written in float32 on purpose: the formulas define stored bits, and every kernel (CPU,
CUDA, Triton) performs the same sequence of IEEE-rounded float32 operations, so codes and scales agree
bit for bit with these functions (tests/test_state8.py checks them against a float64 closed form).

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
MAX_CODE_M = 127
MAX_CODE_V = 255
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


def _decode_factor(max_code: int) -> float:
    """K = fp32(1/max_code²), as a Python float (exactly representable in float32)."""
    return float(torch.tensor(1.0, dtype=torch.float32) / (max_code * max_code))


def _code(t: Tensor, max_code: int) -> Tensor:
    """rne(min(t, max_code)) for t ≥ 0 (NaN → max_code)."""
    return torch.round(torch.where(t < max_code, t, torch.full_like(t, max_code)))


def quantize_exp_avg(m: Tensor) -> Tuple[Tensor, Tensor]:
    """(int8 codes shaped like m, float32 scales of :func:`scale_shape`) of the first moment."""
    blocks = _blocks(m)
    s = _block_max_abs(blocks)                                           # s_m
    r = _encode_factor(s)
    t = (blocks.abs() * r[:, None]).sqrt() * MAX_CODE_M                  # 127·sqrt(|m|/s_m)
    c = _code(t, MAX_CODE_M)
    c = torch.where(blocks < 0, -c, c)
    return c.to(torch.int8).reshape(m.shape), s.reshape(scale_shape(m.shape))


def dequantize_exp_avg(codes: Tensor, scales: Tensor) -> Tensor:
    """m = (c·|c|·K_m)·s_m (float32, shaped like the codes)."""
    c = codes.to(torch.float32).reshape(-1, BLOCK)
    s = scales.reshape(-1, 1).to(torch.float32)
    return (((c * c.abs()) * _decode_factor(MAX_CODE_M)) * s).reshape(codes.shape)


def quantize_exp_avg_sq(v: Tensor) -> Tuple[Tensor, Tensor]:
    """(uint8 codes shaped like v, float32 scales) of the second moment, coded through w = √v."""
    w = _blocks(v).sqrt()
    s = _block_max_abs(w)                                                # s_w = max √v
    r = _encode_factor(s)
    t = (w * r[:, None]).sqrt() * MAX_CODE_V                             # 255·sqrt(√v/s_w) = 255·(v/s_w²)^¼
    return _code(t, MAX_CODE_V).to(torch.uint8).reshape(v.shape), s.reshape(scale_shape(v.shape))


def dequantize_exp_avg_sq(codes: Tensor, scales: Tensor) -> Tensor:
    """v = ((c²·K_v)·s_w)² (float32, shaped like the codes)."""
    c = codes.to(torch.float32).reshape(-1, BLOCK)
    s = scales.reshape(-1, 1).to(torch.float32)
    w = ((c * c) * _decode_factor(MAX_CODE_V)) * s                      # √v
    return (w * w).reshape(codes.shape)
