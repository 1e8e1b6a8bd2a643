"""Triton multi-tensor kernels for Adam with decoupled decay (AdamHD and AdamC).

Implements the contract of :func:`fusedecay.reference.adam_decay_reference` for one bucket of
tensors (one device, one param dtype) in two launches:

1. ``_adam_decay_kernel`` — one program per *block* of ``BLOCK`` elements of one tensor. A flat
   block map (``tensor index, chunk index`` per block) and a pointer table (int64 addresses of each
   tensor's param/grad/moments/step/μ and its numel) live in one int64 device buffer. Each program
   reads its tensor's addresses from the table, updates the moments and the parameter in registers
   (math in fp32, storage in the tensors' own dtypes) and writes Σ|θ_t| of its block into a partials
   buffer. Full blocks take an unmasked path so loads/stores vectorise; the tail block is masked.
2. ``_ordered_abs_sum_kernel`` — one program per tensor sums that tensor's block partials in block
   order: Σ|θ_t| per tensor with a fixed reduction order, so reruns are bit-identical (no atomics); with
   ``delta_beta`` it also updates δ's μ from that sum (AdamHD Eq. 8–9), so δ tracking adds no launch.

8-bit state (docs/state8.md, ``exp_avg_scales`` given): the moments are int8/uint8 codes with one float32
scale per 128 elements. The same kernel (constexpr ``QUANT``) sees its block as rows of 128 elements,
decodes, runs the same element math, takes each row's maxima and encodes — csrc/state8.h's formulas in
tl ops (integer ops on bit patterns, IEEE-rounded products).

The metadata buffer is built on the host once per distinct set of tensors and cached, keyed on
data pointers, sizes and dtypes: steady-state steps copy nothing host→device. On a miss it is uploaded
from pinned memory without a host sync (also inside a CUDA-graph capture; plans a capture used are kept
for the life of the process, since replays read them). Everything
that changes per step reaches the kernel as device memory — the step counters (bias corrections are
computed in-kernel from them), μ (δ = delta_scale·μ), lr / max_lr when they are tensors, grad_scale
and found_inf — so a launch can be captured in a CUDA graph and replayed with a new lr.
"""
from __future__ import annotations

import math
import operator
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._device import on_device
from .state8 import (QBLOCK, QBLOCK_C, decode_exp_avg, decode_exp_avg_sq, encode_exp_avg, encode_exp_avg_sq,
                     row_max_abs)

DECAY_IDS = {"l2": 0, "prox": 1, "euler": 2}

DEFAULT_BLOCK = 4096
DEFAULT_NUM_WARPS = 8
REDUCE_BLOCK = 256
CACHE_SIZE = 64  # distinct tensor sets whose metadata stays on the device (see docs/triton.md)

_FLOAT_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
_TL_DTYPES = {**_FLOAT_TL_DTYPES, torch.int8: tl.int8, torch.uint8: tl.uint8}  # + 8-bit moment codes
# Rows of the pointer table, in order (scales: 8-bit state only; mu_numel: n of μ's update).
_ROWS = ("param", "grad", "exp_avg", "exp_avg_sq", "step", "delta_mu", "numel", "exp_avg_scale", "exp_avg_sq_scale",
         "mu_numel")

# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------

