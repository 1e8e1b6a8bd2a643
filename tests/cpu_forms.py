"""Runs the compiled CPU kernel on inputs that reach every masked lane operation and returns every output.

The kernel writes its 16-lane vector code in two forms (csrc/cpu/adam_decay_cpu.cpp, ``VectorForm``): one for
AVX-512 (its own x86-64-v4 functions, with a few AVX-512 intrinsics) and one for split registers (the AVX2 and
baseline clones, other architectures), which must give the same bits. ``FUSEDECAY_CPU_VECTORS=split`` makes an
AVX-512 CPU run the split form (its AVX2 clone), so tests/test_state8.py runs this
module twice — in its own process and in a subprocess with that variable — and compares the bits.

    python tests/cpu_forms.py OUT.pt      # the subprocess side: its outputs and kernel_config()
"""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "python"))

from fusedecay import _cpp_backend as cpp  # noqa: E402
from fusedecay.reference import state8  # noqa: E402

# The last tensor is plain (Gaussian values only): its 8-bit blocks have no subnormal codes, which the 8-bit loop
# runs without the subnormal branches (Q8Codec); the others' blocks all meet special or tiny values.
SHAPES = [(6, 256), (3, 128), (4, 256)]
PLAIN = 2
SPECIAL = [float("nan"), -float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40, -3e-39]


def _values(shape, g, scale, block=0):
    x = torch.randn(shape, generator=g) * scale
    if shape == SHAPES[PLAIN]:
        return x
    flat = x.view(-1)
    # one special value in block ``block`` (0 or 1) of each of the first rows (grads put theirs where the state
    # is finite, so a step meets them: m = −inf from a finite m), the rest spread over many binades (subnormal
    # codes, values far below the block maximum)
    for k, s in enumerate(SPECIAL):
        if k * 256 + 128 * block + 5 < flat.numel():
            flat[k * 256 + 128 * block + 5] = s
    flat[1::7] *= torch.exp2(-torch.rand(flat[1::7].shape, generator=g) * 40)
    return x


def _state(param_dtype, moments, g):
    params = [_values(s, g, 0.5).to(param_dtype) for s in SHAPES]
    m = [_values(s, g, 1e-3) for s in SHAPES]
    v = [_values(s, g, 1e-3).abs() ** 2 for s in SHAPES]
    st = dict(params=params, steps=[torch.tensor(3.0) for _ in SHAPES],
              mus=[torch.tensor(0.2) for _ in SHAPES])
    if moments == "q8":
        st["exp_avgs"], st["exp_avg_scales"] = map(list, zip(*[state8.quantize_exp_avg(x) for x in m]))
        st["exp_avg_sqs"], st["exp_avg_sq_scales"] = map(list, zip(*[state8.quantize_exp_avg_sq(x) for x in v]))
    else:
        dt = {"f32": torch.float32, "bf16": torch.bfloat16}[moments]
        st["exp_avgs"], st["exp_avg_sqs"] = [x.to(dt) for x in m], [x.to(dt) for x in v]
    return st


def run() -> dict:
    """Every case's state and Σ|θ_t| after each of three steps, keyed by name (a special value spreads over its
    block within a step or two: the states of later steps alone would hide most of the lanes that met one)."""
    torch.set_num_threads(1)
    out = {}
    g = torch.Generator().manual_seed(11)
    for param_dtype in (torch.float32, torch.bfloat16):
        for moments in ("q8", "f32", "bf16"):
            for decay in ("prox", "euler", "l2"):
                st = _state(param_dtype, moments, g)
                name = f"{param_dtype}-{moments}-{decay}"
                for k in range(3):
                    grads = [_values(s, g, 1e-2, block=1).to(param_dtype) for s in SHAPES]
                    torch._foreach_add_(st["steps"], 1)
                    sums = torch.zeros(len(SHAPES))
                    q8 = dict(exp_avg_scales=st["exp_avg_scales"], exp_avg_sq_scales=st["exp_avg_sq_scales"]) \
                        if moments == "q8" else {}
                    tracks = decay != "l2"
                    cpp.adam_decay(st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], st["steps"],
                                   st["mus"] if tracks else None, sums, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                                   weight_decay=0.1, decay=decay, delta_fixed=None, delta_scale=1.0, max_lr=None,
                                   bias_correction=True, maximize=k == 1, delta_beta=0.9 if tracks else None, **q8)
                    out[f"{name}/step{k}/sums"] = sums.clone()
                    for key, tensors in st.items():
                        for i, t in enumerate(tensors):
                            out[f"{name}/step{k}/{key}{i}"] = t.clone()
    return out


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bit patterns (NaNs compare by their bits)."""
    if t.is_floating_point():
        return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
    return t


def kernel_config() -> dict:
    """What this process's CPU kernel runs (fusedecay::_cpu_kernel_config): its AVX-512 vector form or not, and the
    software prefetch distance — so that a test can check that the environment it set took effect."""
    avx512, prefetch = torch.ops.fusedecay._cpu_kernel_config()
    return {"avx512_form": bool(avx512), "prefetch": int(prefetch)}


if __name__ == "__main__":
    torch.save({"outputs": run(), "config": kernel_config()}, sys.argv[1])
