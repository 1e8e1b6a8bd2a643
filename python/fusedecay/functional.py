"""Functional API, in the style of ``torch.optim.adamw.adamw``: the one entry point that the
optimizer classes, the distributed wrappers and the benchmarks call.

:func:`adam_decay` runs one AdamHD/AdamC step over lists of tensors:
  1. t ← t + 1 for every state step (one foreach launch per device) — except where the backend does it inside its
     call (the CPU kernel: ``Backend.increments_steps``), which saves a call per step;
  2. per (device, dtype) bucket, the chosen backend's multi-tensor kernel does moments, preconditioned step,
     decay and writes Σ|θ_t| per tensor — one pass over parameter memory. Moments are full precision, or 8-bit
     codes + block scales (docs/state8.md) for the entries given scales; the compiled CPU and CUDA kernels take
     both formats in one call (``Backend.mixed_moment_formats``), other backends get one call per format;
  3. if δ tracks the weights (``delta_mode`` "mean" or "ema"), μ ← β0·μ + (1 − β0)·Σ|θ_t|/numel: inside the
     kernel's reduction stage (no extra launch), or — when ``abs_sum_reduce`` must all-reduce the partial
     sums of a sharded caller first (one collective for all layers) — after it, for all tensors at once.

:func:`scionc` runs one ScionC step: momentum, LMO (``lmo_fn`` lets a caller replace how directions
are computed, e.g. batched or distributed Newton–Schulz), then the decayed update.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import backends as _backends
from ._step_wrapper import no_grad
from .reference import adam_decay as _ref_adam
from .reference import scion as _ref_scion

DELTA_MODES = ("ema", "mean", "fixed")
UPDATES = ("prox", "euler")


def _buckets(tensors: Sequence[Tensor], scales: Optional[Sequence[Optional[Tensor]]] = None, backend: str = "auto"
             ) -> List[Tuple[torch.device, torch.dtype, _backends.Backend, List[int]]]:
    """(device, dtype, backend, indices) of each kernel call: one per (device, dtype), split by state format (8-bit
    or full precision) where the backend takes one format per call."""
    by_place: Dict[Tuple[torch.device, torch.dtype], List[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        by_place[(t.device, t.dtype)].append(i)
    out = []
    for (device, dtype), idx in by_place.items():
        impl = _backends.resolve(backend, device, dtype)
        if scales is None or impl.mixed_moment_formats:
            out.append((device, dtype, impl, idx))
            continue
        for quantized in (True, False):
            part = [i for i in idx if (scales[i] is not None) == quantized]
            if part:
                out.append((device, dtype, impl, part))
    return out


def _mu_dtype(param_dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if param_dtype == torch.float64 else torch.float32


def abs_sum(x: Tensor, backend: str = "auto") -> Tensor:
    """Σ|x| (0-d, math dtype) by the reduction the backend's kernel uses for Σ|θ_t| when it provides one (the
    CPU kernel's chunked, ordered sum), else by the reference's fixed-order block sum. Either way the result
    does not depend on the thread count."""
    fn = _backends.resolve(backend, x.device, x.dtype).op("abs_sum")
    return fn(x) if fn is not None else _ref_adam.abs_sum(x)


def init_delta_mu(param: Tensor, backend: str = "auto") -> Tensor:
    """μ_0 = mean|θ_0| as a 0-d tensor on the param's device (mean of an empty tensor is 0), with Σ|θ_0| from
    :func:`abs_sum`, so δ_1 is the same whatever the thread count."""
    return abs_sum(param, backend) / max(param.numel(), 1)


@no_grad
def adam_decay(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
               state_steps: List[Tensor], delta_mus: Optional[List[Tensor]], *, lr: Union[float, Tensor],
               beta1: float, beta2: float, eps: float, weight_decay: float, decay: str, delta_mode: str = "fixed",
               delta: Optional[float] = None, delta_scale: float = 1.0, delta_beta: float = 0.99,
               max_lr: Optional[Union[float, Tensor]] = None, bias_correction: bool = True, maximize: bool = False,
               backend: str = "auto", grad_scale: Optional[Tensor] = None, found_inf: Optional[Tensor] = None,
               numels: Optional[Sequence[int]] = None,
               abs_sum_reduce: Optional[Callable[[Tensor], Tensor]] = None,
               exp_avg_scales: Optional[Sequence[Optional[Tensor]]] = None,
               exp_avg_sq_scales: Optional[Sequence[Optional[Tensor]]] = None) -> None:
    """One step of Adam with decoupled decay over lists of tensors (see module docstring).

    ``decay``: "l2" (AdamW/AdamC), "prox" or "euler" (AdamHD). ``max_lr`` not None turns on the
    corrected coefficient λ_t = λ·γ_t/γ_max. ``numels`` are the sizes the means divide by (the global
    sizes for sharded tensors); default: each tensor's own numel. ``exp_avg_scales``/``exp_avg_sq_scales``:
    per param, None (full-precision moments) or the float32 block scales of 8-bit state, whose
    ``exp_avgs``/``exp_avg_sqs`` entries are then the int8/uint8 codes (docs/state8.md).
    """
    if not params:
        return
    n = len(params)
    for name, lst in (("grads", grads), ("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs),
                      ("state_steps", state_steps)):
        if len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} entries for {n} params")
    if weight_decay == 0:
        decay = "l2"  # no decay: every kind reduces to θ − γu bit for bit, and δ is not needed
    tracks = decay != "l2" and delta_mode != "fixed"
    if tracks and (delta_mus is None or len(delta_mus) != n):
        raise ValueError("delta_mode 'mean'/'ema' needs one delta_mu per param")
    if (exp_avg_scales is None) != (exp_avg_sq_scales is None):
        raise ValueError("exp_avg_scales and exp_avg_sq_scales must be given together")
    for name, lst in (("exp_avg_scales", exp_avg_scales), ("exp_avg_sq_scales", exp_avg_sq_scales)):
        if lst is not None and len(lst) != n:
            raise ValueError(f"{name} has {len(lst)} entries for {n} params")
    delta_fixed = delta if (decay != "l2" and delta_mode == "fixed") else None
    mu_beta = 0.0 if delta_mode == "mean" else delta_beta

    # μ's update runs in the kernel's reduction stage unless the sums must be all-reduced first.
    fused_mu = tracks and abs_sum_reduce is None
    on = _PerDevice()
    buckets = _buckets(params, exp_avg_scales, backend)
    # t ← t + 1 before any kernel runs, one increment (and found_inf undo) per device, for the buckets whose backend
    # does not do it inside its call.
    steps_on: Dict[torch.device, List[Tensor]] = defaultdict(list)
    for device, _, b, idx in buckets:
        if not b.increments_steps:
            steps_on[device] += [state_steps[i] for i in idx]
    for device, steps in steps_on.items():
        _increment_steps(steps, device)
    for device, dtype, b, idx in buckets:
        impl = b.adam_decay
        sub = lambda lst: [lst[i] for i in idx]  # noqa: E731
        quantized = exp_avg_scales is not None and any(exp_avg_scales[i] is not None for i in idx)
        extra = {"increment_steps": True} if b.increments_steps else {}
        abs_sums = None
        if tracks and not (fused_mu and b.mu_without_abs_sums):
            abs_sums = torch.empty(len(idx), dtype=_mu_dtype(dtype), device=device)
        sizes = None
        if tracks and (numels is not None or abs_sum_reduce is not None):
            sizes = [numels[i] if numels is not None else params[i].numel() for i in idx]
        # GradScaler keeps grad_scale / found_inf on one device; params on other GPUs get asynchronous
        # device-to-device copies (once per device and step), as torch's fused optimizers do.
        fi = on(found_inf, device)
        impl(sub(params), sub(grads), sub(exp_avgs), sub(exp_avg_sqs), sub(state_steps),
             sub(delta_mus) if tracks else None, abs_sums, lr=on(lr, device), beta1=beta1, beta2=beta2, eps=eps,
             weight_decay=weight_decay, decay=decay, delta_fixed=delta_fixed, delta_scale=delta_scale,
             max_lr=on(max_lr, device), bias_correction=bias_correction, maximize=maximize,
             grad_scale=on(grad_scale, device), found_inf=fi,
             exp_avg_scales=sub(exp_avg_scales) if quantized else None,
             exp_avg_sq_scales=sub(exp_avg_sq_scales) if quantized else None,
             delta_beta=mu_beta if fused_mu else None, numels=sizes if fused_mu else None, **extra)
        if tracks and not fused_mu:
            update_delta_mu(sub(delta_mus), abs_sum_reduce(abs_sums), sizes, mu_beta, fi)
    if found_inf is not None:
        for device, steps in steps_on.items():   # an overflow step does not count
            torch._foreach_sub_(steps, [on(found_inf, device).to(torch.float32)] * len(steps))


def _increment_steps(steps: List[Tensor], device: torch.device) -> None:
    """t ← t + 1 for the step counters of the params on one device. On the CPU the compiled extension does
    it in one call; torch's foreach add there is a loop of small ops (~1.4 µs per tensor)."""
    op = getattr(torch.ops.fusedecay, "_increment_steps_", None) if device.type == "cpu" else None
    if op is not None:
        op(steps)
    else:
        torch._foreach_add_(steps, 1)


