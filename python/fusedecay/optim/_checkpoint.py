"""Loading optimizer state: every check before anything changes, and switching from another Adam.

``load_state_dict`` of AdamHD, AdamC and ScionC comes here first. A state dict is either

* **native** (its param groups carry exactly this optimizer's options): torch's semantics — the saved
  hyperparameters replace the current ones and the state is put back, dtypes kept (fp32 moments of bf16
  params stay fp32) — once every check below has passed; or
* **another Adam's** (torch ``Adam``/``AdamW`` in any of their fused/foreach/for-loop forms, or AdamHD's
  into AdamC and back; for AdamHD and AdamC only): a *switch*. The moments ``exp_avg``/``exp_avg_sq`` and
  ``step`` carry over (so bias correction continues where it was), cast to this optimizer's moment dtype;
  **the hyperparameters stay this optimizer's own** (a switch is a change of optimizer, and the old one's
  lr, betas or λ are not the new one's); AdamHD's μ is not carried: it starts from the current weights at
  the next step. Params are matched across the two optimizers in order over all groups (by
  ``param_names`` when both sides have them), so the group structure may differ. torch's AMSGrad
  ``max_exp_avg_sq`` has no counterpart and is dropped with a warning.

:func:`load_adam_state` is the switch for any target, torch's AdamW included (its own ``load_state_dict``
would take the saved hyperparameters and keep μ as an unused entry).

Checks (each raises naming the field and the param, before anything is changed): the number of param
groups and of params per group (native), the total number of params (switch), state keys that name no
param, missing or unknown state fields, and each state tensor's shape and dtype against what this
optimizer would have created for that param.
"""
from __future__ import annotations

import warnings
from itertools import chain
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from .._validate import param_label
from . import _state_format

ADAM_FIELDS = ("step", "exp_avg", "exp_avg_sq")
TORCH_ADDED_DEFAULTS = frozenset({"differentiable"})
# Adam-family state with no counterpart in a switch's target: what happens to it.
_DROPPED = {"delta_mu": None,  # μ: AdamHD's own; restarts from the weights, silently by design (documented)
            "max_exp_avg_sq": "torch AMSGrad's max_exp_avg_sq has no counterpart here and is dropped"}

# A spec says, per state field, the shape and dtype this optimizer would create for a param; None: any
# single number (``step``). Required fields must be present; optional ones may be.
Spec = Dict[str, Tuple[Tuple[int, ...], Optional[torch.dtype]]]


def _saved_params(state_dict: Mapping[str, Any]) -> List[Any]:
    return list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))


def check_dict(state_dict: Mapping[str, Any]) -> None:
    if not isinstance(state_dict, Mapping) or "state" not in state_dict or "param_groups" not in state_dict:
        raise ValueError("load_state_dict: expected a dict with 'state' and 'param_groups' (from state_dict())")


def is_native(optimizer: Optimizer, saved_groups: List[dict], all_option_keys: set, optional_keys=()) -> bool:
    """Whether every saved group carries this optimizer's options and no option of a sibling optimizer
    (``all_option_keys``: the options of every optimizer this one may receive state from)."""
    # torch's Optimizer.__setstate__ (unpickling, deepcopy) adds "differentiable" to the defaults; not an option of ours.
    own = set(optimizer.defaults) - TORCH_ADDED_DEFAULTS
    required = own - set(optional_keys)
    return all(required <= set(g) and not (set(g) & all_option_keys) - own for g in saved_groups)


