"""Reference (eager, per-tensor, readable) Adam with decoupled decay: AdamHD and AdamC.

This file is the ground truth every fused kernel (CUDA, CPU C++, Triton) is tested against. It is
written for clarity, not speed: one parameter tensor at a time, math in float32 (float64 when the
parameter is float64), stored back in the parameter's dtype.

Papers and equations
--------------------
* AdamHD — Guo & Fan, "AdamHD: Decoupled Huber Decay Regularization for Language Model
  Pre-Training", arXiv 2511.14721. Huber penalty H_δ(a) = ½a² (|a| ≤ δ), δ|a| − ½δ² otherwise.
  - Adam moments (Eq. 10–11) and the preconditioned step θ̃_t = θ_{t−1} − γ_t u_t (Eq. 17).
  - Proximal Huber decay prox_{τH_δ}(θ̃) with τ = γ_t λ (Eq. 13–14, applied as Eq. 18).
  - Euler (explicit) decay θ_t = θ_{t−1} − γ_t(u_t + λ clip(θ_{t−1}, −δ, δ)) (Eq. 12).
  - Per-layer threshold δ^(l) = c·mean|θ^(l)| (Eq. 7) or c·μ^(l) with μ an EMA of it (Eq. 8–9).
* AdamC — Defazio, "Why Gradients Rapidly Increase Near the End of Training", arXiv 2506.02285,
  and Chou, "Correction of Decoupled Weight Decay", arXiv 2512.08217: the decay coefficient follows
  the schedule, λ_t = λ·γ_t/γ_max, so the applied decay γ_t·λ_t scales as γ_t².

The decay kinds this module implements (``decay=``):
  "l2"    AdamW's decoupled decay:     θ_t = θ_{t−1}(1 − τ) − γ_t u_t
  "prox"  AdamHD proximal Huber decay: θ_t = prox_{τH_δ}(θ_{t−1} − γ_t u_t)
  "euler" AdamHD explicit Huber decay: θ_t = θ_{t−1} − γ_t u_t − τ clip(θ_{t−1}, −δ, δ)
with τ = γ_t·λ_t, λ_t = λ (uncorrected) or λ·γ_t/γ_max (corrected).
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import state8

Scalar = Union[float, Tensor]

DECAY_KINDS = ("l2", "prox", "euler")


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype element-wise math runs in: float64 for float64 tensors, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Elements per block of the ordered Σ|θ| reduction: below torch's parallel grain size (32768), so each block is
# summed by one thread.
ABS_SUM_BLOCK = 4096


def abs_sum(x: Tensor) -> Tensor:
    """Σ_i |x_i| in the math dtype, in an order that does not depend on the thread count.

    torch's own ``x.abs().sum()`` splits a large reduction across threads, so its rounding changes with
    their number (two runs of one job on different thread counts would start δ from different μ_0). Here
    |x| is cut into blocks of ``ABS_SUM_BLOCK`` elements, each block is summed as one row of a 2-D sum (one
    thread per row), and the block sums are reduced the same way until one block is left.
    """
    s = x.detach().reshape(-1).to(math_dtype(x.dtype)).abs()
    while s.numel() > ABS_SUM_BLOCK:
        rows = -(-s.numel() // ABS_SUM_BLOCK)
        if s.numel() != rows * ABS_SUM_BLOCK:   # zeros complete the last block (a copy only when one is partial)
            s = torch.nn.functional.pad(s, (0, rows * ABS_SUM_BLOCK - s.numel()))
        s = s.view(rows, ABS_SUM_BLOCK).sum(dim=1)
    return s.sum()


def huber_prox(y: Tensor, tau: Scalar, delta: Scalar) -> Tensor:
    """prox_{τH_δ}(y), element-wise (AdamHD Eq. 13–14).

    Minimises ½(x − y)² + τ H_δ(x). Inside the quadratic zone the solution is y/(1+τ); the zone
    boundary in y-space is |y| = (1+τ)δ; outside it the linear branch shifts y by τδ toward zero.
    """
    one_plus_tau = 1 + tau
    inside = y.abs() <= one_plus_tau * delta
    return torch.where(inside, y / one_plus_tau, y - tau * delta * torch.sign(y))


def huber_grad(theta: Tensor, delta: Scalar) -> Tensor:
    """∇H_δ(θ) = clip(θ, −δ, δ), element-wise (the Euler decay direction, AdamHD Eq. 12)."""
    if isinstance(delta, Tensor):
        return torch.minimum(torch.maximum(theta, -delta), delta)
    return theta.clamp(-delta, delta)


def decay_coefficient(lr: Scalar, weight_decay: float, max_lr: Optional[Scalar]) -> Scalar:
    """τ = γ_t·λ_t with λ_t = λ (max_lr None) or λ·γ_t/γ_max (AdamC's correction)."""
    if max_lr is None:
        return lr * weight_decay
    return lr * weight_decay * (lr / max_lr)


def adam_direction(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, *,
                   beta1: float, beta2: float, eps: float, bias_correction: bool) -> Tensor:
    """Update the moments in place and return u_t (AdamHD Eq. 10–11; spec §1).

    ``grad`` is already in the math dtype and already negated for ``maximize``.
    """
    dt = grad.dtype
    m = exp_avg.to(dt).mul_(beta1).add_(grad, alpha=1 - beta1)             # m_t
    v = exp_avg_sq.to(dt).mul_(beta2).addcmul_(grad, grad, value=1 - beta2)  # v_t
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
    if bias_correction:
        t = step.to(dt)
        bc1 = 1 - beta1 ** t
        bc2 = 1 - beta2 ** t
        return (m / bc1) / ((v / bc2).sqrt() + eps)
    return m / (v.sqrt() + eps)


def adam_decay_step(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, *,
                    lr: Scalar, beta1: float, beta2: float, eps: float, weight_decay: float,
                    decay: str, delta: Optional[Scalar], max_lr: Optional[Scalar],
                    bias_correction: bool, maximize: bool, grad_scale: Optional[Tensor] = None) -> Tensor:
    """One AdamHD/AdamC step on one tensor, in place. ``step`` is t, already incremented.

    ``delta`` is δ_t^(l) for this tensor (ignored for ``decay="l2"``). Returns Σ_i |θ_t,i| in the
    math dtype (the per-layer magnitude that feeds δ's EMA).
    """
    dt = math_dtype(param.dtype)
    g = grad.to(dt)
    if grad_scale is not None:
        g = g / grad_scale.to(dt)
    if maximize:
        g = -g
    lr = lr.to(dt) if isinstance(lr, Tensor) else lr
    u = adam_direction(g, exp_avg, exp_avg_sq, step, beta1=beta1, beta2=beta2, eps=eps,
                       bias_correction=bias_correction)                      # u_t
    theta = param.to(dt)                                                     # θ_{t−1}
    tau = decay_coefficient(lr, weight_decay, max_lr)                         # τ = γ_t λ_t
    if isinstance(delta, Tensor):
        delta = delta.to(dt)
    if decay == "l2":
        new = theta * (1 - tau) - lr * u
    elif decay == "prox":
        new = huber_prox(theta - lr * u, tau, delta)                         # Eq. 17 then Eq. 18
    elif decay == "euler":
        new = theta - lr * u - tau * huber_grad(theta, delta)                # Eq. 12
    else:
        raise ValueError(f"unknown decay kind {decay!r}; expected one of {DECAY_KINDS}")
    param.copy_(new)
    return abs_sum(param)


def delta_mu_update(mu: Tensor, abs_sum: Tensor, numel: int, beta: float) -> Tensor:
    """μ_t = β·μ_{t−1} + (1 − β)·Σ|θ_t|/numel (AdamHD Eq. 8–9; β = 0 is Eq. 7), in μ's dtype."""
    return mu * beta + (abs_sum / float(max(int(numel), 1))) * (1 - beta)


def adam_decay_reference(params, grads, exp_avgs, exp_avg_sqs, state_steps, delta_mus, abs_sums, *,
                         lr, beta1, beta2, eps, weight_decay, decay, delta_fixed, delta_scale, max_lr,
                         bias_correction, maximize, grad_scale=None, found_inf=None, exp_avg_scales=None,
                         exp_avg_sq_scales=None, delta_beta=None, numels=None) -> None:
    """The multi-tensor kernel contract, implemented by looping :func:`adam_decay_step`.

    Every backend implements exactly this signature (see ``fusedecay.backends``):
      * ``state_steps`` are already incremented; δ_i = ``delta_fixed`` if given, else
        ``delta_scale * delta_mus[i]`` (``decay="l2"`` uses no δ);
      * ``abs_sums`` (a 1-D tensor with one slot per param, or None) receives Σ|θ_t| per tensor;
      * 8-bit state (docs/state8.md): with ``exp_avg_scales``/``exp_avg_sq_scales`` given, every
        ``exp_avgs[i]`` is an int8 code tensor and ``exp_avg_sqs[i]`` a uint8 one, with their float32 block
        scales; the moments are decoded, updated in float32 and encoded again;
      * ``delta_beta`` not None: after the step μ_i ← β·μ_i + (1 − β)·Σ|θ_t|/n_i (n_i = ``numels[i]``, default
        the tensor's numel), the update :func:`fusedecay.functional.update_delta_mu` does (``abs_sums`` needed);
      * if ``found_inf`` is nonzero nothing is written to params, moments, scales or μ.
    """
    quantized = exp_avg_scales is not None
    if quantized != (exp_avg_sq_scales is not None):
        raise ValueError("exp_avg_scales and exp_avg_sq_scales must be given together")
    if delta_beta is not None and abs_sums is None:
        raise ValueError("delta_beta needs abs_sums (the per-tensor sums μ is updated from)")
    for i, p in enumerate(params):
        stored = [p, exp_avgs[i], exp_avg_sqs[i]]
        if quantized:
            stored += [exp_avg_scales[i], exp_avg_sq_scales[i]]
            m = state8.dequantize_exp_avg(exp_avgs[i], exp_avg_scales[i])
            v = state8.dequantize_exp_avg_sq(exp_avg_sqs[i], exp_avg_sq_scales[i])
        else:
            m, v = exp_avgs[i], exp_avg_sqs[i]
        if found_inf is not None:
            # Eager reference: keep it readable; the kernels do this without a host sync.
            snapshot = [x.clone() for x in stored]
        if decay == "l2":
            delta = None
        elif delta_fixed is not None:
            delta = delta_fixed
        else:
            delta = delta_scale * delta_mus[i]
        s = adam_decay_step(p, grads[i], m, v, state_steps[i], lr=lr, beta1=beta1,
                            beta2=beta2, eps=eps, weight_decay=weight_decay, decay=decay, delta=delta,
                            max_lr=max_lr, bias_correction=bias_correction, maximize=maximize,
                            grad_scale=grad_scale)
        if quantized:
            (m_codes, m_scales), (v_codes, v_scales) = state8.quantize_exp_avg(m), state8.quantize_exp_avg_sq(v)
            for dst, src in zip(stored[1:], (m_codes, v_codes, m_scales, v_scales)):
                dst.copy_(src)
        skip = found_inf.to(torch.bool) if found_inf is not None else None
        if skip is not None:
            for dst, old in zip(stored, snapshot):
                dst.copy_(torch.where(skip, old, dst))
            s = torch.where(skip, abs_sum(p), s)
        if abs_sums is not None:
            abs_sums[i] = s
        if delta_beta is not None:
            new_mu = delta_mu_update(delta_mus[i], abs_sums[i], numels[i] if numels is not None else p.numel(),
                                     delta_beta)
            delta_mus[i].copy_(new_mu if skip is None else torch.where(skip, delta_mus[i], new_mu))
