"""Compiled backends: registers Backend "cpu" (fusedecay._C) and, when built, Backend "cuda" (fusedecay._C_cuda).

Both run the op ``torch.ops.fusedecay.adam_decay_`` (defined by csrc/ops.cpp through ``TORCH_LIBRARY``,
so torch.compile sees it as a mutating custom op); the dispatcher picks the CPU or the CUDA kernel from
the tensors' device. The Python side only turns the contract's arguments (lr / max_lr as float or
tensor) into the op's.

The CPU extension comes ahead of time (``fusedecay._C``, built by setup.py when torch is importable at build
time: ``pip install --no-build-isolation``, ``python setup.py build_ext --inplace``) or, when that is missing
or was built for another torch, just in time on first use (:mod:`fusedecay._jit`; docs/install.md). The CUDA
extension is ahead of time only. An import failure here means neither worked (no compiler, ``FUSEDECAY_JIT=0``):
``fusedecay.backends`` records the reason and falls back to the reference, with one warning.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

from . import _jit
from . import backends as _backends

#: Why the CUDA extension is not available (None when it is loaded).
cuda_unavailable_reason: Optional[str] = None


def _load_cpu() -> str:
    """Load the CPU kernels: the ahead-of-time ``fusedecay._C``, else a just-in-time build. Returns where from."""
    try:
        importlib.import_module("fusedecay._C")
        return "fusedecay._C"
    except ImportError as e:
        aot_error = e
    try:
        return _jit.build_cpu()
    except ImportError as e:
        raise ImportError(f"no CPU kernels: fusedecay._C is not built ({aot_error}) and the just-in-time build "
                          f"did not work ({e})") from e


#: Where the CPU kernels came from: "fusedecay._C" or the path of the just-in-time build.
cpu_kernels_origin = _load_cpu()
if not hasattr(torch.ops.fusedecay, "adam_decay_"):
    raise ImportError(f"the CPU kernels ({cpu_kernels_origin}) loaded but did not register "
                      "torch.ops.fusedecay.adam_decay_")

if torch.version.cuda is not None:
    try:
        importlib.import_module("fusedecay._C_cuda")
    except ImportError as e:
        cuda_unavailable_reason = f"fusedecay._C_cuda is not built ({e})"
else:
    cuda_unavailable_reason = "torch was built without CUDA"


def _split(x, name: str):
    """(float value, tensor or None) for a float-or-tensor argument."""
    if isinstance(x, Tensor):
        return 0.0, x
    if x is None:
        return None, None
    return float(x), None


def adam_decay(params, grads, exp_avgs, exp_avg_sqs, state_steps, delta_mus, abs_sums, *, lr, beta1, beta2, eps,
               weight_decay, decay, delta_fixed, delta_scale, max_lr, bias_correction, maximize, grad_scale=None,
               found_inf=None, exp_avg_scales=None, exp_avg_sq_scales=None, delta_beta=None, numels=None,
               chunk_size: int = 0, increment_steps: bool = False) -> None:
    """The multi-tensor contract of :func:`fusedecay.reference.adam_decay_reference`, on the compiled op.

    ``exp_avg_scales``/``exp_avg_sq_scales``: per param, the block scales of 8-bit state or None (full-precision
    moments); one call may mix both. ``increment_steps``: t ← t + 1 inside the op (the steps are then the
    counts before this step; nothing is incremented when found_inf is set). ``chunk_size`` (elements per work
    unit; 0 = the default 65536; a multiple of 128 with 8-bit state) only changes the work split.
    """
    if not params:
        return
    lr_value, lr_tensor = _split(lr, "lr")
    max_lr_value, max_lr_tensor = _split(max_lr, "max_lr")
    if max_lr_tensor is not None:
        max_lr_value = None
    if exp_avg_scales is not None and exp_avg_sq_scales is not None:
        # The op takes the scales of the 8-bit entries only, in order.
        exp_avg_scales = [s for s in exp_avg_scales if s is not None]
        exp_avg_sq_scales = [s for s in exp_avg_sq_scales if s is not None]
    torch.ops.fusedecay.adam_decay_(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(state_steps),
        list(delta_mus) if delta_mus is not None else None, abs_sums,
        lr=lr_value, lr_tensor=lr_tensor, beta1=float(beta1), beta2=float(beta2), eps=float(eps),
        weight_decay=float(weight_decay), decay=decay,
        delta_fixed=None if delta_fixed is None else float(delta_fixed), delta_scale=float(delta_scale),
        max_lr=max_lr_value, max_lr_tensor=max_lr_tensor, bias_correction=bool(bias_correction),
        maximize=bool(maximize), grad_scale=grad_scale, found_inf=found_inf, chunk_size=int(chunk_size),
        exp_avg_scales=exp_avg_scales, exp_avg_sq_scales=exp_avg_sq_scales,
        delta_beta=None if delta_beta is None else float(delta_beta),
        mu_numels=None if numels is None else [int(k) for k in numels], increment_steps=bool(increment_steps))


def abs_sum(x: Tensor) -> Tensor:
    """Σ|x| of a CPU tensor by the kernel's own chunked, ordered reduction (``fusedecay::abs_sums_``)."""
    out = torch.empty(1, dtype=torch.float64 if x.dtype == torch.float64 else torch.float32)
    torch.ops.fusedecay.abs_sums_([x.detach()], out)
    return out[0]


DTYPES = (torch.float32, torch.bfloat16, torch.float64)

CPU_BACKEND = _backends.Backend("cpu", ("cpu",), DTYPES, adam_decay, extras={"abs_sum": abs_sum},
                                mixed_moment_formats=True, increments_steps=True, mu_without_abs_sums=True)
_backends.register(CPU_BACKEND)

CUDA_BACKEND = None
if cuda_unavailable_reason is not None:
    _backends._plugin_errors.setdefault("fusedecay._C_cuda", cuda_unavailable_reason)  # shown by resolve("cuda")
else:
    CUDA_BACKEND = _backends.Backend("cuda", ("cuda",), DTYPES, adam_decay, mixed_moment_formats=True)
    _backends.register(CUDA_BACKEND)
