"""Compiled backends: registers Backend "cpu" (fusedecay._C) and, when built, Backend "cuda" (fusedecay._C_cuda).

Both run the op ``torch.ops.fusedecay.adam_decay_`` (defined by csrc/ops.cpp through ``TORCH_LIBRARY``,
so torch.compile sees it as a mutating custom op); the dispatcher picks the CPU or the CUDA kernel from
the tensors' device. The Python side only turns the contract's arguments (lr / max_lr as float or
tensor) into the op's.

The extensions are built by ``pip install -e . --no-build-isolation`` or ``python setup.py build_ext
--inplace`` (see docs/kernels.md). With ``FUSEDECAY_JIT=1`` a missing CPU extension is compiled on the
fly with ``torch.utils.cpp_extension.load`` into ``<checkout>/build/jit`` (development and tests only).
An import failure here is normal on a pure-Python install: ``fusedecay.backends`` records the reason
and falls back to the reference.
"""
from __future__ import annotations

import importlib
import os
from typing import Optional

import torch
from torch import Tensor

from . import backends as _backends

_HERE = os.path.dirname(os.path.abspath(__file__))
_CSRC = os.path.normpath(os.path.join(_HERE, "..", "..", "csrc"))

#: Why the CUDA extension is not available (None when it is loaded).
cuda_unavailable_reason: Optional[str] = None


def _jit_build_cpu():
    """Compile the CPU extension with cpp_extension.load (ninja) into <checkout>/build/jit."""
    from torch.utils.cpp_extension import load

    build_dir = os.path.join(os.path.dirname(_CSRC), "build", "jit")
    os.makedirs(build_dir, exist_ok=True)
    flags = ["-O3", "-g0", "-fno-math-errno", "-ffp-contract=off", "-fopenmp"]
    return load(name="fusedecay_C_jit", sources=[os.path.join(_CSRC, "ops.cpp"),
                                                 os.path.join(_CSRC, "cpu", "adam_decay_cpu.cpp")],
                extra_include_paths=[_CSRC], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                build_directory=build_dir, is_python_module=False, verbose=False)


def _load_cpu():
    try:
        return importlib.import_module("fusedecay._C")
    except ImportError as e:
        if os.environ.get("FUSEDECAY_JIT", "0") == "1" and os.path.isdir(_CSRC):
            return _jit_build_cpu()
        raise ImportError(f"fusedecay._C is not built ({e}); build it with `python setup.py build_ext --inplace` "
                          f"or `pip install -e . --no-build-isolation`") from e


_load_cpu()
if not hasattr(torch.ops.fusedecay, "adam_decay_"):
    raise ImportError("fusedecay._C loaded but did not register torch.ops.fusedecay.adam_decay_")

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
               chunk_size: int = 0) -> None:
    """The multi-tensor contract of :func:`fusedecay.reference.adam_decay_reference`, on the compiled op.

    ``chunk_size`` (elements per work unit; 0 = the default 65536; a multiple of 128 with 8-bit state) only
    changes the work split.
    """
    if not params:
        return
    lr_value, lr_tensor = _split(lr, "lr")
    max_lr_value, max_lr_tensor = _split(max_lr, "max_lr")
    if max_lr_tensor is not None:
        max_lr_value = None
    torch.ops.fusedecay.adam_decay_(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), list(state_steps),
        list(delta_mus) if delta_mus is not None else None, abs_sums,
        lr=lr_value, lr_tensor=lr_tensor, beta1=float(beta1), beta2=float(beta2), eps=float(eps),
        weight_decay=float(weight_decay), decay=decay,
        delta_fixed=None if delta_fixed is None else float(delta_fixed), delta_scale=float(delta_scale),
        max_lr=max_lr_value, max_lr_tensor=max_lr_tensor, bias_correction=bool(bias_correction),
        maximize=bool(maximize), grad_scale=grad_scale, found_inf=found_inf, chunk_size=int(chunk_size),
        exp_avg_scales=None if exp_avg_scales is None else list(exp_avg_scales),
        exp_avg_sq_scales=None if exp_avg_sq_scales is None else list(exp_avg_sq_scales),
        delta_beta=None if delta_beta is None else float(delta_beta),
        mu_numels=None if numels is None else [int(k) for k in numels])


DTYPES = (torch.float32, torch.bfloat16, torch.float64)

CPU_BACKEND = _backends.Backend("cpu", ("cpu",), DTYPES, adam_decay)
_backends.register(CPU_BACKEND)

CUDA_BACKEND = None
if cuda_unavailable_reason is not None:
    _backends._plugin_errors.setdefault("fusedecay._C_cuda", cuda_unavailable_reason)  # shown by resolve("cuda")
else:
    CUDA_BACKEND = _backends.Backend("cuda", ("cuda",), DTYPES, adam_decay)
    _backends.register(CUDA_BACKEND)
