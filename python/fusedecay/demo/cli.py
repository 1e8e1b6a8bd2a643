"""``python -m fusedecay.demo``: pre-train a small byte-level GPT on the Python stdlib sources with
AdamW, AdamHD, AdamC and ScionC, then write metrics, plots and a claim-by-claim summary."""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .. import __version__
from .. import backends as _backends
from . import plots
from .corpus import load_corpus, val_batches
from .. import param_roles
from .model import SIZES, GPTConfig
from .optimizers import EXTRA_OPTIMIZERS, OPTIMIZERS, Hyper, describe
from .prune import prunable_share, pruned_losses, weight_stats
from .summary import claims, markdown, per_run_numbers
from .train import evaluate, train_one

# Per-size defaults: steps, batch size, sequence length, Adam lr. "tiny" finishes all four optimizers in a
# few minutes on 2 CPU cores; "gpt2-124m" is GPT-2 small's shape (with a 256-byte vocabulary) for a GPU.
SIZE_DEFAULTS = {
    "tiny": dict(steps=400, batch_size=16, seq_len=128, adam_lr=1e-3, val_batches=8),
    "small": dict(steps=1500, batch_size=32, seq_len=256, adam_lr=1e-3, val_batches=16),
    "gpt2-124m": dict(steps=3000, batch_size=32, seq_len=1024, adam_lr=6e-4, val_batches=32),
}
LAYER_SPARSITIES = tuple(round(0.1 * i, 2) for i in range(1, 10))
GLOBAL_SPARSITIES = (0.3, 0.5, 0.7)

CAVEAT = ("**Scale caveat.** This is a small, short run (see the setup line): the papers' claims are about "
          "GPT-2/3-scale pre-training for billions of tokens, where weights and gradients reach a steady state. "
          "A few hundred steps on a byte-level model measure the same quantities but do not reproduce that "
          "regime, and one seed gives no error bars; read the verdicts as \"what this run shows\", not as a "
          "test of the papers.")


def _floats(s: str) -> List[float]:
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}")
    if not vals or any(not 0 <= v <= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"sparsities must be in [0, 1], got {s!r}")
    return vals


def _optimizers(s: str) -> List[str]:
    names = [x.strip().lower() for x in s.split(",") if x.strip()]
    known = OPTIMIZERS + EXTRA_OPTIMIZERS
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown optimizer(s) {bad or s!r}; choose from {','.join(known)}")
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fusedecay.demo", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model preset (n_layer, n_head, n_embd)")
    p.add_argument("--n-layer", type=int, help="override the preset's number of blocks")
    p.add_argument("--n-head", type=int, help="override the preset's attention heads")
    p.add_argument("--n-embd", type=int, help="override the preset's width")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: per size)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default: per size)")
    p.add_argument("--seq-len", type=int, help="bytes per sequence (default: per size)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--optimizers", type=_optimizers, default=list(OPTIMIZERS),
                   help="comma-separated; 'scion' (the uncorrected baseline) may be added")
    p.add_argument("--out", type=Path, default=Path("fusedecay_demo_out"), help="output folder")
    p.add_argument("--seed", type=int, default=0, help="model init and batch order (same for every optimizer)")
    p.add_argument("--corpus-dir", type=Path, help="folder of *.py files (default: this Python's stdlib)")
    p.add_argument("--eval-every", type=int, help="validation every N steps (default: steps/20)")
    p.add_argument("--val-batches", type=int, help="batches in the fixed validation set (default: per size)")
    p.add_argument("--adam-lr", type=float, help="peak lr of AdamW/AdamHD/AdamC (default: per size)")
    p.add_argument("--scion-lr", type=float, default=Hyper.scion_lr, help="peak lr γ of ScionC (step = γ·radius)")
    p.add_argument("--weight-decay", type=float, default=Hyper.weight_decay, help="λ of the Adam variants")
    p.add_argument("--warmup-frac", type=float, default=Hyper.warmup_frac, help="linear warmup share of steps")
    p.add_argument("--layer-sparsities", type=_floats, default=list(LAYER_SPARSITIES),
                   help="per-layer pruning grid")
    p.add_argument("--global-sparsities", type=_floats, default=list(GLOBAL_SPARSITIES), help="global pruning grid")
    p.add_argument("--prune-tolerance", type=float, default=0.01,
                   help="relative val-loss increase allowed when reading off the max pruning sparsity")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    return p


