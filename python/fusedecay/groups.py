"""Param groups by role: point AdamW, AdamHD, AdamC or ScionC at an ``nn.Module``.

The three optimizers treat params differently by the role each plays in the network, and getting the
split wrong is silent: it trains, just differently. :func:`param_groups` makes the split once, by rules
a user can read in the summary it prints before training:

    role        what it is                                   AdamW/AdamHD        AdamC               ScionC
    hidden      every other matrix (ndim >= 2): attention,   decay λ             corrected decay     spectral LMO,
                MLP, conv kernels, expert stacks, routers                                            corrected (C²)
    embedding   input embedding tables (nn.Embedding,        decay λ (none with  corrected decay     sign LMO, plain
                nn.EmbeddingBag) that are not the head       decay_embeddings=False)                 decay γλ
    output      the output layer, tied to an embedding       decay λ             plain decay         sign LMO, plain
                or not                                                           (uncorrected)       decay γλ
    norm        params of normalisation layers (gains)       none                none                bias LMO, none
    bias        every other param with < 2 dims              none                none                bias LMO, none

Why: the output layer's update stays correlated with its weights, so the corrected decay (AdamC, ScionC)
does not apply to it (Chou, arXiv 2512.08217); gains and biases are not decayed (usual practice; AdamHD's
decay mask); embeddings are decayed unless ``decay_embeddings=False``.

The output layer is, first that applies:
  1. the params named by ``output=`` or given role "output" by an override;
  2. ``model.get_output_embeddings().weight`` (transformers' protocol; any model may define it, e.g. one
     that ties its head functionally with ``F.linear(x, self.wte.weight)``);
  3. a param registered both under an embedding module and another module (tying by assignment);
  4. the weight of the last module holding params, if that module is an ``nn.Linear`` (classifiers,
     conv nets, untied LM heads).
Otherwise :func:`param_groups` raises and asks for ``output="name"`` (or ``output=None``: no output layer).

ScionC reads N-D weights through a ``matrix_view`` (see :mod:`fusedecay.reference.scion`), set here from
the module type: conv kernels "flatten" to (d_out, d_in·k·k); transformers' ``Conv1D`` (GPT-2), stored
(d_in, d_out), is "transposed"; any other N-D weight (an MoE expert stack (E, d_out, d_in)) is a "batch"
of matrices. An override can choose another view (e.g. "taps" for convs).

Hyperparameters are not set here (lr, λ, radius come from the optimizer's constructor) except what the
role decides; ``options={role: {...}}`` adds per-role values (e.g. ScionC's radius for the sign layers).
Overrides map a param name (a regex, matched in full against each of the param's names, tied aliases
included) or a callable ``(name, param) -> bool`` to a role or a dict of group options (which may hold
"role"). A param matched by two overrides, or an override that matches no param, is an error. Frozen
params (``requires_grad=False``) are left out.
"""
from __future__ import annotations

import inspect
import re
import sys
from collections import defaultdict
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

ROLES = ("hidden", "embedding", "output", "norm", "bias")
OPTIMIZERS = ("adamw", "adamhd", "adamc", "scionc")

Override = Union[str, Callable[[str, Tensor], bool]]


# ----------------------------------------------------------------------------------------------
# Roles
# ----------------------------------------------------------------------------------------------

_NORM_NAME = re.compile(r"Norm(\dd)?$")  # LayerNorm, RMSNorm, BatchNorm2d, LlamaRMSNorm, T5LayerNorm, ...


def _is_norm(m: nn.Module) -> bool:
    return isinstance(m, (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)) or bool(
        _NORM_NAME.search(type(m).__name__))


def _is_embedding(m: nn.Module) -> bool:
    return isinstance(m, (nn.Embedding, nn.EmbeddingBag))