def check_native(optimizer: Optimizer, state_dict: Mapping[str, Any],
                 spec: Callable[[dict, Tensor], Tuple[Spec, Spec, Sequence[Sequence[str]]]], merged_group: Callable[[dict, dict], dict]) -> None:
    """Every check of a native load (see module docstring); raises before anything is changed."""
    groups, saved_groups = optimizer.param_groups, state_dict["param_groups"]
    if len(groups) != len(saved_groups):
        raise ValueError(f"load_state_dict: param_groups: the state dict has {len(saved_groups)} groups, this "
                         f"optimizer {len(groups)}")
    for i, (g, sg) in enumerate(zip(groups, saved_groups)):
        if len(g["params"]) != len(sg["params"]):
            raise ValueError(f"load_state_dict: param_groups[{i}] has {len(sg['params'])} params in the state dict, "
                             f"{len(g['params'])} here")
    owner = {}
    for g, sg in zip(groups, saved_groups):
        group = merged_group(g, sg)
        for key, p in zip(sg["params"], g["params"]):
            owner[key] = (p, group)
    for key, st in state_dict["state"].items():
        if key not in owner:
            raise ValueError(f"load_state_dict: state has an entry for {key!r}, which no param group lists")
        if isinstance(st, Mapping) and not st:
            continue   # an empty entry (torch's state is a defaultdict: reading it makes one)
        p, group = owner[key]
        check_param_state(optimizer, p, st, *spec(group, p))


def check_param_state(optimizer: Optimizer, p: Tensor, st: Mapping[str, Any], required: Spec, optional: Spec,
                      one_of: Sequence[Sequence[str]] = ()) -> None:
    """``one_of``: alternative sets of optional fields (e.g. two formats of the same moments): exactly one set
    must be complete, and no field of another set may be present."""
    label = param_label(optimizer.param_groups, p)
    if not isinstance(st, Mapping):
        raise ValueError(f"load_state_dict: the state of {label} is a {type(st).__name__}, not a dict")
    missing = [k for k in required if k not in st]
    if missing:
        raise ValueError(f"load_state_dict: the state of {label} lacks {missing} (it has {sorted(st)}); "
                         f"is it another optimizer's state?")
    unknown = sorted(set(st) - set(required) - set(optional))
    if unknown:
        raise ValueError(f"load_state_dict: the state of {label} has fields {unknown} that "
                         f"{type(optimizer).__name__} does not keep for this param (its group, shape and dtype)")
    if one_of:
        present = [fields for fields in one_of if any(k in st for k in fields)]
        if len(present) > 1:
            raise ValueError(f"load_state_dict: the state of {label} holds moments in two formats "
                             f"({[list(f) for f in present]}; it has {sorted(st)})")
        lacking = [k for k in (present[0] if present else one_of[0]) if k not in st]
        if lacking:
            raise ValueError(f"load_state_dict: the state of {label} lacks {lacking} (it has {sorted(st)}); "
                             f"is it another optimizer's state?")
    for name, (shape, dtype) in chain(required.items(), optional.items()):
        if name in st:
            _check_field(label, name, st[name], shape, dtype)


def _check_field(label: str, name: str, v: Any, shape, dtype) -> None:
    if dtype is None:  # a single number (step)
        if isinstance(v, Tensor):
            if v.numel() != 1 or not (v.is_floating_point() or v.dtype in (torch.int32, torch.int64)):
                raise ValueError(f"load_state_dict: '{name}' of {label} must be one number, got a {v.dtype} tensor "
                                 f"of shape {tuple(v.shape)}")
        elif isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"load_state_dict: '{name}' of {label} must be a number, got {type(v).__name__}")
        return
    if not isinstance(v, Tensor):
        raise ValueError(f"load_state_dict: '{name}' of {label} must be a tensor, got {type(v).__name__}")
    if tuple(v.shape) != tuple(shape):
        raise ValueError(f"load_state_dict: '{name}' of {label} has shape {tuple(v.shape)}, expected {tuple(shape)}")
    if v.dtype != dtype:
        raise ValueError(f"load_state_dict: '{name}' of {label} has dtype {v.dtype}, expected {dtype}")