class _PerDevice:
    """``x`` (a tensor hyperparameter) on ``device``: itself if already there, else one non-blocking copy per
    (tensor, device, dtype) within a step. CPU tensors stay on the CPU for GPU buckets: the backends read
    them on the host (no device sync), and refuse them inside a CUDA-graph capture."""

    def __init__(self):
        self._copies: Dict[Tuple[int, torch.device, Optional[torch.dtype]], Tensor] = {}

    def __call__(self, x, device: torch.device, dtype: Optional[torch.dtype] = None):
        if not isinstance(x, Tensor):
            return x
        if (x.device == device or x.device.type == "cpu") and (dtype is None or x.dtype == dtype):
            return x
        key = (id(x), device, dtype)
        y = self._copies.get(key)
        if y is None:
            target = device if x.device.type != "cpu" else x.device
            # Asynchronous only towards a GPU (stream-ordered before the kernels that read it); a device→CPU copy
            # must have landed before the CPU kernel reads it.
            y = self._copies[key] = x.to(target, dtype or x.dtype, non_blocking=target.type != "cpu")
        return y


def update_delta_mu(delta_mus: List[Tensor], abs_sums: Tensor, numels: Sequence[int], beta: float,
                    found_inf: Optional[Tensor] = None) -> None:
    """μ ← β·μ + (1 − β)·Σ|θ|/numel for a bucket, in a fixed order (AdamHD Eq. 8–9; Eq. 7 is β = 0).

    The sizes enter as Python scalars of foreach ops (kernel arguments), never as a host→device copy, so the
    update is free of host syncs and can be captured in a CUDA graph as it is."""
    sizes = [float(max(int(k), 1)) for k in numels]
    skip = found_inf.to(abs_sums.device).bool() if found_inf is not None else None
    if abs_sums.device.type == "cpu":
        # On the CPU a foreach op over 0-d tensors is a loop of tiny ops; one stacked vector does the same
        # arithmetic (elementwise identical: the same fp32/fp64 divisions, products and sums).
        old = torch.stack(delta_mus)
        new_t = old * beta + (abs_sums / torch.tensor(sizes, dtype=abs_sums.dtype)) * (1 - beta)
        if skip is not None:
            new_t = torch.where(skip, old, new_t)
        torch._foreach_copy_(delta_mus, list(new_t.unbind(0)))
    else:
        _update_delta_mu_foreach(delta_mus, abs_sums, sizes, beta, skip)