def _is_transposed_linear(m: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored (d_in, d_out)."""
    mod = sys.modules.get("transformers.pytorch_utils")
    cls = getattr(mod, "Conv1D", None) if mod is not None else None
    return cls is not None and isinstance(m, cls)


class _Param:
    """One trainable param with every name it is registered under and the modules that own it."""

    def __init__(self, name: str, param: Tensor):
        self.name = name
        self.param = param
        self.aliases: List[str] = []
        self.owners: List[nn.Module] = []


def _collect(model: nn.Module) -> Tuple[List[_Param], int]:
    """Trainable params in ``named_parameters()`` order (tied params once), and the frozen count."""
    found: Dict[int, _Param] = {}
    frozen = 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            found[id(p)] = _Param(name, p)
        else:
            frozen += 1
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for attr, p in mod.named_parameters(recurse=False):
            entry = found.get(id(p))
            if entry is not None:
                full = f"{mod_name}.{attr}" if mod_name else attr
                if full not in entry.aliases:
                    entry.aliases.append(full)
                if all(o is not mod for o in entry.owners):
                    entry.owners.append(mod)
    return list(found.values()), frozen


def _find_output(model: nn.Module, params: List[_Param]) -> Tuple[Optional[_Param], str]:
    """The output layer's weight by rules 2–4 of the module docstring, and which rule found it."""
    by_id = {id(e.param): e for e in params}
    get_out = getattr(model, "get_output_embeddings", None)
    if callable(get_out):
        head = get_out()
        w = getattr(head, "weight", None) if head is not None else None
        if isinstance(w, Tensor) and id(w) in by_id:
            return by_id[id(w)], "found by model.get_output_embeddings()"
    tied = [e for e in params if any(_is_embedding(o) for o in e.owners) and any(not _is_embedding(o) for o in e.owners)]
    if len(tied) == 1:
        return tied[0], "found tied to an embedding"
    if len(tied) > 1:
        raise ValueError(f"param_groups: several params are tied between an embedding and another module "
                         f"({', '.join(e.name for e in tied)}); name the output layer with output='...'")
    last = None
    for mod in model.modules():
        if any(True for _ in mod.parameters(recurse=False)):
            last = mod
    if isinstance(last, nn.Linear) and id(last.weight) in by_id:
        return by_id[id(last.weight)], "found as the last layer, an nn.Linear"
    return None, ""


def _resolve_output_name(model: nn.Module, params: List[_Param], name: str) -> _Param:
    for e in params:
        if name in e.aliases:
            return e
    modules = dict(model.named_modules())
    w = getattr(modules.get(name), "weight", None)
    for e in params:
        if w is not None and e.param is w:
            return e
    raise ValueError(f"param_groups: output={name!r} names no trainable param or module with a weight")


def _matches(key: Override, entry: _Param) -> bool:
    if callable(key):
        return any(bool(key(n, entry.param)) for n in entry.aliases)
    return any(re.fullmatch(key, n) for n in entry.aliases)


def _apply_overrides(params: List[_Param], overrides: Mapping[Override, Any]) -> Dict[int, Tuple[Override, dict]]:
    """Per param (by id): the override that names it and its options; errors for twice-named params and
    overrides that name nothing."""
    named: Dict[int, Tuple[Override, dict]] = {}
    for key, value in overrides.items():
        if not (isinstance(key, str) or callable(key)):
            raise TypeError(f"param_groups: override keys are regex strings or callables (name, param) -> bool, "
                            f"got {key!r}")
        if isinstance(value, str):
            opts = {"role": value}
        elif isinstance(value, Mapping):
            opts = dict(value)
        else:
            raise TypeError(f"param_groups: override {key!r} must map to a role name or a dict of group options, "
                            f"got {value!r}")
        if "role" in opts and opts["role"] not in ROLES:
            raise ValueError(f"param_groups: override {key!r} gives unknown role {opts['role']!r} "
                             f"(expected one of {ROLES})")
        hits = [e for e in params if _matches(key, e)]
        if not hits:
            raise ValueError(f"param_groups: override {key!r} matches no trainable param")
        for e in hits:
            if id(e.param) in named:
                raise ValueError(f"param_groups: param {e.name!r} is named by two overrides: "
                                 f"{named[id(e.param)][0]!r} and {key!r}")
            named[id(e.param)] = (key, opts)
    return named


def _auto_role(e: _Param, outputs: set) -> str:
    if id(e.param) in outputs:
        return "output"
    if e.param.ndim >= 2:
        return "embedding" if any(_is_embedding(o) for o in e.owners) else "hidden"
    return "norm" if any(_is_norm(o) for o in e.owners) else "bias"


def _assign(model: nn.Module, output, overrides) -> Tuple[List[Tuple[_Param, str, dict]], int, str]:
    """(param, role, override options) for every trainable param, the frozen count, how the head was found."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups needs an nn.Module, got {type(model).__name__}")
    params, frozen = _collect(model)
    named = _apply_overrides(params, overrides or {})
    outputs = {k for k, (_, o) in named.items() if o.get("role") == "output"}
    how = "named by an override" if outputs else ""
    if output is not None and output != "auto":
        if not isinstance(output, str):
            raise TypeError(f"param_groups: output must be 'auto', a param or module name, or None; got {output!r}")
        outputs.add(id(_resolve_output_name(model, params, output).param))
        how = "named by output="
    elif output == "auto" and not outputs:
        head, how = _find_output(model, params)
        if head is None:
            raise ValueError("param_groups: could not find the output layer (no get_output_embeddings(), no weight "
                             "tied to an embedding, and the last layer is not an nn.Linear); name it with "
                             "output='<param or module name>', or pass output=None if the model has none")
        outputs.add(id(head.param))
    for e in params:
        if id(e.param) in outputs and e.param.ndim < 2:
            raise ValueError(f"param_groups: the output layer must be a matrix, got {e.name!r} of shape "
                             f"{tuple(e.param.shape)}")
    out = []
    for e in params:
        opts = dict(named.get(id(e.param), (None, {}))[1])
        role = opts.pop("role", None) or _auto_role(e, outputs)
        out.append((e, role, opts))
    return out, frozen, how or "output=None"


def param_roles(model: nn.Module, *, output: Optional[str] = "auto",
                overrides: Optional[Mapping[Override, Any]] = None) -> Dict[str, List[Tuple[str, nn.Parameter]]]:
    """{role: [(name, param), ...]} for every trainable param of ``model`` (roles in :data:`ROLES` order).

    The same assignment :func:`param_groups` uses; ``output`` and ``overrides`` as there (override
    options other than "role" are ignored here, as they only shape the groups)."""
    assigned, _, _ = _assign(model, output, overrides)
    roles: Dict[str, List[Tuple[str, nn.Parameter]]] = {r: [] for r in ROLES}
    for e, role, _ in assigned:
        roles[role].append((e.name, e.param))
    return roles


# ----------------------------------------------------------------------------------------------
# Groups per optimizer
# ----------------------------------------------------------------------------------------------

def _optimizer_name(optimizer) -> str:
    if isinstance(optimizer, str):
        name = optimizer.lower()
    else:
        name = getattr(optimizer, "__name__", type(optimizer).__name__).lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"param_groups: unknown optimizer {optimizer!r} (expected one of {OPTIMIZERS} or the class)")
    return name


def _optimizer_class(name: str):
    from . import optim
    return {"adamw": torch.optim.AdamW, "adamhd": optim.AdamHD, "adamc": optim.AdamC, "scionc": optim.ScionC}[name]


def _group_keys(name: str) -> set:
    """The group options ``name``'s optimizer understands (its constructor's keyword arguments)."""
    sig = inspect.signature(_optimizer_class(name).__init__)
    return {k for k in sig.parameters if k not in ("self", "params")}


def _matrix_view(e: _Param) -> Optional[str]:
    """ScionC's matrix_view for a hidden weight, from the module that owns it (None: a plain 2-D matrix)."""
    if any(_is_transposed_linear(o) for o in e.owners):
        return "transposed"
    if e.param.ndim <= 2:
        return None
    if any(isinstance(o, nn.modules.conv._ConvNd) for o in e.owners):
        return "flatten"
    return "batch"