def restore_saved_tensors(optimizer: Optimizer, state_dict: Mapping[str, Any]) -> None:
    """After torch's load (which casts floating state to the param's dtype): put each saved tensor back,
    moved to the param's device only, so dtypes survive and a resume is bit-identical."""
    id_map = dict(zip(_saved_params(state_dict), chain.from_iterable(g["params"] for g in optimizer.param_groups)))
    for key, st in state_dict["state"].items():
        p = id_map[key]
        for name, v in st.items():
            if isinstance(v, Tensor):
                optimizer.state[p][name] = v.to(device=p.device)


# ----------------------------------------------------------------------------------------------
# Switching from another Adam
# ----------------------------------------------------------------------------------------------

def _named(groups: List[dict]) -> bool:
    return all(g.get("param_names") is not None and len(g["param_names"]) == len(g["params"]) for g in groups)


def _match_params(optimizer: Optimizer, state_dict: Mapping[str, Any]) -> List[Tuple[Any, Tensor]]:
    """(saved key, param) pairs: by param_names when both sides name every param, else in order. Under DCP
    (keys are parameter names, not indices) ``set_optimizer_state_dict`` has already ordered the saved
    params like this optimizer's, and the names it copies into the groups are the old optimizer's."""
    saved = _saved_params(state_dict)
    params = list(chain.from_iterable(g["params"] for g in optimizer.param_groups))
    if len(saved) != len(params):
        raise ValueError(f"load_state_dict: the state dict holds {len(saved)} params, this optimizer {len(params)} "
                         f"(a switch matches params in order over all groups)")
    saved_names = [g.get("param_names") for g in state_dict["param_groups"]]
    names = [g.get("param_names") for g in optimizer.param_groups]
    by_index = all(isinstance(k, int) for k in saved)
    if by_index and _named(state_dict["param_groups"]) and _named(optimizer.param_groups):
        by_name = dict(zip(chain.from_iterable(saved_names), saved))
        pairs = []
        for n, p in zip(chain.from_iterable(names), params):
            if n not in by_name:
                raise ValueError(f"load_state_dict: param {n!r} is not in the state dict's param_names")
            pairs.append((by_name[n], p))
        return pairs
    return list(zip(saved, params))


