"""Full optimizer step on a GPT-2-shaped parameter set, same run:

* ScionC(backend="batched")       — the fast path (batched NS; Triton element-wise passes on CUDA);
* ScionC(backend="reference")     — the per-tensor reference;
* a Muon-style per-layer loop     — what a typical Muon/Scion implementation does: per matrix, lerp
                                    momentum, NS in the NS dtype, decay and update in place;
* torch.optim.AdamW(fused=True)   — the baseline users compare against.

    python bench/bench_scionc_step.py                # GPU: GPT-2 124M (12 layers, d=768, vocab 50257)
    python bench/bench_scionc_step.py --cpu-small    # CPU: d=192, vocab 8192 (auto on a GPU-less machine)

Rows: median ms per step, TFLOP/s of the step's NS matmuls, % of the matmul peak measured in the same
run, and each row's speedup over the per-layer loop.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from bench_newton_schulz import environment, peak_matmul, pick_device, time_all, write_rows  # noqa: E402
import run_info  # noqa: E402
import torch  # noqa: E402

from fusedecay import ScionC  # noqa: E402
from fusedecay.newton_schulz import ns_flops  # noqa: E402
from fusedecay.reference.scion import newton_schulz, scion_decay  # noqa: E402


def gpt2_params(d: int, n_layer: int, vocab: int, ctx: int, device, dtype):
    """name → param with GPT-2's shapes (nn.Linear weights are (out, in))."""
    shapes = {"wte": (vocab, d), "wpe": (ctx, d), "ln_f.w": (d,), "ln_f.b": (d,)}
    for i in range(n_layer):
        shapes.update({f"h{i}.qkv.w": (3 * d, d), f"h{i}.qkv.b": (3 * d,), f"h{i}.proj.w": (d, d),
                       f"h{i}.proj.b": (d,), f"h{i}.fc.w": (4 * d, d), f"h{i}.fc.b": (4 * d,),
                       f"h{i}.fc2.w": (d, 4 * d), f"h{i}.fc2.b": (d,), f"h{i}.ln1.w": (d,), f"h{i}.ln1.b": (d,),
                       f"h{i}.ln2.w": (d,), f"h{i}.ln2.b": (d,)})
    g = torch.Generator().manual_seed(0)
    params = {}
    for k, s in shapes.items():
        p = torch.nn.Parameter((torch.randn(s, generator=g) * 0.02).to(device, dtype))
        p.grad = (torch.randn(s, generator=g) * 0.01).to(device, dtype)
        params[k] = p
    return params


def scion_groups(params):
    mats = [p for k, p in params.items() if p.ndim == 2 and k not in ("wte", "wpe")]
    return [dict(params=mats, lmo="spectral", radius=50.0),
            dict(params=[params["wte"], params["wpe"]], lmo="sign", radius=3000.0, corrected=False,
                 weight_decay=0.1),
            dict(params=[p for p in params.values() if p.ndim == 1], lmo="bias", radius=10.0)]