def resolve_args(a: argparse.Namespace) -> argparse.Namespace:
    d = SIZE_DEFAULTS[a.size]
    for k in ("steps", "batch_size", "seq_len", "adam_lr", "val_batches"):
        if getattr(a, k) is None:
            setattr(a, k, d[k])
    n_layer, n_head, n_embd = SIZES[a.size]
    a.n_layer = a.n_layer or n_layer
    a.n_embd = a.n_embd or n_embd
    a.n_head = a.n_head or (n_head if a.n_embd == n_embd else max(1, a.n_embd // 32))
    for k in ("steps", "batch_size", "seq_len", "n_layer", "n_head", "n_embd", "val_batches"):
        if getattr(a, k) < 1:
            raise SystemExit(f"--{k.replace('_', '-')} must be >= 1, got {getattr(a, k)}")
    a.eval_every = a.eval_every or max(1, a.steps // 20)
    return a


def backend_names(device: torch.device) -> Dict[str, str]:
    out = {"adam_decay": _backends.resolve("auto", device, torch.float32).name}
    try:
        b = _backends.resolve("auto", device, torch.float32, op="scion_directions")
        out["scion_directions"] = b.name if b.op("scion_directions") else "reference"
    except RuntimeError:
        out["scion_directions"] = "reference"
    return out


def scion_target_ratio(model, norm_target: float) -> float:
    """Mean over block matrices of ‖θ‖_F² / (C²·‖spectral lmo‖_F²), ‖lmo‖_F² = (d_out/d_in)·min(d_out, d_in)."""
    ratios = []
    for _, p in param_roles(model)["hidden"]:
        d_out, d_in = p.shape
        ratios.append(float(p.detach().double().square().sum()) / (norm_target * d_out / d_in * min(d_out, d_in)))
    return sum(ratios) / len(ratios)


def main(argv: Optional[Sequence[str]] = None) -> int:
    a = resolve_args(build_parser().parse_args(argv))
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was given but torch.cuda.is_available() is False")
    device = torch.device(a.device)
    t_start = time.perf_counter()

    corpus = load_corpus(a.corpus_dir, min_bytes=a.seq_len + 2)
    cfg = GPTConfig(n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd, block_size=a.seq_len)
    hp = Hyper(adam_lr=a.adam_lr, weight_decay=a.weight_decay, scion_lr=a.scion_lr, warmup_frac=a.warmup_frac)
    val_set = [(x.to(device), y.to(device)) for x, y in val_batches(corpus.val, a.batch_size, a.seq_len,
                                                                      a.val_batches)]
    a.out.mkdir(parents=True, exist_ok=True)

    runs: Dict[str, Dict] = {}
    n_params = None
    share = None
    for name in a.optimizers:
        model, hist = train_one(name, cfg, hp, corpus.train, val_set, steps=a.steps, batch_size=a.batch_size,
                                seq_len=a.seq_len, seed=a.seed, eval_every=a.eval_every, device=device,
                                progress=not a.no_progress)
        n_params = sum(p.numel() for p in model.parameters())
        share = prunable_share(model)
        hist["hyperparameters"] = describe(name, hp)
        hist["weights"] = weight_stats(model)
        ev = lambda m: evaluate(m, val_set)  # noqa: E731
        hist["pruning"] = pruned_losses(model, ev, a.layer_sparsities, ("layer",))
        hist["pruning"].update(pruned_losses(model, ev, a.global_sparsities, ("global",)))
        if name in ("scionc", "scion"):
            hist["norm_target_ratio"] = scion_target_ratio(model, hp.scion_norm_target)
        runs[name] = hist

    nums = per_run_numbers(runs, hp.warmup_frac, a.prune_tolerance)
    rows = claims(runs, nums, hp.warmup_frac, a.prune_tolerance, runs.get("scionc", {}).get("norm_target_ratio"))
    tokens = a.steps * a.batch_size * a.seq_len
    setup = (f"Setup: `{' '.join(['python -m fusedecay.demo'] + list(argv if argv is not None else sys.argv[1:]))}` — "
             f"GPT {cfg.n_layer} layers × {cfg.n_embd} wide, {cfg.n_head} heads, tied head, byte vocabulary, "
             f"{n_params / 1e6:.2f}M params ({share:.0%} in the pruned block matrices); {a.steps} steps × "
             f"{a.batch_size} × {a.seq_len} bytes = {tokens / 1e6:.2f}M train bytes per optimizer; corpus "
             f"{corpus.n_train_files}+{corpus.n_val_files} stdlib files ({corpus.train.numel() / 1e6:.1f}/"
             f"{corpus.val.numel() / 1e6:.1f} MB train/val), seed {a.seed}, device {a.device}, torch "
             f"{torch.__version__} (CPU threads: {torch.get_num_threads()}), fusedecay {__version__} "
             f"(backend auto → {backend_names(device)}).")
    meta = {"title": f"{a.size if (cfg.n_layer, cfg.n_head, cfg.n_embd) == SIZES[a.size] else 'custom'} GPT, "
                     f"{a.steps} steps", "setup": setup, "caveat": CAVEAT}
    md = markdown(meta, nums, rows, runs)
    figures = plots.all_plots(runs, a.out)
    (a.out / "summary.md").write_text(md)
    metrics = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
        "model": {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd, "block_size": cfg.block_size,
                  "vocab_size": cfg.vocab_size, "n_params": n_params, "prunable_share": share, "tied_head": True},
        "hyperparameters": hp.to_dict(), "corpus": corpus.describe(),
        "env": {"torch": torch.__version__, "python": platform.python_version(), "fusedecay": __version__,
                "device": str(device), "backends": backend_names(device), "cpu_threads": torch.get_num_threads()},
        "runs": runs, "numbers": nums, "claims": rows, "figures": figures,
        "total_wall_time_s": time.perf_counter() - t_start,
    }
    with open(a.out / "metrics.json", "w") as f:
        json.dump(metrics, f, allow_nan=True)
    print(md)
    print(f"wrote {a.out / 'metrics.json'}, {a.out / 'summary.md'} and "
          f"{', '.join(str(a.out / v) for v in figures.values())} in {metrics['total_wall_time_s']:.0f} s")
    return 0
