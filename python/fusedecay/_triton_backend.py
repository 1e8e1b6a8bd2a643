"""Registers the Triton backend ("triton") for AdamHD/AdamC's multi-tensor step.

Imported by :mod:`fusedecay.backends` as a plugin: if triton (or the kernel module) fails to import,
the registry records why and the package keeps working on the other backends. Devices and dtypes:

* ``cuda``: float32 and bfloat16 params (moments fp32 or the param's dtype).
* ``cpu``: float32 only, and only when ``TRITON_INTERPRET=1`` was set before this import — Triton's
  interpreter runs the same kernels on the CPU (slowly; for tests and debugging).
"""
from __future__ import annotations

import os

import torch

from .backends import Backend, register
from .triton_kernels import adam_decay as _kernels  # needs triton; an ImportError is reported by the registry

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@torch.compiler.disable
def adam_decay_triton(params, grads, exp_avgs, exp_avg_sqs, state_steps, delta_mus, abs_sums, **kw) -> None:
    """``adam_decay_reference``'s contract on the Triton kernels.

    Runs outside torch.compile graphs (Dynamo cannot trace the data-pointer tables); everything that
    changes per step is read from device memory, so a compiled step around it does not recompile
    when a tensor lr changes, and the launches can be captured in a CUDA graph.
    """
    _kernels.adam_decay(params, grads, exp_avgs, exp_avg_sqs, state_steps, delta_mus, abs_sums, **kw)


if INTERPRET:
    # The interpreter dereferences host pointers: CPU tensors only, and numpy has no bfloat16.
    register(Backend("triton", ("cpu",), (torch.float32,), adam_decay_triton))
else:
    register(Backend("triton", ("cuda",), (torch.float32, torch.bfloat16), adam_decay_triton))
