"""Named parameter sets for the optimizer-step benchmarks: lists of (name, shape).

* ``gpt2-124m`` — GPT-2 small exactly as Hugging Face stores it (Conv1D weights are (in, out), tied
  LM head): 148 tensors, 124,439,808 parameters.
* ``cpu-small`` — the same layer mix at d_model 384, 4 layers, vocab 16384, context 512: 13.6 M
  parameters in 52 tensors. Its footprint (θ, g, m, v: 16 B/param in fp32, 8 B in bf16 = 218 / 109 MB)
  is several times a server CPU's L3 (32 MB on the CI box), so a step streams from DRAM.
* ``gpt-tiny`` — the same layer mix at d 128, 2 layers, vocab 256, context 128 (0.46 M params): quick runs
  of the tooling (tests/test_bench_tools.py).
* ``many-small-N`` — one fixed total size split into N equal 1-D tensors (the time-vs-number-of-tensors
  sweep); the total is :data:`SWEEP_NUMEL` for the device type.
* ``split-T-N`` — T parameters in N equal 1-D tensors (``bench_paired_step.py --sweep``: 1M params as
  10 × 100k … 4000 × 250, where per-tensor host work and launches weigh most).

Values are random (never zeros): matrices ~ N(0, 0.02²), norm gains ~ 1 + N(0, 0.02²), biases
~ N(0, 0.02²); gradients ~ N(0, 1e-2²); see :func:`make_params`.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

Shape = Tuple[int, ...]

# Total numel of the many-small sweep (fp32 footprint θ, g, m, v = 16 B/param): 2^23 on CPU (134 MB, 4× a
# 32 MB L3), 2^24 on GPU (268 MB, 5× an H100's 50 MB L2), so that no split of it is served from cache.
SWEEP_NUMEL = {"cpu": 1 << 23, "cuda": 1 << 24}
SWEEP_COUNTS = (1, 4, 16, 64, 256, 1024)


def gpt_shapes(vocab: int, n_ctx: int, d: int, n_layer: int) -> List[Tuple[str, Shape]]:
    """A GPT-2-style model's parameters in Hugging Face order and layout (tied LM head)."""
    out: List[Tuple[str, Shape]] = [("wte", (vocab, d)), ("wpe", (n_ctx, d))]
    for i in range(n_layer):
        h = f"h.{i}"
        out += [(f"{h}.ln_1.weight", (d,)), (f"{h}.ln_1.bias", (d,)),
                (f"{h}.attn.c_attn.weight", (d, 3 * d)), (f"{h}.attn.c_attn.bias", (3 * d,)),
                (f"{h}.attn.c_proj.weight", (d, d)), (f"{h}.attn.c_proj.bias", (d,)),
                (f"{h}.ln_2.weight", (d,)), (f"{h}.ln_2.bias", (d,)),
                (f"{h}.mlp.c_fc.weight", (d, 4 * d)), (f"{h}.mlp.c_fc.bias", (4 * d,)),
                (f"{h}.mlp.c_proj.weight", (4 * d, d)), (f"{h}.mlp.c_proj.bias", (d,))]
    out += [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]
    return out


def many_small(total: int, count: int) -> List[Tuple[str, Shape]]:
    if total % count:
        raise ValueError(f"{total} does not split into {count} equal tensors")
    return [(f"t{i}", (total // count,)) for i in range(count)]


def sweep_name(count: int) -> str:
    return f"many-small-{count:04d}"


def shapes(name: str, device_type: str = "cpu") -> List[Tuple[str, Shape]]:
    if name == "gpt2-124m":
        return gpt_shapes(vocab=50257, n_ctx=1024, d=768, n_layer=12)
    if name == "cpu-small":
        return gpt_shapes(vocab=16384, n_ctx=512, d=384, n_layer=4)
    if name == "gpt-tiny":
        return gpt_shapes(vocab=256, n_ctx=128, d=128, n_layer=2)
    if name.startswith("many-small-"):
        return many_small(SWEEP_NUMEL.get(device_type, SWEEP_NUMEL["cpu"]), int(name.rsplit("-", 1)[1]))
    if name.startswith("split-"):
        _, total, count = name.split("-")
        return many_small(int(total), int(count))
    raise KeyError(f"unknown parameter set {name!r}")


def numel(shape_list: Sequence[Tuple[str, Shape]]) -> int:
    n = 0
    for _, s in shape_list:
        k = 1
        for d in s:
            k *= d
        n += k
    return n


def make_params(shape_list: Sequence[Tuple[str, Shape]], device: torch.device, dtype: torch.dtype,
                seed: int = 0) -> List[torch.Tensor]:
    """Leaf params with random values and random ``.grad`` (generated in fp32 on the device, then cast)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    params = []
    for name, s in shape_list:
        w = torch.randn(s, generator=gen, device=device, dtype=torch.float32) * 0.02
        if name.endswith(".weight") and len(s) == 1:  # LayerNorm gain
            w += 1.0
        p = w.to(dtype).requires_grad_(True)
        p.grad = (torch.randn(s, generator=gen, device=device, dtype=torch.float32) * 1e-2).to(dtype)
        params.append(p)
    return params


def describe() -> Dict[str, Tuple[int, int]]:
    """name -> (number of tensors, numel) for the fixed sets (used by the docs)."""
    return {n: (len(shapes(n)), numel(shapes(n))) for n in ("gpt2-124m", "cpu-small")}


if __name__ == "__main__":
    for n, (k, size) in describe().items():
        print(f"{n}: {k} tensors, {size:,} params")
