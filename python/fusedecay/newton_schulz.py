"""Batched Newton–Schulz: one bmm chain per group of same-shape matrices.

The spectral LMO of ScionC is NS(m)·sqrt(d_out/d_in), NS = the orthogonal polar factor by
Newton–Schulz (see :func:`fusedecay.reference.scion.newton_schulz`, the ground truth, and its
coefficients :func:`~fusedecay.reference.scion.ns_coefficients`: classic quintic or Polar Express,
Amsel et al. 2025, arXiv 2505.16932). A model has many matrices of few shapes (GPT-2 124M: 48
matrices, 3 shapes once oriented wide), so running one batched chain per shape replaces ~15 small
matmuls per matrix with ~15 large ones per shape.

Two modes:

* ``exact=True`` (default on CPU): groups by the exact shape, stacks the matrices without
  transposing them and runs the reference's operations in the reference's order on the stack. This
  is not bit-identical to the per-layer reference: the stack's matmuls are ``bmm`` calls, the
  reference's are ``mm`` calls, and BLAS libraries pick different kernels for them (MKL on Intel
  CPUs does). Tested against the float64 NS within fp32 tolerance, like the fused mode.
* ``exact=False`` (default on CUDA): groups by the shape oriented wide (d×D and D×d share a group),
  writes each matrix into the stacked buffer already transposed and cast (one copy), and fuses the
  polynomial into the matmuls' epilogues (``baddbmm``: B = bA + cA², X = aX + BX). Optionally the
  two symmetric products (A = XXᵀ and A² = AAᵀ) run on a Triton kernel that computes one triangle
  of tiles and mirrors it (:mod:`fusedecay.triton_kernels.symmetric_matmul`), for groups whose
  oriented row count is ≥ ``symmetric_min_rows``. Off by default until the GPU benchmark
  (bench/bench_newton_schulz.py) sets the crossover.
"""
from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor

from .reference.scion import NS_EPS, as_matrices, from_matrices, ns_coefficients

# Oriented row count from which the Triton symmetric kernel replaces bmm (None: never). Settable by the
# environment so the benchmark's crossover can be applied without a code change.
_env = os.environ.get("FUSEDECAY_SYMMETRIC_MIN_ROWS")
SYMMETRIC_MIN_ROWS: Optional[int] = int(_env) if _env else None


def default_ns_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU, fp64 for fp64 inputs (the ScionC class's rule)."""
    if dtype == torch.float64:
        return torch.float64
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def shape_groups(mats: Sequence[Tensor], merge_transposed: bool) -> Dict[tuple, List[int]]:
    """Indices of ``mats`` grouped by (device, shape) — by the wide-oriented shape if ``merge_transposed``."""
    groups: Dict[tuple, List[int]] = defaultdict(list)
    for i, m in enumerate(mats):
        if m.ndim != 2:
            raise ValueError(f"newton_schulz_batched needs 2-D matrices, got shape {tuple(m.shape)} at index {i}")
        r, c = m.shape
        shape = (min(r, c), max(r, c)) if merge_transposed else (r, c)
        groups[(m.device, m.dtype, shape)].append(i)
    return groups


def _chain_exact(x: Tensor, coeffs) -> Tensor:
    """The reference's iteration, op for op, on a stack (bmm where the reference runs mm)."""
    for a, b, c in coeffs:
        A = x @ x.mT
        B = b * A + c * (A @ A)
        x = a * x + B @ x
    return x


def _chain_fused(x: Tensor, coeffs, symmetric: bool) -> Tensor:
    """Same polynomial with the scalar work folded into the matmuls: 3 launches per step."""
    if symmetric:
        from .triton_kernels.symmetric_matmul import symmetric_matmul
    for a, b, c in coeffs:
        if symmetric:
            A = symmetric_matmul(x)                          # A = X Xᵀ, one triangle of tiles computed
            B = symmetric_matmul(A, alpha=c, beta=b, add=A)  # B = b A + c A Aᵀ  (A symmetric: A Aᵀ = A²)
        else:
            A = torch.bmm(x, x.mT)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        x = torch.baddbmm(x, B, x, beta=a, alpha=1.0)
    return x


def use_symmetric_kernel(x: Tensor, symmetric_min_rows: Optional[int]) -> bool:
    """Whether the fused chain on stack ``x`` (n, rows, cols) runs its symmetric products on Triton."""
    return (symmetric_min_rows is not None and x.device.type == "cuda" and x.size(-2) >= symmetric_min_rows
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16))


def newton_schulz_stack(x: Tensor, steps: int = 5, ns: str = "classic", *,
                        symmetric_min_rows: Optional[int] = None) -> Tensor:
    """Fused-mode NS of a wide-oriented stack ``x`` (n, rows ≤ cols), computed in x's dtype.

    Normalises each slice by its Frobenius norm (×1.01 for Polar Express) and runs the fused chain.
    ``symmetric_min_rows``: default :data:`SYMMETRIC_MIN_ROWS`.
    """
    if symmetric_min_rows is None:
        symmetric_min_rows = SYMMETRIC_MIN_ROWS
    if x.ndim != 3 or x.size(-2) > x.size(-1):
        raise ValueError(f"newton_schulz_stack needs a wide (n, rows <= cols) stack, got shape {tuple(x.shape)}")
    coeffs = ns_coefficients(ns, steps)
    scale = 1.01 if ns == "polar_express" else 1.0
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) * scale + NS_EPS)
    return _chain_fused(x, coeffs, use_symmetric_kernel(x, symmetric_min_rows))


