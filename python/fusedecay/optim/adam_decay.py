"""AdamHD and AdamC: drop-in ``torch.optim.Optimizer`` classes over :func:`fusedecay.functional.adam_decay`.

Both keep per-param state ``step`` (float32 0-d tensor on the param's device), ``exp_avg``,
``exp_avg_sq`` — or, in a group with ``state_bits=8``, their 8-bit codes and block scales (see
:mod:`fusedecay.optim._state_format` and docs/state8.md) — and, for AdamHD with ``delta_mode``
"mean"/"ema", ``delta_mu`` (μ^(l): the tracked mean |θ| that gives δ^(l) = delta_scale·μ^(l)).
``step()`` does no host sync: lr may be a float or a 0-d tensor, and GradScaler's
``grad_scale``/``found_inf`` are applied on the device.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from .. import _validate as V
from .._step_wrapper import optimizer_step
from .. import backends as _backends
from .. import distributed as _dist
from ..functional import DELTA_MODES, UPDATES, _mu_dtype, adam_decay, init_delta_mu
from . import _checkpoint as C
from . import _state_format as SF

class _AdamDecayBase(Optimizer):
    """Shared machinery; subclasses set ``_decay_of(group)``."""

    _step_supports_amp_scaling = True  # GradScaler hands us grad_scale/found_inf instead of unscaling

    def __init__(self, params, defaults: Dict[str, Any]):
        self._check_group(defaults)
        # Load the backends now (a first-use compile of the CPU kernels included), not inside the first step():
        # a step traced by torch.compile then never meets an import.
        _backends.available_backends()
        super().__init__(params, defaults)

    # -- param groups ----------------------------------------------------------------------------
    def _check_group(self, g: Dict[str, Any]) -> None:
        V.non_negative("lr", g["lr"])
        V.betas(g["betas"])
        V.number("eps", g["eps"])
        V.non_negative("eps", g["eps"])
        V.number("weight_decay", g["weight_decay"])
        V.non_negative("weight_decay", g["weight_decay"])
        V.flag("bias_correction", g["bias_correction"])
        V.flag("maximize", g["maximize"])
        V.flag("corrected", g["corrected"])
        V.choice("backend", g["backend"], _backends.BACKEND_NAMES)
        V.choice("moment_dtype", g["moment_dtype"], (None, torch.float32, torch.bfloat16, torch.float64))
        V.choice("state_bits", g.get("state_bits", 32), (32, 8))
        if g.get("max_lr") is not None:
            V.positive("max_lr", g["max_lr"])

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        merged = dict(self.defaults)
        merged.update({k: v for k, v in param_group.items() if k != "params"})
        self._check_group(merged)  # raises before anything is added
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            if isinstance(p, Tensor) and (torch.is_complex(p) or not p.is_floating_point()):
                raise TypeError(f"fusedecay optimizers need real floating-point params, got {p.dtype}")
        V.check_params(self.param_groups, len(self.param_groups), params, param_group.get("param_names"))
        for p in params:
            SF.check_placements(merged, p)
        lr = merged["lr"]
        # γ at construction: AdamC's default γ_max when no scheduler set initial_lr.
        param_group.setdefault("init_lr", lr.clone() if isinstance(lr, Tensor) else lr)
        super().add_param_group(param_group)

    def _decay_of(self, group) -> str:
        raise NotImplementedError

    def _max_lr(self, group):
        """γ_max for the corrected coefficient, or None when the group is uncorrected."""
        if not group["corrected"]:
            return None
        if group.get("max_lr") is not None:
            return group["max_lr"]
        return group.get("initial_lr", group["init_lr"])

    def _tracks_delta(self, group) -> bool:
        return (self._decay_of(group) != "l2" and group.get("delta_mode", "fixed") != "fixed"
                and group["weight_decay"] != 0)

    # -- state -----------------------------------------------------------------------------------
    def _init_group(self, group, params, grads, exp_avgs, exp_avg_sqs, steps, mus, m_scales, v_scales, made):
        """Fills the lists for one group; ``scales`` gets (exp_avg_scales, exp_avg_sq_scales) per param (None for
        full-precision moments) when the group has ``state_bits=8``. Checks each param's grad and state first
        (``_validate.grad_ok``, ``state_on_param_device``: a bad one raises naming the param) and makes missing
        state; ``made`` gets (param, whether it had a state entry, the keys it had) for each state this call is
        about to add to, so that ``step`` can take the additions back when a later param fails its checks."""
        tracks = self._tracks_delta(group)
        state8 = group.get("state_bits", 32) == 8
        get = self.state.get
        strided, floats = torch.strided, V.REAL_FLOAT_DTYPES
        for p in group["params"]:  # per param per step: kept lean (thousands of small tensors are common)
            g = p.grad
            if g is None:
                continue
            state = get(p)
            # The common case in attribute reads (V.grad_ok's and V.state_on_param_device's checks, inlined); anything
            # else goes through them (raising naming the param) and makes what is missing.
            if (not state or (tracks and "delta_mu" not in state) or g.shape != p.shape or g.layout is not strided
                    or g.dtype not in floats or p.dtype not in floats or g.device != (dev := p.device)
                    or state["step"].device != dev):
                state = self._checked_state(group, p, tracks, made)
            params.append(p)
            grads.append(g)
            if state8 and "exp_avg_codes" in state:
                exp_avgs.append(state["exp_avg_codes"])
                exp_avg_sqs.append(state["exp_avg_sq_codes"])
                m_scales.append(state["exp_avg_scales"])
                v_scales.append(state["exp_avg_sq_scales"])
            else:
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
                if state8:
                    m_scales.append(None)
                    v_scales.append(None)
            steps.append(state["step"])
            if tracks:
                mus.append(state["delta_mu"])

    def _checked_state(self, group, p: Tensor, tracks: bool, made) -> Dict[str, Any]:
        """``p``'s state after checking its grad and state (a bad one raises naming the param; a state entry made
        for the check is removed again) and making what is missing (recorded in ``made``, see ``_init_group``)."""
        states = self.state
        had = p in states
        state = states[p]
        try:
            V.grad_ok(p)
            V.state_on_param_device(p, state, "step")
        except (TypeError, ValueError) as e:
            if not had:
                del states[p]
            raise type(e)(f"{V.param_label(self.param_groups, p)}: {e}") from None
        if not state or (tracks and "delta_mu" not in state):
            made.append((p, had, tuple(state)))
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state.update(SF.new_moments(group, p))
            if tracks and "delta_mu" not in state:
                state["delta_mu"] = self._initial_delta_mu(p, group["backend"])
        return state

    def _initial_delta_mu(self, p: Tensor, backend: str) -> Tensor:
        """μ^(l)_0 = mean|θ_0| (the global mean over all shards for a DTensor param), reduced in a fixed order."""
        return _dist.init_delta_mu(p, backend) if _dist.is_dtensor(p) else init_delta_mu(p, backend)

    @optimizer_step
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        # Every group's lists (and checks) before any group's update: a bad grad or state raises with nothing changed.
        work, made = [], []
        try:
            for group in self.param_groups:
                lists = [], [], [], [], [], [], [], []
                self._init_group(group, *lists, made)
                if lists[0]:
                    work.append((group, lists))
        except BaseException:
            for p, had, kept in reversed(made):   # the state this step made, taken back
                st = self.state[p]
                for k in [k for k in st if k not in kept]:
                    del st[k]
                if not had:
                    del self.state[p]
            raise
        for group, (params, grads, exp_avgs, exp_avg_sqs, steps, mus, m_scales, v_scales) in work:
            beta1, beta2 = group["betas"]
            # DTensor params (FSDP2): local shards + one all-reduce of Σ|θ| (see fusedecay.distributed).
            run = _dist.adam_decay if _dist.has_dtensor(params) else adam_decay
            run(params, grads, exp_avgs, exp_avg_sqs, steps, mus if mus else None, lr=group["lr"],
                       beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                       decay=self._decay_of(group), delta_mode=group.get("delta_mode", "fixed"),
                       delta=group.get("delta"), delta_scale=group.get("delta_scale", 1.0),
                       delta_beta=group.get("delta_beta", 0.0), max_lr=self._max_lr(group),
                       bias_correction=group["bias_correction"], maximize=group["maximize"],
                       backend=group["backend"], grad_scale=grad_scale, found_inf=found_inf,
                       exp_avg_scales=m_scales or None, exp_avg_sq_scales=v_scales or None)
        return loss

    # -- checkpoints -----------------------------------------------------------------------------
    def _state_spec(self, group, p: Tensor):
        """(required, optional, one_of) state fields of ``p`` in ``group``, shape and dtype as ``_init_group`` makes
        them. The moments may be in either format (full precision or 8-bit, converted after loading): exactly one
        of the two sets in ``one_of`` must be complete."""
        mdt = group.get("moment_dtype") or p.dtype
        shape = tuple(p.shape)
        full = {"exp_avg": (shape, mdt), "exp_avg_sq": (shape, mdt)}
        optional = {"delta_mu": ((), _mu_dtype(p.dtype)), **full}
        one_of = [tuple(full)]
        if p.dtype in SF.STATE8_DTYPES and SF.state8.eligible(p.shape):   # may hold 8-bit moments
            optional.update(SF.state8_spec(p.shape))
            one_of.append(SF.STATE8_KEYS)
        return {"step": ((), None)}, optional, one_of

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Load this optimizer's own state, or switch from another Adam's (torch ``Adam``/``AdamW``, or AdamHD
        into AdamC and back). See :mod:`fusedecay.optim._checkpoint`; in short:

        * own state: as torch's (the saved hyperparameters replace the current ones), but the state keeps the
          dtypes it was saved with and ``step`` lives on the param's device, so a resume is bit-identical;
        * another Adam's: ``exp_avg``, ``exp_avg_sq`` and ``step`` carry over, the hyperparameters stay this
          optimizer's, and AdamHD's μ starts from the current weights at the next step.

        ``state_bits`` is a storage choice, not a hyperparameter: each group keeps its own, and moments saved in
        the other format are converted (8-bit ↔ full precision, :func:`fusedecay.optim._state_format.convert_moments`).
        Anything else (ScionC's state, wrong shapes, dtypes or counts) raises naming the param and field, and
        changes nothing."""
        C.check_dict(state_dict)
        if not C.is_native(self, state_dict["param_groups"], _ADAM_OPTION_KEYS, _OPTIONAL_GROUP_KEYS):
            self._load_switch(state_dict)
            return
        C.check_native(self, state_dict, self._state_spec, lambda g, saved: {**self.defaults, **saved})
        state_bits = [g.get("state_bits", 32) for g in self.param_groups]
        super().load_state_dict(state_dict)
        C.restore_saved_tensors(self, state_dict)
        for g, bits in zip(self.param_groups, state_bits):
            g["state_bits"] = bits
        self._finish_load()

    def _finish_load(self) -> None:
        """``step`` as one float32 number on the param's device; moments in the format each group asks for."""
        group_of = {p: g for g in self.param_groups for p in g["params"]}
        for p, st in self.state.items():
            if "step" in st:   # whatever form it was saved in
                st["step"] = torch.as_tensor(st["step"]).reshape(()).to(device=p.device, dtype=torch.float32)
            if p in group_of:
                SF.convert_moments(group_of[p], p, st)

    def _load_switch(self, state_dict: Dict[str, Any]) -> None:
        """Another Adam's moments and step, this optimizer's hyperparameters (see ``load_state_dict``)."""
        C.check_dict(state_dict)
        native = C.adam_state_as_native(self, state_dict, lambda g, p: g.get("moment_dtype") or p.dtype,
                                        lambda g, p: p.device)
        C.load_switched(self, native, super().load_state_dict)
        self._finish_load()