@triton.jit
def _tensor_ptr(row_ptr, tid, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """Address ``row_ptr[tid]`` as a typed pointer; ALIGNED promises 16-byte alignment (vector loads)."""
    ptr = tl.load(row_ptr + tid).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _one_minus_pow(t, LOG2_BETA: tl.constexpr):
    """1 − β^t for the step count t, in fp64 (β^t = 2^(t·log2 β)).

    fp64 because 1 − β2^t cancels: at t = 1, β2 = 0.999, fp32 would keep ~4 significant digits.
    LOG2_BETA is a compile-time double; the result is rounded to fp32 once.
    """
    log2_beta = tl.full((), LOG2_BETA, tl.float64)
    return (1.0 - tl.exp2(t.to(tl.float64) * log2_beta)).to(tl.float32)


@triton.jit
def _clip(x, d):
    """clip(x, −d, d) with comparisons, so a NaN x stays NaN (as torch.clamp and the CUDA/CPU kernels)."""
    return tl.where(x < -d, -d, tl.where(x > d, d, x))


@triton.jit
def _adam_decay_block(p_ptr, g_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, offs, rows, n, lr, tau, delta, grad_mul, inv_bc1,
                      inv_sqrt_bc2, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
                      DECAY: tl.constexpr, SCALE_GRAD: tl.constexpr, MASKED: tl.constexpr,
                      WRITE_ABS: tl.constexpr, QUANT: tl.constexpr):
    """Update one block in place; returns Σ|θ_t| over it (0 when not WRITE_ABS).

    The arithmetic is csrc/adam_decay_math.h's (the CUDA and CPU kernels'), with IEEE-rounded division
    and square root (tl.div_rn / tl.sqrt_rn: Triton's ``/`` and ``tl.sqrt`` are approximate and flush
    subnormals, which with eps = 0 turns a subnormal v into an infinite step). With QUANT, ``offs`` is
    [rows, QBLOCK] and ``rows`` the block-row indices of the scales; m and v are decoded before and
    encoded after (csrc/state8.h).
    """
    if MASKED:
        mask = offs < n
        theta = tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)   # θ_{t−1}
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(m_ptr + offs, mask=mask, other=0)
        v = tl.load(v_ptr + offs, mask=mask, other=0)
    else:
        theta = tl.load(p_ptr + offs).to(tl.float32)
        g = tl.load(g_ptr + offs).to(tl.float32)
        m = tl.load(m_ptr + offs)
        v = tl.load(v_ptr + offs)
    if QUANT:  # codes → moments: m = sign(c)·V(|c|)·s_m, √v = V(c)·s_w, v = (√v)²
        row_mask = rows * QBLOCK_C < n
        m = decode_exp_avg(m, tl.load(ms_ptr + rows, mask=row_mask, other=0.0))
        v = decode_exp_avg_sq(v, tl.load(vs_ptr + rows, mask=row_mask, other=0.0))
    else:
        m = m.to(tl.float32)
        v = v.to(tl.float32)
    if SCALE_GRAD:
        g = g * grad_mul                                     # ±1/grad_scale (GradScaler, maximize)
    m = beta1 * m + one_minus_beta1 * g                      # m_t
    v = beta2 * v + one_minus_beta2 * (g * g)                # v_t
    denom = tl.sqrt_rn(v) * inv_sqrt_bc2 + eps
    step = lr * tl.div_rn(m * inv_bc1, denom)                # γ_t u_t
    if DECAY == 0:    # l2 (AdamW / AdamC): θ(1 − τ) − γu
        new = theta * (1.0 - tau) - step
    elif DECAY == 1:  # prox (AdamHD Eq. 17–18): prox_{τH_δ}(θ − γu) = y − τ·clip(y/(1+τ), −δ, δ)
        y = theta - step
        q = y * tl.div_rn(tl.full((), 1.0, tl.float32), 1.0 + tau)
        new = y - tau * _clip(q, delta)
    else:             # euler (AdamHD Eq. 12): θ − γu − τ·clip(θ, −δ, δ)
        new = theta - step - tau * _clip(theta, delta)
    if QUANT:  # moments → codes, scales = the rows' maxima of |m| and √v
        w = tl.sqrt_rn(v)
        if MASKED:
            m = tl.where(mask, m, 0.0)
            w = tl.where(mask, w, 0.0)
        s_m = row_max_abs(m)
        s_w = row_max_abs(w)
        m = encode_exp_avg(m, s_m)
        v = encode_exp_avg_sq(w, s_w)
        if MASKED:
            tl.store(ms_ptr + rows, s_m, mask=row_mask)
            tl.store(vs_ptr + rows, s_w, mask=row_mask)
        else:
            tl.store(ms_ptr + rows, s_m)
            tl.store(vs_ptr + rows, s_w)
    # Storage rounding happens here (bf16 params / moments); Σ|θ_t| is taken of the stored value.
    new_p = new.to(p_ptr.dtype.element_ty)
    if MASKED:
        tl.store(p_ptr + offs, new_p, mask=mask)
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty), mask=mask)
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(p_ptr + offs, new_p)
        tl.store(m_ptr + offs, m.to(m_ptr.dtype.element_ty))
        tl.store(v_ptr + offs, v.to(v_ptr.dtype.element_ty))
    total = tl.full((), 0.0, tl.float32)
    if WRITE_ABS:
        a = tl.abs(new_p.to(tl.float32))
        if MASKED:
            a = tl.where(mask, a, 0.0)
        total = _sum_all(a, QUANT)
    return total


@triton.jit
def _sum_all(a, TWO_D: tl.constexpr):
    """Sum of a 1-D block, or of a [rows, QBLOCK] block (8-bit state)."""
    if TWO_D:
        total = tl.sum(tl.sum(a, axis=1), axis=0)
    else:
        total = tl.sum(a, axis=0)
    return total


