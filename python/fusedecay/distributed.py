"""Distributed training: FSDP2/DTensor-sharded params, DDP-replicated params, DCP checkpoints.

How the optimizers see a DTensor param
--------------------------------------
:class:`~fusedecay.AdamHD`, :class:`~fusedecay.AdamC` and :class:`~fusedecay.ScionC` route a param
group through :func:`adam_decay` / :func:`scionc` below (instead of :mod:`fusedecay.functional`)
whenever one of its params is a ``DTensor``: nothing to wrap, nothing to configure. State is created
with ``zeros_like(param)``, so ``exp_avg``/``exp_avg_sq``/``momentum_buffer`` are DTensors with the
param's mesh and placements; ``step`` and AdamHD's ``delta_mu`` (μ, one number per layer, identical on
every rank) stay plain 0-d tensors, which ``torch.distributed.checkpoint`` saves as replicated values,
exactly like torch's own ``step``. The fused kernels run on ``.to_local()`` views of params, grads and
states (the views share storage, so the DTensors are updated in place); element-wise work needs no
communication. The only collectives are the ones the math needs:

* AdamHD (``delta_mode`` "ema"/"mean"): δ^(l) = c·μ^(l) uses the mean |θ| of the WHOLE tensor. The
  kernel already writes each local shard's Σ|θ_t|; one ``all_reduce`` per (sharding, dtype) bucket
  sums those partial sums for all layers at once (``functional.adam_decay``'s ``abs_sum_reduce``), and
  the means divide by global numels. μ_0 = mean|θ_0| is the global mean too (one all-reduce per layer,
  first step only). AdamC and ``delta_mode="fixed"`` communicate nothing.
* ScionC ``spectral``: Newton–Schulz must see the whole matrix, never a shard. Matrices of a param
  group are sorted by shape and dealt round-robin to owner ranks; one ``all_to_all_single`` sends every
  shard to its matrix's owner, the owner runs the (batched) LMO on whole matrices, a second
  ``all_to_all_single`` returns each rank its slice. Shards travel in ``ns_dtype`` when that is
  narrower than the LMO input (NS casts to it first anyway, so this is exact); results travel in the
  input's dtype (the wider of the param's and the momentum buffer's). Replicated matrices (plain tensors under DDP after :func:`split_lmo_work`, or
  all-``Replicate`` DTensors on a 1-D mesh) are dealt the same way, and one ``all_gather`` shares the
  results. N-D weights follow their ``matrix_view``: an expert stack (E, d_out, d_in) sharded over E
  (FSDP2's default ``Shard(0)``) holds whole matrices on each rank, so each rank orthogonalises its own
  experts and nothing is sent; sharded over d_out or d_in (or a flattened conv kernel sharded on any
  dim) it is exchanged like a sharded matrix, the whole stack going to one owner.
* ScionC ``bias``: m / RMS(m) with the RMS of the whole tensor: local Σm² for all such params, one
  ``all_reduce``. ``sign``: element-wise, sign(m)/d_in with the global d_in; no communication.

Plain (non-DTensor) params never touch ``torch.distributed`` unless the user asks for it with
:func:`split_lmo_work`; the package works without an initialised process group.

Supported layouts: any mesh; ``Shard``/``Replicate`` placements for AdamHD/AdamC (Σ|θ| is reduced over
every sharded mesh dim). ScionC's spectral LMO needs a weight sharded on at most one mesh dim, with a
plain ``Shard(d)`` (FSDP2 default, ``shard_placement_fn``, HSDP); 2-D sharding (FSDP+TP)
and ``_StridedShard`` raise ``NotImplementedError``. ``Partial`` params raise ``ValueError``.
"""
from __future__ import annotations

import math
import sys
from collections import defaultdict
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import backends as _backends
from . import functional as F
from .reference.scion import RMS_EPS, matrix_batch_dims, matrix_dims

__all__ = ["is_dtensor", "has_dtensor", "local", "adam_decay", "init_delta_mu", "scionc", "DistributedLMO",
           "split_lmo_work"]


# ----------------------------------------------------------------------------------------------
# DTensor helpers
# ----------------------------------------------------------------------------------------------

def _dtensor_cls():
    # No DTensor can exist before torch.distributed.tensor is imported, so plain single-GPU users
    # never pay for importing it (about a second).
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None) if mod is not None else None


def is_dtensor(t: Any) -> bool:
    cls = _dtensor_cls()
    return cls is not None and isinstance(t, cls)


def has_dtensor(tensors: Sequence[Any]) -> bool:
    cls = _dtensor_cls()
    return cls is not None and any(isinstance(t, cls) for t in tensors)


