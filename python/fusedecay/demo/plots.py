"""PNG figures of a demo run (matplotlib, Agg backend; nothing is shown on screen)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, List

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .optimizers import LABELS  # noqa: E402

COLORS = {"adamw": "tab:blue", "adamhd": "tab:orange", "adamc": "tab:green", "scionc": "tab:red", "scion": "tab:purple"}


def _median(xs: List[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def _ema(xs: List[float], beta: float = 0.9) -> List[float]:
    out, m = [], None
    for x in xs:
        m = x if m is None else beta * m + (1 - beta) * x
        out.append(m)
    return out


def curves(runs: Dict[str, Dict], path: Path) -> None:
    """Train loss, validation loss, total gradient norm and wall time per step, one line per optimizer."""
    fig, ax = plt.subplots(2, 2, figsize=(12, 8))
    for name, r in runs.items():
        c, lab = COLORS[name], LABELS[name]
        steps = range(1, len(r["train_loss"]) + 1)
        ax[0, 0].plot(steps, r["train_loss"], color=c, alpha=0.2, lw=0.6)
        ax[0, 0].plot(steps, _ema(r["train_loss"]), color=c, label=lab)
        ax[0, 1].plot(r["val_step"], r["val_loss"], "o-", color=c, ms=3, label=lab)
        ax[1, 0].plot(steps, r["grad_norm_total"], color=c, alpha=0.2, lw=0.6)
        ax[1, 0].plot(steps, _ema(r["grad_norm_total"]), color=c, label=lab)
        ax[1, 1].plot(steps, [1e3 * t for t in r["step_time_s"]], color=c, lw=0.7,
                      label=f"{lab} (median optimizer step {1e3 * _median(r['opt_time_s']):.1f} ms)")
    ax[0, 0].set(title="train loss (faint: per step, line: EMA 0.9)", xlabel="step", ylabel="nats/byte")
    ax[0, 1].set(title="validation loss", xlabel="step", ylabel="nats/byte")
    tail = [v for r in runs.values() for v in r["val_loss"][len(r["val_loss"]) // 3:]]
    if tail:
        ax[0, 1].set_ylim(min(tail) - 0.05, max(tail) + 0.05)
    ax[0, 0].set_ylim(top=max(max(r["val_loss"][1:] or r["val_loss"]) for r in runs.values()) + 0.5)
    ax[1, 0].set(title="total gradient norm (before the step)", xlabel="step", yscale="log")
    ax[1, 1].set(title="wall time per step (forward + backward + optimizer)",
                 xlabel="step", ylabel="ms", yscale="log")
    for a in ax.flat:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def norms(runs: Dict[str, Dict], path: Path) -> None:
    """Per-layer weight norms (top row) and gradient norms (bottom row), one column per optimizer."""
    names = list(runs)
    fig, ax = plt.subplots(2, len(names), figsize=(4.2 * len(names), 7), squeeze=False,
                           sharey="row")
    for j, name in enumerate(names):
        r = runs[name]
        layers = r["layers"]
        cmap = plt.get_cmap("viridis")
        for i, layer in enumerate(layers):
            hidden = layer.startswith("blocks.")
            color = cmap(i / max(1, len(layers) - 1)) if hidden else ("black" if layer == "wte.weight" else "gray")
            kw = dict(color=color, lw=0.8 if hidden else 1.6, ls="-" if hidden else "--")
            kw["label"] = layer if (not hidden or i in (0, len(layers) - 3)) else None
            ax[0, j].plot(r["weight_norm"][layer], **kw)
            ax[1, j].plot(_ema(r["grad_norm"][layer]), **kw)
        ax[0, j].set(title=f"{LABELS[name]}: ‖θ‖_F per layer", xlabel="step", yscale="log")
        ax[1, j].set(title=f"{LABELS[name]}: ‖g‖_F per layer (EMA 0.9)", xlabel="step", yscale="log")
        for a in ax[:, j]:
            a.grid(alpha=0.3)
    ax[0, 0].legend(fontsize=7, title="dashed: wte (tied head), wpe", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def histograms(runs: Dict[str, Dict], path: Path) -> None:
    """Pooled histogram of θ/RMS(θ) over the block matrices at the end of training (log counts)."""
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2))
    for name, r in runs.items():
        w = r["weights"]
        edges, counts = w["hist_edges"], w["hist_counts"]
        total = sum(counts) or 1.0
        dens = [c / total for c in counts]
        mids = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
        lab = f"{LABELS[name]} (Hoyer {w['hoyer_mean']:.3f})"
        for a in ax:
            a.step(mids, dens, where="mid", color=COLORS[name], label=lab)
    ax[0].set(title="block-matrix weights at the end: θ / RMS(layer θ)", xlabel="θ / RMS", ylabel="share",
              yscale="log")
    ax[1].set(title="zoom on |θ| < RMS (the part magnitude pruning removes)", xlim=(-1, 1), xlabel="θ / RMS")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pruning(runs: Dict[str, Dict], path: Path) -> None:
    """Validation loss against magnitude-pruning sparsity, per-layer and global."""
    fig, ax = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
    for a, mode in zip(ax, ("layer", "global")):
        for name, r in runs.items():
            pts = sorted((float(k), v) for k, v in r["pruning"].get(mode, {}).items())
            xs = [0.0] + [p[0] for p in pts]
            ys = [r["final_val_loss"]] + [p[1] for p in pts]
            a.plot(xs, ys, "o-", color=COLORS[name], ms=3, label=LABELS[name])
        a.set(title=f"{mode} magnitude pruning of block matrices", xlabel="sparsity", ylabel="val loss (nats/byte)")
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def all_plots(runs: Dict[str, Dict], out: Path) -> Dict[str, str]:
    files = {"curves": "curves.png", "norms": "norms.png", "histograms": "histograms.png", "pruning": "pruning.png"}
    curves(runs, out / files["curves"])
    norms(runs, out / files["norms"])
    histograms(runs, out / files["histograms"])
    pruning(runs, out / files["pruning"])
    return files
