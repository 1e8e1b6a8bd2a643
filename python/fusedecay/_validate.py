"""Hyperparameter checks shared by the optimizer classes: every error names the argument."""
from __future__ import annotations

import math
from numbers import Real

import torch
from torch import Tensor


def _value(name: str, x) -> float:
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"Invalid {name}: a tensor {name} must hold one element, got shape {tuple(x.shape)}")
        return float(x.detach().reshape(()).cpu())  # construction time only, never inside step()
    if isinstance(x, bool) or not isinstance(x, Real):
        raise TypeError(f"Invalid {name}: expected a number, got {type(x).__name__}")
    return float(x)


def number(name: str, x) -> None:
    """Hyperparameters other than lr / max_lr must be Python numbers: the kernels take them as scalar
    arguments, so a tensor would be read on the host at every step (a device sync on GPU)."""
    if isinstance(x, Tensor):
        raise TypeError(f"Invalid {name}: pass a Python number (only lr and max_lr may be tensors; a tensor "
                        f"{name} would be read on the host at every step)")


def non_negative(name: str, x) -> None:
    v = _value(name, x)
    if not (v >= 0.0 and math.isfinite(v)):
        raise ValueError(f"Invalid {name}: {v} (must be a finite number >= 0)")


def positive(name: str, x) -> None:
    v = _value(name, x)
    if not (v > 0.0 and math.isfinite(v)):
        raise ValueError(f"Invalid {name}: {v} (must be a finite number > 0)")


def unit_interval(name: str, x, *, low_open: bool = False, high_closed: bool = False) -> None:
    """x in [0, 1) by default; (0, 1] with low_open and high_closed."""
    v = _value(name, x)
    lo_ok = v > 0.0 if low_open else v >= 0.0
    hi_ok = v <= 1.0 if high_closed else v < 1.0
    if not (lo_ok and hi_ok):
        rng = ("(" if low_open else "[") + "0, 1" + ("]" if high_closed else ")")
        raise ValueError(f"Invalid {name}: {v} (must lie in {rng})")


def betas(x) -> None:
    if not (isinstance(x, (tuple, list)) and len(x) == 2):
        raise ValueError(f"Invalid betas: {x!r} (expected a pair (beta1, beta2))")
    number("betas[0]", x[0])
    number("betas[1]", x[1])
    unit_interval("betas[0]", x[0])
    unit_interval("betas[1]", x[1])


def choice(name: str, x, options) -> None:
    if x not in options:
        raise ValueError(f"Invalid {name}: {x!r} (expected one of {tuple(options)})")


def flag(name: str, x) -> None:
    if not isinstance(x, bool):
        raise TypeError(f"Invalid {name}: expected True or False, got {x!r}")


REAL_FLOAT_DTYPES = frozenset((torch.float16, torch.bfloat16, torch.float32, torch.float64))


def grad_ok(p: Tensor) -> None:
    """Reject what no backend supports, before anything is written (messages are completed with the param's
    name by the optimizer)."""
    g = p.grad
    if g is None:
        return
    if g.shape != p.shape or g.device != p.device:
        raise ValueError(f"its grad has shape {tuple(g.shape)} on {g.device}, the param shape {tuple(p.shape)} "
                         f"on {p.device}")
    if g.layout is torch.strided and p.dtype in REAL_FLOAT_DTYPES and g.dtype in REAL_FLOAT_DTYPES:
        return  # the common case, checked with attribute reads only (this runs per param per step)
    if g.is_sparse or g.layout != torch.strided:
        raise TypeError("fusedecay optimizers do not support sparse gradients (param.grad is sparse)")
    if torch.is_complex(g) or torch.is_complex(p):
        raise TypeError("fusedecay optimizers do not support complex parameters or gradients")
    if not p.is_floating_point():
        raise TypeError(f"fusedecay optimizers need floating-point parameters, got {p.dtype}")


def state_on_param_device(p: Tensor, state, field: str) -> None:
    """A param moved (``model.to(...)``) after its state was made would be stepped across devices."""
    v = state.get(field)
    if v is not None and v.device != p.device:
        raise ValueError(f"its state '{field}' is on {v.device} but the param is now on {p.device}; move the state "
                         f"with it, e.g. optimizer.load_state_dict(optimizer.state_dict())")


def step_inputs(optimizer, state_field: str) -> None:
    """Every grad and state of ``optimizer`` before a step writes anything: a bad one raises naming its param,
    and nothing changes (attribute reads only: this runs every step). ``state_field`` is a state tensor whose
    device tells where the state lives."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.grad is None:
                continue
            try:
                grad_ok(p)
                state_on_param_device(p, optimizer.state.get(p, {}), state_field)
            except (TypeError, ValueError) as e:
                raise type(e)(f"{param_label(optimizer.param_groups, p)}: {e}") from None


def param_label(groups, p: Tensor) -> str:
    """How an error names ``p``: its name when the group carries ``param_names``, else its place and shape."""
    for gi, g in enumerate(groups):
        for k, q in enumerate(g["params"]):
            if q is p:
                names = g.get("param_names")
                if names and k < len(names):
                    return f"param '{names[k]}'"
                return f"param {k} of param_groups[{gi}] (shape {tuple(p.shape)})"
    return f"a param of shape {tuple(p.shape)}"


def check_params(groups, group_index: int, params, names=None) -> None:
    """Each param of a new group once, and in no existing group (torch only warns about the first)."""
    seen = {}
    for k, p in enumerate(params):
        label = f"param '{names[k]}'" if names and k < len(names) else f"param {k} (shape {tuple(p.shape)})"
        if id(p) in seen:
            raise ValueError(f"{label} of param_groups[{group_index}] is the same tensor as {seen[id(p)]} of that "
                             f"group; a param may appear once")
        seen[id(p)] = label
        for gi, g in enumerate(groups):
            if any(q is p for q in g["params"]):
                raise ValueError(f"{label} of param_groups[{group_index}] is already in param_groups[{gi}] "
                                 f"(as {param_label(groups, p)}); a param may be in one group only")

