"""Where one CPU optimizer step's time goes: the whole ``step()``, the compiled op calls inside it, and the step
with the kernels replaced by no-ops (what is left is Python, validation and dispatch), for AdamHD (prox + EMA) and
torch's fused AdamW on the same param set.

    python bench/step_breakdown.py                       # cpu-small, 8-bit state, 2 threads
    python bench/step_breakdown.py --state-bits 32 --rounds 31

"cold": 512 MiB of other memory was written just before the step, as in training (forward and backward run in
between) and in bench/bench_paired_step.py's interleaved rounds, where the other optimizers' steps do it; "back to
back": the same step again right after. Medians over the rounds, in ms. Prints a Markdown table; writes nothing.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))

import param_sets  # noqa: E402
from fusedecay import AdamHD  # noqa: E402
from fusedecay import _cpp_backend as cpp  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--param-set", default="cpu-small")
    ap.add_argument("--state-bits", type=int, default=8, choices=(8, 32))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args()
    if args.rounds < 1 or args.threads < 1:
        ap.error("--rounds and --threads must be at least 1")
    torch.set_num_threads(args.threads)
    shapes = param_sets.shapes(args.param_set)
    ours = AdamHD(param_sets.make_params(shapes, torch.device("cpu"), torch.float32), lr=1e-3, weight_decay=0.1,
                  state_bits=args.state_bits)
    theirs = torch.optim.AdamW(param_sets.make_params(shapes, torch.device("cpu"), torch.float32), lr=1e-3,
                               weight_decay=0.1, fused=True)
    for _ in range(3):
        ours.step()
        theirs.step()
    flush = torch.empty(128 << 20)

    # Our op calls, timed from inside step() (the backend object is what fusedecay.functional calls).
    real_op = cpp.CPU_BACKEND.adam_decay
    op_seconds = []

    def timed_op(*a, **k):
        t0 = time.perf_counter()
        real_op(*a, **k)
        op_seconds.append(time.perf_counter() - t0)

    def rounds(kernels_on: bool):
        out = {"ours": ([], [], []), "torch": ([], [], [])}   # cold step, back-to-back step, cold op calls (each)
        real_fused = torch._fused_adamw_
        cpp.CPU_BACKEND.adam_decay = timed_op if kernels_on else (lambda *a, **k: None)
        if not kernels_on:
            torch._fused_adamw_ = lambda *a, **k: None
        try:
            for _ in range(args.rounds):
                for name, opt in (("ours", ours), ("torch", theirs)):
                    flush.fill_(1.0)
                    op_seconds.clear()
                    t0 = time.perf_counter()
                    opt.step()
                    t1 = time.perf_counter()
                    cold_ops = list(op_seconds)
                    opt.step()
                    t2 = time.perf_counter()
                    out[name][0].append(t1 - t0)
                    out[name][1].append(t2 - t1)
                    out[name][2].append(cold_ops)
        finally:
            cpp.CPU_BACKEND.adam_decay = real_op
            torch._fused_adamw_ = real_fused
        med = {k: [statistics.median(x) * 1e3 for x in v[:2]] for k, v in out.items()}
        for k, v in out.items():   # the op calls one by one (on the CPU one per param group)
            med[k].append([statistics.median(c[i] for c in v[2]) * 1e3 for i in range(min(map(len, v[2])))])
        return med

    on, off = rounds(True), rounds(False)
    n = sum(p.numel() for p in ours.param_groups[0]["params"])
    print(f"{args.param_set} ({len(shapes)} tensors, {n:,} fp32 params), AdamHD state_bits={args.state_bits}, "
          f"{args.threads} threads, medians of {args.rounds} rounds, ms")
    print()
    print("| optimizer | step, cold | step, back to back | op calls in the cold step, each | step without kernels, cold "
          "| step without kernels, back to back |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, label in (("ours", f"AdamHD prox+EMA ({args.state_bits}-bit state)"), ("torch", "torch AdamW fused")):
        ops = " + ".join(f"{x:.3f}" for x in on[name][2]) if name == "ours" else "—"
        print(f"| {label} | {on[name][0]:.3f} | {on[name][1]:.3f} | {ops} | {off[name][0]:.3f} | {off[name][1]:.3f} |")


if __name__ == "__main__":
    main()