def newton_schulz_batched(mats: Sequence[Tensor], steps: int = 5, ns: str = "classic",
                          dtype: Optional[torch.dtype] = None, *, exact: Optional[bool] = None,
                          symmetric_min_rows: Optional[int] = None) -> List[Tensor]:
    """NS(m) for every matrix in ``mats`` (the same function as the reference), batched by shape.

    ``dtype``: the dtype the iteration runs in (default :func:`default_ns_dtype`). ``exact``: see the
    module docstring (default: True on CPU, False elsewhere). ``symmetric_min_rows``: fused mode only;
    default :data:`SYMMETRIC_MIN_ROWS`. Returns tensors in each input's dtype and shape.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Invalid steps: {steps!r} (must be an integer >= 1)")
    coeffs = ns_coefficients(ns, steps)   # raises ValueError on an unknown ns
    scale = 1.01 if ns == "polar_express" else 1.0
    if symmetric_min_rows is None:
        symmetric_min_rows = SYMMETRIC_MIN_ROWS
    out: List[Optional[Tensor]] = [None] * len(mats)
    for (device, in_dtype, _), idx in _ordered_groups(mats, exact).items():
        ex = exact if exact is not None else device.type == "cpu"
        dt = dtype or default_ns_dtype(device, in_dtype)
        if ex:
            # Stack as stored; then exactly the reference's steps on the stack.
            x = torch.stack([mats[i] for i in idx]).to(dt)
            tall = x.size(-2) > x.size(-1)
            if tall:
                x = x.mT
            x = x / (torch.linalg.matrix_norm(x, keepdim=True) * scale + NS_EPS)
            x = _chain_exact(x, coeffs)
            if tall:
                x = x.mT
            for k, i in enumerate(idx):
                out[i] = x[k].to(in_dtype)
        else:
            r, c = mats[idx[0]].shape
            rows, cols = min(r, c), max(r, c)
            x = torch.empty((len(idx), rows, cols), dtype=dt, device=device)
            for k, i in enumerate(idx):
                m = mats[i]
                x[k].copy_(m.mT if m.size(0) > m.size(1) else m)   # orient wide + cast in one copy
            x = newton_schulz_stack(x, steps, ns, symmetric_min_rows=symmetric_min_rows)
            for k, i in enumerate(idx):
                m = mats[i]
                out[i] = (x[k].mT if m.size(0) > m.size(1) else x[k]).to(in_dtype)
    return out  # type: ignore[return-value]


def _ordered_groups(mats: Sequence[Tensor], exact: Optional[bool]) -> Dict[tuple, List[int]]:
    if exact is None:
        # Per device: CPU groups by exact shape, other devices merge transposed shapes.
        cpu = [i for i, m in enumerate(mats) if m.device.type == "cpu"]
        rest = [i for i, m in enumerate(mats) if m.device.type != "cpu"]
        groups: Dict[tuple, List[int]] = {}
        for sel, merge in ((cpu, False), (rest, True)):
            for key, idx in shape_groups([mats[i] for i in sel], merge).items():
                groups[key] = [sel[j] for j in idx]
        return groups
    return shape_groups(mats, merge_transposed=not exact)


def spectral_directions(weights: Sequence[Tensor], steps: int = 5, ns: str = "classic",
                        dtype: Optional[torch.dtype] = None, *, matrix_view: str = "auto", **kw) -> List[Tensor]:
    """Spectral LMO of each weight: NS·sqrt(d_out/d_in) per matrix of ``matrix_view`` (reference: ``spectral_lmo``).

    N-D weights are split into their matrices first (an expert stack (E, d_out, d_in) into E matrices, a
    conv kernel flattened to one), so every matrix joins the batch of its shape: the experts of a stack
    and same-shape matrices of other params share one bmm chain."""
    views = [as_matrices(w, matrix_view) for w in weights]
    matrices, counts = [], []
    for v in views:
        stack = v.reshape(math.prod(v.shape[:-2]), *v.shape[-2:])
        matrices.extend(stack.unbind(0))
        counts.append(stack.size(0))
    q = iter(newton_schulz_batched(matrices, steps, ns, dtype, **kw))
    out = []
    for w, v, n in zip(weights, views, counts):
        d_out, d_in = v.shape[-2], v.shape[-1]
        if v.ndim == 2:
            x = next(q)
        else:
            x = torch.stack([next(q) for _ in range(n)]) if n else v.new_empty((0, d_out, d_in))
        out.append(from_matrices(x.reshape(v.shape) * math.sqrt(d_out / d_in), matrix_view, w.shape))
    return out


def ns_flops(rows: int, cols: int, steps: int) -> int:
    """Matmul FLOPs of ``steps`` iterations on one wide-oriented rows×cols matrix (2 r²c + 2 r³ + 2 r²c)."""
    return steps * (4 * rows * rows * cols + 2 * rows ** 3)

