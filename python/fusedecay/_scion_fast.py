"""The ``batched`` backend: ScionC's fast path (registered on import; see fusedecay.backends).

It provides two ops for :func:`fusedecay.functional.scionc`:

* ``scion_directions`` — unit LMO directions for a list of tensors: spectral by batched
  Newton–Schulz (:mod:`fusedecay.newton_schulz`, one bmm chain per shape), sign with foreach ops,
  bias per tensor.
* ``scionc`` — a whole group step. Two implementations of the same function:
    - torch path (CPU, and anywhere the Triton one does not apply): foreach ops in the reference's
      order (fp32/fp64 math), batched NS; it agrees with the float64 reference to fp32 tolerance (its
      matmuls are bmm where the reference's are mm, which need not round alike).
    - Triton path (CUDA, contiguous fp32/bf16/fp16 params, spectral or sign groups; lr a float or a
      tensor — a device lr is read by the kernels, so the step can be captured in a CUDA graph):
      :mod:`fusedecay.triton_kernels.scion_update` fuses momentum, Nesterov, cast, transpose and
      stacking into one pass that writes the NS input; NS runs batched in ``ns_dtype``; a second pass
      applies decay, spectral scale and update. A sign group is one pass per tensor.
"""
from __future__ import annotations

import math
from typing import List, Optional

import torch
from torch import Tensor

from . import backends as _backends
from .newton_schulz import newton_schulz_stack, shape_groups, spectral_directions
from .reference import scion as _ref

try:  # Triton is optional: without it the torch path runs everywhere.
    from .triton_kernels import scion_update as _tk
except Exception:  # pragma: no cover - depends on the install
    _tk = None


def scion_directions(inputs: List[Tensor], *, lmo: str, ns_steps: int, ns: str,
                     ns_dtype: Optional[torch.dtype], matrix_view: str = "auto") -> List[Tensor]:
    """Unit LMO directions (the same function as ``functional.scion_directions_reference``)."""
    if not inputs:
        return []
    if lmo == "spectral":
        return spectral_directions(inputs, ns_steps, ns, ns_dtype, matrix_view=matrix_view)
    if lmo == "sign":
        d = torch._foreach_sign(inputs)
        torch._foreach_div_(d, [_ref.matrix_dims(m.shape, matrix_view)[1] for m in inputs])   # sign(m)/d_in
        return list(d)
    if lmo == "bias":
        return [_ref.bias_lmo(m) for m in inputs]
    raise ValueError(f"unknown lmo {lmo!r}; expected one of {_ref.LMO_KINDS}")


def _stacks_as_stored(params: List[Tensor], lmo: str, matrix_view: str) -> bool:
    """The Triton passes stack 2-D weights as stored: N-D and transposed spectral weights take the torch path."""
    return lmo != "spectral" or (matrix_view != "transposed" and all(p.ndim == 2 for p in params))


def _triton_applies(params: List[Tensor], grads: List[Tensor], bufs: List[Tensor], lr, lmo: str) -> bool:
    if _tk is None or lmo not in ("spectral", "sign"):
        return False
    p0 = params[0]
    if p0.device.type != "cuda" or p0.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    if isinstance(lr, Tensor) and lr.device != p0.device and lr.device.type != "cpu":
        return False
    return all(t.is_contiguous() for lst in (params, grads, bufs) for t in lst)


def scionc_group_step(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], *, lr,
                      momentum: float, lmo: str, radius: float, norm_target: float, corrected: bool,
                      weight_decay: float, ns_steps: int = 5, ns: str = "classic",
                      ns_dtype: Optional[torch.dtype] = None, nesterov: bool = False, maximize: bool = False,
                      matrix_view: str = "auto") -> None:
    """One ScionC step for one param group (signature of ``functional.scionc`` less backend/lmo_fn)."""
    if not params:
        return
    hyper = dict(lr=lr, momentum=momentum, lmo=lmo, radius=radius, norm_target=norm_target, corrected=corrected,
                 weight_decay=weight_decay, ns_steps=ns_steps, ns=ns, ns_dtype=ns_dtype, nesterov=nesterov,
                 maximize=maximize, matrix_view=matrix_view)
    if _stacks_as_stored(params, lmo, matrix_view) and _triton_applies(params, grads, momentum_buffers, lr, lmo):
        _step_triton(params, grads, momentum_buffers, **hyper)
    else:
        _step_torch(params, grads, momentum_buffers, **hyper)