class AdamHD(_AdamDecayBase):
    r"""Adam with decoupled Huber decay (AdamHD, arXiv 2511.14721).

    Per step: Adam moments and the preconditioned step θ̃ = θ − γ·u, then the element-wise proximal
    Huber operator with τ = γλ and a per-layer threshold δ^(l) (``update="prox"``, default), or the
    explicit form θ − γ(u + λ·clip(θ, −δ, δ)) (``update="euler"``).

    Args:
        params: iterable of params or param-group dicts (each group may override any keyword).
        lr: γ (float or 0-d tensor). betas, eps: Adam's. weight_decay: λ (0 disables decay for a group).
        update: "prox" | "euler".
        delta_mode: "ema" (default; δ = c·μ, μ an EMA with ``delta_beta`` of mean|θ|, Eq. 8–9),
            "mean" (δ = c·mean|θ_{t−1}|, Eq. 7) or "fixed" (δ = ``delta``).
        delta: δ for ``delta_mode="fixed"`` (> 0). delta_scale: c (> 0). delta_beta: β0 in [0, 1).
        corrected: if True, λ_t = λ·γ_t/γ_max (AdamC's correction combined with Huber decay).
        max_lr: γ_max for ``corrected``; default the scheduler's ``initial_lr``, else lr at construction.
        bias_correction: Adam's bias correction (True, as torch AdamW). maximize: ascend.
        moment_dtype: dtype of exp_avg/exp_avg_sq (None: the param's, as torch AdamW; torch.float32 keeps
            fp32 moments for bf16 params — the compiled and Triton kernels read and write them directly).
        state_bits: 32 (moments in ``moment_dtype``) or 8: 8-bit blockwise moments (≈2.06 B/param instead of 8,
            docs/state8.md) for fp32/bf16 params with at least 2 dims, 4096 elements and a dim-0 row that is a
            multiple of 128; other params of the group keep ``moment_dtype`` moments.
        backend: "auto" | "reference" | "cpu" | "cuda" | "triton".

    Defaults c = 1.0, β0 = 0.99, bias_correction=True and ``update="prox"`` are fusedecay's choices:
    the paper's own values were not available (see README, "Choices the papers leave open").
    """

    def __init__(self, params, lr=1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, update: str = "prox", delta_mode: str = "ema",
                 delta: Optional[float] = None, delta_scale: float = 1.0, delta_beta: float = 0.99,
                 corrected: bool = False, max_lr: Optional[float] = None, bias_correction: bool = True,
                 maximize: bool = False, moment_dtype: Optional[torch.dtype] = None, state_bits: int = 32,
                 backend: str = "auto"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, update=update,
                        delta_mode=delta_mode, delta=delta, delta_scale=delta_scale, delta_beta=delta_beta,
                        corrected=corrected, max_lr=max_lr, bias_correction=bias_correction, maximize=maximize,
                        moment_dtype=moment_dtype, state_bits=state_bits, backend=backend)
        super().__init__(params, defaults)

    def _check_group(self, g):
        super()._check_group(g)
        V.choice("update", g["update"], UPDATES)
        V.choice("delta_mode", g["delta_mode"], DELTA_MODES)
        if g["delta_mode"] == "fixed":
            if g["delta"] is None:
                raise ValueError("Invalid delta: None (delta_mode='fixed' needs delta > 0)")
            V.number("delta", g["delta"])
            V.positive("delta", g["delta"])
        elif g["delta"] is not None:
            raise ValueError(f"Invalid delta: {g['delta']!r} is only used with delta_mode='fixed' "
                             f"(got delta_mode={g['delta_mode']!r}); use delta_scale instead")
        V.number("delta_scale", g["delta_scale"])
        V.positive("delta_scale", g["delta_scale"])
        V.number("delta_beta", g["delta_beta"])
        V.unit_interval("delta_beta", g["delta_beta"])

    def _decay_of(self, group) -> str:
        return group["update"]