class MuonStyleLoop:
    """Per-layer loop as in typical Muon/Scion code: one small NS chain per matrix."""

    def __init__(self, groups, lr, momentum, ns_dtype, norm_target=1.1875):
        self.groups, self.lr, self.alpha, self.ns_dtype, self.C2 = groups, lr, momentum, ns_dtype, norm_target
        self.bufs = {p: torch.zeros_like(p) for g in groups for p in g["params"]}

    @torch.no_grad()
    def step(self):
        for g in self.groups:
            s = self.lr * g["radius"]
            eta = scion_decay(s, momentum=self.alpha, norm_target=self.C2, corrected=g.get("corrected", True),
                              lr=self.lr, weight_decay=g.get("weight_decay", 0.0))
            for p in g["params"]:
                m = self.bufs[p].lerp_(p.grad, self.alpha)
                if g["lmo"] == "spectral":
                    d = newton_schulz(m, 5, "classic", self.ns_dtype)
                    scale = s * math.sqrt(p.shape[0] / p.shape[1])
                elif g["lmo"] == "sign":
                    d, scale = m.sign(), s / p.shape[-1]
                else:
                    d, scale = m, s / m.square().mean().add(1e-12).sqrt()
                p.mul_(1 - eta)
                p.sub_(d.to(p.dtype) * scale)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-small", action="store_true", help="d=192, vocab 8192, ctx 256 (default without CUDA)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--reps", type=int, default=7, help="CPU repetitions (median)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/scionc_step_<device>.json)")
    args = ap.parse_args()
    device = pick_device(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    small = args.cpu_small or device.type != "cuda"
    d, vocab, ctx = (192, 8192, 256) if small else (768, 50257, 1024)
    set_name = f"gpt2-124m{'/4 (d=192, vocab 8192)' if small else ''} ({args.layers} layers)"
    dtype = torch.float32
    ns_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    env = environment(device)
    peak_n = 4096 if device.type == "cuda" else 1024
    peak_fn, peak_flops, peak_dtype = peak_matmul(device, peak_n)

    probe = gpt2_params(d, args.layers, vocab, ctx, "meta", dtype)
    mats = [tuple(p.shape) for k, p in probe.items() if p.ndim == 2 and k not in ("wte", "wpe")]
    flops = sum(ns_flops(min(s), max(s), 5) for s in mats)
    n_params = sum(p.numel() for p in probe.values())
    lr, momentum = 0.0005, 0.1

    def make(kind):
        P = gpt2_params(d, args.layers, vocab, ctx, device, dtype)
        if kind == "adamw-fused":
            opt = torch.optim.AdamW(list(P.values()), lr=1e-4, weight_decay=0.1, fused=True)
        elif kind == "muon-style-loop":
            opt = MuonStyleLoop(scion_groups(P), lr, momentum, ns_dtype)
        else:
            opt = ScionC(scion_groups(P), lr=lr, momentum=momentum, backend=kind, ns_dtype=ns_dtype)
        return opt

    opts = {kind: make(kind) for kind in ("muon-style-loop", "batched", "reference", "adamw-fused")}
    fns = {"peak": peak_fn, **{kind: opt.step for kind, opt in opts.items()}}
    results = time_all(fns, device, args.reps)
    peak = peak_flops / (results.pop("peak") * 1e-3) / 1e12
    print(f"{env['device']}: {peak_dtype} matmul at {peak_n}²: {peak:.4f} TFLOP/s (100% line)")
    rows = []
    base = results["muon-style-loop"]
    for kind, ms in results.items():
        is_scion = kind != "adamw-fused"
        tf = flops / (ms * 1e-3) / 1e12 if is_scion else None
        rows.append(dict(kernel="scionc_step" if is_scion else "adamw_step", backend=kind, shape_set=set_name,
                         shapes=sorted(set(mats)), n_matrices=len(mats), n_params=n_params,
                         dtype=str(dtype).replace("torch.", ""), ns_dtype=str(ns_dtype).replace("torch.", ""),
                         median_ms=round(ms, 4), tflops=None if tf is None else round(tf, 4),
                         pct_of_peak=None if tf is None else round(100 * tf / peak, 2), peak_tflops=round(peak, 3),
                         peak_dtype=peak_dtype, peak_n=peak_n, speedup_vs_per_layer_loop=round(base / ms, 3), **env))
        print(f"{kind:18s} {ms:10.3f} ms  x{base / ms:6.2f} vs per-layer loop"
              + (f"  {tf:.3f} TFLOP/s (NS matmuls) {100 * tf / peak:.1f}% of peak" if tf else ""))
    # GPU files carry the device name (an H100 run and an H200 run must not overwrite each other).
    tag = run_info.slug(torch.cuda.get_device_name(device)) if device.type == "cuda" else "cpu"
    write_rows(rows, args.out or os.path.join(HERE, "results", f"scionc_step_{tag}.json"))


if __name__ == "__main__":
    main()
