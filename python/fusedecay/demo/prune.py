"""Magnitude pruning of the hidden (transformer-block) matrices, and sparsity statistics.

Pruned set: every 2-D matrix inside the blocks (attention qkv/proj, MLP fc/proj). The tied
embedding/head, the position table and the LayerNorm gains stay dense (common practice; with a
256-byte vocabulary they are a small share of the parameters — the JSON records the share).
  * "layer":  each matrix loses the same fraction s of its smallest-|θ| entries;
  * "global": one |θ| threshold over all pruned matrices together, removing a fraction s overall.
Weights are restored after each evaluation.
"""
from __future__ import annotations

import math
from typing import Dict, List, Sequence

import torch
from torch import Tensor

from .. import param_roles
from .model import GPT

PRUNE_MODES = ("layer", "global")


def hidden_matrices(model: GPT) -> List[Tensor]:
    return [p for _, p in param_roles(model)["hidden"]]


def _smallest_mask(values: Tensor, k: int) -> Tensor:
    """Boolean mask of the k smallest entries of ``values`` (exactly k; ties broken by position)."""
    mask = torch.zeros(values.numel(), dtype=torch.bool, device=values.device)
    if k > 0:
        mask[torch.argsort(values.flatten(), stable=True)[:k]] = True
    return mask.view_as(values)


@torch.no_grad()
def prune_(mats: Sequence[Tensor], sparsity: float, mode: str) -> None:
    """Zero a fraction ``sparsity`` of the smallest-magnitude entries of ``mats`` in place."""
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    if mode == "layer":
        for m in mats:
            m.masked_fill_(_smallest_mask(m.abs(), int(round(sparsity * m.numel()))), 0.0)
    elif mode == "global":
        flat = torch.cat([m.abs().flatten() for m in mats])
        mask = _smallest_mask(flat, int(round(sparsity * flat.numel())))
        for m, part in zip(mats, mask.split([m.numel() for m in mats])):
            m.masked_fill_(part.view_as(m), 0.0)
    else:
        raise ValueError(f"unknown pruning mode {mode!r}; expected one of {PRUNE_MODES}")


@torch.no_grad()
def pruned_losses(model: GPT, evaluate, sparsities: Sequence[float], modes: Sequence[str] = PRUNE_MODES
                  ) -> Dict[str, Dict[str, float]]:
    """{mode: {"0.30": val loss after pruning 30%, ...}}; the model is left as it was."""
    mats = hidden_matrices(model)
    saved = [m.clone() for m in mats]
    out: Dict[str, Dict[str, float]] = {}
    for mode in modes:
        out[mode] = {}
        for s in sparsities:
            prune_(mats, s, mode)
            out[mode][f"{s:.2f}"] = evaluate(model)
            for m, keep in zip(mats, saved):
                m.copy_(keep)
    return out


def hoyer(x: Tensor) -> float:
    """Hoyer's sparsity (sqrt(n) − ‖x‖₁/‖x‖₂)/(sqrt(n) − 1): 0 for a constant-magnitude vector, 1 for one-hot.
    Scale-free, so optimizers whose weights live at different scales compare fairly."""
    x = x.detach().double().flatten()
    n = x.numel()
    l2 = x.norm()
    if n < 2 or l2 == 0:
        return 0.0
    return float((math.sqrt(n) - x.abs().sum() / l2) / (math.sqrt(n) - 1))


@torch.no_grad()
def weight_stats(model: GPT, bins: int = 120, span: float = 6.0) -> Dict:
    """Sparsity of the hidden matrices at the end of training, and a pooled histogram of θ/RMS(θ)."""
    mats = hidden_matrices(model)
    near_zero = []
    edges = torch.linspace(-span, span, bins + 1)
    counts = torch.zeros(bins, dtype=torch.float64)
    raw = []
    for m in mats:
        x = m.detach().float().cpu().flatten()
        rms = x.square().mean().sqrt().clamp_min(1e-30)
        near_zero.append(float((x.abs() < 0.1 * rms).float().mean()))
        counts += torch.histc(x / rms, bins=bins, min=-span, max=span).double()
        raw.append(x)
    raw = torch.cat(raw)
    return {
        "hoyer_mean": sum(hoyer(m) for m in mats) / len(mats),
        "near_zero_frac": sum(near_zero) / len(near_zero),   # share of |θ| < 0.1·RMS(layer)
        "abs_mean": float(raw.abs().mean()), "rms": float(raw.square().mean().sqrt()),
        "hist_edges": edges.tolist(), "hist_counts": counts.tolist(),
    }


def prunable_share(model: GPT) -> float:
    total = sum(p.numel() for p in model.parameters())
    return sum(m.numel() for m in hidden_matrices(model)) / total
