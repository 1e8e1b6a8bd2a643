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
from .._step_wrapper import optimizer_step
from .. import backends as _backends
from .. import distributed as _dist
from ..functional import scionc
from ..reference.scion import LMO_KINDS, MATRIX_VIEWS, NS_KINDS
from . import _checkpoint as C

# Options added after checkpoints were first saved, and what a saved group (or an unpickled optimizer) without
# one did: "auto" matrices, buffers in the param's dtype.
_OPTIONAL_GROUP_KEYS = {"matrix_view": "auto", "momentum_dtype": None}
MOMENTUM_DTYPES = (None, torch.float32, torch.bfloat16)   # the update runs in fp32 (fp64 for fp64 params)


class ScionC(Optimizer):
    r"""Scion with layer-wise LMOs and corrected decoupled weight decay (ScionC, arXiv 2512.08217).

    Args:
        params: iterable of params or param-group dicts; groups override any keyword below.
        lr: γ (float or 0-d tensor). The step along the unit LMO direction is s = γ·``radius``.
        momentum: α, the weight on the *new* gradient (Scion convention), in (0, 1]; default 0.1.
        weight_decay: λ for uncorrected groups (η = γλ). Corrected groups take η from C²: a corrected group
            whose weight_decay (its own, or this default when it sets none) is nonzero raises, so nothing is
            silently ignored. (``param_groups`` gives its corrected groups weight_decay=0, so this default
            reaches the sign layers only.)
        lmo: "spectral" (params with >= 2 dims) | "sign" | "bias".
        radius: ρ_l > 0. norm_target: C_l² > 0, the steady-state ‖θ‖_F² in units of ‖lmo‖_F².
        corrected: η_t = s²(2 − α)/(2αC²) if True, else γλ.
        ns: "classic" (quintic 3.4445, −4.7750, 2.0315) | "polar_express". ns_steps: iterations (≥ 1).
        ns_dtype: dtype Newton–Schulz runs in (default: bf16 on CUDA, fp32 elsewhere).
        nesterov: the author's Nesterov variant (see reference). maximize: ascend.
        backend: "auto" | "reference" | a registered backend with batched ``scion_directions``.
        matrix_view: how a weight with more than 2 dims is read as matrices (d_out, d_in) by the spectral
            and sign LMOs: "batch" (leading dims index matrices: an MoE expert stack (E, d_out, d_in), one
            orthogonalisation per expert), "flatten" (a conv kernel (d_out, d_in, k, k) as one
            (d_out, d_in·k·k) matrix), "taps" (one (d_out, d_in) matrix per kernel tap), "transposed"
            (stored (d_in, d_out), as transformers' ``Conv1D``) or "auto" (default: "batch" up to 3-D,
            "flatten" from 4-D). See docs/param_groups.md.
        momentum_dtype: dtype of ``momentum_buffer`` (None: the param's). ``torch.bfloat16`` halves the state of
            fp32 params (2 bytes/param instead of 4): each step computes m_t in the param's precision from the
            stored m_{t−1}, hands that unrounded m_t (or the Nesterov blend) to the LMO, and stores m_t rounded to
            nearest-even bf16. A group option, like the others; a checkpoint keeps the buffers' dtypes.
    """

    def __init__(self, params, lr=0.02, momentum: float = 0.1, weight_decay: float = 0.0, *, lmo: str = "spectral",
                 radius: float = 1.0, norm_target: float = 1.1875, corrected: bool = True, ns: str = "classic",
                 ns_steps: int = 5, ns_dtype: Optional[torch.dtype] = None, nesterov: bool = False,
                 maximize: bool = False, backend: str = "auto", matrix_view: str = "auto",
                 momentum_dtype: Optional[torch.dtype] = None):
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, lmo=lmo, radius=radius,
                        norm_target=norm_target, corrected=corrected, ns=ns, ns_steps=ns_steps, ns_dtype=ns_dtype,
                        nesterov=nesterov, maximize=maximize, backend=backend, matrix_view=matrix_view,
                        momentum_dtype=momentum_dtype)
        self._check_group(defaults, [], defaults_only=True)
        # Load the backends now (a first-use compile of the CPU kernels included), not inside the first step():
        # a step traced by torch.compile then never meets an import.
        _backends.available_backends()
        super().__init__(params, defaults)
        # Optional override of how LMO directions are computed (fn(inputs, lmo=, ns_steps=, ns=, ns_dtype=) -> list);
        # the distributed path calls it on whole matrices on their owner rank. None: the backend's own.
        self._lmo_fn = None
        # Set by fusedecay.distributed.split_lmo_work: the group replicated (DDP) params share NS work over.
        self._lmo_process_group = None

    def _check_group(self, g: Dict[str, Any], params, defaults_only: bool = False) -> None:
        """Every option of group ``g``; with ``defaults_only`` (the constructor's keywords) the rules that tie
        options together are left to the groups, which may override either side (e.g. a nonzero
        ``weight_decay`` default meant for the uncorrected groups only)."""
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
        V.choice("matrix_view", g["matrix_view"], MATRIX_VIEWS)
        V.choice("momentum_dtype", g["momentum_dtype"], MOMENTUM_DTYPES)
        if not defaults_only and g["corrected"] and g["weight_decay"] != 0:
            raise ValueError(f"Invalid weight_decay: {g['weight_decay']} on a corrected group (its decay is set by "
                             "norm_target); use corrected=False for plain decay γλ")
        if g["lmo"] == "spectral":
            for p in params:
                if p.ndim < 2:
                    raise ValueError(f"Invalid lmo: 'spectral' needs params with >= 2 dims, got shape "
                                     f"{tuple(p.shape)} (use lmo='bias' for 1-D params)")

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        merged = dict(self.defaults)
        merged.update({k: v for k, v in param_group.items() if k != "params"})
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if isinstance(p, Tensor) and (torch.is_complex(p) or not p.is_floating_point()):
                raise TypeError(f"fusedecay optimizers need real floating-point params, got {p.dtype}")
        self._check_group(merged, params)
        V.check_params(self.param_groups, len(self.param_groups), params, param_group.get("param_names"))
        param_group["params"] = params
        super().add_param_group(param_group)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            for key, absent in _OPTIONAL_GROUP_KEYS.items():
                group.setdefault(key, absent)  # checkpoints saved before the option existed
        for key, absent in _OPTIONAL_GROUP_KEYS.items():
            self.defaults.setdefault(key, absent)

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """As torch's (the saved hyperparameters replace the current ones), after checking the state dict is a
        ScionC's and fits these params: group and param counts, ``momentum_buffer`` shapes and dtypes. A
        mismatch raises naming the param and field, and changes nothing."""
        C.check_dict(state_dict)
        if not C.is_native(self, state_dict["param_groups"], set(self.defaults), _OPTIONAL_GROUP_KEYS):
            missing = sorted(set(self.defaults) - set(_OPTIONAL_GROUP_KEYS) - C.TORCH_ADDED_DEFAULTS
                             - set().union(*map(set, state_dict["param_groups"] or [{}])))
            raise ValueError(f"load_state_dict: not a ScionC state dict: its param groups lack {missing}; a ScionC "
                             f"needs a momentum_buffer per param (another optimizer's state cannot be mapped)")
        C.check_native(self, state_dict, self._state_spec,
                       lambda g, saved: {**self.defaults, **_OPTIONAL_GROUP_KEYS, **saved})
        super().load_state_dict(state_dict)
        C.restore_saved_tensors(self, state_dict)   # torch's load casts the buffers to the param's dtype

    @staticmethod
    def _momentum_dtype(group, p: Tensor) -> torch.dtype:
        return group.get("momentum_dtype") or p.dtype

    @classmethod
    def _state_spec(cls, group, p: Tensor):
        return {"momentum_buffer": (tuple(p.shape), cls._momentum_dtype(group, p))}, {}

    def _ns_dtype(self, group, p: Tensor) -> torch.dtype:
        if group["ns_dtype"] is not None:
            return group["ns_dtype"]
        if p.dtype == torch.float64:
            return torch.float64
        return torch.bfloat16 if p.device.type == "cuda" else torch.float32

    def _check_step_inputs(self) -> None:
        V.step_inputs(self, "momentum_buffer")

    @optimizer_step
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._check_step_inputs()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p, dtype=self._momentum_dtype(group, p),
                                                                memory_format=torch.preserve_format)
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
                   maximize=group["maximize"], backend=group["backend"], lmo_fn=self._lmo_fn,
                   matrix_view=group["matrix_view"])
        return loss
