"""``python -m fusedecay.demo``: pre-train a small byte-level GPT on the Python stdlib sources with AdamW,
AdamHD, AdamC, ScionC and the uncorrected Scion baseline, over several seeds, then write metrics, plots and a
claim-by-claim summary with intervals. ``--sweep`` runs a grid of weight decays instead and compares each
optimizer at its own best λ.

Regimes (``--regime``; docs/demo.md explains the choice):
  * ``decay`` (default): weight decay acts. The decay timescale at the peak lr, 1/(γ_max·λ), is under a third
    of the run, so the block matrices receive Σ_t η_t ≈ 1.8 of decay with AdamW (≈ 1.3 with the γ²-shaped
    corrected rules) and their norms approach the steady state the correction paper reasons about. 3 seeds.
  * ``quick``: the earlier, faster demo settings (lr 1e-3, λ 0.1, 400 steps: Σ η_t ≈ 0.02, decay barely acts),
    one seed.
"""
from __future__ import annotations

import argparse
import json
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from .. import __version__
from .. import backends as _backends
from . import plots
from .claims import Setting, shared_claims, sweep_claims
from .corpus import load_corpus
from .measures import CURVE_MAX
from .model import GPT, SIZES, GPTConfig
from .optimizers import EXTRA_OPTIMIZERS, OPTIMIZERS, OPTIONAL_OPTIMIZERS, Hyper
from .prune import prunable_share
from .runner import Job, RunConfig, available_cpus, run_jobs
from .summary import default_markdown, sweep_markdown

# Per regime and size: steps, batch size, sequence length, Adam lr γ_max, Adam λ, validation batches, seeds and
# (quick only) the Scion family's own decay; the decay regime matches the Scion family to γ_max·λ (optimizers.py).
REGIMES: Dict[str, Dict[str, dict]] = {
    "decay": {
        "tiny": dict(steps=600, batch_size=8, seq_len=128, adam_lr=3e-3, weight_decay=2.0, val_batches=16),
        "small": dict(steps=1500, batch_size=32, seq_len=256, adam_lr=1e-3, weight_decay=2.4, val_batches=16),
        "gpt2-124m": dict(steps=3000, batch_size=32, seq_len=1024, adam_lr=6e-4, weight_decay=2.0, val_batches=32),
    },
    "quick": {
        "tiny": dict(steps=400, batch_size=16, seq_len=128, adam_lr=1e-3, weight_decay=0.1, val_batches=8),
        "small": dict(steps=1500, batch_size=32, seq_len=256, adam_lr=1e-3, weight_decay=0.1, val_batches=16),
        "gpt2-124m": dict(steps=3000, batch_size=32, seq_len=1024, adam_lr=6e-4, weight_decay=0.1, val_batches=32),
    },
}
REGIME_SEEDS = {"decay": (0, 1, 2), "quick": (0,)}
# The quick regime keeps the Scion authors' decay: C² = 1.1875, and λ = 1 for the uncorrected baseline.
REGIME_SCION = {"decay": (None, None), "quick": (1.1875, 1.0)}
SWEEP_FACTORS = (0.1, 0.3, 1.0, 3.0)   # the default sweep grid: these multiples of the regime's λ
LAYER_SPARSITIES = tuple(round(0.1 * i, 2) for i in range(1, 10))
GLOBAL_SPARSITIES = (0.3, 0.5, 0.7)

CAVEAT = ("**Scale caveat.** This is a small run (see the setup line): the papers' claims are about GPT-2/3-scale "
          "pre-training for billions of tokens. The decay regime gives the block matrices the same number of decay "
          "timescales a long run does, so the decay-dependent effects can show, but the model, data and step count "
          "are tiny and byte-level: read the verdicts as \"what this run shows\", not as a test of the papers.")


def _floats(s: str) -> List[float]:
    try:
        vals = [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}")
    if not vals:
        raise argparse.ArgumentTypeError(f"expected at least one number, got {s!r}")
    return vals


def _sparsities(s: str) -> List[float]:
    vals = _floats(s)
    if any(not 0 <= v <= 1 for v in vals):
        raise argparse.ArgumentTypeError(f"sparsities must be in [0, 1], got {s!r}")
    return vals


def _positive(s: str) -> List[float]:
    vals = _floats(s)
    if any(not v > 0 for v in vals):
        raise argparse.ArgumentTypeError(f"weight decays must be > 0, got {s!r}")
    return sorted(set(vals))


def _seeds(s: str) -> List[int]:
    try:
        seeds = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds, got {s!r}")
    return seeds


