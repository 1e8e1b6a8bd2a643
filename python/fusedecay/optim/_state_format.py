"""How AdamHD/AdamC keep a param's moments: full precision or 8-bit blockwise (docs/state8.md).

State keys: full precision — ``exp_avg``, ``exp_avg_sq`` (``moment_dtype`` or the param's dtype); 8-bit —
``exp_avg_codes`` (int8), ``exp_avg_scales`` (float32), ``exp_avg_sq_codes`` (uint8), ``exp_avg_sq_scales``
(float32). A group with ``state_bits=8`` gives 8-bit state to every fp32/bf16 param whose shape is
:func:`fusedecay.reference.state8.eligible`; the others keep full precision.

:func:`convert_moments` turns one param's state into the format its group asks for (decode or encode with the
reference codec), so a checkpoint of either format loads into an optimizer of either format.

DTensor params (FSDP2): eligibility is decided on the global shape, so it does not depend on the world size;
codes are ``zeros_like(param)`` and the scales a DTensor of the global scale shape with the param's mesh and
placements. Blocks never straddle a dim-0 row, so a ``Shard(0)`` split (at any world size) splits codes and
scales at the same rows; other placements (``Shard(d > 0)``) would cut blocks and raise.
"""
from __future__ import annotations

from typing import Any, Dict, Tuple

import torch
from torch import Tensor

from .. import distributed as _dist
from ..reference import state8

STATE8_KEYS = ("exp_avg_codes", "exp_avg_scales", "exp_avg_sq_codes", "exp_avg_sq_scales")
STATE8_DTYPES = (torch.float32, torch.bfloat16)


def wants_state8(group: Dict[str, Any], p: Tensor) -> bool:
    """Whether ``p`` gets 8-bit moments in ``group`` (``p.shape`` is the global shape of a DTensor)."""
    return group.get("state_bits", 32) == 8 and p.dtype in STATE8_DTYPES and state8.eligible(p.shape)


def state8_spec(shape) -> Dict[str, Any]:
    """Field → (shape, dtype) of 8-bit moments for a param of (global) ``shape``."""
    scales = tuple(state8.scale_shape(shape))
    return {"exp_avg_codes": (tuple(shape), torch.int8), "exp_avg_scales": (scales, torch.float32),
            "exp_avg_sq_codes": (tuple(shape), torch.uint8), "exp_avg_sq_scales": (scales, torch.float32)}


def full_precision_copy(p: Tensor, state: Dict[str, Any]) -> Dict[str, Any]:
    """``state`` with 8-bit moments decoded to float32 ``exp_avg``/``exp_avg_sq`` (a new dict; ``state`` is not
    changed). Full-precision state is returned as it is."""
    if "exp_avg_codes" not in state:
        return state
    out = {k: v for k, v in state.items() if k not in STATE8_KEYS}
    out["exp_avg"], out["exp_avg_sq"] = _decoded(p, state, torch.float32)
    return out


def _decoded(p: Tensor, state: Dict[str, Any], dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """The values of ``state``'s 8-bit moments (this rank's shard), as ``dtype`` tensors laid out like ``p``."""
    loc = _dist.local
    m = state8.dequantize_exp_avg(loc(state["exp_avg_codes"]), loc(state["exp_avg_scales"]))
    v = state8.dequantize_exp_avg_sq(loc(state["exp_avg_sq_codes"]), loc(state["exp_avg_sq_scales"]))
    return _as_param_layout(p, m.to(dtype)), _as_param_layout(p, v.to(dtype))


def check_placements(group: Dict[str, Any], p: Tensor) -> None:
    """A DTensor ``p`` that gets 8-bit state in ``group`` must keep whole dim-0 rows on each rank (checked when the
    group is added, so a step or a load never fails half-way on it)."""
    if not (_dist.is_dtensor(p) and wants_state8(group, p)):
        return
    for pl in p.placements:
        if not (pl.is_replicate() or (type(pl).__name__ == "Shard" and pl.dim == 0)):  # not _StridedShard
            raise NotImplementedError(
                f"fusedecay: 8-bit optimizer state needs Shard(0) or Replicate placements (blocks are whole "
                f"dim-0 rows), got {tuple(p.placements)}; use state_bits=32 for this param group")


def _scales_like(p: Tensor, local: Tensor) -> Tensor:
    """A float32 scale tensor for ``p`` holding ``local`` (this rank's rows: a DTensor when ``p`` is one)."""
    if not _dist.is_dtensor(p):
        return local
    from torch.distributed.tensor import DTensor

    shape = state8.scale_shape(p.shape)
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=torch.Size(shape),
                              stride=(shape[1], 1))


def _as_param_layout(p: Tensor, local: Tensor) -> Tensor:
    if not _dist.is_dtensor(p):
        return local
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def new_moments(group: Dict[str, Any], p: Tensor) -> Dict[str, Tensor]:
    """Zero moments for ``p`` in the format of ``group``."""
    if wants_state8(group, p):
        rows = _dist.local(p).shape[0]
        blocks = state8.scale_shape(p.shape)[1]
        zeros = lambda dt: torch.zeros_like(p, dtype=dt, memory_format=torch.contiguous_format)  # noqa: E731
        scales = lambda: _scales_like(p, torch.zeros((rows, blocks), dtype=torch.float32,  # noqa: E731
                                                     device=_dist.local(p).device))
        return {"exp_avg_codes": zeros(torch.int8), "exp_avg_scales": scales(),
                "exp_avg_sq_codes": zeros(torch.uint8), "exp_avg_sq_scales": scales()}
    mdt = group.get("moment_dtype") or p.dtype  # e.g. fp32 moments for bf16 params
    return {"exp_avg": torch.zeros_like(p, dtype=mdt, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(p, dtype=mdt, memory_format=torch.preserve_format)}


def convert_moments(group: Dict[str, Any], p: Tensor, state: Dict[str, Any]) -> None:
    """Re-encode ``state``'s moments in place into the format ``group`` asks for ``p`` (no-op when it matches).

    8-bit → full precision decodes (exact for the stored values); full precision → 8-bit encodes with the
    reference codec. Either way it acts on this rank's shard of a DTensor (blocks are whole in a shard).
    """
    has8 = "exp_avg_codes" in state
    if "exp_avg" not in state and not has8:
        return  # no moments yet (e.g. only ``step``)
    want8 = wants_state8(group, p)
    if want8 == has8:
        return
    if want8:
        m = _dist.local(state.pop("exp_avg")).to(torch.float32)
        v = _dist.local(state.pop("exp_avg_sq")).to(torch.float32)
        (mc, ms), (vc, vs) = state8.quantize_exp_avg(m), state8.quantize_exp_avg_sq(v)
        state.update(exp_avg_codes=_as_param_layout(p, mc), exp_avg_scales=_scales_like(p, ms),
                     exp_avg_sq_codes=_as_param_layout(p, vc), exp_avg_sq_scales=_scales_like(p, vs))
    else:
        state["exp_avg"], state["exp_avg_sq"] = _decoded(p, state, group.get("moment_dtype") or p.dtype)
        for k in STATE8_KEYS:
            del state[k]
