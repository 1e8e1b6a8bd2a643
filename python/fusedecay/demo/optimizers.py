"""The four optimizers of the demo, their param groups and hyperparameters (sources in docs/demo.md).

Every optimizer sees the same param roles (:func:`fusedecay.param_groups`; the head is the tied ``wte``):

    role        AdamW            AdamHD                AdamC                    ScionC
    hidden      decay λ          Huber decay λ         corrected decay λ        spectral LMO, corrected (C²)
    embedding   decay λ          Huber decay λ         corrected decay λ        sign LMO, uncorrected decay
    output      decay λ          Huber decay λ         plain (uncorrected) λ    sign LMO, uncorrected decay
    gain (1-D)  no decay         no decay              no decay                 bias LMO, no decay

The Adam variants share lr, betas, eps and λ (one grid point: AdamHD and AdamC are drop-in
replacements for AdamW, which is how both papers compare). ScionC's lr lives on a different scale (its
step is lr × radius along a unit-norm direction), so it uses the Scion authors' GPT values; the
learning-rate *schedule* is the same for all of them.

Decay strength. Unless given, the Scion family's decay is matched to the Adam family's: ScionC's C² is
chosen so that its per-step decay of the block matrices at the peak lr, η_max = s²(2 − α)/(2αC²) with
s = γ_max·ρ, equals the Adam family's γ_max·λ, and the uncorrected Scion baseline gets λ = η_max/γ_max
(its decay at the peak lr is then the same too). Every decayed optimizer then has the same decay
timescale 1/η_max at the peak; AdamW, AdamHD and Scion follow γ_t, AdamC and ScionC follow γ_t².
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from .. import AdamC, AdamHD, ScionC, param_groups
from .model import GPT

OPTIMIZERS = ("adamw", "adamhd", "adamc", "scionc")
# Optional baseline (not in the default set): Scion with plain decay η = γλ everywhere, i.e. ScionC
# without the correction, for the "ScionC vs Scion" claim.
EXTRA_OPTIMIZERS = ("scion",)
# Optional runs, never in the default set: AdamHD with 8-bit moment state (state_bits=8, docs/state8.md), to see
# what the 8-bit state costs against AdamHD's own fp32 state in the same run (`--optimizers adamhd,adamhd8`).
OPTIONAL_OPTIMIZERS = ("adamhd8",)
LABELS = {"adamw": "AdamW (torch)", "adamhd": "AdamHD", "adamc": "AdamC", "scionc": "ScionC", "scion": "Scion",
          "adamhd8": "AdamHD, 8-bit state"}


@dataclass
class Hyper:
    """Hyperparameters of one run (recorded in the metrics JSON)."""
    adam_lr: float = 1e-3          # γ_max of AdamW/AdamHD/AdamC
    betas: Tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1      # λ of the Adam variants (2-D params only)
    # AdamHD (seed 000): δ^(l) = c·μ^(l), μ an EMA of mean|θ| (Eqs. 8–9), proximal update (Eq. 18)
    hd_delta_scale: float = 1.0    # c
    hd_delta_beta: float = 0.99    # β0
    hd_update: str = "prox"
    # ScionC (seed 003; Scion's GPT settings): step s = γ·ρ along the unit LMO direction
    scion_lr: float = 2.0 ** -12   # γ_max
    scion_momentum: float = 0.1    # α, weight on the new gradient
    scion_hidden_radius: float = 50.0
    scion_sign_radius: float = 3000.0
    scion_norm_target: Optional[float] = None   # C² of ScionC's block matrices; None: matched (module docstring)
    scion_sign_decay: float = 1.0  # λ of the uncorrected sign layers: η = γ·λ = γ (Scion's constrained decay)
    scion_plain_decay: Optional[float] = None   # λ of the uncorrected "scion" baseline's block matrices; None: matched
    warmup_frac: float = 0.1       # linear warmup share of the steps, then cosine to 0

    def __post_init__(self) -> None:
        peak = self.adam_lr * self.weight_decay   # η_max = γ_max·λ of the Adam family
        if (self.scion_norm_target is None or self.scion_plain_decay is None) and not peak > 0:
            raise ValueError(f"matching the Scion family's decay needs adam_lr·weight_decay > 0, got "
                             f"{self.adam_lr}·{self.weight_decay}; give scion_norm_target and scion_plain_decay")
        if self.scion_norm_target is None:
            s = self.scion_lr * self.scion_hidden_radius
            a = self.scion_momentum
            self.scion_norm_target = s * s * (2 - a) / (2 * a * peak)   # C² with s²(2−α)/(2αC²) = η_max
        if self.scion_plain_decay is None:
            self.scion_plain_decay = peak / self.scion_lr              # λ with γ_max·λ = η_max

    def to_dict(self) -> dict:
        return asdict(self)


def lr_lambda(total_steps: int, warmup_frac: float) -> Callable[[int], float]:
    """Multiplier of γ_max at step index t (0-based): linear warmup, then cosine decay towards 0."""
    warmup = max(1, int(round(warmup_frac * total_steps))) if warmup_frac > 0 else 0

    def f(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        span = max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(t - warmup, span) / span))

    return f


def build_optimizer(name: str, model: GPT, hp: Hyper) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``model``'s params, grouped by role (see module docstring)."""
    adam = dict(lr=hp.adam_lr, betas=hp.betas, eps=hp.eps, weight_decay=hp.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(param_groups(model, "adamw"), **adam)
    if name in ("adamhd", "adamhd8"):
        return AdamHD(param_groups(model, "adamhd"), update=hp.hd_update, delta_mode="ema",
                      delta_scale=hp.hd_delta_scale, delta_beta=hp.hd_delta_beta, backend="auto",
                      state_bits=8 if name == "adamhd8" else 32, **adam)
    if name == "adamc":
        # Corrected (λ_t = λγ_t/γ_max) everywhere but the output layer (seed 003's rule).
        return AdamC(param_groups(model, "adamc"), backend="auto", **adam)
    if name in ("scionc", "scion"):
        hidden = ({"corrected": True, "norm_target": hp.scion_norm_target} if name == "scionc"
                  else {"corrected": False, "weight_decay": hp.scion_plain_decay})
        sign = {"radius": hp.scion_sign_radius, "weight_decay": hp.scion_sign_decay}
        vector = {"radius": hp.scion_hidden_radius}
        options = {"hidden": {"radius": hp.scion_hidden_radius, **hidden}, "embedding": sign, "output": sign,
                   "norm": vector, "bias": vector}
        return ScionC(param_groups(model, "scionc", options=options), lr=hp.scion_lr, momentum=hp.scion_momentum,
                      backend="auto")
    raise ValueError(f"unknown optimizer {name!r}; expected one of {','.join(OPTIMIZERS + EXTRA_OPTIMIZERS)}")


def hidden_decay(name: str, hp: Hyper, lr_mult: float) -> float:
    """η_t applied to the block matrices at a step with lr multiplier ``lr_mult`` (θ ← (1 − η_t)θ − …).
    For AdamHD it is the coefficient of the quadratic (|θ| ≤ δ) regime, an upper bound on its shrinkage."""
    if name in ("adamw", "adamhd", "adamhd8"):
        return hp.adam_lr * lr_mult * hp.weight_decay
    if name == "adamc":
        return hp.adam_lr * lr_mult * hp.weight_decay * lr_mult        # λ_t = λ·γ_t/γ_max
    s = hp.scion_lr * lr_mult * hp.scion_hidden_radius
    if name == "scionc":
        a = hp.scion_momentum
        return s * s * (2 - a) / (2 * a * hp.scion_norm_target)
    if name == "scion":
        return hp.scion_lr * lr_mult * hp.scion_plain_decay
    raise ValueError(name)


def describe(name: str, hp: Hyper) -> Dict[str, object]:
    """The hyperparameters that apply to ``name`` (for the JSON and the summary)."""
    common = {"schedule": f"linear warmup {hp.warmup_frac:.0%} of steps, cosine to 0"}
    if name in ("adamw", "adamhd", "adamhd8", "adamc"):
        d = {"lr": hp.adam_lr, "betas": list(hp.betas), "eps": hp.eps, "weight_decay": hp.weight_decay,
             "decay_on": "2-D params (hidden, embeddings, tied head)"}
        if name in ("adamhd", "adamhd8"):
            d.update(update=hp.hd_update, delta_mode="ema", delta_scale=hp.hd_delta_scale,
                     delta_beta=hp.hd_delta_beta)
        if name == "adamhd8":
            d.update(state_bits=8)
        if name == "adamc":
            d.update(corrected="hidden + position embedding", uncorrected="tied output head")
        return {**d, **common}
    if name in ("scionc", "scion"):
        hidden = (f"corrected, C²={hp.scion_norm_target:g}" if name == "scionc"
                  else f"uncorrected, λ={hp.scion_plain_decay:g}")
        return {"lr": hp.scion_lr, "momentum": hp.scion_momentum, "hidden": f"spectral, radius "
                f"{hp.scion_hidden_radius:g}, {hidden}",
                "embeddings/head": f"sign, radius {hp.scion_sign_radius:g}, uncorrected, λ={hp.scion_sign_decay:g}",
                "gains": f"bias, radius {hp.scion_hidden_radius:g}, no decay", **common}
    raise ValueError(name)
