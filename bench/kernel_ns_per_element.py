"""Nanoseconds per element of one CPU kernel call: fp32 moments, 8-bit moments (docs/state8.md) and torch's fused
AdamW, on one fp32 tensor that fits in the L2 cache (2^18 elements: the arithmetic) and one that does not
(2^23: arithmetic and memory). Best of 5 × 5 calls per case, which filters out most of a shared machine's noise.

    python bench/kernel_ns_per_element.py --threads 1

Prints a Markdown table; writes nothing. AdamHD's prox update with a fixed δ, no Σ|θ| (the step's arithmetic;
the EMA variant adds one add per element).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

from fusedecay import _cpp_backend as cpp  # noqa: E402
from fusedecay.reference import state8  # noqa: E402

HYPER = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decay="prox", delta_fixed=0.1,
             delta_scale=1.0, max_lr=None, bias_correction=True, maximize=False)


def best_seconds(fn, calls=5, repeats=5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def cases(rows: int):
    g = torch.Generator().manual_seed(0)
    p = [torch.randn(rows, 128, generator=g) * 0.1]
    grad = [torch.randn(rows, 128, generator=g) * 1e-2]
    m = [torch.randn(rows, 128, generator=g) * 1e-3]
    v = [(torch.randn(rows, 128, generator=g) * 1e-3) ** 2]
    (mc, ms), (vc, vs) = state8.quantize_exp_avg(m[0]), state8.quantize_exp_avg_sq(v[0])
    step = [torch.tensor(3.0)]
    yield "fp32 moments", lambda: cpp.adam_decay(p, grad, m, v, step, None, None, **HYPER)
    yield "8-bit moments", lambda: cpp.adam_decay(p, grad, [mc], [vc], step, None, None, exp_avg_scales=[ms],
                                                   exp_avg_sq_scales=[vs], **HYPER)
    if hasattr(torch, "_fused_adamw_"):
        yield "torch fused AdamW", lambda: torch._fused_adamw_(p, grad, m, v, [], step, lr=1e-3, beta1=0.9,
                                                                beta2=0.999, weight_decay=0.1, eps=1e-8, amsgrad=False,
                                                                maximize=False)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"{a.threads} thread(s), torch {torch.__version__}")
    print("| elements | kernel | ns/element |")
    print("|---:|---|---:|")
    for rows in (1 << 11, 1 << 16):
        for name, fn in cases(rows):
            print(f"| {rows * 128} | {name} | {best_seconds(fn) / (rows * 128) * 1e9:.2f} |")


if __name__ == "__main__":
    main()