class AdamC(_AdamDecayBase):
    r"""AdamW with corrected decoupled weight decay (AdamC; Defazio 2025, arXiv 2506.02285).

    θ_t = θ_{t−1}(1 − γ_t λ_t) − γ_t u_t with λ_t = λ·γ_t/γ_max, so the applied decay scales as γ_t².
    With a constant lr this is exactly AdamW. ``corrected=False`` on a group gives plain AdamW decay
    there (the output layer, per the ScionC paper's exception).

    Args: as :class:`AdamHD` minus the Huber options; ``max_lr`` defaults to the scheduler's
    ``initial_lr``, else the lr at construction.
    """

    def __init__(self, params, lr=1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, *, corrected: bool = True, max_lr: Optional[float] = None,
                 bias_correction: bool = True, maximize: bool = False, moment_dtype: Optional[torch.dtype] = None,
                 state_bits: int = 32, backend: str = "auto"):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, corrected=corrected, max_lr=max_lr,
                        bias_correction=bias_correction, maximize=maximize, moment_dtype=moment_dtype,
                        state_bits=state_bits, backend=backend)
        super().__init__(params, defaults)

    def _decay_of(self, group) -> str:
        return "l2"


def _option_keys(cls) -> set:
    return {k for k in inspect.signature(cls.__init__).parameters if k not in ("self", "params")}


# Every option of the Adam family: a saved group with another member's options is a switch, not a resume.
_ADAM_OPTION_KEYS = _option_keys(AdamHD) | _option_keys(AdamC)
# Options a saved group may lack and still be this optimizer's own (checkpoints from before they existed).
_OPTIONAL_GROUP_KEYS = ("state_bits",)
