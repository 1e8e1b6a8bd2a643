"""PNG figures of a demo run and of a sweep (matplotlib, Agg backend; nothing is shown on screen).

Every curve is the mean over seeds; the shaded band spans the seeds' minimum to maximum.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from .claims import Setting, iv, values  # noqa: E402
from .measures import block_norm, edge_width, final_phase  # noqa: E402
from .optimizers import LABELS  # noqa: E402

COLORS = {"adamw": "tab:blue", "adamhd": "tab:orange", "adamc": "tab:green", "scionc": "tab:red", "scion": "tab:purple",
          "adamhd8": "tab:brown"}
BAND = "line: mean over seeds, band: min–max"


def _ema(xs: Sequence[float], beta: float = 0.9) -> List[float]:
    out, m = [], None
    for x in xs:
        m = x if m is None else beta * m + (1 - beta) * x
        out.append(m)
    return out


def _trailing_mean(xs: Sequence[float], w: int) -> List[float]:
    """Means of xs[i - w + 1 : i + 1] for i = w − 1, …, len(xs) − 1."""
    return [sum(xs[i - w + 1:i + 1]) / w for i in range(w - 1, len(xs))]


def _finish(fig, axes, path: Path, title: str = BAND, legend: bool = True, dpi: int = 90) -> None:
    """Grid (and legend) on ``axes``, the figure's title, then write ``path`` and free the figure."""
    for a in axes:
        a.grid(alpha=0.3)
        if legend:
            a.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _band(ax, x: Sequence[float], series: Sequence[Sequence[float]], color: str, label: str, **kw) -> None:
    """Mean of ``series`` (one per seed) as a line, min–max as a shaded band."""
    cols = list(zip(*series))
    mean = [sum(c) / len(c) for c in cols]
    ax.plot(x, mean, color=color, label=label, **kw)
    if len(series) > 1:
        ax.fill_between(x, [min(c) for c in cols], [max(c) for c in cols], color=color, alpha=0.2, lw=0)


def _shade_final_phase(ax, n_steps: int, warmup_frac: float) -> None:
    first, last = final_phase(n_steps, warmup_frac)
    ax.axvspan(first + 1, last + 1, color="gray", alpha=0.12, lw=0)


