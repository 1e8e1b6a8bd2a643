"""ScionC: Scion with corrected decoupled weight decay, as a ``torch.optim.Optimizer``.

Each param group names its LMO (``lmo``: "spectral" for hidden matrices, "sign" for embeddings and
the output layer, "bias" for 1-D params), its radius ρ and target C² (``norm_target``), and whether
its decay is corrected (``corrected``; the output layer keeps plain decay γλ). See
:mod:`fusedecay.reference.scion` for the equations.
"""
from __future__ import annotations

import functools
from typing import Any, Dict, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import _validate as V
from .. import backends as _backends
from .. import distributed as _dist
from ..functional import scionc
from ..reference.scion import LMO_KINDS, NS_KINDS


class ScionC(Optimizer):
    r"""Scion with layer-wise LMOs and corrected decoupled weight decay (ScionC, arXiv 2512.08217).

    Args:
        params: iterable of params or param-group dicts; groups override any keyword below.
        lr: γ (float or 0-d tensor). The step along the unit LMO direction is s = γ·``radius``.
        momentum: α, the weight on the *new* gradient (Scion convention), in (0, 1]; default 0.1.
        weight_decay: λ for uncorrected groups (η = γλ). Corrected groups ignore it (η comes from C²);
            a nonzero value there raises, so nothing is silently ignored.
        lmo: "spectral" (2-D params only) | "sign" | "bias".
        radius: ρ_l > 0. norm_target: C_l² > 0, the steady-state ‖θ‖_F² in units of ‖lmo‖_F².
        corrected: η_t = s²(2 − α)/(2αC²) if True, else γλ.
        ns: "classic" (quintic 3.4445, −4.7750, 2.0315) | "polar_express". ns_steps: iterations (≥ 1).
        ns_dtype: dtype Newton–Schulz runs in (default: bf16 on CUDA, fp32 elsewhere).
        nesterov: the author's Nesterov variant (see reference). maximize: ascend.
        backend: "auto" | "reference" | a registered backend with batched ``scion_directions``.
    """

    def __init__(self, params, lr=0.02, momentum: float = 0.1, weight_decay: float = 0.0, *, lmo: str = "spectral",
                 radius: float = 1.0, norm_target: float = 1.1875, corrected: bool = True, ns: str = "classic",
                 ns_steps: int = 5, ns_dtype: Optional[torch.dtype] = None, nesterov: bool = False,
                 maximize: bool = False, backend: str = "auto"):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, lmo=lmo, radius=radius,
                        norm_target=norm_target, corrected=corrected, ns=ns, ns_steps=ns_steps, ns_dtype=ns_dtype,
                        nesterov=nesterov, maximize=maximize, backend=backend)
        self._check_group(defaults, [])
        # Load the backends now (a first-use compile of the CPU kernels included), not inside the first step():
        # a step traced by torch.compile then never meets an import.
        _backends.available_backends()
        super().__init__(params, defaults)
        # Optional override of how LMO directions are computed (fn(inputs, lmo=, ns_steps=, ns=, ns_dtype=) -> list);
        # the distributed path calls it on whole matrices on their owner rank. None: the backend's own.
        self._lmo_fn = None
        # Set by fusedecay.distributed.split_lmo_work: the group replicated (DDP) params share NS work over.
        self._lmo_process_group = None

    def _check_group(self, g: Dict[str, Any], params) -> None:
        V.non_negative("lr", g["lr"])
        for name in ("momentum", "weight_decay", "radius", "norm_target"):
            V.number(name, g[name])
        V.unit_interval("momentum", g["momentum"], low_open=True, high_closed=True)
        V.non_negative("weight_decay", g["weight_decay"])
        V.choice("lmo", g["lmo"], LMO_KINDS)
        V.positive("radius", g["radius"])
        V.positive("norm_target", g["norm_target"])
        V.flag("corrected", g["corrected"])
        V.choice("ns", g["ns"], NS_KINDS)
        if isinstance(g["ns_steps"], bool) or not isinstance(g["ns_steps"], int) or g["ns_steps"] < 1:
            raise ValueError(f"Invalid ns_steps: {g['ns_steps']!r} (must be an integer >= 1)")
        if g["ns_dtype"] is not None and g["ns_dtype"] not in (torch.bfloat16, torch.float16, torch.float32,
                                                               torch.float64):
            raise ValueError(f"Invalid ns_dtype: {g['ns_dtype']!r}")
        V.flag("nesterov", g["nesterov"])
        V.flag("maximize", g["maximize"])
        V.choice("backend", g["backend"], _backends.BACKEND_NAMES)
        if g["corrected"] and g["weight_decay"] != 0:
            raise ValueError(f"Invalid weight_decay: {g['weight_decay']} on a corrected group (its decay is set by "
                             "norm_target); use corrected=False for plain decay γλ")
        if g["lmo"] == "spectral":
            for p in params:
                if p.ndim != 2:
                    raise ValueError(f"Invalid lmo: 'spectral' needs 2-D params, got shape {tuple(p.shape)} "
                                     "(use lmo='bias' for 1-D params, or reshape conv kernels)")

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        merged = dict(self.defaults)
        merged.update({k: v for k, v in param_group.items() if k != "params"})
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if isinstance(p, Tensor) and (torch.is_complex(p) or not p.is_floating_point()):
                raise TypeError(f"fusedecay optimizers need real floating-point params, got {p.dtype}")
        self._check_group(merged, params)
        param_group["params"] = params
        super().add_param_group(param_group)

    def _ns_dtype(self, group, p: Tensor) -> torch.dtype:
        if group["ns_dtype"] is not None:
            return group["ns_dtype"]
        if p.dtype == torch.float64:
            return torch.float64
        return torch.bfloat16 if p.device.type == "cuda" else torch.float32

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                V.grad_ok(p)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                bufs.append(state["momentum_buffer"])
            if not params:
                continue
            run = scionc
            if self._lmo_process_group is not None or _dist.has_dtensor(params):
                # DTensor params (FSDP2) or split NS work (DDP): see fusedecay.distributed.
                run = functools.partial(_dist.scionc, replicated_group=self._lmo_process_group)
            run(params, grads, bufs, lr=group["lr"], momentum=group["momentum"], lmo=group["lmo"],
                   radius=group["radius"], norm_target=group["norm_target"], corrected=group["corrected"],
                   weight_decay=group["weight_decay"], ns_steps=group["ns_steps"], ns=group["ns"],
                   ns_dtype=self._ns_dtype(group, params[0]), nesterov=group["nesterov"],
                   maximize=group["maximize"], backend=group["backend"], lmo_fn=self._lmo_fn)
        return loss