def _update_delta_mu_foreach(delta_mus: List[Tensor], abs_sums: Tensor, sizes: List[float], beta: float,
                             skip: Optional[Tensor]) -> None:
    """The GPU form: a few multi-tensor launches, sizes as kernel scalars."""
    means = torch._foreach_div(list(abs_sums.unbind(0)), sizes)
    new = torch._foreach_mul(delta_mus, beta)
    torch._foreach_add_(new, torch._foreach_mul(means, 1 - beta))
    if skip is not None:  # found_inf as a bool tensor: μ keeps its old value
        new = list(torch.where(skip, torch.stack(delta_mus), torch.stack(new)).unbind(0))
    torch._foreach_copy_(delta_mus, new)


# ----------------------------------------------------------------------------------------------
# ScionC
# ----------------------------------------------------------------------------------------------

def scion_directions_reference(inputs: List[Tensor], *, lmo: str, ns_steps: int, ns: str,
                               ns_dtype: Optional[torch.dtype], matrix_view: str = "auto") -> List[Tensor]:
    """Unit LMO directions, one tensor at a time (the readable path)."""
    return [_ref_scion.lmo(lmo, m, ns_steps=ns_steps, ns=ns, ns_dtype=ns_dtype, matrix_view=matrix_view)
            for m in inputs]