def _optimizers(s: str) -> List[str]:
    names = [x.strip().lower() for x in s.split(",") if x.strip()]
    known = OPTIMIZERS + EXTRA_OPTIMIZERS + OPTIONAL_OPTIMIZERS
    bad = [n for n in names if n not in known]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown optimizer(s) {bad or s!r}; choose from {','.join(known)}")
    return list(dict.fromkeys(names))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fusedecay.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--regime", choices=sorted(REGIMES), default="decay",
                   help="decay: weight decay acts (default); quick: the earlier, faster settings")
    p.add_argument("--size", choices=sorted(SIZES), default="tiny", help="model preset (n_layer, n_head, n_embd)")
    p.add_argument("--n-layer", type=int, help="override the preset's number of blocks")
    p.add_argument("--n-head", type=int, help="override the preset's attention heads")
    p.add_argument("--n-embd", type=int, help="override the preset's width")
    p.add_argument("--steps", type=int, help="optimizer steps per run (default: per regime and size)")
    p.add_argument("--batch-size", type=int, help="sequences per step (default: per regime and size)")
    p.add_argument("--seq-len", type=int, help="bytes per sequence (default: per regime and size)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--optimizers", type=_optimizers, default=list(OPTIMIZERS + EXTRA_OPTIMIZERS),
                   help="comma-separated subset of adamw,adamhd,adamc,scionc,scion (default: all five), plus the "
                        "optional adamhd8 (AdamHD with 8-bit moment state)")
    p.add_argument("--seeds", type=_seeds, help="comma-separated seeds, the same for every optimizer (model init "
                   "and batch order; default: 0,1,2 in the decay regime, 0 in the quick one)")
    p.add_argument("--workers", type=int, help="runs side by side in worker processes (default: the CPU count "
                   "on cpu, 1 on cuda)")
    p.add_argument("--out", type=Path, default=Path("fusedecay_demo_out"), help="output folder")
    p.add_argument("--corpus-dir", type=Path, help="folder of *.py files (default: this Python's stdlib)")
    p.add_argument("--eval-every", type=int, help="validation every N steps (default: steps/20)")
    p.add_argument("--val-batches", type=int, help="batches in the fixed validation set (default: per regime)")
    p.add_argument("--adam-lr", type=float, help="peak lr γ_max of AdamW/AdamHD/AdamC (default: per regime)")
    p.add_argument("--weight-decay", type=float, help="λ of the Adam variants (default: per regime)")
    p.add_argument("--scion-lr", type=float, default=Hyper.scion_lr, help="peak lr γ of ScionC/Scion "
                   "(step = γ·radius)")
    p.add_argument("--scion-norm-target", type=float, help="ScionC's C² (default: matched to the Adam family's "
                   "peak decay γ_max·λ in the decay regime, 1.1875 in the quick one)")
    p.add_argument("--scion-weight-decay", type=float, help="λ of the uncorrected Scion baseline's block matrices "
                   "(default: matched to the same peak decay; 1 in the quick regime)")
    p.add_argument("--warmup-frac", type=float, default=Hyper.warmup_frac, help="linear warmup share of steps")
    p.add_argument("--layer-sparsities", type=_sparsities, default=list(LAYER_SPARSITIES),
                   help="per-layer pruning grid")
    p.add_argument("--global-sparsities", type=_sparsities, default=list(GLOBAL_SPARSITIES),
                   help="global pruning grid")
    p.add_argument("--sweep", action="store_true", help="run every optimizer at each λ of --sweep-lambdas and "
                   "compare each at its own best λ (the Scion family at the matched decay)")
    p.add_argument("--sweep-lambdas", type=_positive, help="λ grid of the sweep (default: 0.1, 0.3, 1 and 3 "
                   "times the regime's λ)")
    p.add_argument("--no-progress", action="store_true", help="hide the tqdm progress bars")
    return p