@triton.jit(do_not_specialize=["n_tensors", "block_map_offset"])
def _adam_decay_kernel(meta_ptr, partials_ptr, lr_ptr, lr_value, max_lr_ptr, max_lr_value, grad_scale_ptr,
                       found_inf_ptr, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, weight_decay,
                       delta_fixed, delta_scale, n_tensors, block_map_offset,
                       P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, M_DTYPE: tl.constexpr,
                       V_DTYPE: tl.constexpr, DECAY: tl.constexpr, DELTA_FROM_MU: tl.constexpr,
                       LR_IS_PTR: tl.constexpr, CORRECTED: tl.constexpr, MAX_LR_IS_PTR: tl.constexpr,
                       HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr,
                       BIAS_CORRECTION: tl.constexpr, LOG2_BETA1: tl.constexpr, LOG2_BETA2: tl.constexpr,
                       MAXIMIZE: tl.constexpr, WRITE_ABS: tl.constexpr, ALIGNED: tl.constexpr,
                       QUANT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    # Scalar arguments are fp32 on a GPU; the interpreter hands over Python floats: pin them to fp32.
    beta1 = tl.cast(beta1, tl.float32)
    one_minus_beta1 = tl.cast(one_minus_beta1, tl.float32)
    beta2 = tl.cast(beta2, tl.float32)
    one_minus_beta2 = tl.cast(one_minus_beta2, tl.float32)
    eps = tl.cast(eps, tl.float32)
    weight_decay = tl.cast(weight_decay, tl.float32)
    delta_scale = tl.cast(delta_scale, tl.float32)
    # Flat block map: (tensor index, chunk index within that tensor), int64 pairs.
    tid = tl.load(meta_ptr + block_map_offset + 2 * pid)
    chunk = tl.load(meta_ptr + block_map_offset + 2 * pid + 1)
    p_ptr = _tensor_ptr(meta_ptr, tid, P_DTYPE, ALIGNED)
    g_ptr = _tensor_ptr(meta_ptr + n_tensors, tid, G_DTYPE, ALIGNED)
    m_ptr = _tensor_ptr(meta_ptr + 2 * n_tensors, tid, M_DTYPE, ALIGNED)
    v_ptr = _tensor_ptr(meta_ptr + 3 * n_tensors, tid, V_DTYPE, ALIGNED)
    step_ptr = _tensor_ptr(meta_ptr + 4 * n_tensors, tid, tl.float32, False)
    n = tl.load(meta_ptr + 6 * n_tensors + tid)
    if QUANT:  # the block as rows of QBLOCK elements, one scale per row
        rows = chunk * (BLOCK // QBLOCK_C) + tl.arange(0, BLOCK // QBLOCK_C)
        offs = rows[:, None] * QBLOCK_C + tl.arange(0, QBLOCK_C)[None, :]  # int64
        ms_ptr = _tensor_ptr(meta_ptr + 7 * n_tensors, tid, tl.float32, False)
        vs_ptr = _tensor_ptr(meta_ptr + 8 * n_tensors, tid, tl.float32, False)
    else:
        rows = chunk
        offs = chunk * BLOCK + tl.arange(0, BLOCK)  # int64: tensors may exceed 2^31 elements
        ms_ptr = step_ptr  # not read
        vs_ptr = step_ptr

    # Per-step scalars, read from device memory and forced to fp32.
    if LR_IS_PTR:
        lr = tl.load(lr_ptr).to(tl.float32)
    else:
        lr = tl.cast(lr_value, tl.float32)
    tau = lr * weight_decay                                  # τ = γ_t·λ
    if CORRECTED:
        if MAX_LR_IS_PTR:
            max_lr = tl.load(max_lr_ptr).to(tl.float32)
        else:
            max_lr = tl.cast(max_lr_value, tl.float32)
        tau = tau * tl.div_rn(lr, max_lr)                    # τ = γ_t·λ·γ_t/γ_max (AdamC)
    if DELTA_FROM_MU:
        mu_ptr = _tensor_ptr(meta_ptr + 5 * n_tensors, tid, tl.float32, False)
        delta = delta_scale * tl.load(mu_ptr)                # δ^(l) = c·μ^(l)
    else:
        delta = tl.cast(delta_fixed, tl.float32)
    one = tl.full((), 1.0, tl.float32)
    if BIAS_CORRECTION:
        t = tl.load(step_ptr)
        inv_bc1 = tl.div_rn(one, _one_minus_pow(t, LOG2_BETA1))                  # 1/(1 − β1^t)
        inv_sqrt_bc2 = tl.div_rn(one, tl.sqrt_rn(_one_minus_pow(t, LOG2_BETA2)))  # 1/sqrt(1 − β2^t)
    else:
        inv_bc1 = one
        inv_sqrt_bc2 = one
    if HAS_GRAD_SCALE:
        grad_mul = tl.div_rn(one, tl.load(grad_scale_ptr).to(tl.float32))
    else:
        grad_mul = one
    if MAXIMIZE:
        grad_mul = -grad_mul

    full = (chunk + 1) * BLOCK <= n
    skip = False
    if HAS_FOUND_INF:
        skip = tl.load(found_inf_ptr).to(tl.float32) != 0.0
    if skip:
        # Overflow step: write nothing; Σ|θ| is of the unchanged θ_{t−1} (as the reference).
        total = tl.full((), 0.0, tl.float32)
        if WRITE_ABS:
            mask = offs < n
            total = _sum_all(tl.abs(tl.load(p_ptr + offs, mask=mask, other=0.0).to(tl.float32)), QUANT)
    elif full:
        total = _adam_decay_block(p_ptr, g_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, offs, rows, n, lr, tau, delta, grad_mul,
                                  inv_bc1, inv_sqrt_bc2, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, DECAY,
                                  HAS_GRAD_SCALE or MAXIMIZE, False, WRITE_ABS, QUANT)
    else:
        total = _adam_decay_block(p_ptr, g_ptr, m_ptr, v_ptr, ms_ptr, vs_ptr, offs, rows, n, lr, tau, delta, grad_mul,
                                  inv_bc1, inv_sqrt_bc2, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, DECAY,
                                  HAS_GRAD_SCALE or MAXIMIZE, True, WRITE_ABS, QUANT)
    if WRITE_ABS:
        tl.store(partials_ptr + pid, total)


@triton.jit(do_not_specialize=["n_tensors", "first_block_offset", "out_index_offset"])
def _ordered_abs_sum_kernel(partials_ptr, meta_ptr, n_tensors, first_block_offset, out_index_offset, out_ptr,
                            found_inf_ptr, mu_beta, mu_one_minus_beta, UPDATE_MU: tl.constexpr,
                            HAS_FOUND_INF: tl.constexpr, RBLOCK: tl.constexpr):
    """out[out_index[t]] = Σ partials[first_block[t] : first_block[t+1]], in a fixed order; with UPDATE_MU
    also μ_t ← β0·μ_t + (1 − β0)·Σ/n_t (unless found_inf), the operations of functional.update_delta_mu (Triton
    may fuse the multiply-add: last-bit differences on a GPU)."""
    t = tl.program_id(0)
    lo = tl.load(meta_ptr + first_block_offset + t)
    hi = tl.load(meta_ptr + first_block_offset + t + 1)
    acc = tl.zeros([RBLOCK], dtype=tl.float32)
    for start in range(lo, hi, RBLOCK):
        offs = start + tl.arange(0, RBLOCK)
        acc += tl.load(partials_ptr + offs, mask=offs < hi, other=0.0)
    dst = tl.load(meta_ptr + out_index_offset + t)
    total = tl.sum(acc, axis=0)
    tl.store(out_ptr + dst, total)
    if UPDATE_MU:
        skip = False
        if HAS_FOUND_INF:
            skip = tl.load(found_inf_ptr).to(tl.float32) != 0.0
        if not skip:
            mu_ptr = _tensor_ptr(meta_ptr + 5 * n_tensors, t, tl.float32, False)
            n = tl.load(meta_ptr + 9 * n_tensors + t).to(tl.float32)
            beta = tl.cast(mu_beta, tl.float32)
            one_minus_beta = tl.cast(mu_one_minus_beta, tl.float32)
            tl.store(mu_ptr, tl.load(mu_ptr) * beta + tl.div_rn(total, n) * one_minus_beta)


# ------------------------------------------------------------------------------------------------
# Host side: metadata (built once per tensor set, cached on the device) and the launcher
# ------------------------------------------------------------------------------------------------

class _Plan:
    """One launch: tensors sharing (param, grad, exp_avg, exp_avg_sq) dtypes, and their device metadata.

    ``meta`` (int64, on the device) = [len(_ROWS) rows × n pointer table | first_block (n+1) | out_index (n) |
    block map (2 × n_blocks)]; ``partials`` holds one fp32 Σ|θ| per block.
    """

    __slots__ = ("meta", "partials", "n_tensors", "n_blocks", "first_block_offset", "out_index_offset",
                 "block_map_offset", "dtypes", "aligned", "has_mu", "block", "host", "stream", "quant")

    def __init__(self, meta, partials, n_tensors, n_blocks, dtypes, aligned, has_mu, block, host=None, stream=None,
                 quant=False):
        self.meta, self.partials = meta, partials
        # The pinned host copy of ``meta`` (CUDA): a copy captured in a CUDA graph re-reads it at every
        # replay, so it lives as long as the plan. ``stream``: where meta/partials were allocated.
        self.host, self.stream = host, stream
        self.n_tensors, self.n_blocks = n_tensors, n_blocks
        self.first_block_offset = len(_ROWS) * n_tensors
        self.out_index_offset = self.first_block_offset + n_tensors + 1
        self.block_map_offset = self.out_index_offset + n_tensors
        self.dtypes, self.aligned, self.has_mu, self.block, self.quant = dtypes, aligned, has_mu, block, quant


_PLAN_CACHE: "OrderedDict[tuple, List[_Plan]]" = OrderedDict()
# Plans that a CUDA graph captured: a replay reads their device metadata (and the captured upload re-reads
# the pinned host copy), so they are never evicted or freed (like the CUDA backend's captured tables).
_CAPTURED_PLANS: Dict[int, List[_Plan]] = {}


def clear_cache() -> None:
    """Drop the cached device metadata of eager steps. Plans used inside a CUDA-graph capture are kept:
    a graph replay still reads them (they are freed only at process exit)."""
    _PLAN_CACHE.clear()


def _keep_for_graph(plans: List[_Plan]) -> None:
    _CAPTURED_PLANS.setdefault(id(plans), plans)


def _storage_order(t: Tensor) -> Optional[Tuple[int, ...]]:
    """Strides of the non-unit dims if ``t`` is non-overlapping and dense (any dim order), else None.

    Such a tensor is a plain run of ``numel`` elements from ``data_ptr()``; element-wise updates of
    tensors with the same dense layout can treat them as flat arrays.
    """
    if t.is_contiguous():
        return ()
    dims = sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz != 1)
    expected = 1
    for st, sz in dims:
        if st != expected:
            return None
        expected *= sz
    return tuple(st for sz, st in zip(t.shape, t.stride()) if sz != 1)


def _flat_ok(p: Tensor, g: Tensor, m: Tensor, v: Tensor) -> bool:
    """True if the four tensors can be updated as flat arrays with one shared element order."""
    if p.is_contiguous() and g.is_contiguous() and m.is_contiguous() and v.is_contiguous():
        return True
    if p.numel() == 0:
        return True
    order = _storage_order(p)
    return order is not None and all(_storage_order(x) == order for x in (g, m, v))


def _check_tensors(device, params, grads, exp_avgs, exp_avg_sqs, state_steps, delta_mus, scales=None) -> None:
    """Validation done when metadata is (re)built; a cache hit implies the same tensors passed it.
    ``scales``: (exp_avg_scales, exp_avg_sq_scales) of 8-bit state, or None."""
    n = len(params)
    lists = [("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs), ("state_steps", state_steps)]
    if delta_mus is not None:
        lists.append(("delta_mus", delta_mus))
    if scales is not None:
        lists += [("exp_avg_scales", scales[0]), ("exp_avg_sq_scales", scales[1])]
    for name, lst in lists:
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} entries for {n} params")
    p_dtype = params[0].dtype
    for i in range(n):
        p = params[i]
        if p.dtype != p_dtype or p.dtype not in _FLOAT_TL_DTYPES:
            raise ValueError(f"params[{i}]: dtype {p.dtype} (the triton backend needs one of "
                             f"{tuple(_FLOAT_TL_DTYPES)} per launch, all params alike)")
        for name, lst in lists:
            x = lst[i]
            if x.device != device:
                raise ValueError(f"{name}[{i}] is on {x.device}, params are on {device}")
        for name, x in (("grads", grads[i]), ("exp_avgs", exp_avgs[i]), ("exp_avg_sqs", exp_avg_sqs[i])):
            if x.numel() != p.numel():
                raise ValueError(f"{name}[{i}] has {x.numel()} elements, params[{i}] has {p.numel()}")
            if x.dtype not in (_FLOAT_TL_DTYPES if name == "grads" else _TL_DTYPES):
                raise ValueError(f"{name}[{i}]: dtype {x.dtype} not supported by the triton backend")
        if state_steps[i].dtype != torch.float32 or state_steps[i].numel() != 1:
            raise ValueError(f"state_steps[{i}] must be a one-element float32 tensor, got "
                             f"{state_steps[i].dtype} of shape {tuple(state_steps[i].shape)}")
        if delta_mus is not None and (delta_mus[i].dtype != torch.float32 or delta_mus[i].numel() != 1):
            raise ValueError(f"delta_mus[{i}] must be a one-element float32 tensor, got {delta_mus[i].dtype}")
        codes = (exp_avgs[i].dtype, exp_avg_sqs[i].dtype)
        if scales is None:
            if torch.int8 in codes or torch.uint8 in codes:
                raise ValueError(f"exp_avgs[{i}]: 8-bit codes need exp_avg_scales and exp_avg_sq_scales")
            continue
        if codes != (torch.int8, torch.uint8):
            raise ValueError(f"exp_avgs[{i}]: 8-bit state needs int8 exp_avg and uint8 exp_avg_sq codes, got {codes}")
        if p.numel() % QBLOCK or not (exp_avgs[i].is_contiguous() and exp_avg_sqs[i].is_contiguous()):
            raise ValueError(f"params[{i}]: 8-bit state needs a multiple of {QBLOCK} elements and contiguous codes")
        for name, sc in (("exp_avg_scales", scales[0][i]), ("exp_avg_sq_scales", scales[1][i])):
            if sc.dtype != torch.float32 or sc.numel() != p.numel() // QBLOCK or not sc.is_contiguous():
                raise ValueError(f"{name}[{i}]: expected a contiguous float32 tensor of {p.numel() // QBLOCK} "
                                 f"elements, got {sc.dtype} of shape {tuple(sc.shape)}")


def _build_plans(device, params, grads, exp_avgs, exp_avg_sqs, state_steps, delta_mus, block, scales=None,
                 mu_numels=None) -> List[_Plan]:
    _check_tensors(device, params, grads, exp_avgs, exp_avg_sqs, state_steps, delta_mus, scales)
    groups: "OrderedDict[tuple, List[int]]" = OrderedDict()
    for i in range(len(params)):
        groups.setdefault((grads[i].dtype, exp_avgs[i].dtype, exp_avg_sqs[i].dtype), []).append(i)
    plans = []
    block = max(block, QBLOCK) if scales is not None else block  # 8-bit state: whole scale rows per program
    for (g_dt, m_dt, v_dt), idx in groups.items():
        n = len(idx)
        cols = [(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i], state_steps[i],
                 delta_mus[i] if delta_mus is not None else None) for i in idx]
        rows = [[c[r].data_ptr() if c[r] is not None else 0 for c in cols] for r in range(6)]
        numels = torch.tensor([params[i].numel() for i in idx], dtype=torch.int64)
        rows.append(numels.tolist())
        for k in range(2):
            rows.append([scales[k][i].data_ptr() for i in idx] if scales is not None else [0] * n)
        rows.append([max(int(mu_numels[i] if mu_numels is not None else params[i].numel()), 1) for i in idx])
        blocks = (numels + block - 1) // block
        first_block = torch.zeros(n + 1, dtype=torch.int64)
        torch.cumsum(blocks, 0, out=first_block[1:])
        n_blocks = int(first_block[-1])
        # Flat block → (tensor, chunk) map, interleaved.
        tensor_of_block = torch.repeat_interleave(torch.arange(n, dtype=torch.int64), blocks)
        chunk_of_block = torch.arange(n_blocks, dtype=torch.int64) - first_block[:-1][tensor_of_block]
        block_map = torch.stack([tensor_of_block, chunk_of_block], dim=1).reshape(-1)
        host = torch.cat([torch.tensor(rows, dtype=torch.int64).reshape(-1), first_block,
                          torch.tensor(idx, dtype=torch.int64), block_map])
        stream = None
        if device.type == "cuda":
            # Pinned + non_blocking: no host sync, and legal inside a CUDA-graph capture (torch's pinned
            # allocator serves captures from a private pool); the plan keeps ``host`` alive.
            try:
                host = host.pin_memory()
            except RuntimeError as e:
                if not torch.cuda.is_current_stream_capturing():
                    raise
                raise RuntimeError(
                    "fusedecay triton backend: this torch cannot allocate pinned memory during a CUDA-graph capture "
                    "(needed when the step's tensors were never seen eagerly, e.g. grads allocated inside the graph); "
                    "run one eager step with the same tensors before capturing, or use backend='cuda'") from e
            meta = torch.empty(host.shape, dtype=host.dtype, device=device)
            meta.copy_(host, non_blocking=True)
            stream = torch.cuda.current_stream(device)
        else:
            meta = host.to(device)  # CPU (the interpreter): no copy at all
        partials = torch.empty(max(n_blocks, 1), dtype=torch.float32, device=device)
        # 16-byte aligned bases let the kernel use 128-bit loads; a misaligned view just runs scalar.
        aligned = all(ptr % 16 == 0 for r in range(4) for ptr in rows[r])
        dtypes = (_TL_DTYPES[params[idx[0]].dtype], _TL_DTYPES[g_dt], _TL_DTYPES[m_dt], _TL_DTYPES[v_dt])
        plans.append(_Plan(meta, partials, n, n_blocks, dtypes, aligned, delta_mus is not None, block,
                           host if device.type == "cuda" else None, stream, scales is not None))
    return plans


_DTYPE_OF = operator.attrgetter("dtype")


def _cache_key(device, block, params, grads, exp_avgs, exp_avg_sqs, state_steps, delta_mus, scales=None,
               mu_numels=None) -> tuple:
    """Addresses, sizes and dtypes: everything the metadata encodes (map() keeps this ~1 µs/tensor)."""
    ptr = Tensor.data_ptr
    return (device, block, tuple(map(ptr, params)), tuple(map(ptr, grads)), tuple(map(ptr, exp_avgs)),
            tuple(map(ptr, exp_avg_sqs)), tuple(map(ptr, state_steps)),
            tuple(map(ptr, delta_mus)) if delta_mus is not None else None, tuple(map(Tensor.numel, params)),
            tuple(map(_DTYPE_OF, params)), tuple(map(_DTYPE_OF, grads)), tuple(map(_DTYPE_OF, exp_avgs)),
            tuple(map(_DTYPE_OF, exp_avg_sqs)),
            None if scales is None else (tuple(map(ptr, scales[0])), tuple(map(ptr, scales[1]))),
            None if mu_numels is None else tuple(mu_numels))


_NUMEL_FIELD = 8  # position of the params' sizes in the key above


def _plans_for(device, block, params, grads, exp_avgs, exp_avg_sqs, state_steps, delta_mus, cache: bool,
               capturing: bool = False, scales=None, mu_numels=None):
    tensors = (params, grads, exp_avgs, exp_avg_sqs, state_steps, delta_mus)
    if not cache:
        plans = _build_plans(device, *tensors, block, scales, mu_numels)
    else:
        key = _cache_key(device, block, *tensors, scales, mu_numels)
        plans = _PLAN_CACHE.get(key)
        if plans is None:
            plans = _build_plans(device, *tensors, block, scales, mu_numels)
            # A plan built during a capture holds no data until the graph is first replayed (its upload is only
            # recorded): it serves that graph alone and never an eager step or another capture.
            if not capturing:
                _PLAN_CACHE[key] = plans
                while len(_PLAN_CACHE) > CACHE_SIZE:
                    _PLAN_CACHE.popitem(last=False)
        else:
            # The key holds the params' sizes; a grad of another size at a recycled address must not pass.
            if tuple(map(Tensor.numel, grads)) != key[_NUMEL_FIELD]:
                _check_tensors(device, *tensors, scales)
            _PLAN_CACHE.move_to_end(key)
    if capturing:
        _keep_for_graph(plans)
    if device.type == "cuda":
        cur = torch.cuda.current_stream(device)
        for plan in plans:
            if plan.stream is not None and plan.stream != cur:
                # Used on another stream than the one it was allocated on: tell the allocator, so that
                # freeing the plan (cache eviction) cannot hand the memory out while this stream reads it.
                plan.meta.record_stream(cur)
                plan.partials.record_stream(cur)
    return plans


def _device_scalar(name: str, x, device, capturing: bool = False) -> Tuple[Optional[Tensor], float]:
    """(tensor, 0.0) for a tensor hyperparameter on the params' device; (None, value) for a number, or for a
    CPU tensor with GPU params (read on the host: no device sync, as the CUDA backend does)."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor {name} must hold one element, got shape {tuple(x.shape)}")
        if x.device == device:
            return x, 0.0
        if x.device.type == "cpu":
            if capturing:
                raise ValueError(f"Invalid {name}: a CPU tensor while the step is being captured in a CUDA graph "
                                 f"(its value would be frozen into the graph); put {name} on {device}")
            return None, float(x)
        raise ValueError(f"Invalid {name}: on {x.device}, params on {device}")
    return None, float(x)


def _device_tensor(name: str, x: Tensor, device) -> Tensor:
    """grad_scale / found_inf: one-element tensors on the params' device (where GradScaler keeps them)."""
    if x.numel() != 1:
        raise ValueError(f"Invalid {name}: expected a tensor with one element, got shape {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"Invalid {name}: on {x.device}, params on {device}")
    return x


def _log2_beta(name: str, beta: float) -> float:
    beta = float(beta)
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"Invalid {name}: {beta} (must lie in [0, 1))")
    return math.log2(beta) if beta > 0.0 else -1.0e4  # β = 0: β^t underflows to 0 for t ≥ 1


def adam_decay(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
               state_steps: List[Tensor], delta_mus: Optional[List[Tensor]], abs_sums: Optional[Tensor], *,
               lr, beta1: float, beta2: float, eps: float, weight_decay: float, decay: str,
               delta_fixed: Optional[float], delta_scale: float, max_lr, bias_correction: bool, maximize: bool,
               grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
               exp_avg_scales: Optional[List[Tensor]] = None, exp_avg_sq_scales: Optional[List[Tensor]] = None,
               delta_beta: Optional[float] = None, numels: Optional[List[int]] = None,
               block_size: Optional[int] = None, num_warps: Optional[int] = None) -> None:
    """Multi-tensor AdamHD/AdamC step with the semantics of ``adam_decay_reference`` (see module doc).

    All params must share one device and dtype (fp32/bf16/fp16; fp32 only under TRITON_INTERPRET).
    ``block_size`` (a power of two; at least 128 with 8-bit state) and ``num_warps`` are tuning knobs;
    defaults suit bandwidth-bound GPUs.
    """
    if not params:
        return
    if decay not in DECAY_IDS:
        raise ValueError(f"Invalid decay: {decay!r} (expected one of {tuple(DECAY_IDS)})")
    device = params[0].device
    block = int(block_size or DEFAULT_BLOCK)
    if block < 16 or block & (block - 1):
        raise ValueError(f"Invalid block_size: {block} (must be a power of two >= 16)")
    uses_delta = decay != "l2"
    delta_from_mu = uses_delta and delta_fixed is None
    if delta_from_mu and delta_mus is None:
        raise ValueError(f"delta_mus is None and delta_fixed is None: decay={decay!r} needs a δ")
    if abs_sums is not None and (abs_sums.numel() != len(params) or abs_sums.device != device):
        raise ValueError(f"abs_sums must have one slot per param on {device}, got shape {tuple(abs_sums.shape)} "
                         f"on {abs_sums.device}")
    mus = delta_mus if delta_from_mu else None
    if (exp_avg_scales is None) != (exp_avg_sq_scales is None):
        raise ValueError("exp_avg_scales and exp_avg_sq_scales must be given together")
    scales = None if exp_avg_scales is None else (list(exp_avg_scales), list(exp_avg_sq_scales))
    if delta_beta is not None and (not delta_from_mu or abs_sums is None):
        raise ValueError("Invalid delta_beta: the fused μ update needs decay 'prox'/'euler' with δ from μ, and "
                         "abs_sums")
    mu_numels = None if numels is None or delta_beta is None else [int(k) for k in numels]

    # Params whose layout can't be walked flat get contiguous stand-ins, copied back after the launch
    # (8-bit blocks are defined in row-major order: their params must be contiguous).
    contiguous = Tensor.is_contiguous
    if all(map(contiguous, params)) and all(map(contiguous, grads)) and all(map(contiguous, exp_avgs)) \
            and all(map(contiguous, exp_avg_sqs)):
        staged = []
    elif scales is not None:
        staged = [i for i in range(len(params)) if not (params[i].is_contiguous() and grads[i].is_contiguous())]
    else:
        staged = [i for i in range(len(params)) if not _flat_ok(params[i], grads[i], exp_avgs[i], exp_avg_sqs[i])]
    if staged:
        params, grads, exp_avgs, exp_avg_sqs = (list(x) for x in (params, grads, exp_avgs, exp_avg_sqs))
        originals = [(i, params[i], exp_avgs[i], exp_avg_sqs[i]) for i in staged]
        for i in staged:
            params[i], grads[i] = params[i].contiguous(), grads[i].contiguous()
            exp_avgs[i], exp_avg_sqs[i] = exp_avgs[i].contiguous(), exp_avg_sqs[i].contiguous()
    # Triton launches on the current device's current stream: make that the params' device (also for the
    # capture query, which looks at the current device's stream).
    with on_device(device):
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        lr_t, lr_v = _device_scalar("lr", lr, device, capturing)
        corrected = max_lr is not None
        max_lr_t, max_lr_v = _device_scalar("max_lr", max_lr, device, capturing) if corrected else (None, 1.0)
        gs_t = _device_tensor("grad_scale", grad_scale, device) if grad_scale is not None else None
        fi_t = _device_tensor("found_inf", found_inf, device) if found_inf is not None else None
        log2_beta1, log2_beta2 = _log2_beta("beta1", beta1), _log2_beta("beta2", beta2)
        warps = int(num_warps or DEFAULT_NUM_WARPS)
        plans = _plans_for(device, block, params, grads, exp_avgs, exp_avg_sqs, state_steps, mus,
                           cache=not staged, capturing=capturing, scales=scales, mu_numels=mu_numels)
        for plan in plans:
            dummy = plan.partials  # stands in for pointer arguments a specialization never reads
            if plan.n_blocks > 0:
                _adam_decay_kernel[(plan.n_blocks,)](
                    plan.meta, plan.partials, lr_t if lr_t is not None else dummy, lr_v,
                    max_lr_t if max_lr_t is not None else dummy, max_lr_v,
                    gs_t if gs_t is not None else dummy, fi_t if fi_t is not None else dummy,
                    float(beta1), 1.0 - float(beta1), float(beta2), 1.0 - float(beta2), float(eps),
                    float(weight_decay), float(delta_fixed) if (uses_delta and not delta_from_mu) else 0.0,
                    float(delta_scale), plan.n_tensors, plan.block_map_offset,
                    P_DTYPE=plan.dtypes[0], G_DTYPE=plan.dtypes[1], M_DTYPE=plan.dtypes[2], V_DTYPE=plan.dtypes[3],
                    DECAY=DECAY_IDS[decay], DELTA_FROM_MU=delta_from_mu, LR_IS_PTR=lr_t is not None,
                    CORRECTED=corrected, MAX_LR_IS_PTR=max_lr_t is not None, HAS_GRAD_SCALE=gs_t is not None,
                    HAS_FOUND_INF=fi_t is not None, BIAS_CORRECTION=bool(bias_correction),
                    LOG2_BETA1=log2_beta1, LOG2_BETA2=log2_beta2, MAXIMIZE=bool(maximize),
                    WRITE_ABS=abs_sums is not None, ALIGNED=plan.aligned, QUANT=plan.quant, BLOCK=plan.block,
                    num_warps=warps)
            if abs_sums is not None:
                beta = float(delta_beta) if delta_beta is not None else 0.0
                _ordered_abs_sum_kernel[(plan.n_tensors,)](
                    plan.partials, plan.meta, plan.n_tensors, plan.first_block_offset, plan.out_index_offset, abs_sums,
                    fi_t if fi_t is not None else plan.partials, beta, 1.0 - beta, UPDATE_MU=delta_beta is not None,
                    HAS_FOUND_INF=fi_t is not None, RBLOCK=REDUCE_BLOCK)

    if staged:
        for i, p, m, v in originals:
            p.copy_(params[i])
            m.copy_(exp_avgs[i])
            v.copy_(exp_avg_sqs[i])