@no_grad
def scionc(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], *, lr: Union[float, Tensor],
           momentum: float, lmo: str, radius: float, norm_target: float, corrected: bool, weight_decay: float,
           ns_steps: int = 5, ns: str = "classic", ns_dtype: Optional[torch.dtype] = None, nesterov: bool = False,
           maximize: bool = False, backend: str = "auto", lmo_fn: Optional[Callable[..., List[Tensor]]] = None,
           matrix_view: str = "auto") -> None:
    """One ScionC step for one param group (one LMO kind).

    ``backend="reference"`` loops :func:`fusedecay.reference.scionc_step`. Other backends run the same
    math on lists: a foreach momentum update, directions from ``lmo_fn`` (default: the backend's
    batched ``scion_directions`` if it has one, else the per-tensor reference), and a foreach update.
    A backend with a ``scionc`` op (e.g. "batched") runs the whole group step itself.
    ``matrix_view``: how an N-D weight is read as matrices (see :mod:`fusedecay.reference.scion`).
    """
    if not params:
        return
    if backend == "reference" and lmo_fn is None:
        for p, g, b in zip(params, grads, momentum_buffers):
            _ref_scion.scionc_step(p, g, b, lr=lr, momentum=momentum, lmo_kind=lmo, radius=radius,
                                   norm_target=norm_target, corrected=corrected, weight_decay=weight_decay,
                                   ns_steps=ns_steps, ns=ns, ns_dtype=ns_dtype, nesterov=nesterov, maximize=maximize,
                                   matrix_view=matrix_view)
        return
    if lmo_fn is None:
        b = None
        try:
            b = _backends.resolve(backend, params[0].device, params[0].dtype, op="scion_directions")
        except RuntimeError:
            if backend != "auto":
                raise
        step_fn = b.op("scionc") if b is not None else None
        if step_fn is not None:   # the backend runs the whole group step (e.g. fused element-wise passes)
            step_fn(params, grads, momentum_buffers, lr=lr, momentum=momentum, lmo=lmo, radius=radius,
                    norm_target=norm_target, corrected=corrected, weight_decay=weight_decay, ns_steps=ns_steps,
                    ns=ns, ns_dtype=ns_dtype, nesterov=nesterov, maximize=maximize, matrix_view=matrix_view)
            return
        lmo_fn = (b.op("scion_directions") if b is not None else None) or scion_directions_reference
    g = [x.neg() if maximize else x for x in grads]
    # m_t = (1 − α) m_{t−1} + α g_t, in the wider of the param's and the buffer's dtype: a buffer kept narrower than
    # its param (ScionC's momentum_dtype) is widened, updated and stored rounded, and the LMO sees the unrounded m_t
    # (as in reference.scionc_step); a wider one (fp32 momentum for bf16 params) is updated in place.
    m = [b.to(torch.promote_types(b.dtype, p.dtype)) for b, p in zip(momentum_buffers, params)]
    torch._foreach_lerp_(m, [x.to(t.dtype) for x, t in zip(g, m)], momentum)
    widened = [(b, t) for b, t in zip(momentum_buffers, m) if b is not t]
    if widened:
        torch._foreach_copy_([b for b, _ in widened], [t for _, t in widened])
    inputs = m
    if nesterov:
        inputs = torch._foreach_lerp(m, [x.to(t.dtype) for x, t in zip(g, m)], momentum)
    dirs = lmo_fn(list(inputs), lmo=lmo, ns_steps=ns_steps, ns=ns, ns_dtype=ns_dtype, matrix_view=matrix_view)
    s = lr * radius
    eta = _ref_scion.scion_decay(s, momentum=momentum, norm_target=norm_target, corrected=corrected, lr=lr,
                                 weight_decay=weight_decay, nesterov=nesterov)
    if isinstance(eta, Tensor) or eta != 0:
        torch._foreach_mul_(params, 1 - eta)
    if isinstance(s, Tensor):
        torch._foreach_add_(params, torch._foreach_mul([d.to(p.dtype) for d, p in zip(dirs, params)], -s))
    else:
        torch._foreach_add_(params, [d.to(p.dtype) for d, p in zip(dirs, params)], alpha=-s)