def resolve_args(a: argparse.Namespace) -> argparse.Namespace:
    d = REGIMES[a.regime][a.size]
    for k in ("steps", "batch_size", "seq_len", "adam_lr", "weight_decay", "val_batches"):
        if getattr(a, k) is None:
            setattr(a, k, d[k])
    if a.seeds is None:
        a.seeds = list(REGIME_SEEDS[a.regime])
    if a.sweep and (a.scion_norm_target is not None or a.scion_weight_decay is not None):
        raise SystemExit("--sweep matches the Scion family's decay to each λ of the grid; "
                         "--scion-norm-target/--scion-weight-decay cannot be combined with it")
    if not a.sweep:   # the sweep always matches the Scion family's decay to each λ (even in the quick regime)
        c2, lam = REGIME_SCION[a.regime]
        a.scion_norm_target = a.scion_norm_target if a.scion_norm_target is not None else c2
        a.scion_weight_decay = a.scion_weight_decay if a.scion_weight_decay is not None else lam
    n_layer, n_head, n_embd = SIZES[a.size]
    a.n_layer = a.n_layer or n_layer
    a.n_embd = a.n_embd or n_embd
    a.n_head = a.n_head or (n_head if a.n_embd == n_embd else max(1, a.n_embd // 32))
    for k in ("steps", "batch_size", "seq_len", "n_layer", "n_head", "n_embd", "val_batches"):
        if getattr(a, k) < 1:
            raise SystemExit(f"--{k.replace('_', '-')} must be >= 1, got {getattr(a, k)}")
    a.eval_every = a.eval_every or max(1, a.steps // 20)
    if not any(0 < s <= CURVE_MAX for s in a.layer_sparsities):
        raise SystemExit(f"--layer-sparsities needs a value in (0, {CURVE_MAX}] for the pruning-curve summary, got "
                         f"{a.layer_sparsities}")
    if a.workers is None:
        a.workers = 1 if a.device == "cuda" else available_cpus()
    if a.workers < 1 or (a.device == "cuda" and a.workers != 1):
        raise SystemExit(f"--workers must be >= 1 (and 1 on cuda), got {a.workers}")
    if a.sweep:
        if a.sweep_lambdas is None:
            a.sweep_lambdas = [round(f * a.weight_decay, 10) for f in SWEEP_FACTORS]
        if len(a.sweep_lambdas) < 2:
            raise SystemExit(f"--sweep-lambdas needs at least 2 values, got {a.sweep_lambdas}")
    elif a.sweep_lambdas is not None:
        raise SystemExit("--sweep-lambdas is only used with --sweep")
    return a


def backend_names(device: torch.device) -> Dict[str, str]:
    out = {"adam_decay": _backends.resolve("auto", device, torch.float32).name}
    try:
        b = _backends.resolve("auto", device, torch.float32, op="scion_directions")
        out["scion_directions"] = b.name if b.op("scion_directions") else "reference"
    except RuntimeError:
        out["scion_directions"] = "reference"
    return out


def git_commit() -> str:
    """The checkout's commit, "+dirty" if tracked code (the package, the extension sources, setup.py) differs from
    it — docs may change while a long run goes; "unknown" outside a git checkout."""
    here = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=here, capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":/python", ":/csrc",
                                ":/triton_kernels", ":/setup.py"], cwd=here,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def _hyper(a: argparse.Namespace, weight_decay: float) -> Hyper:
    return Hyper(adam_lr=a.adam_lr, weight_decay=weight_decay, scion_lr=a.scion_lr, warmup_frac=a.warmup_frac,
                 scion_norm_target=a.scion_norm_target, scion_plain_decay=a.scion_weight_decay)


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _fmt_minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {seconds % 60:.0f} s"


def _setup_line(a, argv, cfg, n_params, share, corpus, device, n_runs, wall: float) -> str:
    tokens = a.steps * a.batch_size * a.seq_len
    cmd = " ".join(["python -m fusedecay.demo"] + [shlex.quote(x) for x in argv])
    threads = max(1, available_cpus() // a.workers) if a.workers > 1 else torch.get_num_threads()
    return (f"Setup: `{cmd}` at commit {git_commit()}, regime `{a.regime}` — GPT {cfg.n_layer} layers × "
            f"{cfg.n_embd} wide, {cfg.n_head} heads, tied head, byte vocabulary, {n_params / 1e6:.2f}M params "
            f"({share:.0%} in the pruned block matrices); {a.steps} steps × {a.batch_size} × {a.seq_len} bytes = "
            f"{tokens / 1e6:.2f}M train bytes per run; seeds {','.join(map(str, a.seeds))} (the same for every optimizer); corpus "
            f"{corpus.n_train_files}+{corpus.n_val_files} stdlib files ({corpus.train.numel() / 1e6:.1f}/"
            f"{corpus.val.numel() / 1e6:.1f} MB train/val); device {a.device}, torch {torch.__version__}, "
            f"{n_runs} runs on {a.workers} worker(s) × {threads} CPU thread(s), fusedecay {__version__} "
            f"(backend auto → {backend_names(device)}); CPU {cpu_name()}. "
            f"**Wall time {_fmt_minutes(wall)}.**")


def _group(results: Sequence[Dict], jobs: Sequence[Job], names: Sequence[str], seeds: Sequence[int]
           ) -> Dict[str, Setting]:
    by = {(j.name, j.seed): r for j, r in zip(jobs, results)}
    return {n: [by[(n, s)] for s in seeds] for n in names}


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = resolve_args(build_parser().parse_args(argv))
    if a.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was given but torch.cuda.is_available() is False")
    device = torch.device(a.device)
    t_start = time.perf_counter()

    corpus = load_corpus(a.corpus_dir, min_bytes=a.seq_len + 2)
    cfg = GPTConfig(n_layer=a.n_layer, n_head=a.n_head, n_embd=a.n_embd, block_size=a.seq_len)
    rc = RunConfig(model=cfg, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, eval_every=a.eval_every,
                   val_batches=a.val_batches, device=a.device,
                   corpus_dir=str(a.corpus_dir) if a.corpus_dir else None,
                   layer_sparsities=tuple(a.layer_sparsities), global_sparsities=tuple(a.global_sparsities))
    lambdas = a.sweep_lambdas if a.sweep else [a.weight_decay]
    hps = [_hyper(a, lam) for lam in lambdas]   # raises before any training if a setting is invalid
    a.out.mkdir(parents=True, exist_ok=True)
    jobs = [Job(n, s, hp) for hp in hps for n in a.optimizers for s in a.seeds]
    progress = not a.no_progress and a.workers == 1
    results = run_jobs(rc, jobs, corpus, a.workers, progress)
    per_point = len(a.optimizers) * len(a.seeds)
    grid = [_group(results[i * per_point:(i + 1) * per_point], jobs[i * per_point:(i + 1) * per_point],
                   a.optimizers, a.seeds) for i in range(len(hps))]

    with torch.device("meta"):
        probe = GPT(cfg)
    n_params = sum(p.numel() for p in probe.parameters())
    share = prunable_share(probe)
    title = (f"{a.size if (cfg.n_layer, cfg.n_head, cfg.n_embd) == SIZES[a.size] else 'custom'} GPT, {a.steps} "
             f"steps, {len(a.seeds)} seed(s)")
    caveat = CAVEAT
    if a.device == "cuda":
        caveat += " The CUDA path (bf16 autocast, backend auto) has not yet been run on a GPU by this project."
    meta = {"title": title, "caveat": caveat, "n_seeds": str(len(a.seeds))}
    env = {"torch": torch.__version__, "python": platform.python_version(), "fusedecay": __version__,
           "device": str(device), "backends": backend_names(device), "cpu_threads": torch.get_num_threads(),
           "workers": a.workers, "commit": git_commit()}
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    if a.sweep:
        labels = [f"{lam:g}" for lam in lambdas]
        rows = sweep_claims(grid, labels)
        plots.sweep(grid, lambdas, a.out / "sweep.png")
        figures = {"sweep": "sweep.png"}
        meta["comparison_note"] = ("\"compared\" says, per row, whether the verdict is best-vs-best (each optimizer "
                                   "at its own best λ of the grid), at a shared λ, or across the grid.")
        payload = {"lambdas": lambdas, "hyperparameters": [hp.to_dict() for hp in hps],
                   "measures": [{n: [h["measures"] for h in s] for n, s in point.items()} for point in grid],
                   "pruning": [{n: [h["pruning"] for h in s] for n, s in point.items()} for point in grid]}
        name = "sweep"
    else:
        runs, hp = grid[0], hps[0]
        rows = shared_claims(runs, f"shared λ {a.weight_decay:g}")
        figures = plots.all_plots(runs, a.out, a.warmup_frac)
        meta["comparison_note"] = (f"Every optimizer runs at the one decay setting of this run (λ = "
                                   f"{a.weight_decay:g} for the Adam family; ScionC C² = "
                                   f"{hp.scion_norm_target:.3g}, Scion λ = {hp.scion_plain_decay:.3g}), so every "
                                   "verdict is at a shared λ; `--sweep` compares each optimizer at its own best λ.")
        payload = {"hyperparameters": hp.to_dict(), "runs": runs}
        name = "metrics"
    wall = time.perf_counter() - t_start
    meta["setup"] = _setup_line(a, argv, cfg, n_params, share, corpus, device, len(jobs), wall)
    if a.sweep:
        scion = [f"ScionC C² {hp.scion_norm_target:.3g}, Scion λ {hp.scion_plain_decay:.3g}" for hp in hps]
        md = sweep_markdown(meta, grid, labels, scion, rows)
    else:
        md = default_markdown(meta, runs, rows)
    (a.out / "summary.md").write_text(md)
    metrics = {"config": config, "model": {"n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_embd": cfg.n_embd,
                                           "block_size": cfg.block_size, "vocab_size": cfg.vocab_size,
                                           "n_params": n_params, "prunable_share": share, "tied_head": True},
               "corpus": corpus.describe(), "env": env, "claims": rows, "figures": figures,
               "total_wall_time_s": wall, **payload}
    with open(a.out / f"{name}.json", "w") as f:
        json.dump(metrics, f, allow_nan=True)
    print(md)
    print(f"wrote {a.out / (name + '.json')}, {a.out / 'summary.md'} and "
          f"{', '.join(str(a.out / v) for v in figures.values())}; wall time {_fmt_minutes(wall)}")
    return 0
