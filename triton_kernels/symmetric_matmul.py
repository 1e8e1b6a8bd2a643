"""Symmetric product C = α·X Xᵀ + β·Y for batched X (n, M, K), computing one triangle of tiles.

C is symmetric whenever Y is, so each program computes one tile C[i, j] with i ≥ j and stores it
twice, at (i, j) and transposed at (j, i): about half the FLOPs of a general matmul. Newton–Schulz
uses it twice per step: A = X Xᵀ, and B = b·A + c·A Aᵀ (= b·A + c·A² because A is symmetric).
The mirrored result is exactly symmetric, unlike a general matmul's.

Accumulation is fp32; fp32 inputs use IEEE dot products (no TF32), like torch's default matmul.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._device import on_device


@triton.jit
def _symmetric_matmul_kernel(x_ptr, y_ptr, c_ptr, M, K,
                             sxb, sxm, sxk, syb, sym_, syn, scb, scm, scn,
                             alpha, beta,
                             HAS_Y: tl.constexpr, IEEE: tl.constexpr,
                             BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    # Linear id → lower-triangle tile (i, j), j ≤ i: i = ⌊(√(8p+1) − 1)/2⌋, then fix float rounding.
    i = ((tl.sqrt(8.0 * pid.to(tl.float32) + 1.0) - 1.0) * 0.5).to(tl.int32)
    i = tl.where((i + 1) * (i + 2) // 2 <= pid, i + 1, i)
    i = tl.where(i * (i + 1) // 2 > pid, i - 1, i)
    j = pid - i * (i + 1) // 2

    rm = i * BLOCK + tl.arange(0, BLOCK)
    rn = j * BLOCK + tl.arange(0, BLOCK)
    rk = tl.arange(0, BLOCK_K)
    x_base = x_ptr + batch * sxb
    a_ptrs = x_base + rm[:, None] * sxm + rk[None, :] * sxk      # X[rm, k]     (BLOCK, BLOCK_K)
    b_ptrs = x_base + rn[None, :] * sxm + rk[:, None] * sxk      # X[rn, k]ᵀ    (BLOCK_K, BLOCK)
    acc = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kmask = (k0 + rk) < K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & kmask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=kmask[:, None] & (rn[None, :] < M), other=0.0)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K * sxk
        b_ptrs += BLOCK_K * sxk

    mask = (rm[:, None] < M) & (rn[None, :] < M)
    acc = acc * alpha
    if HAS_Y:
        y = tl.load(y_ptr + batch * syb + rm[:, None] * sym_ + rn[None, :] * syn, mask=mask, other=0.0)
        acc += beta * y.to(tl.float32)
    out = acc.to(c_ptr.dtype.element_ty)
    c_base = c_ptr + batch * scb
    # Keep the lower triangle (all of an off-diagonal tile, since i > j) and store it twice: at
    # C[rm, rn] and mirrored at C[rn, rm]. The result is exactly symmetric, diagonal tiles included.
    lower = mask & (rm[:, None] >= rn[None, :])
    tl.store(c_base + rm[:, None] * scm + rn[None, :] * scn, out, mask=lower)
    tl.store(c_base + rn[None, :] * scm + rm[:, None] * scn, out, mask=lower)

def _config(M: int, dtype: torch.dtype, device: torch.device):
    """(BLOCK, BLOCK_K, num_warps, num_stages). Untuned on GPU: bench/bench_newton_schulz.py measures it."""
    if device.type != "cuda":          # interpreter: small tiles keep numpy work small
        return 32, 32, 1, 1
    if dtype == torch.float32:
        # fp32 (IEEE dot, no tensor cores): a 128×128 accumulator with 8 warps spills registers on sm_90.
        return 64, 32, 4, 2
    if M >= 1024:
        return 128, 64, 8, 3
    return 64, 64, 4, 3


def symmetric_matmul(x: Tensor, alpha: float = 1.0, beta: float = 0.0, add: Optional[Tensor] = None,
                     out: Optional[Tensor] = None) -> Tensor:
    """α·X Xᵀ + β·Y for X of shape (M, K) or (n, M, K); ``add`` = Y must be symmetric (n, M, M).

    Returns a new (n, M, M) tensor (or writes ``out``) in X's dtype.
    """
    if x.ndim not in (2, 3):
        raise ValueError(f"symmetric_matmul: x must be (M, K) or (n, M, K), got shape {tuple(x.shape)}")
    squeeze = x.ndim == 2
    x3 = x.unsqueeze(0) if squeeze else x
    n, M, K = x3.shape
    if add is not None:
        add3 = add.unsqueeze(0) if add.ndim == 2 else add
        if tuple(add3.shape) != (n, M, M):
            raise ValueError(f"symmetric_matmul: add must have shape {(n, M, M)}, got {tuple(add.shape)}")
    else:
        add3 = x3   # unused (HAS_Y=False); any valid pointer
    if out is None:
        out3 = torch.empty((n, M, M), dtype=x.dtype, device=x.device)
    else:
        out3 = out.unsqueeze(0) if out.ndim == 2 else out
        if tuple(out3.shape) != (n, M, M) or out3.dtype != x.dtype:
            raise ValueError(f"symmetric_matmul: out must be {x.dtype} of shape {(n, M, M)}")
    if n == 0 or M == 0:
        return out3.squeeze(0) if squeeze else out3
    block, block_k, warps, stages = _config(M, x.dtype, x.device)
    tiles = triton.cdiv(M, block)
    grid = (tiles * (tiles + 1) // 2, n)
    with on_device(x.device):
        _symmetric_matmul_kernel[grid](
            x3, add3, out3, M, K, *x3.stride(), *add3.stride(), *out3.stride(), float(alpha), float(beta),
            HAS_Y=add is not None, IEEE=x.dtype == torch.float32, BLOCK=block, BLOCK_K=block_k,
            num_warps=warps, num_stages=stages)
    return out3.squeeze(0) if squeeze else out3


def symmetric_matmul_flops(n: int, M: int, K: int) -> int:
    """FLOPs a general matmul would spend on X Xᵀ (the conventional count for TFLOP/s)."""
    return 2 * n * M * M * K


__all__ = ["symmetric_matmul", "symmetric_matmul_flops"]
