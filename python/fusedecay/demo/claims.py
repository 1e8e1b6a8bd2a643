"""The two seeds' claims, each judged on intervals over seeds (``stats``) from the measures of ``measures``.

Two kinds of comparison, named in every row:
  * **shared λ** (the default run): every optimizer at the one decay setting of the run;
  * **best-vs-best** (``--sweep``): each optimizer at its own best λ of the grid, chosen by the mean over
    seeds of the measure the claim is about (val loss for "better loss", the pruning-curve summary for
    "better after pruning"); sparsity and speed are read at each optimizer's val-loss-best λ.
"More robust to λ" is a claim of its own (sweep only): the spread of a measure across the grid.

A row is {"seed", "claim", "measure", "comparison", "numbers", "verdict"}; verdicts are those of
``stats.verdict`` ("agrees", "disagrees", "tie") or "not tested".
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence

from .measures import first_crossing, first_rise_above, layer_curve
from .stats import Interval, best_index, interval, paired_verdict, verdict

HD_SEED = "AdamHD, 2511.14721"
C_SEED = "corrected decay, 2512.08217"
DEMO_QUESTION = "not a paper claim"
PRUNE_THRESHOLD = 0.10   # nats above AdamW's dense loss: the loss level whose crossing sparsity is reported
FIXED_SPARSITIES = ("0.50", "0.70")

NAMES = {"adamw": "AdamW", "adamhd": "AdamHD", "adamc": "AdamC", "scionc": "ScionC", "scion": "Scion",
         "adamhd8": "AdamHD 8-bit"}
STATE8_TOLERANCE = 0.01  # the 8-bit state "trains like" fp32 state if its val loss is within 1% (relative)

# A "setting" is the list of one optimizer's histories over the seeds (same seed order for every optimizer).
Setting = List[Dict]


def values(setting: Setting, key: str) -> List[float]:
    return [h["measures"][key] for h in setting]


def iv(setting: Setting, key: str) -> Interval:
    return interval(values(setting, key))


def _row(seed: str, claim: str, measure: str, comparison: str, numbers: str, verdict_: str,
         paired: str = "—") -> Dict[str, str]:
    return {"seed": seed, "claim": claim, "measure": measure, "comparison": comparison, "numbers": numbers,
            "verdict": verdict_, "paired": paired}


def _pair(base: str, cand: str, xa: Sequence[float], xb: Sequence[float], spec: str = ".4f") -> str:
    """Both optimizers' intervals, and the interval of the per-seed difference candidate − baseline (the runs
    of one seed share init and batches, so the paired difference is the sharper view; the verdict still needs
    the two intervals to separate)."""
    d = interval([y - x for x, y in zip(xa, xb)])
    return (f"{NAMES[base]} {interval(xa).fmt(spec)}, {NAMES[cand]} {interval(xb).fmt(spec)}; paired Δ "
            f"{d.fmt('+' + spec)}")


def _compare(seed: str, claim: str, measure: str, comparison: str, base: str, cand: str, xa: Sequence[float],
             xb: Sequence[float], better: str, extra: str = "") -> Dict[str, str]:
    """A row judging per-seed values ``xb`` (candidate) against ``xa`` (baseline)."""
    return _row(seed, claim, measure, comparison, _pair(base, cand, xa, xb) + extra,
                verdict(interval(xb), interval(xa), better), paired_verdict(xa, xb, better))


def steps_to(setting: Setting, target: float) -> List[float]:
    """Per seed: the step at which the validation curve first reaches ``target`` (interpolated)."""
    out = []
    for h in setting:
        s = first_crossing(h["val_step"], h["val_loss"], target)
        out.append(float("inf") if s is None else s)
    return out


def crossing_sparsity(setting: Setting, threshold: float) -> List[float]:
    """Per seed: the per-layer sparsity at which the pruned val loss first exceeds ``threshold`` (the grid's
    largest sparsity if it never does)."""
    return [first_rise_above(*layer_curve(h["pruning"]["layer"], h["final_val_loss"]), threshold) for h in setting]


# ---- the claims, each for one pair of settings (baseline, candidate) -------------------------------------------

def speed_row(base: str, cand: str, W: Setting, H: Setting, comparison: str) -> Dict[str, str]:
    target = max(values(W, "final_val_loss") + values(H, "final_val_loss"))
    xa, xb = steps_to(W, target), steps_to(H, target)
    a, b = interval(xa), interval(xb)
    return _row(HD_SEED, "10–15% faster convergence than AdamW",
                f"steps until the val loss first reaches {target:.4f} (the highest final val loss among these runs, "
                "so every run reaches it; interpolated between evaluations)", comparison,
                f"{_pair(base, cand, xa, xb, '.0f')} steps; per-seed ratio {NAMES[cand]}/{NAMES[base]} "
                f"{interval([y / x if x > 0 else float('inf') for x, y in zip(xa, xb)]).fmt('.3f')}",
                verdict(b, a, "lower"), paired_verdict(xa, xb, "lower"))


def loss_row(seed: str, claim: str, base: str, cand: str, W: Setting, H: Setting, comparison: str) -> Dict[str, str]:
    return _compare(seed, claim, "final val loss, nats/byte (perplexity per byte = e^loss, same order)", comparison,
                    base, cand, values(W, "final_val_loss"), values(H, "final_val_loss"), "lower")


def sparsity_row(base: str, cand: str, W: Setting, H: Setting, comparison: str) -> Dict[str, str]:
    za, zb = iv(W, "near_zero_frac"), iv(H, "near_zero_frac")
    return _compare(HD_SEED, "sparser weights", "Hoyer sparsity of the block matrices (scale-free, mean over layers); "
                    "also the share of |θ| < 0.1·RMS(layer)", comparison, base, cand, values(W, "hoyer"),
                    values(H, "hoyer"), "higher", f"; near-zero share {za.fmt()} / {zb.fmt()}")


def pruning_row(base: str, cand: str, W: Setting, H: Setting, comparison: str) -> Dict[str, str]:
    xa, xb = values(W, "prune_curve"), values(H, "prune_curve")
    keys = [k for k in FIXED_SPARSITIES if "prune_layer_" + k in W[0]["measures"]]
    fixed = "; ".join(f"at {float(k):.0%}: {iv(W, 'prune_layer_' + k).fmt('.3f')} / "
                      f"{iv(H, 'prune_layer_' + k).fmt('.3f')}" for k in keys)
    threshold = iv(W, "final_val_loss").mean + PRUNE_THRESHOLD
    cw, ch = crossing_sparsity(W, threshold), crossing_sparsity(H, threshold)
    sa, sb = interval(cw), interval(ch)
    saving = interval([1 - (1 - y) / (1 - x) if x < 1 else 0.0 for x, y in zip(cw, ch)])   # per seed
    top = max(float(k) for k in W[0]["pruning"]["layer"])
    censored = (f" (some curves stay below the threshold up to the grid's {top:.0%}: a lower bound)"
                if max(cw + ch) >= top else "")
    return _row(HD_SEED, "20–30% memory savings after magnitude pruning",
                "per-layer magnitude pruning of the block matrices: mean val loss over sparsities 10–80% (the "
                "curve's area ÷ width; verdict), val loss at fixed sparsities, and the sparsity at which the loss "
                "crosses "
                f"AdamW's dense loss + {PRUNE_THRESHOLD:g} nats", comparison,
                f"mean over the curve {_pair(base, cand, xa, xb)}; {fixed} ({NAMES[base]} / {NAMES[cand]}); crossing "
                f"{threshold:.3f} at sparsity {sa.fmt('.1f', 100, '%')} / {sb.fmt('.1f', 100, '%')} → memory saving "
                f"{saving.fmt('+.1f', 100, '%')} per seed{censored}", verdict(interval(xb), interval(xa), "lower"),
                paired_verdict(xa, xb, "lower"))


def weight_norm_row(base: str, cand: str, W: Setting, C: Setting, comparison: str) -> Dict[str, str]:
    extra = ""
    if "norm_target_ratio" in C[0]["measures"]:
        extra = (f"; {NAMES[cand]} ‖θ‖²/(C²·‖lmo‖²) at the end {iv(C, 'norm_target_ratio').fmt('.3f')} "
                 "(1 = its steady state)")
    return _compare(C_SEED, f"{NAMES[cand]}: the weight norm does not decay at the end of the cosine schedule, "
                    f"where {NAMES[base]}'s does", "‖θ‖ of the block matrices at the last step ÷ at the start of the "
                    "final 20% of the cosine phase (< 1: it decayed)", comparison, base, cand,
                    values(W, "weight_norm_ratio"), values(C, "weight_norm_ratio"), "higher", extra)


def grad_norm_row(base: str, cand: str, W: Setting, C: Setting, comparison: str) -> Dict[str, str]:
    return _compare(C_SEED, f"{NAMES[cand]}: the gradient norm does not rise at the end of the cosine schedule, "
                    f"where {NAMES[base]}'s does", "total ‖g‖ averaged over the last fifth of the final 20% of the "
                    "cosine phase ÷ over its first fifth (> 1: it rose)", comparison, base, cand,
                    values(W, "grad_norm_ratio"), values(C, "grad_norm_ratio"), "lower")


def state8_row(H: Setting, Q: Setting, comparison: str) -> Dict[str, str]:
    """8-bit moment state against AdamHD's own fp32 state (an equivalence question, not a paper's claim): per seed,
    the relative difference of the final val loss; "agrees" when its 95 % interval lies inside ±1 %, "disagrees"
    when entirely outside, "tie" (inconclusive) otherwise. The paired column is the usual overlap rule."""
    xa, xb = values(H, "final_val_loss"), values(Q, "final_val_loss")
    rel = interval([(y - x) / x for x, y in zip(xa, xb)])
    tol = STATE8_TOLERANCE
    v = "agrees" if rel.n > 1 and -tol <= rel.lo and rel.hi <= tol else (
        "disagrees" if rel.n > 1 and (rel.lo > tol or rel.hi < -tol) else "tie")
    return _row(DEMO_QUESTION, f"8-bit moment state trains like fp32 state (within {tol:.0%} of the val loss)",
                "final val loss; the per-seed relative difference (8-bit − fp32)/fp32 must lie within "
                f"±{tol:.0%}", comparison, f"{_pair('adamhd', 'adamhd8', xa, xb)}; relative "
                f"{rel.fmt('+.2f', 100, '%')}", v, paired_verdict(xa, xb, "lower"))


def not_tested(seed: str, claim: str, why: str) -> Dict[str, str]:
    return _row(seed, claim, "—", "—", why, "not tested")


SCION_CLAIM = "ScionC performs comparably to or better than uncorrected Scion"
DOWNSTREAM = "2.5–4.7% downstream-task gains"


def shared_claims(runs: Dict[str, Setting], comparison: str) -> List[Dict[str, str]]:
    """All claims at one shared decay setting (the default run). ``runs``: optimizer → histories over seeds."""
    rows: List[Dict[str, str]] = []
    if "adamw" in runs and "adamhd" in runs:
        W, H = runs["adamw"], runs["adamhd"]
        rows += [speed_row("adamw", "adamhd", W, H, comparison),
                 loss_row(HD_SEED, "lower validation perplexity (up to 4 points on GPT-2 tokens)", "adamw", "adamhd",
                          W, H, comparison),
                 sparsity_row("adamw", "adamhd", W, H, comparison),
                 pruning_row("adamw", "adamhd", W, H, comparison)]
    rows.append(not_tested(HD_SEED, DOWNSTREAM, "no downstream tasks in this demo"))
    for base, cand in (("adamw", "adamc"), ("scion", "scionc")):
        if base in runs and cand in runs:
            rows += [weight_norm_row(base, cand, runs[base], runs[cand], comparison),
                     grad_norm_row(base, cand, runs[base], runs[cand], comparison)]
    if "adamhd" in runs and "adamhd8" in runs:
        rows.append(state8_row(runs["adamhd"], runs["adamhd8"], comparison))
    if "scionc" in runs:
        if "scion" in runs:
            rows.append(loss_row(C_SEED, SCION_CLAIM, "scion", "scionc", runs["scion"], runs["scionc"], comparison))
        else:
            rows.append(not_tested(C_SEED, SCION_CLAIM, "the uncorrected baseline was not run (add `scion` to "
                                   "--optimizers)"))
    return rows


# ---- the sweep: best-vs-best, shared λ at every grid point, robustness --------------------------------------------

def best_setting(grid: Sequence[Dict[str, Setting]], name: str, key: str, better: str = "lower") -> int:
    """Index of the grid point where optimizer ``name``'s mean ``key`` over seeds is best."""
    return best_index([values(point[name], key) for point in grid], better)


