"""Triton launches on the *current* CUDA device and its current stream; these helpers make that the
tensors' device (a no-op when it already is, and on the CPU under the interpreter)."""
from __future__ import annotations

import contextlib

import torch


def on_device(device: torch.device):
    """Context manager: ``torch.cuda.device(device)`` when it is a CUDA device other than the current one."""
    if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()