def local(t: Tensor) -> Tensor:
    """This rank's part of ``t``: the local shard of a DTensor (a view sharing its storage), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def _local_like(t: Tensor, param: Tensor, what: str) -> Tensor:
    """Local view of a grad/state of a DTensor param, after checking it is laid out like the param."""
    if not is_dtensor(t) or t.device_mesh != param.device_mesh or tuple(t.placements) != tuple(param.placements):
        got = f"placements {tuple(t.placements)}" if is_dtensor(t) else f"a plain {type(t).__name__}"
        raise ValueError(f"fusedecay: {what} of a DTensor param with placements {tuple(param.placements)} "
                         f"must be a DTensor laid out like it, got {got}")
    return t.to_local()


def _layout_key(p: Tensor):
    """Params with equal keys share their collectives: (mesh, placements), or None for plain tensors."""
    if not is_dtensor(p):
        return None
    for pl in p.placements:
        if pl.is_partial():
            raise ValueError(f"fusedecay: params with Partial placements are not supported (got {tuple(p.placements)})")
    return (p.device_mesh, tuple(p.placements))


def _shard_groups(key) -> List[Any]:
    """Process groups of the mesh dims a tensor is sharded over (empty for replicated/plain)."""
    if key is None:
        return []
    mesh, placements = key
    return [mesh.get_group(d) for d, pl in enumerate(placements) if pl.is_shard()]


def _all_reduce_over(groups: List[Any]) -> Optional[Callable[[Tensor], Tensor]]:
    if not groups:
        return None
    import torch.distributed as dist

    def reduce(x: Tensor) -> Tensor:
        for g in groups:
            dist.all_reduce(x, group=g)  # sum; enqueued on the device stream, no host sync
        return x

    return reduce


def _group_indices(params: Sequence[Tensor]) -> Dict[Any, List[int]]:
    out: Dict[Any, List[int]] = defaultdict(list)  # insertion order = first appearance: same on every rank
    for i, p in enumerate(params):
        out[_layout_key(p)].append(i)
    return out


# ----------------------------------------------------------------------------------------------
# AdamHD / AdamC
# ----------------------------------------------------------------------------------------------

def init_delta_mu(param: Tensor, backend: str = "auto") -> Tensor:
    """μ_0 = mean|θ_0| over the whole (unsharded) tensor, as a plain 0-d tensor equal on all ranks."""
    if not is_dtensor(param):
        return F.init_delta_mu(param, backend)
    s = F.abs_sum(param.to_local().detach(), backend)
    reduce = _all_reduce_over(_shard_groups(_layout_key(param)))
    if reduce is not None:
        s = reduce(s)
    return s / max(param.numel(), 1)  # DTensor.numel() is the global numel


def adam_decay(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor], exp_avg_sqs: List[Tensor],
               state_steps: List[Tensor], delta_mus: Optional[List[Tensor]], *,
               numels: Optional[Sequence[int]] = None, abs_sum_reduce: Optional[Callable[[Tensor], Tensor]] = None,
               exp_avg_scales: Optional[Sequence[Optional[Tensor]]] = None,
               exp_avg_sq_scales: Optional[Sequence[Optional[Tensor]]] = None, **kwargs) -> None:
    """:func:`fusedecay.functional.adam_decay` for lists that may hold DTensors.

    Params are split by layout (mesh, placements); each part runs the functional step on local
    views, with global numels and one all-reduce of Σ|θ| per bucket. ``numels``/``abs_sum_reduce``
    given by the caller apply to the plain-tensor part only (a DTensor knows its own). 8-bit state
    (``exp_avg_scales``) runs on the local codes and scales: its blocks are whole dim-0 rows, so a
    ``Shard(0)`` shard holds whole blocks and the numerics do not depend on the world size.
    """
    pick = lambda lst, idx: None if lst is None else [lst[i] for i in idx]  # noqa: E731
    for key, idx in _group_indices(params).items():
        if key is None:
            F.adam_decay(pick(params, idx), pick(grads, idx), pick(exp_avgs, idx), pick(exp_avg_sqs, idx),
                         pick(state_steps, idx), pick(delta_mus, idx), numels=pick(numels, idx),
                         abs_sum_reduce=abs_sum_reduce, exp_avg_scales=pick(exp_avg_scales, idx),
                         exp_avg_sq_scales=pick(exp_avg_sq_scales, idx), **kwargs)
            continue
        ps = [params[i] for i in idx]
        scales = lambda lst, what: None if lst is None else [  # noqa: E731
            None if lst[i] is None else _local_like(lst[i], params[i], what) for i in idx]
        F.adam_decay([p.to_local() for p in ps],
                     [_local_like(grads[i], params[i], "grad") for i in idx],
                     [_local_like(exp_avgs[i], params[i], "exp_avg") for i in idx],
                     [_local_like(exp_avg_sqs[i], params[i], "exp_avg_sq") for i in idx],
                     [local(state_steps[i]) for i in idx],
                     None if delta_mus is None else [local(delta_mus[i]) for i in idx],
                     numels=[p.numel() for p in ps], abs_sum_reduce=_all_reduce_over(_shard_groups(key)),
                     exp_avg_scales=scales(exp_avg_scales, "exp_avg_scales"),
                     exp_avg_sq_scales=scales(exp_avg_sq_scales, "exp_avg_sq_scales"), **kwargs)


# ----------------------------------------------------------------------------------------------
# ScionC
# ----------------------------------------------------------------------------------------------

def split_lmo_work(optimizer, group=None):
    """Share ScionC's spectral LMO work across the ranks of ``group`` (default: the world) for
    params that are replicated plain tensors, as under DDP: each rank runs Newton–Schulz on its
    round-robin share of the matrices and one ``all_gather`` per step gives everyone all results.

    Needs an initialised process group (raises otherwise); DTensor params need no call.
    Returns the optimizer.
    """
    import torch.distributed as dist

    if not hasattr(optimizer, "_lmo_process_group"):
        raise TypeError(f"split_lmo_work applies to fusedecay.ScionC, got {type(optimizer).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("split_lmo_work needs an initialised process group (torch.distributed.init_process_group)")
    optimizer._lmo_process_group = group if group is not None else dist.group.WORLD
    return optimizer


def _backend_lmo_fn(backend: str, device: torch.device, dtype: torch.dtype) -> Callable[..., List[Tensor]]:
    """The LMO ``functional.scionc`` would use for this backend on whole (local) tensors."""
    if backend != "reference":
        try:
            fn = _backends.resolve(backend, device, dtype, op="scion_directions").op("scion_directions")
            if fn is not None:
                return fn
        except RuntimeError:
            if backend != "auto":
                raise
    return F.scion_directions_reference


def scionc(params: List[Tensor], grads: List[Tensor], momentum_buffers: List[Tensor], *, backend: str = "auto",
           lmo_fn: Optional[Callable[..., List[Tensor]]] = None, replicated_group=None, **kwargs) -> None:
    """:func:`fusedecay.functional.scionc` for lists that may hold DTensors (or replicated tensors
    whose LMO work is split over ``replicated_group``). ``lmo_fn`` (default: the backend's) is what
    runs on whole matrices."""
    if not params:
        return
    layouts = [(_layout_key(p), tuple(p.shape)) for p in params]
    lp = [local(p) for p in params]
    lg = [_local_like(g, p, "grad") if is_dtensor(p) else g for p, g in zip(params, grads)]
    lb = [_local_like(b, p, "momentum_buffer") if is_dtensor(p) else b for p, b in zip(params, momentum_buffers)]
    inner = lmo_fn or _backend_lmo_fn(backend, lp[0].device, lp[0].dtype)
    F.scionc(lp, lg, lb, backend=backend, lmo_fn=DistributedLMO(layouts, inner, replicated_group), **kwargs)


def _chunk_sizes(n: int, world: int) -> List[int]:
    """Sizes of ``torch.chunk(n, world)`` padded with empty chunks: the DTensor/FSDP2 Shard layout."""
    c = -(-n // world) if n else 0
    return [max(0, min(c, n - r * c)) for r in range(world)]


def _shard_shape(shape: Tuple[int, ...], dim: int, size: int) -> Tuple[int, ...]:
    return shape[:dim] + (size,) + shape[dim + 1:]


class DistributedLMO:
    """An ``lmo_fn`` for :func:`fusedecay.functional.scionc` whose inputs are local views.

    ``layouts[i]`` = (layout key, global shape) of input i (key None: a plain tensor); ``inner`` is
    the LMO applied to whole tensors; ``replicated_group`` (or None) is where plain matrices' NS
    work is split. Every rank must call it with the same layouts in the same order.
    """

    def __init__(self, layouts, inner: Callable[..., List[Tensor]], replicated_group=None):
        self.layouts = layouts
        self.inner = inner
        self.replicated_group = replicated_group

    def __call__(self, inputs: List[Tensor], *, lmo: str, ns_steps: int, ns: str,
                 ns_dtype: Optional[torch.dtype], matrix_view: str = "auto") -> List[Tensor]:
        if len(inputs) != len(self.layouts):
            raise ValueError(f"DistributedLMO built for {len(self.layouts)} tensors, called with {len(inputs)}")
        kw = dict(lmo=lmo, ns_steps=ns_steps, ns=ns, ns_dtype=ns_dtype, matrix_view=matrix_view)
        out: List[Optional[Tensor]] = [None] * len(inputs)
        own: List[int] = []  # whole tensors on this rank, computed here
        if lmo == "sign":
            for i, (key, shape) in enumerate(self.layouts):
                if key is None:
                    own.append(i)
                else:  # element-wise; d_in from the global shape
                    out[i] = torch.sign(inputs[i]) / matrix_dims(shape, matrix_view)[1]
        elif lmo == "bias":
            self._bias(inputs, out, own)
        elif lmo == "spectral":
            self._spectral(inputs, out, own, kw)
        else:
            raise ValueError(f"unknown lmo {lmo!r}")
        if own:
            for i, d in zip(own, self.inner([inputs[i] for i in own], **kw)):
                out[i] = d
        return out

    # -- bias: m / RMS(m), RMS over the whole tensor ----------------------------------------------
    def _bias(self, inputs, out, own):
        by_groups: Dict[Any, List[int]] = defaultdict(list)
        for i, (key, _) in enumerate(self.layouts):
            groups = _shard_groups(key)
            if not groups:
                own.append(i)  # plain or replicated: the whole tensor is here
            else:
                by_groups[(key, inputs[i].dtype)].append(i)
        for (key, dtype), idx in by_groups.items():
            acc = F._mu_dtype(dtype)
            sq = torch.stack([inputs[i].square().sum(dtype=acc) for i in idx])        # local Σm²
            _all_reduce_over(_shard_groups(key))(sq)                                   # one all-reduce
            numels = [float(max(math.prod(self.layouts[i][1]), 1)) for i in idx]              # global sizes
            inv_rms = torch._foreach_add(torch._foreach_div(list(sq.unbind(0)), numels), RMS_EPS)
            torch._foreach_rsqrt_(inv_rms)
            for i, r in zip(idx, inv_rms):
                out[i] = inputs[i] * r.to(dtype)

    # -- spectral: NS of whole matrices on owner ranks --------------------------------------------
    def _spectral(self, inputs, out, own, kw):
        sharded: Dict[Any, List[int]] = defaultdict(list)     # process group -> inputs sharded over it
        replicated: Dict[Any, List[int]] = defaultdict(list)  # process group -> whole inputs to share work on
        shard_dim: Dict[int, int] = {}                        # input -> the matrix dim it is sharded on
        for i, (key, shape) in enumerate(self.layouts):
            if key is None:
                if self.replicated_group is not None:
                    replicated[self.replicated_group].append(i)
                else:
                    own.append(i)
                continue
            mesh, placements = key
            mesh_dims = [d for d, pl in enumerate(placements) if pl.is_shard()]
            if not mesh_dims:  # all Replicate: share the work on a 1-D mesh, else compute it here
                if mesh.ndim == 1:
                    replicated[mesh.get_group(0)].append(i)
                else:
                    own.append(i)
                continue
            pl = placements[mesh_dims[0]]
            if len(mesh_dims) > 1 or type(pl).__name__ != "Shard":
                raise NotImplementedError(
                    f"fusedecay: the spectral LMO supports matrices sharded on one mesh dim with Shard(0)/Shard(1); "
                    f"got placements {placements} (sharded on several mesh dims, or strided)")
            dim = pl.dim % len(shape)
            if dim in matrix_batch_dims(len(shape), kw["matrix_view"]):
                own.append(i)  # sharded over a dim that indexes matrices (an expert stack's E): whole ones are local
                continue
            sharded[mesh.get_group(mesh_dims[0])].append(i)
            shard_dim[i] = dim
        for group, idx in sharded.items():
            for ids in _by_dtype(idx, inputs):
                self._exchange_sharded(group, ids, shard_dim, inputs, out, kw)
        for group, idx in replicated.items():
            for ids in _by_dtype(idx, inputs):
                self._gather_replicated(group, ids, inputs, out, kw)

    def _deal(self, idx: List[int], world: int) -> Tuple[List[int], Dict[int, int]]:
        """Round-robin owners after a stable sort by shape, so same-shape matrices batch on owners."""
        order = sorted(idx, key=lambda i: self.layouts[i][1])
        return order, {i: k % world for k, i in enumerate(order)}

    def _exchange_sharded(self, group, idx, shard_dim, inputs, out, kw):
        """Whole-matrix LMO of matrices sharded over ``group``: two all_to_all_single."""
        import torch.distributed as dist

        world, me = dist.get_world_size(group), dist.get_rank(group)
        order, owner = self._deal(idx, world)
        mine = [i for i in order if owner[i] == me]
        owned_by = [[i for i in order if owner[i] == r] for r in range(world)]
        dtype, dev = inputs[idx[0]].dtype, inputs[idx[0]].device
        sizes = {i: _chunk_sizes(self.layouts[i][1][shard_dim[i]], world) for i in idx}   # rows/cols per rank
        shard_shape = lambda i, r: _shard_shape(self.layouts[i][1], shard_dim[i], sizes[i][r])  # noqa: E731
        for i in idx:
            if tuple(inputs[i].shape) != shard_shape(i, me):
                raise ValueError(f"fusedecay: local shard of shape {tuple(inputs[i].shape)} where "
                                 f"Shard({shard_dim[i]}) of {self.layouts[i][1]} over {world} ranks gives "
                                 f"{shard_shape(i, me)}")
        to_owner = [sum(inputs[i].numel() for i in owned_by[r]) for r in range(world)]   # what I send rank r
        from_rank = [sum(math.prod(shard_shape(i, r)) for i in mine) for r in range(world)]  # what r sends me

        # 1) every shard to its matrix's owner. NS casts to ns_dtype first, so shards may travel in it.
        ns_dtype = kw["ns_dtype"]
        wire = ns_dtype if ns_dtype is not None and ns_dtype.itemsize < dtype.itemsize else dtype
        send = [inputs[i].reshape(-1).to(wire) for r in range(world) for i in owned_by[r]]
        recv = torch.empty(sum(from_rank), dtype=wire, device=dev)
        dist.all_to_all_single(recv, torch.cat(send) if send else recv.new_empty(0), from_rank, to_owner, group=group)

        # 2) owners reassemble whole matrices (rank order is shard order) and run the LMO on them
        parts: Dict[int, List[Tensor]] = defaultdict(list)
        flat = iter(recv.split([math.prod(shard_shape(i, r)) for r in range(world) for i in mine]))
        for r in range(world):
            for i in mine:
                parts[i].append(next(flat).view(shard_shape(i, r)))
        whole = [torch.cat(parts[i], dim=shard_dim[i]).to(dtype) for i in mine]
        dirs = self.inner(whole, **kw) if whole else []

        # 3) every rank gets its slice of each result, in the buffer's dtype
        back = [d.narrow(shard_dim[i], sum(sizes[i][:r]), sizes[i][r]).reshape(-1).to(dtype)
                for r in range(world) for i, d in zip(mine, dirs)]
        result = torch.empty(sum(to_owner), dtype=dtype, device=dev)
        dist.all_to_all_single(result, torch.cat(back) if back else result.new_empty(0), to_owner, from_rank,
                               group=group)
        mine_in_order = [i for r in range(world) for i in owned_by[r]]
        for i, piece in zip(mine_in_order, result.split([inputs[i].numel() for i in mine_in_order])):
            out[i] = piece.view(inputs[i].shape)

    def _gather_replicated(self, group, idx, inputs, out, kw):
        """LMO of whole matrices present on every rank of ``group``: a share each, one all_gather."""
        import torch.distributed as dist

        world, me = dist.get_world_size(group), dist.get_rank(group)
        order, owner = self._deal(idx, world)
        owned_by = [[i for i in order if owner[i] == r] for r in range(world)]
        dirs = self.inner([inputs[i] for i in owned_by[me]], **kw) if owned_by[me] else []
        slot = max(1, max(sum(inputs[i].numel() for i in ids) for ids in owned_by))  # all_gather: equal sizes
        buf = inputs[idx[0]].new_zeros(slot)
        if dirs:
            flat = torch.cat([d.reshape(-1).to(buf.dtype) for d in dirs])
            buf[:flat.numel()].copy_(flat)
        gathered = buf.new_empty(world * slot)
        dist.all_gather(list(gathered.split(slot)), buf, group=group)
        for r, ids in enumerate(owned_by):
            numels = [inputs[i].numel() for i in ids]
            for i, piece in zip(ids, gathered.narrow(0, r * slot, sum(numels)).split(numels)):
                out[i] = piece.view(inputs[i].shape)


def _by_dtype(idx: List[int], inputs: List[Tensor]) -> List[List[int]]:
    groups: Dict[torch.dtype, List[int]] = defaultdict(list)
    for i in idx:
        groups[inputs[i].dtype].append(i)
    return list(groups.values())