def _at(labels: Sequence[str], k: int) -> str:
    edge = " (grid edge)" if k in (0, len(labels) - 1) and len(labels) > 1 else ""
    return f"λ {labels[k]}{edge}"


def _best_vs_best(labels: Sequence[str], base: str, cand: str, kb: int, kc: int, by: str) -> str:
    return f"best-vs-best by {by}: {NAMES[base]} at {_at(labels, kb)}, {NAMES[cand]} at {_at(labels, kc)}"


def robust_row(seed: str, base: str, cand: str, grid: Sequence[Dict[str, Setting]], labels: Sequence[str],
               key: str, what: str) -> Dict[str, str]:
    """Spread (max − min over the grid, per seed) of measure ``key``: lower = more robust to λ."""
    def spread(name: str) -> List[float]:
        return [max(s) - min(s) for s in zip(*[values(point[name], key) for point in grid])]
    return _compare(seed, f"{NAMES[cand]} is more robust to λ than {NAMES[base]} ({what})",
                    f"per seed, max − min of the {what} over the λ grid",
                    f"across the grid λ ∈ {{{', '.join(labels)}}}", base, cand, spread(base), spread(cand), "lower")


def sweep_claims(grid: Sequence[Dict[str, Setting]], labels: Sequence[str]) -> List[Dict[str, str]]:
    """Best-vs-best, robustness and per-grid-point rows of a λ sweep; ``grid[i]`` holds the runs at λ
    ``labels[i]``."""
    have = set(grid[0])
    rows: List[Dict[str, str]] = []
    loss_best = {n: best_setting(grid, n, "final_val_loss") for n in have}
    if {"adamw", "adamhd"} <= have:
        kw, kh = loss_best["adamw"], loss_best["adamhd"]
        cmp_loss = _best_vs_best(labels, "adamw", "adamhd", kw, kh, "val loss")
        W, H = grid[kw]["adamw"], grid[kh]["adamhd"]
        rows += [speed_row("adamw", "adamhd", W, H, cmp_loss),
                 loss_row(HD_SEED, "lower validation perplexity (up to 4 points on GPT-2 tokens)", "adamw", "adamhd",
                          W, H, cmp_loss),
                 sparsity_row("adamw", "adamhd", W, H, cmp_loss)]
        pw, ph = best_setting(grid, "adamw", "prune_curve"), best_setting(grid, "adamhd", "prune_curve")
        rows.append(pruning_row("adamw", "adamhd", grid[pw]["adamw"], grid[ph]["adamhd"],
                                _best_vs_best(labels, "adamw", "adamhd", pw, ph, "pruned loss (mean over the curve)")))
        rows += [robust_row(DEMO_QUESTION, "adamw", "adamhd", grid, labels, "final_val_loss", "val loss"),
                 robust_row(DEMO_QUESTION, "adamw", "adamhd", grid, labels, "prune_curve", "pruned loss")]
    if {"adamw", "adamc"} <= have:
        kw, kc = loss_best["adamw"], loss_best["adamc"]
        rows.append(loss_row(DEMO_QUESTION, "AdamC reaches a lower val loss than AdamW", "adamw", "adamc",
                             grid[kw]["adamw"], grid[kc]["adamc"], _best_vs_best(labels, "adamw", "adamc", kw, kc,
                                                                                  "val loss")))
        rows.append(robust_row(DEMO_QUESTION, "adamw", "adamc", grid, labels, "final_val_loss", "val loss"))
    if {"scion", "scionc"} <= have:
        ks, kc = loss_best["scion"], loss_best["scionc"]
        rows.append(loss_row(C_SEED, SCION_CLAIM, "scion", "scionc", grid[ks]["scion"], grid[kc]["scionc"],
                             _best_vs_best(labels, "scion", "scionc", ks, kc, "val loss")))
        rows.append(robust_row(DEMO_QUESTION, "scion", "scionc", grid, labels, "final_val_loss", "val loss"))
    for base, cand in (("adamw", "adamc"), ("scion", "scionc")):
        if {base, cand} <= have:
            for make in (weight_norm_row, grad_norm_row):
                rows.append(per_point_row(make, base, cand, grid, labels))
    return rows


def per_point_row(make: Callable, base: str, cand: str, grid: Sequence[Dict[str, Setting]],
                  labels: Sequence[str]) -> Dict[str, str]:
    """One claim judged at a shared λ at every grid point: the numbers and verdict of each point, joined."""
    per = [make(base, cand, point[base], point[cand], f"λ {lab}") for point, lab in zip(grid, labels)]
    first = per[0]
    numbers = "; ".join(f"λ {lab}: {r['numbers']}" for r, lab in zip(per, labels))
    verdicts = " · ".join(f"λ {lab}: **{r['verdict']}**" for r, lab in zip(per, labels))
    paired = " · ".join(f"λ {lab}: {r['paired']}" for r, lab in zip(per, labels))
    return _row(first["seed"], first["claim"], first["measure"], "shared λ, at each grid point", numbers, verdicts,
                paired)


def best_table(grid: Sequence[Dict[str, Setting]], labels: Sequence[str]) -> Dict[str, Dict[str, Optional[str]]]:
    """Per optimizer: the λ (label) with the best mean val loss and the best mean pruned loss."""
    return {n: {key: labels[best_setting(grid, n, key)] for key in ("final_val_loss", "prune_curve")} for n in grid[0]}
