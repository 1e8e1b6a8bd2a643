"""Backend registry: which implementation runs a group's update.

A backend provides ``adam_decay`` — a multi-tensor kernel with exactly the signature and semantics
of :func:`fusedecay.reference.adam_decay_reference` — for the device types and dtypes it lists.
The reference is always present. Compiled and Triton backends register themselves from their own
modules (``fusedecay._cpp_backend``, ``fusedecay._triton_backend``) when those import; a package
with no compiled extension and no Triton still works, on the reference.

``backend="auto"`` picks, per (device, dtype) group, the first available entry of
:data:`AUTO_ORDER` for that device type, and says once (a warning) when it had to fall back to the
reference on a device where a fused path was expected.
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .reference import adam_decay_reference


@dataclass
class Backend:
    name: str
    device_types: Tuple[str, ...]
    dtypes: Tuple[torch.dtype, ...]
    adam_decay: Optional[Callable] = None
    # Optional extras a backend may provide; see fusedecay.functional.
    extras: Dict[str, Callable] = field(default_factory=dict)
    # adam_decay takes one call for params with 8-bit and with full-precision moments together (else
    # fusedecay.functional makes one call per format).
    mixed_moment_formats: bool = False
    # adam_decay takes ``increment_steps=True``: it does t ← t + 1 itself (not when found_inf is set), after its
    # checks (else fusedecay.functional increments the steps before the call and undoes it for found_inf after).
    increments_steps: bool = False
    # adam_decay takes ``abs_sums=None`` with the fused μ update (``delta_beta``): the kernel keeps the per-tensor sums
    # to itself (else fusedecay.functional allocates a tensor for them at every step).
    mu_without_abs_sums: bool = False

    def op(self, name: str) -> Optional[Callable]:
        return getattr(self, name, None) if name == "adam_decay" else self.extras.get(name)

    def supports(self, device: torch.device, dtype: torch.dtype) -> bool:
        return device.type in self.device_types and dtype in self.dtypes


_REGISTRY: Dict[str, Backend] = {
    "reference": Backend("reference", ("cpu", "cuda", "meta", "mps", "xpu"),
                         (torch.float16, torch.bfloat16, torch.float32, torch.float64), adam_decay_reference),
}

# Fastest first. The order is documented in the README ("Backends").
AUTO_ORDER: Dict[str, List[str]] = {
    "cuda": ["cuda", "triton", "batched", "reference"],
    # "batched" is not in the CPU order: on CPU a batched matmul is a loop of matmuls, and the batched
    # ScionC step measured slower than the per-tensor loop (bench/results/scionc_step_cpu.json).
    "cpu": ["cpu", "reference"],
}

BACKEND_NAMES = ("auto", "reference", "cpu", "cuda", "triton", "batched")

# Modules that register more backends when they import successfully.
_PLUGIN_MODULES = ("fusedecay._cpp_backend", "fusedecay._triton_backend", "fusedecay._scion_fast")
_plugins_loaded = False
_plugin_errors: Dict[str, str] = {}
_warned: set = set()


def register(backend: Backend) -> None:
    _REGISTRY[backend.name] = backend


def _load_plugins() -> None:
    # torch.compile traces this on every step: after the first call it is one global read (a constant to dynamo);
    # the imports themselves (and a first-use compile of the CPU kernels) run eagerly, outside any graph.
    if not _plugins_loaded:
        _import_plugins()


@torch.compiler.disable
def _import_plugins() -> None:
    global _plugins_loaded
    _plugins_loaded = True
    for mod in _PLUGIN_MODULES:
        try:
            importlib.import_module(mod)
        except Exception as e:  # a missing build or missing triton is normal; remember why
            _plugin_errors[mod] = f"{type(e).__name__}: {e}"


def available_backends() -> Dict[str, Backend]:
    """Name → Backend for every backend usable in this process."""
    _load_plugins()
    return dict(_REGISTRY)


def unavailable_reasons() -> Dict[str, str]:
    _load_plugins()
    return dict(_plugin_errors)


def _warn_once(key, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=4)


def resolve(name: str, device: torch.device, dtype: torch.dtype, op: str = "adam_decay") -> Backend:
    """The backend that runs ``op`` for tensors on ``device`` with ``dtype``."""
    _load_plugins()
    if name == "auto":
        for cand in AUTO_ORDER.get(device.type, ["reference"]):
            b = _REGISTRY.get(cand)
            if b is not None and b.op(op) is not None and b.supports(device, dtype):
                # Say so when the Adam update falls back on a device that has a fused path. (ScionC's CPU path is
                # the per-tensor one by design: see AUTO_ORDER.)
                if cand == "reference" and op == "adam_decay" and device.type in AUTO_ORDER:
                    why = "; ".join(f"{k}: {v}" for k, v in _plugin_errors.items()) or "no fused backend registered"
                    _warn_once((device.type, dtype, op),
                               f"fusedecay: no fused {op} backend for {device.type}/{dtype}; using the eager "
                               f"reference (slower). Reason: {why}")
                return b
        return _REGISTRY["reference"]
    b = _REGISTRY.get(name)
    if b is None:
        if name not in BACKEND_NAMES:
            raise ValueError(f"Invalid backend: {name!r} (expected one of {BACKEND_NAMES})")
        detail = "; ".join(f"{k}: {v}" for k, v in _plugin_errors.items())
        raise RuntimeError(f"fusedecay backend {name!r} is not available in this process ({detail or 'not built'})")
    if b.op(op) is None:
        raise RuntimeError(f"fusedecay backend {name!r} does not implement {op}")
    if not b.supports(device, dtype):
        raise RuntimeError(f"fusedecay backend {name!r} does not support {device.type} tensors of dtype {dtype}")
    return b