def _role_options(name: str, role: str, e: _Param, tied_embedding: bool, decay_embeddings: bool) -> dict:
    """The group options the role decides for optimizer ``name`` (see the module docstring's table)."""
    no_decay = role in ("norm", "bias") or (not decay_embeddings and (role == "embedding" or tied_embedding))
    if name == "scionc":
        if role == "hidden":
            view = _matrix_view(e)
            return dict(lmo="spectral", corrected=True, weight_decay=0.0, **({"matrix_view": view} if view else {}))
        if role in ("embedding", "output"):
            opts = dict(lmo="sign", corrected=False)
            if any(_is_transposed_linear(o) for o in e.owners):
                opts["matrix_view"] = "transposed"
            return dict(opts, weight_decay=0.0) if no_decay else opts
        return dict(lmo="bias", corrected=False, weight_decay=0.0)
    opts: Dict[str, Any] = {"weight_decay": 0.0} if no_decay else {}
    if role == "output" and name in ("adamhd", "adamc"):
        opts["corrected"] = False
    return opts


def _hashable(v):
    if isinstance(v, Tensor):
        return ("tensor", id(v))
    if isinstance(v, (list, tuple)):
        return tuple(_hashable(x) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _hashable(x)) for k, x in v.items()))
    return v


class ParamGroups(list):
    """The param groups (a list of dicts, ready for the optimizer) plus what decided them.

    ``print(groups)`` shows the summary table; ``groups.roles`` maps each param name to its role and
    ``groups.group_roles[i]`` is the role of group i."""

    def __init__(self, groups: List[dict], group_roles: List[str], optimizer: str, roles: Dict[str, str],
                 aliases: Dict[str, List[str]], output_found_by: str, frozen: int):
        super().__init__(groups)
        self.group_roles = group_roles
        self.optimizer = optimizer
        self.roles = roles
        self.aliases = aliases  # name -> every name the param is registered under (tied params: several)
        self.output_found_by = output_found_by
        self.frozen = frozen

    def _shown(self, name: str) -> str:
        return " = ".join(self.aliases.get(name, [name]))

    def summary(self) -> str:
        scion = self.optimizer == "scionc"
        head = ["group", "role"] + (["lmo", "view"] if scion else []) + ["decay", "shape", "params", "names"]
        rows = []
        for gi, (g, role) in enumerate(zip(self, self.group_roles)):
            by_shape: Dict[tuple, List[str]] = defaultdict(list)
            for n, p in zip(g["param_names"], g["params"]):
                by_shape[tuple(p.shape)].append(n)
            for shape, names in by_shape.items():
                cols = [str(gi), role]
                if scion:
                    cols += [g.get("lmo", "spectral"), g.get("matrix_view", "")]
                cols += [_decay_text(self.optimizer, g), str(shape), str(len(names)),
                         self._shown(names[0]) + (f" (+{len(names) - 1} more)" if len(names) > 1 else "")]
                rows.append(cols)
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        outputs = [self._shown(n) for n, r in self.roles.items() if r == "output"]
        lines = [f"param groups for {self.optimizer}: {sum(len(g['params']) for g in self)} params in {len(self)} "
                 f"groups; output layer: {', '.join(outputs) or 'none'} ({self.output_found_by})", fmt(head)]
        lines += [fmt(r) for r in rows]
        counts = defaultdict(lambda: [0, 0])
        for g, role in zip(self, self.group_roles):
            counts[role][0] += len(g["params"])
            counts[role][1] += sum(p.numel() for p in g["params"])
        per_role = " | ".join(f"{r} {counts[r][0]} ({counts[r][1]:,})" for r in ROLES if r in counts)
        lines.append(f"params (elements) per role: {per_role}"
                     + (f"; frozen, not in any group: {self.frozen}" if self.frozen else ""))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


