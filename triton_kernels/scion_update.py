"""Element-wise ScionC kernels: everything in a step except the Newton–Schulz matmuls.

One pass over each tensor's memory per kernel, fp32 math, storage in the tensor's dtype (bf16 rounded to nearest
even, also under the interpreter); a momentum buffer may be narrower than its param (ScionC's ``momentum_dtype``):
the LMO input is the unrounded m_t:

* :func:`momentum_to_stack` — m ← (1 − α) m + α g (g negated for ``maximize``) and writes the LMO
  input (m, or the Nesterov m̂ = (1 − α) m + α g) cast to the NS dtype straight into its slot of
  the stacked NS buffer, transposed if the matrix is tall (the slot's strides do the transpose).
  Replaces: momentum update, Nesterov blend, cast, transpose, stack.
* :func:`apply_direction` — θ ← keep·θ − step·D[slot] with keep = 1 − η_t and step = s·sqrt(d_out/d_in),
  reading the NS output slot through its strides. Replaces: unstack, transpose, cast, spectral
  scale, decay, update.
* :func:`sign_step` — the whole step of a ``sign`` group in one pass: momentum, sign LMO, sign/d_in,
  decay and update.

``keep`` and ``step`` are Python floats, or (a tensor lr: CUDA graphs, schedulers writing into it) 0-d
fp32 tensors on the params' device that the kernels read from memory; ``step_mul`` is a per-tensor constant
factor (sqrt(d_out/d_in) or 1/d_in) applied in the kernel. Nothing here reads a device value on the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._device import on_device

_BLOCK = 1024


@triton.jit
def _rne_bf16(x):
    """fp32 → bf16, round to nearest even (NaN → 0x7FC0, as torch), written on the bits: the Triton interpreter's
    own cast truncates, so tests on the CPU would check another rounding than a GPU's."""
    u = x.to(tl.uint32, bitcast=True)
    r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _stored(x, DTYPE: tl.constexpr):
    """fp32 math value ``x`` as storage dtype ``DTYPE`` (rounded to nearest even)."""
    if DTYPE == tl.bfloat16:
        return _rne_bf16(x)
    else:
        return x.to(DTYPE)


