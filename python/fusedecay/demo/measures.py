"""The numbers each claim is judged by, computed from one run's history (one optimizer, one seed).

Each measure follows how its paper measures the claim (docs/demo.md, "How each claim is measured"):

* **final phase of the cosine schedule** (corrected decay, 2512.08217: AdamW's weight norm falls and its
  gradient norm rises while the lr anneals; the corrected rules keep both steady): the window is the last
  ``FINAL_PHASE`` = 20 % of the cosine part of the schedule. ‖θ‖ is the Frobenius norm of all block matrices
  together (the layers the correction applies to), read at the last step ÷ at the window's first step;
  ‖g‖ is the total gradient norm (all params, before the step), averaged over the last ``EDGE`` = 20 % of the
  window ÷ averaged over its first 20 % (per-step gradient norms are noisy; the averages are not).
* **pruning** (AdamHD, 2511.14721: memory saved by magnitude pruning): the whole loss-vs-sparsity curve, summed
  up as the mean validation loss after per-layer pruning at the grid's sparsities up to ``CURVE_MAX`` = 80 %
  (the area under the curve ÷ its width), plus the loss at fixed sparsities and — across runs, in
  ``claims`` — the sparsity at which each curve crosses a common loss threshold.
* **convergence speed**: the (interpolated) step at which the validation curve first reaches a target loss.
"""
from __future__ import annotations

import math
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

FINAL_PHASE = 0.20   # share of the cosine phase (after warmup) that counts as "the end of the schedule"
EDGE = 0.20          # share of that window averaged at each of its ends for the gradient norm
CURVE_MAX = 0.80     # the pruning-curve summary averages the per-layer grid up to this sparsity


def first_crossing(xs: Sequence[float], ys: Sequence[float], target: float) -> Optional[float]:
    """Smallest x (linear interpolation) at which ys first falls to ``target`` or below; None if never."""
    for i, (x, y) in enumerate(zip(xs, ys)):
        if y <= target:
            if i == 0:
                return float(x)
            x0, y0 = xs[i - 1], ys[i - 1]
            return float(x0 + (x - x0) * (y0 - target) / (y0 - y)) if y0 != y else float(x)
    return None


def first_rise_above(xs: Sequence[float], ys: Sequence[float], limit: float) -> float:
    """x at which ys (increasing in x, as a pruning curve) first exceeds ``limit``, interpolated; the last x
    if it never does."""
    for i, (x, y) in enumerate(zip(xs, ys)):
        if y > limit:
            if i == 0:
                return float(x)
            x0, y0 = xs[i - 1], ys[i - 1]
            return float(x0 + (x - x0) * (limit - y0) / (y - y0))
    return float(xs[-1])


def final_phase(n_steps: int, warmup_frac: float) -> Tuple[int, int]:
    """(first, last) step index of the final ``FINAL_PHASE`` of the cosine phase (inclusive)."""
    warmup = int(round(warmup_frac * n_steps)) if warmup_frac > 0 else 0
    first = warmup + int(math.floor((1 - FINAL_PHASE) * (n_steps - warmup)))
    return min(first, n_steps - 1), n_steps - 1


def block_norm(hist: Dict, t: int) -> float:
    """‖θ‖_F of all block (transformer-layer) matrices together after step index t."""
    return math.sqrt(sum(hist["weight_norm"][n][t] ** 2 for n in hist["layers"] if n.startswith("blocks.")))


def weight_norm_ratio(hist: Dict, warmup_frac: float) -> float:
    """‖θ_blocks‖ at the last step ÷ at the first step of the final phase (< 1: the norm fell there)."""
    first, last = final_phase(len(hist["train_loss"]), warmup_frac)
    return block_norm(hist, last) / block_norm(hist, first)


def edge_width(first: int, last: int) -> int:
    """Steps averaged at each end of the window [first, last]."""
    return max(1, int(round(EDGE * (last - first + 1))))


def grad_norm_ratio(grad_norms: Sequence[float], warmup_frac: float) -> float:
    """Mean total ‖g‖ over the last EDGE of the final phase ÷ mean over its first EDGE (> 1: it rose)."""
    first, last = final_phase(len(grad_norms), warmup_frac)
    w = edge_width(first, last)
    start = grad_norms[first:first + w]
    end = grad_norms[last + 1 - w:last + 1]
    return (sum(end) / len(end)) / (sum(start) / len(start))


def layer_curve(pruning: Dict[str, float], dense: float) -> Tuple[List[float], List[float]]:
    """The per-layer pruning curve as sorted (sparsities, val losses), starting at (0, dense)."""
    pts = sorted((float(k), v) for k, v in pruning.items())
    if not pts or pts[0][0] > 0:
        pts = [(0.0, dense)] + pts
    return [p[0] for p in pts], [p[1] for p in pts]


def curve_summary(pruning: Dict[str, float]) -> float:
    """Mean val loss after per-layer pruning at the grid's sparsities in (0, CURVE_MAX]."""
    vals = [v for k, v in pruning.items() if 0 < float(k) <= CURVE_MAX + 1e-9]
    if not vals:
        raise ValueError(f"the per-layer pruning grid has no sparsity in (0, {CURVE_MAX}]: {sorted(pruning)}")
    return sum(vals) / len(vals)


def run_measures(hist: Dict, warmup_frac: float) -> Dict[str, float]:
    """The scalar measures of one run (the claims combine them across seeds and optimizers)."""
    layer = hist["pruning"]["layer"]
    out = {
        "final_val_loss": hist["final_val_loss"],
        "decay_sum": sum(hist["hidden_decay"]),
        "weight_norm_ratio": weight_norm_ratio(hist, warmup_frac),
        "grad_norm_ratio": grad_norm_ratio(hist["grad_norm_total"], warmup_frac),
        "hoyer": hist["weights"]["hoyer_mean"],
        "near_zero_frac": hist["weights"]["near_zero_frac"],
        "prune_curve": curve_summary(layer),
        "median_step_ms": 1e3 * statistics.median(hist["step_time_s"]),
        "median_opt_ms": 1e3 * statistics.median(hist["opt_time_s"]),
        "wall_time_s": hist["wall_time_s"],
    }
    for k, v in layer.items():
        out[f"prune_layer_{k}"] = v
    if "norm_target_ratio" in hist:
        out["norm_target_ratio"] = hist["norm_target_ratio"]
    return out
