"""Why the 8-bit state uses an 8-bit float per block (docs/state8.md): the Adam update with quantised moments
against the same update with float32 moments, for candidate codes, on synthetic gradients.

Each coordinate i gets gradients g = σ_i·(μ_i + noise), σ_i = exp(spread·N(0, 1)): within a block of 128 the
gradient scales differ by orders of magnitude (``--spread`` sets how many), as between the input features of
a weight matrix's row. Both moment EMAs run for ``--steps`` steps, the quantised ones re-encoded after every
step (round to nearest, as the kernels do); the figure is ‖u_q − u_fp32‖ / ‖u_fp32‖ of the update direction
u = m̂/(√v̂ + ε) at the last step and the largest over the run.

Candidates, all with one float32 scale (the block maximum) per 128 elements:
  * f8 (the contract): m as sign + e4m3, √v as e5m3 — fusedecay.reference.state8;
  * sqrt-companded: m's code linear in sqrt|m| (int8), v's in v^¼ (uint8);
  * linear √v: the same m code, v's code linear in √v (uint8), as flashoptim codes it (with groups of 32).

    python bench/state8_codecs.py                 # spreads 1.0, 1.5, 2.5; 300 steps
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

from fusedecay.reference import state8 as S  # noqa: E402


def _scaled(x: torch.Tensor):
    b = x.reshape(-1, S.BLOCK)
    s = b.abs().amax(1, keepdim=True)
    return b, s, torch.where(s > 0, 1 / s, torch.zeros_like(s))


def sqrt_companded_m(m):
    b, s, r = _scaled(m)
    c = torch.round((b.abs() * r).sqrt() * 127).clamp(max=127)
    return (torch.sign(b) * (c / 127) ** 2 * s).reshape(m.shape)


def fourth_root_v(v):
    w, s, r = _scaled(v.sqrt())
    c = torch.round((w * r).sqrt() * 255).clamp(max=255)
    return (((c / 255) ** 2 * s) ** 2).reshape(v.shape)


def linear_sqrt_v(v):
    w, s, r = _scaled(v.sqrt())
    return ((torch.round(w * r * 255) / 255 * s) ** 2).reshape(v.shape)


def rows(codec):
    """The reference codec on the state as rows of one block (it takes ≥ 2-D tensors)."""
    return lambda x: codec(x.reshape(-1, S.BLOCK)).reshape(x.shape)


CODECS = {
    "f8 (e4m3 m, e5m3 √v)": (rows(lambda m: S.dequantize_exp_avg(*S.quantize_exp_avg(m))),
                             rows(lambda v: S.dequantize_exp_avg_sq(*S.quantize_exp_avg_sq(v)))),
    "sqrt-companded": (sqrt_companded_m, fourth_root_v),
    "linear √v": (sqrt_companded_m, linear_sqrt_v),
}


def run(spread: float, steps: int, n: int, seed: int = 0, b1=0.9, b2=0.999, eps=1e-8):
    g = torch.Generator().manual_seed(seed)
    sigma = torch.exp(torch.randn(n, generator=g) * spread)
    mean = torch.randn(n, generator=g) * 0.3
    m32, v32 = torch.zeros(n), torch.zeros(n)
    state = {k: (torch.zeros(n), torch.zeros(n)) for k in CODECS}
    worst = {k: 0.0 for k in CODECS}
    last = {}
    for t in range(1, steps + 1):
        grad = sigma * (mean + torch.randn(n, generator=g)) * 1e-3
        m32 = b1 * m32 + (1 - b1) * grad
        v32 = b2 * v32 + (1 - b2) * grad * grad
        bc1, bc2 = 1 - b1 ** t, 1 - b2 ** t
        u32 = (m32 / bc1) / ((v32 / bc2).sqrt() + eps)
        for k, (qm, qv) in CODECS.items():
            m, v = state[k]
            m = b1 * m + (1 - b1) * grad
            v = b2 * v + (1 - b2) * grad * grad
            u = (m / bc1) / ((v / bc2).sqrt() + eps)
            last[k] = ((u - u32).norm() / u32.norm()).item()
            worst[k] = max(worst[k], last[k])
            state[k] = (qm(m), qv(v))
    return last, worst


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spreads", default="1.0,1.5,2.5")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--numel", type=int, default=128 * 256)
    a = ap.parse_args()
    print(f"relative error of the update direction after {a.steps} steps (largest over the run), "
          f"{a.numel} coordinates, blocks of {S.BLOCK}")
    print("| spread | " + " | ".join(CODECS) + " |")
    print("|---|" + "---|" * len(CODECS))
    for spread in (float(x) for x in a.spreads.split(",")):
        last, worst = run(spread, a.steps, a.numel)
        print(f"| {spread} | " + " | ".join(f"{last[k]:.3g} ({worst[k]:.3g})" for k in CODECS) + " |")


if __name__ == "__main__":
    main()