def curves(runs: Dict[str, Setting], path: Path, warmup_frac: float) -> None:
    """Train loss, validation loss, total gradient norm and block-matrix weight norm per optimizer."""
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    n = len(next(iter(runs.values()))[0]["train_loss"])
    steps = list(range(1, n + 1))
    for name, s in runs.items():
        c, lab = COLORS[name], LABELS[name]
        _band(ax[0, 0], steps, [_ema(h["train_loss"]) for h in s], c, lab)
        _band(ax[0, 1], s[0]["val_step"], [h["val_loss"] for h in s], c, lab, marker="o", ms=2)
        _band(ax[1, 0], steps, [_ema(h["grad_norm_total"]) for h in s], c, lab)
        _band(ax[1, 1], steps, [[block_norm(h, t) for t in range(n)] for h in s], c, lab)
    ax[0, 0].set(title="train loss (EMA 0.9)", xlabel="step", ylabel="nats/byte")
    ax[0, 1].set(title="validation loss", xlabel="step", ylabel="nats/byte")
    tail = [v for s in runs.values() for h in s for v in h["val_loss"][len(h["val_loss"]) // 3:]]
    ax[0, 1].set_ylim(min(tail) - 0.05, max(tail) + 0.05)
    ax[0, 0].set_ylim(top=max(h["val_loss"][min(1, len(h["val_loss"]) - 1)] for s in runs.values() for h in s) + 0.5)
    ax[1, 0].set(title="total gradient norm before the step (EMA 0.9)", xlabel="step", yscale="log")
    ax[1, 1].set(title="‖θ‖_F of the block matrices", xlabel="step", yscale="log")
    for a in ax[1]:
        _shade_final_phase(a, n, warmup_frac)
    _finish(fig, ax.flat, path, f"{BAND}; gray: final 20% of the cosine phase")


def final_phase_norms(runs: Dict[str, Setting], path: Path, warmup_frac: float) -> None:
    """The corrected-decay claim's window: ‖θ_blocks‖ and ‖g‖ over the final 20% of the cosine phase, each ÷
    its value at the window's start (the claim measures read the window's end)."""
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
    n = len(next(iter(runs.values()))[0]["train_loss"])
    first, last = final_phase(n, warmup_frac)
    xs = list(range(first + 1, last + 2))
    for name, s in runs.items():
        c, lab = COLORS[name], LABELS[name]
        _band(ax[0], xs, [[block_norm(h, t) / block_norm(h, first) for t in range(first, last + 1)] for h in s], c,
              f"{lab} (end {iv(s, 'weight_norm_ratio').fmt('.3f')})")
        w = edge_width(first, last)
        gs = [_trailing_mean(h["grad_norm_total"][first:last + 1], w) for h in s]
        _band(ax[1], xs[w - 1:], [[v / g[0] for v in g] for g in gs], c,
              f"{lab} (end {iv(s, 'grad_norm_ratio').fmt('.3f')})")
    ax[0].set(title="‖θ_blocks‖ ÷ its value at the window's start", xlabel="step")
    ax[1].set(title="total ‖g‖, trailing mean over a fifth of the window, ÷ its first value", xlabel="step")
    for a in ax:
        a.axhline(1.0, color="black", lw=0.6)
    _finish(fig, ax, path, f"final 20% of the cosine phase; {BAND}")


def norms(runs: Dict[str, Setting], path: Path) -> None:
    """Per-layer weight norms (top row) and gradient norms (bottom row), one column per optimizer."""
    names = list(runs)
    fig, ax = plt.subplots(2, len(names), figsize=(3.6 * len(names), 6.5), squeeze=False, sharey="row")
    cmap = plt.get_cmap("viridis")
    for j, name in enumerate(names):
        s = runs[name]
        layers = s[0]["layers"]
        n = len(s[0]["train_loss"])
        steps = list(range(1, n + 1))
        for i, layer in enumerate(layers):
            hidden = layer.startswith("blocks.")
            color = cmap(i / max(1, len(layers) - 1)) if hidden else ("black" if layer == "wte.weight" else "gray")
            kw = dict(lw=0.8 if hidden else 1.6, ls="-" if hidden else "--")
            label = layer if (not hidden or i in (0, len(layers) - 3)) else None
            _band(ax[0, j], steps, [h["weight_norm"][layer] for h in s], color, label, **kw)
            _band(ax[1, j], steps, [_ema(h["grad_norm"][layer]) for h in s], color, label, **kw)
        ax[0, j].set(title=f"{LABELS[name]}: ‖θ‖_F per layer", xlabel="step", yscale="log")
        ax[1, j].set(title=f"{LABELS[name]}: ‖g‖_F (EMA 0.9)", xlabel="step", yscale="log")
    ax[0, 0].legend(fontsize=7, title="dashed: wte (tied head), wpe", title_fontsize=7)
    _finish(fig, ax.flat, path, legend=False, dpi=80)


def histograms(runs: Dict[str, Setting], path: Path) -> None:
    """Pooled histogram of θ/RMS(θ) over the block matrices at the end of training (log counts)."""
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, s in runs.items():
        edges = s[0]["weights"]["hist_edges"]
        mids = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        dens = []
        for h in s:
            counts = h["weights"]["hist_counts"]
            total = sum(counts) or 1.0
            dens.append([c / total for c in counts])
        lab = f"{LABELS[name]} (Hoyer {iv(s, 'hoyer').fmt('.3f')})"
        for a in ax:
            _band(a, mids, dens, COLORS[name], lab, drawstyle="steps-mid")
    ax[0].set(title="block-matrix weights at the end: θ / RMS(layer θ)", xlabel="θ / RMS", ylabel="share",
              yscale="log")
    ax[1].set(title="zoom on |θ| < RMS (the part magnitude pruning removes)", xlim=(-1, 1), xlabel="θ / RMS")
    _finish(fig, ax, path)


def pruning(runs: Dict[str, Setting], path: Path) -> None:
    """Validation loss against magnitude-pruning sparsity, per-layer and global."""
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for a, mode in zip(ax, ("layer", "global")):
        for name, s in runs.items():
            keys = sorted(s[0]["pruning"].get(mode, {}), key=float)
            xs = [0.0] + [float(k) for k in keys]
            _band(a, xs, [[h["final_val_loss"]] + [h["pruning"][mode][k] for k in keys] for h in s],
                  COLORS[name], LABELS[name], marker="o", ms=3)
        a.set(title=f"{mode} magnitude pruning of the block matrices", xlabel="sparsity",
              ylabel="val loss (nats/byte)")
    _finish(fig, ax, path)


def all_plots(runs: Dict[str, Setting], out: Path, warmup_frac: float) -> Dict[str, str]:
    files = {"curves": "curves.png", "final_phase": "final_phase.png", "norms": "norms.png",
             "histograms": "histograms.png", "pruning": "pruning.png"}
    curves(runs, out / files["curves"], warmup_frac)
    final_phase_norms(runs, out / files["final_phase"], warmup_frac)
    norms(runs, out / files["norms"])
    histograms(runs, out / files["histograms"])
    pruning(runs, out / files["pruning"])
    return files


def sweep(grid: Sequence[Dict[str, Setting]], lambdas: Sequence[float], path: Path) -> None:
    """Val loss, mean pruned loss and loss at 70% per-layer pruning against λ, one line per optimizer."""
    panels = [("final_val_loss", "final val loss"), ("prune_curve", "pruned loss, mean over 10–80% sparsity"),
              ("prune_layer_0.70", "val loss at 70% per-layer sparsity")]
    panels = [p for p in panels if p[0] in grid[0][next(iter(grid[0]))][0]["measures"]]
    fig, ax = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for a, (key, title) in zip(ax[0], panels):
        for name in grid[0]:
            _band(a, lambdas, list(zip(*[values(point[name], key) for point in grid])), COLORS[name], LABELS[name],
                  marker="o", ms=4)
        a.set(title=title, xlabel="λ (Scion family: matched peak decay)", ylabel="nats/byte", xscale="log")
        a.set_xticks(list(lambdas), [f"{lam:g}" for lam in lambdas])
        a.xaxis.set_minor_formatter(NullFormatter())
    _finish(fig, ax[0], path)
