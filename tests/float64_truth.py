"""Float64 closed forms of the update rules, written out from the spec for the tests' truth.

This module imports torch and math only, never ``fusedecay``: a path compared against it is checked against an
independent statement of the math, not against a helper it shares (the reference's ``lmo``, ``scion_decay``,
``init_delta_mu``, ``update_delta_mu``). Every function takes and returns float64 tensors and works on whole
(unsharded) tensors, one at a time.

ScionC (spec §4), per tensor of a group with momentum α, radius ρ, target C², decay λ:
  g ← −g if maximize
  m_t = (1 − α) m_{t−1} + α g_t                 LMO input: m_t, or m̂ = (1 − α) m_t + α g_t (nesterov)
  s = γ_t ρ
  η_t = s²(2 − α)/(2αC²)                         corrected; × (1 + 4α − 6α² + 2α³)^(−1) with nesterov
  η_t = γ_t λ                                    uncorrected
  θ_t = (1 − η_t) θ_{t−1} − s · lmo(input)
LMOs: sign(m)/d_in; m/sqrt(mean(m²) + 1e-12); spectral = P·sqrt(d_out/d_in) with P from the SVD m = U Σ Vᵀ:
  * ``ns="polar_express"``: P = U Vᵀ, the orthogonal polar factor. Newton–Schulz only approximates it; the
    approximation is exact to rounding once every normalised singular value σ_i/(1.01‖m‖_F) is ≥ 3e-4 and at
    least 10 steps run (measured on the scalar map of the 10-step Polar Express iteration: |p(x) − 1| ≤ 4e-15
    on [3e-4, 1]). :func:`spectral_direction` asserts σ_min/(1.01‖m‖_F) ≥ 1e-3 and ≥ 10 steps, so a mismatch
    against it is a bug, not the iteration's approximation error.
  * ``ns="classic"``: Newton–Schulz is the odd matrix polynomial X ← aX + bX³ + cX⁵ (a, b, c = 3.4445, −4.7750,
    2.0315) on X = m/(‖m‖_F + 1e-7), so P = U f(Σ/(‖m‖_F + 1e-7)) Vᵀ with f the same scalar iteration applied
    to each singular value: exact for any number of steps and any conditioning.

AdamHD / AdamC (spec §1–§3), per tensor:
  m_t = β1 m + (1 − β1) g,  v_t = β2 v + (1 − β2) g²,  u = (m_t/(1 − β1^t)) / (sqrt(v_t/(1 − β2^t)) + ε)
  τ = γ_t λ_t,  λ_t = λ, or λ γ_t/γ_max when corrected
  l2:    θ_t = θ(1 − τ) − γu
  prox:  y = θ − γu;  θ_t = y/(1 + τ) if |y| ≤ (1 + τ)δ else y − τδ sign(y)
  euler: θ_t = θ − γu − τ clip(θ, −δ, δ)
  δ = ``delta`` (fixed) or c·μ; μ_0 = mean|θ_0| at the tensor's first step; after each step (after the decay)
  μ ← β0 μ + (1 − β0) mean|θ_t| (β0 = 0 for ``delta_mode="mean"``); the mean of an empty tensor is 0.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import Tensor

F64 = torch.float64
NS_CLASSIC = (3.4445, -4.7750, 2.0315)   # the quintic's a, b, c (spec §4)
NS_EPS = 1e-7                            # added to ‖m‖_F before normalising (spec §4)
RMS_EPS = 1e-12                          # added under the bias LMO's square root
POLAR_MIN_STEPS = 10
POLAR_MIN_RELATIVE_SIGMA = 1e-3


def random_values(shapes, seed: int = 0, scale: float = 1.0):
    """name -> float64 N(0, scale²) tensor of that shape, from one seeded generator (a test's initial params)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen, dtype=torch.float64) * scale for k, s in shapes.items()}


def grad_stream(shapes, steps: int, skipped=None, seed: int = 1):
    """Per step, name -> float64 N(0, 1) grad; None for the (name, step) pair ``skipped`` (a param without a grad)."""
    gen = torch.Generator().manual_seed(seed)
    return [{k: None if (k, t) == skipped else torch.randn(s, generator=gen, dtype=torch.float64)
             for k, s in shapes.items()} for t in range(steps)]


def cosine_lr(base: float, k: int, total: int, eta_min: float) -> float:
    """γ after ``k`` scheduler steps of cosine annealing from ``base`` to ``eta_min`` over ``total`` steps."""
    return eta_min + (base - eta_min) * (1 + math.cos(math.pi * k / total)) / 2


# ------------------------------------------------------------------------------------------------
# ScionC
# ------------------------------------------------------------------------------------------------

def sign_direction(m: Tensor) -> Tensor:
    d_in = m.shape[-1] if m.ndim >= 2 else 1
    return torch.sign(m) / d_in


def bias_direction(m: Tensor) -> Tensor:
    return m / torch.sqrt(m.square().mean() + RMS_EPS)


def spectral_direction(m: Tensor, ns: str, ns_steps: int) -> Tensor:
    """P·sqrt(d_out/d_in), P the polar factor (Polar Express) or the classic quintic's image, both via the SVD."""
    assert m.ndim == 2 and m.dtype == F64
    d_out, d_in = m.shape
    U, S, Vh = torch.linalg.svd(m, full_matrices=False)
    if ns == "polar_express":
        assert ns_steps >= POLAR_MIN_STEPS, f"Polar Express needs >= {POLAR_MIN_STEPS} steps to be exact here"
        rel = S.min() / (1.01 * torch.linalg.matrix_norm(m))
        assert rel >= POLAR_MIN_RELATIVE_SIGMA, (
            f"input too ill-conditioned for a converged Polar Express (σ_min/(1.01‖m‖_F) = {rel:.2e})")
        f = torch.ones_like(S)
    elif ns == "classic":
        f = S / (torch.linalg.matrix_norm(m) + NS_EPS)
        a, b, c = NS_CLASSIC
        for _ in range(ns_steps):
            f = a * f + b * f ** 3 + c * f ** 5
    else:
        raise ValueError(ns)
    return (U * f) @ Vh * math.sqrt(d_out / d_in)


def scionc_direction(kind: str, m: Tensor, ns: str = "classic", ns_steps: int = 5) -> Tensor:
    if kind == "spectral":
        return spectral_direction(m, ns, ns_steps)
    if kind == "sign":
        return sign_direction(m)
    if kind == "bias":
        return bias_direction(m)
    raise ValueError(kind)


def scionc_eta(lr: float, *, radius: float, momentum: float, norm_target: float, corrected: bool,
               weight_decay: float, nesterov: bool) -> float:
    """η_t: s²(2 − α)/(2αC²) (× (1 + 4α − 6α² + 2α³)^(−1) with nesterov) if corrected, else γλ."""
    if not corrected:
        return lr * weight_decay
    a = momentum
    s = lr * radius
    eta = s * s * (2 - a) / (2 * a * norm_target)
    if nesterov:
        eta = eta / (1 + 4 * a - 6 * a ** 2 + 2 * a ** 3)
    return eta


def scionc_step(theta: Tensor, m: Tensor, g: Tensor, *, lr: float, lmo: str, momentum: float = 0.1,
                radius: float = 1.0, norm_target: float = 1.1875, corrected: bool = True, weight_decay: float = 0.0,
                ns: str = "classic", ns_steps: int = 5, nesterov: bool = False, maximize: bool = False,
                eta_mul: float = 1.0, step_sign: float = 1.0) -> Tuple[Tensor, Tensor]:
    """One ScionC step on one float64 tensor: returns (θ_t, m_t).

    ``eta_mul`` and ``step_sign`` exist only so tests can check that their comparison sees a doubled decay
    (η → 2η) or a flipped step; leave them at 1."""
    a = momentum
    g = -g if maximize else g
    m = (1 - a) * m + a * g
    direction_input = (1 - a) * m + a * g if nesterov else m
    d = scionc_direction(lmo, direction_input, ns, ns_steps)
    eta = eta_mul * scionc_eta(lr, radius=radius, momentum=a, norm_target=norm_target, corrected=corrected,
                               weight_decay=weight_decay, nesterov=nesterov)
    return (1 - eta) * theta - step_sign * (lr * radius) * d, m


# ------------------------------------------------------------------------------------------------
# AdamHD / AdamC
# ------------------------------------------------------------------------------------------------

def mu_update(mu: float, abs_sum: float, numel: int, beta: float, skipped: bool = False) -> float:
    """AdamHD's δ tracking after a step (Eq. 8–9): μ ← β·μ + (1 − β)·Σ|θ_t|/n (n the global size, 0 → 1); an
    overflow step (GradScaler's found_inf) leaves μ as it was."""
    return mu if skipped else beta * mu + (1.0 - beta) * abs_sum / max(numel, 1)


def mean_abs(theta: Tensor) -> Tensor:
    """mean|θ| as a float64 0-d tensor (0 for an empty tensor)."""
    return theta.abs().sum() / max(theta.numel(), 1)


def adam_decay_step(theta: Tensor, m: Tensor, v: Tensor, g: Tensor, t: int, *, lr: float, betas=(0.9, 0.999),
                    eps: float = 1e-8, weight_decay: float, decay: str, delta: Optional[Tensor],
                    max_lr: Optional[float], bias_correction: bool = True,
                    maximize: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """One AdamHD/AdamC step on one float64 tensor at step ``t`` (1-based): returns (θ_t, m_t, v_t)."""
    b1, b2 = betas
    g = -g if maximize else g
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    if bias_correction:
        u = (m / (1 - b1 ** t)) / (torch.sqrt(v / (1 - b2 ** t)) + eps)
    else:
        u = m / (torch.sqrt(v) + eps)
    lam = weight_decay if max_lr is None else weight_decay * lr / max_lr
    tau = lr * lam
    if decay == "l2":
        new = theta * (1 - tau) - lr * u
    elif decay == "prox":
        y = theta - lr * u
        new = torch.where(y.abs() <= (1 + tau) * delta, y / (1 + tau), y - tau * delta * torch.sign(y))
    elif decay == "euler":
        new = theta - lr * u - tau * torch.minimum(torch.maximum(theta, -delta), delta)
    else:
        raise ValueError(decay)
    return new, m, v


class AdamDecayTruth:
    """Float64 AdamHD/AdamC state of one tensor, with the μ bookkeeping of δ (see module docstring).

    ``decay``: "l2" (AdamC/AdamW), "prox" or "euler"; ``delta_mode``: "fixed" | "mean" | "ema". A group with
    λ = 0 has no decay and keeps no μ."""

    def __init__(self, theta: Tensor, *, decay: str, weight_decay: float, delta_mode: str = "fixed",
                 delta: Optional[float] = None, delta_scale: float = 1.0, delta_beta: float = 0.99,
                 max_lr: Optional[float] = None, betas=(0.9, 0.999), eps: float = 1e-8,
                 bias_correction: bool = True, maximize: bool = False):
        self.theta = theta.detach().to(F64).clone()
        self.m = torch.zeros_like(self.theta)
        self.v = torch.zeros_like(self.theta)
        self.t = 0
        self.mu: Optional[Tensor] = None
        self.decay = decay if weight_decay != 0 else "l2"
        self.tracks = self.decay != "l2" and delta_mode != "fixed"
        self.kw = dict(betas=betas, eps=eps, weight_decay=weight_decay, bias_correction=bias_correction,
                       maximize=maximize, max_lr=max_lr)
        self.delta_mode, self.delta, self.delta_scale = delta_mode, delta, delta_scale
        self.delta_beta = 0.0 if delta_mode == "mean" else delta_beta

    def current_delta(self) -> Optional[Tensor]:
        """δ for the next step: the fixed one, c·μ, or None (no Huber decay)."""
        if self.decay == "l2":
            return None
        if not self.tracks:
            return torch.tensor(self.delta, dtype=F64)
        if self.mu is None:
            self.mu = mean_abs(self.theta)                                  # μ_0 = mean|θ_0|
        return self.delta_scale * self.mu                                   # δ = c·μ

    def step(self, g: Tensor, lr: float) -> None:
        delta = self.current_delta()
        self.t += 1
        self.theta, self.m, self.v = adam_decay_step(self.theta, self.m, self.v, g.to(F64), self.t, lr=lr,
                                                     decay=self.decay, delta=delta, **self.kw)
        if self.tracks:                                                     # after the decay step
            self.mu = self.delta_beta * self.mu + (1 - self.delta_beta) * mean_abs(self.theta)