def adam_state_as_native(optimizer: Optimizer, state_dict: Mapping[str, Any],
                         moment_dtype: Callable[[dict, Tensor], torch.dtype], step_device: Callable[[dict, Tensor], Any],
                         extra: Callable[[dict, Tensor, dict], Dict[str, Tensor]] = lambda g, p, st: {}) -> dict:
    """A state dict in ``optimizer``'s own form holding another Adam's moments and step, and the optimizer's
    current hyperparameters; raises (changing nothing) if the state is not an Adam's."""
    check_dict(state_dict)
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    index = {id(p): i for i, p in enumerate(chain.from_iterable(g["params"] for g in optimizer.param_groups))}
    saved_state = state_dict["state"]
    known_keys = set(_saved_params(state_dict))
    stray = [k for k in saved_state if k not in known_keys]
    if stray:
        raise ValueError(f"load_state_dict: state has entries for {stray}, which no param group lists")
    new_state: Dict[int, dict] = {}
    dropped = set()
    for key, p in _match_params(optimizer, state_dict):
        st = saved_state.get(key)
        if not st:
            continue
        group = group_of[id(p)]
        label = param_label(optimizer.param_groups, p)
        if any(k in st for k in _state_format.STATE8_KEYS):   # AdamHD/AdamC 8-bit moments: checked, then decoded
            for name, (shape, dtype) in _state_format.state8_spec(p.shape).items():
                if name not in st:
                    raise ValueError(f"load_state_dict: the 8-bit moments of {label} lack '{name}' "
                                     f"(fields: {sorted(st)})")
                _check_field(label, name, st[name], shape, dtype)
            st = _state_format.full_precision_copy(p, st)
        missing = [k for k in ADAM_FIELDS if k not in st]
        unknown = sorted(set(st) - set(ADAM_FIELDS) - set(_DROPPED))
        if missing or unknown:
            raise ValueError(f"load_state_dict: the state of {label} is not an Adam's: it lacks {missing}"
                             + (f" and has {unknown}" if unknown else "") + f" (fields: {sorted(st)})")
        _check_field(label, "step", st["step"], (), None)
        for name in ("exp_avg", "exp_avg_sq"):
            v = st[name]
            if not isinstance(v, Tensor) or not v.is_floating_point() or v.shape != p.shape:
                got = f"{v.dtype} tensor of shape {tuple(v.shape)}" if isinstance(v, Tensor) else type(v).__name__
                raise ValueError(f"load_state_dict: '{name}' of {label} is a {got}, expected a floating tensor of "
                                 f"shape {tuple(p.shape)}")
        dropped |= {k for k in st if k in _DROPPED and _DROPPED[k]}
        step = st["step"]
        step = step.detach().reshape(()) if isinstance(step, Tensor) else torch.tensor(float(step))
        # Moments this optimizer keeps in 8 bits stay float32 until _finish_load encodes them: a bf16 detour would
        # round the decoded values (and so the re-derived codes and scales).
        mdt = torch.float32 if _state_format.wants_state8(group, p) else moment_dtype(group, p)
        entry = {"step": step.to(dtype=torch.float32, device=step_device(group, p)),
                 "exp_avg": st["exp_avg"].to(device=p.device, dtype=mdt),
                 "exp_avg_sq": st["exp_avg_sq"].to(device=p.device, dtype=mdt)}
        entry.update(extra(group, p, entry))
        new_state[index[id(p)]] = entry
    for k in sorted(dropped):
        warnings.warn(f"load_state_dict: {_DROPPED[k]}", stacklevel=4)
    k = 0
    groups = []
    for g in optimizer.param_groups:
        groups.append(dict(g, params=list(range(k, k + len(g["params"])))))
        k += len(g["params"])
    return {"state": new_state, "param_groups": groups}


def load_switched(optimizer: Optimizer, native: dict, load: Callable[[dict], None]) -> None:
    """Load a switch's native-form dict with ``load`` (torch's ``load_state_dict``: hooks run, the state is
    replaced at once), keeping the optimizer's own group dicts (their tensors — an lr a scheduler or a CUDA
    graph holds — stay the same objects), and the state tensors exactly as converted."""
    groups = optimizer.param_groups
    load(native)
    optimizer.param_groups = groups
    params = list(chain.from_iterable(g["params"] for g in groups))
    for i, st in native["state"].items():
        optimizer.state[params[i]].update(st)


def load_adam_state(optimizer: Optimizer, state_dict: Mapping[str, Any]) -> None:
    """Switch ``optimizer`` (torch ``Adam``/``AdamW``, AdamHD or AdamC) to the moments and step of another
    Adam's ``state_dict`` (any of the same), keeping ``optimizer``'s hyperparameters; AdamHD's μ is not carried
    (AdamHD restarts it from the current weights). See the module docstring for how params are matched."""
    from .adam_decay import _AdamDecayBase

    if isinstance(optimizer, _AdamDecayBase):
        optimizer._load_switch(state_dict)
        return
    if not isinstance(optimizer, torch.optim.Adam):
        raise TypeError(f"load_adam_state: expected torch.optim.Adam/AdamW, AdamHD or AdamC, got "
                        f"{type(optimizer).__name__}")

    def step_device(group, p):  # torch keeps step on the CPU unless fused/capturable (its load moves it then)
        return p.device if group.get("fused") or group.get("capturable") else "cpu"

    def amsgrad_max(group, p, entry):  # a fresh running max, as torch starts one
        return {"max_exp_avg_sq": torch.zeros_like(entry["exp_avg_sq"])} if group.get("amsgrad") else {}

    native = adam_state_as_native(optimizer, state_dict, lambda g, p: p.dtype, step_device, amsgrad_max)
    load_switched(optimizer, native, optimizer.load_state_dict)