def _step_torch(params, grads, bufs, *, lr, momentum, lmo, radius, norm_target, corrected, weight_decay, ns_steps,
                ns, ns_dtype, nesterov, maximize, matrix_view="auto") -> None:
    """Reference arithmetic, op for op, over lists (see reference.scion.scionc_step)."""
    dt = torch.float64 if params[0].dtype == torch.float64 else torch.float32
    g = [x.to(dt) for x in grads]
    if maximize:
        g = list(torch._foreach_neg(g))
    m = [b.to(dt) for b in bufs]                         # the buffers themselves when already in dt
    torch._foreach_mul_(m, 1 - momentum)
    torch._foreach_add_(m, g, alpha=momentum)            # m_t = (1 − α) m_{t−1} + α g_t
    if any(a is not b for a, b in zip(m, bufs)):
        torch._foreach_copy_(bufs, m)
    inputs = m
    if nesterov:
        inputs = torch._foreach_mul(m, 1 - momentum)
        torch._foreach_add_(inputs, g, alpha=momentum)
    d = [x.to(dt) for x in scion_directions(list(inputs), lmo=lmo, ns_steps=ns_steps, ns=ns, ns_dtype=ns_dtype,
                                            matrix_view=matrix_view)]
    lr = lr.to(dt) if isinstance(lr, Tensor) else lr
    s = lr * radius                                      # s_l = γ_t ρ_l
    eta = _ref.scion_decay(s, momentum=momentum, norm_target=norm_target, corrected=corrected, lr=lr,
                           weight_decay=weight_decay, nesterov=nesterov)
    sd = torch._foreach_mul(d, s)
    p = [x.to(dt) for x in params]
    if all(a is b for a, b in zip(p, params)):
        torch._foreach_mul_(params, 1 - eta)
        torch._foreach_sub_(params, sd)                   # θ_t = (1 − η_t) θ_{t−1} − s·lmo
    else:
        new = torch._foreach_mul(p, 1 - eta)
        torch._foreach_sub_(new, sd)
        torch._foreach_copy_(params, new)


def _step_triton(params, grads, bufs, *, lr, momentum, lmo, radius, norm_target, corrected, weight_decay, ns_steps,
                 ns, ns_dtype, nesterov, maximize, matrix_view="auto") -> None:
    device = params[0].device
    if isinstance(lr, Tensor) and lr.device != device:  # a CPU lr with GPU params (_triton_applies)
        with torch.cuda.device(device):
            capturing = torch.cuda.is_current_stream_capturing()
        if capturing:
            raise ValueError(f"Invalid lr: a CPU tensor while the step is being captured in a CUDA graph (its value "
                             f"would be frozen into the graph); put lr on {device}")
        lr = float(lr)  # a host read of a CPU tensor: no device sync
    if isinstance(lr, Tensor):
        # A device lr (schedulers write into it; CUDA-graph replays see the new value): s, η and 1 − η as
        # 0-d fp32 tensors that the kernels read, two tiny launches per group and no host read.
        lr32 = lr.reshape(()).to(torch.float32)  # fp32 math, as the reference upcasts lr
        s = lr32 * radius
        eta = _ref.scion_decay(s, momentum=momentum, norm_target=norm_target, corrected=corrected, lr=lr32,
                               weight_decay=weight_decay, nesterov=nesterov)
        keep = (1.0 - eta).to(torch.float32) if isinstance(eta, Tensor) else torch.full((), 1.0 - eta,
                                                                                      device=device)
    else:
        s = lr * radius
        eta = _ref.scion_decay(s, momentum=momentum, norm_target=norm_target, corrected=corrected, lr=lr,
                               weight_decay=weight_decay, nesterov=nesterov)
        keep = 1.0 - eta
    if lmo == "sign":
        for p, g, b in zip(params, grads, bufs):
            d_in = _ref.matrix_dims(p.shape, matrix_view)[1]
            _tk.sign_step(p, g, b, alpha=momentum, keep=keep, step=s, step_mul=1.0 / d_in, nesterov=nesterov,
                          maximize=maximize)
        return
    dt = ns_dtype or torch.bfloat16
    for (device, _, (rows, cols)), idx in shape_groups(params, merge_transposed=True).items():
        x = torch.empty((len(idx), rows, cols), dtype=dt, device=device)
        for k, i in enumerate(idx):
            _tk.momentum_to_stack(grads[i], bufs[i], x[k], alpha=momentum, nesterov=nesterov, maximize=maximize)
        x = newton_schulz_stack(x, ns_steps, ns)
        for k, i in enumerate(idx):
            d_out, d_in = params[i].shape
            _tk.apply_direction(params[i], x[k], keep=keep, step=s, step_mul=math.sqrt(d_out / d_in))


def _register() -> None:
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    _backends.register(_backends.Backend("batched", ("cpu", "cuda"), dtypes, adam_decay=None,
                                         extras={"scion_directions": scion_directions, "scionc": scionc_group_step}))


_register()
