"""Interleaved A/B of the raw CPU op against torch's own fused AdamW op, without the optimizer classes.

Used to decide CPU-kernel changes (e.g. dropping the software prefetch, docs/bench.md): build the variant in
place, run this, build the other, run it again, a few alternations. Each round calls every candidate once in an
order rotated from round to round; the printed ratio is the median of per-round ratios to
``torch._fused_adamw_`` on its own copy of the same random state (cpu-small, fp32).

    python bench/ab_raw_op.py [--threads 2] [--rounds 60] [--state-bits 8]

``--state-bits 8`` times the 8-bit-state kernels (docs/state8.md) instead, on the cpu-small tensors that are eligible
for it (all but the 1-D ones, 99.8 % of the elements), torch's op on the same tensors with fp32 state. The fused
μ update (``delta_beta``) is on in ``prox_sum``, as AdamHD's default step runs it.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "python"))

import torch  # noqa: E402

import param_sets as PS  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=60)
    ap.add_argument("--state-bits", type=int, choices=(32, 8), default=32)
    a = ap.parse_args()
    from fusedecay import _cpp_backend as C
    from fusedecay.reference import state8
    torch.set_num_threads(a.threads)
    shapes = [s for _, s in PS.shapes("cpu-small")]
    q8 = a.state_bits == 8
    if q8:
        shapes = [s for s in shapes if state8.eligible(s)]

    def state():
        g = torch.Generator().manual_seed(0)
        return ([torch.randn(s, generator=g) * 0.02 for s in shapes], [torch.randn(s, generator=g) * 1e-2 for s in shapes],
                [torch.randn(s, generator=g) * 1e-3 for s in shapes],
                [(torch.randn(s, generator=g) * 1e-3) ** 2 for s in shapes],
                [torch.tensor(1.0) for _ in shapes], [torch.tensor(0.02) for _ in shapes])

    sums = torch.empty(len(shapes))
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)

    def torch_fused(st=state()):
        p, g, m, v, s, _ = st
        torch._fused_adamw_(p, g, m, v, [], s, amsgrad=False, maximize=False, **hyper)

    def ours(decay, with_sums, st):
        p, g, m, v, s, mu = st
        extra = {}
        if q8:
            mq = [state8.quantize_exp_avg(x) for x in m]
            vq = [state8.quantize_exp_avg_sq(x) for x in v]
            m, v = [c for c, _ in mq], [c for c, _ in vq]
            extra = dict(exp_avg_scales=[k for _, k in mq], exp_avg_sq_scales=[k for _, k in vq])
        if with_sums:
            extra.update(delta_beta=0.9, numels=[x.numel() for x in p])
        return lambda: C.adam_decay(p, g, m, v, s, mu if decay != "l2" else None, sums if with_sums else None,
                                    decay=decay, delta_fixed=None, delta_scale=1.0, max_lr=None, bias_correction=True,
                                    maximize=False, **hyper, **extra)

    cands = {"torch_fused": torch_fused, "l2_nosum": ours("l2", False, state()), "prox_sum": ours("prox", True, state())}
    for f in cands.values():
        for _ in range(3):
            f()
    keys = list(cands)
    ts = {k: [] for k in keys}
    for r in range(a.rounds):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            t0 = time.perf_counter()
            cands[k]()
            ts[k].append(time.perf_counter() - t0)
    for k, v in ts.items():
        ratio = statistics.median(x / y for x, y in zip(v, ts["torch_fused"]))
        print(f"{k:12s} {statistics.median(v) * 1e3:8.3f} ms  ratio {ratio:.3f}")


if __name__ == "__main__":
    main()