@triton.jit
def _momentum_to_stack_kernel(g_ptr, m_ptr, u_ptr, N, n_cols, su_r, su_c, alpha, gsign,
                              NESTEROV: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * gsign
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = m * (1.0 - alpha) + alpha * g                       # m_t = (1 − α) m_{t−1} + α g_t
    tl.store(m_ptr + offs, _stored(m, m_ptr.dtype.element_ty), mask=mask)
    if NESTEROV:
        u = m * (1.0 - alpha) + alpha * g                   # m̂ = (1 − α) m_t + α g_t
    else:
        u = m
    r = offs // n_cols
    c = offs - r * n_cols
    tl.store(u_ptr + r * su_r + c * su_c, _stored(u, u_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_keep_step(keep_ptr, step_ptr, keep, step, step_mul, FROM_MEMORY: tl.constexpr):
    """(keep, step·step_mul) in fp32, from device memory or from the scalar arguments."""
    if FROM_MEMORY:
        keep = tl.load(keep_ptr).to(tl.float32)
        step = tl.load(step_ptr).to(tl.float32)
    else:
        keep = tl.cast(keep, tl.float32)
        step = tl.cast(step, tl.float32)
    return keep, step * tl.cast(step_mul, tl.float32)


@triton.jit
def _apply_direction_kernel(p_ptr, d_ptr, N, n_cols, sd_r, sd_c, keep_ptr, step_ptr, keep, step, step_mul,
                            FROM_MEMORY: tl.constexpr, BLOCK: tl.constexpr):
    keep, step = _load_keep_step(keep_ptr, step_ptr, keep, step, step_mul, FROM_MEMORY)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    r = offs // n_cols
    c = offs - r * n_cols
    d = tl.load(d_ptr + r * sd_r + c * sd_c, mask=mask, other=0.0).to(tl.float32)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = p * keep - step * d                                 # θ_t = (1 − η_t) θ_{t−1} − s·lmo
    tl.store(p_ptr + offs, _stored(p, p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _sign_step_kernel(p_ptr, g_ptr, m_ptr, N, alpha, gsign, keep_ptr, step_ptr, keep, step, step_mul,
                      NESTEROV: tl.constexpr, FROM_MEMORY: tl.constexpr, BLOCK: tl.constexpr):
    keep, step = _load_keep_step(keep_ptr, step_ptr, keep, step, step_mul, FROM_MEMORY)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32) * gsign
    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = m * (1.0 - alpha) + alpha * g
    tl.store(m_ptr + offs, _stored(m, m_ptr.dtype.element_ty), mask=mask)
    if NESTEROV:
        u = m * (1.0 - alpha) + alpha * g
    else:
        u = m
    sgn = tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, 0.0))  # torch.sign (0 stays 0)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    p = p * keep - step * sgn                               # step = s / d_in
    tl.store(p_ptr + offs, _stored(p, p_ptr.dtype.element_ty), mask=mask)


def _check_contiguous(**tensors: Tensor) -> None:
    for name, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous for the Triton ScionC kernels")


def _grid(n: int):
    return (triton.cdiv(n, _BLOCK),)


def momentum_to_stack(grad: Tensor, buf: Tensor, slot: Tensor, *, alpha: float, nesterov: bool,
                      maximize: bool) -> None:
    """Momentum update of ``buf`` in place; LMO input written to ``slot`` (oriented wide: slot = input.mT if tall)."""
    _check_contiguous(grad=grad, momentum_buffer=buf)
    if grad.shape != buf.shape or buf.ndim != 2:
        raise ValueError(f"grad {tuple(grad.shape)} and momentum_buffer {tuple(buf.shape)} must be the same 2-D shape")
    rows, cols = buf.shape
    tall = rows > cols
    if tuple(slot.shape) != ((cols, rows) if tall else (rows, cols)):
        raise ValueError(f"slot shape {tuple(slot.shape)} does not fit a {tuple(buf.shape)} matrix oriented wide")
    su_r, su_c = (slot.stride(1), slot.stride(0)) if tall else (slot.stride(0), slot.stride(1))
    n = buf.numel()
    if n:
        with on_device(buf.device):
            _momentum_to_stack_kernel[_grid(n)](grad, buf, slot, n, cols, su_r, su_c, float(alpha),
                                                -1.0 if maximize else 1.0, NESTEROV=bool(nesterov), BLOCK=_BLOCK)


def _scalars(keep, step, like: Tensor):
    """Kernel arguments (keep_ptr, step_ptr, keep, step, FROM_MEMORY) for floats or 0-d device tensors."""
    if isinstance(keep, Tensor) or isinstance(step, Tensor):
        if not (isinstance(keep, Tensor) and isinstance(step, Tensor)):
            raise ValueError("keep and step must both be floats or both be tensors")
        for name, t in (("keep", keep), ("step", step)):
            if t.numel() != 1 or t.device != like.device or t.dtype != torch.float32:
                raise ValueError(f"{name}: expected a one-element float32 tensor on {like.device}, got "
                                 f"{t.dtype} {tuple(t.shape)} on {t.device}")
        return keep, step, 0.0, 0.0, True
    return like, like, float(keep), float(step), False


def apply_direction(param: Tensor, slot: Tensor, *, keep, step, step_mul: float = 1.0) -> None:
    """θ ← keep·θ − (step·step_mul)·D, D read from ``slot`` (the wide-oriented NS output for this matrix).

    ``keep``/``step``: floats, or 0-d fp32 tensors on the param's device (read by the kernel)."""
    _check_contiguous(param=param)
    rows, cols = param.shape
    tall = rows > cols
    if tuple(slot.shape) != ((cols, rows) if tall else (rows, cols)):
        raise ValueError(f"slot shape {tuple(slot.shape)} does not fit a {tuple(param.shape)} matrix oriented wide")
    sd_r, sd_c = (slot.stride(1), slot.stride(0)) if tall else (slot.stride(0), slot.stride(1))
    kp, sp, kv, sv, from_memory = _scalars(keep, step, param)
    n = param.numel()
    if n:
        with on_device(param.device):
            _apply_direction_kernel[_grid(n)](param, slot, n, cols, sd_r, sd_c, kp, sp, kv, sv, float(step_mul),
                                              FROM_MEMORY=from_memory, BLOCK=_BLOCK)


def sign_step(param: Tensor, grad: Tensor, buf: Tensor, *, alpha: float, keep, step, nesterov: bool,
              maximize: bool, step_mul: float = 1.0) -> None:
    """One whole ``sign``-LMO step on one tensor: step·step_mul = s/d_in, keep = 1 − η_t (floats or 0-d
    fp32 tensors on the param's device)."""
    _check_contiguous(param=param, grad=grad, momentum_buffer=buf)
    if not (param.shape == grad.shape == buf.shape):
        raise ValueError("param, grad and momentum_buffer must have the same shape")
    kp, sp, kv, sv, from_memory = _scalars(keep, step, param)
    n = param.numel()
    if n:
        with on_device(param.device):
            _sign_step_kernel[_grid(n)](param, grad, buf, n, float(alpha), -1.0 if maximize else 1.0, kp, sp, kv, sv,
                                        float(step_mul), NESTEROV=bool(nesterov), FROM_MEMORY=from_memory,
                                        BLOCK=_BLOCK)


__all__ = ["momentum_to_stack", "apply_direction", "sign_step"]