def _decay_text(optimizer: str, g: dict) -> str:
    wd_zero = "weight_decay" in g and not isinstance(g["weight_decay"], Tensor) and g["weight_decay"] == 0
    if optimizer == "scionc":
        if g.get("corrected", True):
            return "corrected (C²)"
        return "none" if wd_zero else "plain γλ"
    if wd_zero:
        return "none"
    if optimizer == "adamw":
        return "λ"
    corrected = g.get("corrected", optimizer == "adamc")
    kind = "Huber λ" if optimizer == "adamhd" else "λ"
    return f"{kind}, corrected" if corrected else (f"{kind}, plain" if optimizer == "adamc" else kind)


def param_groups(model: nn.Module, optimizer, *, output: Optional[str] = "auto",
                 overrides: Optional[Mapping[Override, Any]] = None,
                 options: Optional[Mapping[str, Mapping[str, Any]]] = None,
                 decay_embeddings: bool = True) -> ParamGroups:
    """Param groups of ``model`` for ``optimizer`` ("adamw" | "adamhd" | "adamc" | "scionc", or the class).

    Args:
        output: "auto" (find the output layer, see module docstring), a param or module name, or None.
        overrides: {regex or callable(name, param) -> bool: role name | dict of group options (may hold
            "role")}. Each param may be named by at most one override; each override must name a param.
        options: {role: dict of group options} added to every group of that role.
        decay_embeddings: False leaves input embeddings (and a head tied to one) undecayed.

    Returns a :class:`ParamGroups`: pass it to the optimizer; ``print`` it to see the assignment. Each group
    carries ``param_names`` (torch's convention) so errors and checkpoints can name params.
    """
    name = _optimizer_name(optimizer)
    assigned, frozen, how = _assign(model, output, overrides)
    known = _group_keys(name)
    for role, opts in (options or {}).items():
        if role not in ROLES:
            raise ValueError(f"param_groups: options for unknown role {role!r} (expected one of {ROLES})")
        _check_keys(name, known, opts, f"options[{role!r}]")
    tied_ids = {id(e.param) for e, role, _ in assigned
                if role == "output" and any(_is_embedding(o) for o in e.owners)}
    buckets: Dict[tuple, dict] = {}
    order: Dict[str, List[tuple]] = {r: [] for r in ROLES}
    for e, role, over in assigned:
        _check_keys(name, known, over, f"override for {e.name!r}")
        opts = _role_options(name, role, e, id(e.param) in tied_ids, decay_embeddings)
        opts.update((options or {}).get(role, {}))
        opts.update(over)
        key = (role, _hashable(opts))
        if key not in buckets:
            buckets[key] = dict(opts, params=[], param_names=[])
            order[role].append(key)
        buckets[key]["params"].append(e.param)
        buckets[key]["param_names"].append(e.name)
    keys = [k for r in ROLES for k in order[r]]
    roles = {e.name: role for e, role, _ in assigned}
    aliases = {e.name: e.aliases for e, _, _ in assigned}
    return ParamGroups([buckets[k] for k in keys], [k[0] for k in keys], name, roles, aliases, how, frozen)


def _check_keys(name: str, known: set, opts: Mapping[str, Any], where: str) -> None:
    bad = sorted(set(opts) - known - {"role"})
    if bad:
        raise ValueError(f"param_groups: {where} has options {bad} that {name} does not take "
                         f"(it takes {sorted(known)})")
