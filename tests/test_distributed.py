"""FSDP2 / DDP / DCP tests on CPU: 2 gloo processes, spawned once for the whole module.

The spawned workers run every distributed check (``_CHECKS``) and write, per rank, which passed and
the traceback of each that failed; the pytest functions below each assert one check's outcome.
References are single-process runs of the same optimizer on the same global batches, done on every
rank; shards are compared with the matching slice of the reference (``_slice``).
"""
import copy
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from fusedecay import AdamC, AdamHD, ScionC
from fusedecay import distributed as fd
from fusedecay.functional import scion_directions_reference
from fusedecay.reference import lmo as reference_lmo
import gloo_ranks
from spectral_truth import NS, NS_STEPS, sign_truth, spectral_truth, well_conditioned
from tolerances import assert_close, assert_state_close

WORLD = 2
STEPS = 3
SPAWN_TIMEOUT_S = 240  # a hang fails the module instead of blocking CI

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")]


# ----------------------------------------------------------------------------------------------
# Model, data and optimizers shared by the reference and the distributed runs
# ----------------------------------------------------------------------------------------------

class Net(nn.Module):
    """Tiny model whose FSDP2 shards cover the awkward cases on 2 ranks.

    emb (11, 8): Shard(0) 6+5, uneven. l1 (16, 8): Shard(1) 4+4 (shard_placement_fn; FSDP2 needs dim-1
    shards even), a tall matrix.
    l2, l3 (16, 16): same shape (batched NS). l4 (5, 16): 3+2 rows. head (1, 5) and its bias (1,):
    rank 1 holds an empty shard.
    """

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.l1 = nn.Linear(8, 16)
        self.l2 = nn.Linear(16, 16)
        self.l3 = nn.Linear(16, 16)
        self.l4 = nn.Linear(16, 5)
        self.head = nn.Linear(5, 1)

    def forward(self, idx):
        h = self.emb(idx).mean(1)
        for layer in (self.l1, self.l2, self.l3, self.l4):
            h = torch.tanh(layer(h))
        return self.head(h)


def _batches(n, seed=1234):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 11, (4, 3), generator=g), torch.randn(4, 1, generator=g)) for _ in range(n)]


def _param_groups(model, kind):
    mats = [model.l1.weight, model.l2.weight, model.l3.weight, model.l4.weight, model.head.weight]
    biases = [m.bias for m in (model.l1, model.l2, model.l3, model.l4, model.head)]
    if kind == "scionc":
        return [dict(params=mats, lmo="spectral", radius=2.0),
                dict(params=[model.emb.weight], lmo="sign", radius=20.0, corrected=False, weight_decay=0.1),
                dict(params=biases, lmo="bias", radius=0.5)]
    return [dict(params=mats + [model.emb.weight]), dict(params=biases, weight_decay=0.0)]


def _make_opt(model, kind):
    if kind == "adamhd":
        return AdamHD(_param_groups(model, kind), lr=0.03, weight_decay=0.5, delta_mode="ema", delta_beta=0.9)
    if kind == "adamhd_mean":
        return AdamHD(_param_groups(model, kind), lr=0.03, weight_decay=0.5, delta_mode="mean", update="euler")
    if kind == "adamc":
        return AdamC(_param_groups(model, kind), lr=0.03, weight_decay=0.5)
    if kind == "scionc":
        return ScionC(_param_groups(model, kind), lr=0.05, momentum=0.5)
    if kind == "scionc_bf16m":   # bf16 momentum buffers for fp32 params
        return ScionC(_param_groups(model, "scionc"), lr=0.05, momentum=0.5, momentum_dtype=torch.bfloat16)
    raise ValueError(kind)


def _lr_at(step):
    return 0.03 * (1.0 - 0.2 * step)  # a decaying schedule, so AdamC's λ_t = λγ_t/γ_max moves


def _train(model, opt, batches, first_step, rank=None):
    """Steps ``first_step``, ... on ``batches``; rank None = the whole batch (single process).

    The single process accumulates the ranks' half-batch gradients, each scaled by 1/WORLD: the
    same full-batch gradient, and bit-identical to the data-parallel average (sums of two terms and
    scaling by 1/2 are exact). Newton–Schulz amplifies input rounding ~20× on these tiny matrices,
    so a differently rounded gradient alone would exceed the fp32 tolerance on ScionC's params.
    """
    for k, (x, y) in enumerate(batches):
        if not isinstance(opt, ScionC):
            for g in opt.param_groups:
                g["lr"] = _lr_at(first_step + k)
        opt.zero_grad(set_to_none=True)
        for r in range(WORLD) if rank is None else (rank,):
            loss = nn.functional.mse_loss(model(x.chunk(WORLD)[r]), y.chunk(WORLD)[r])
            (loss / WORLD if rank is None else loss).backward()
        opt.step()


def _shard_model(model, hsdp=False):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard

    mesh = _mesh(hsdp)
    fully_shard(model.l1, mesh=mesh, shard_placement_fn=lambda p: Shard(1) if p.ndim == 2 else Shard(0))
    fully_shard(model, mesh=mesh)
    return model


def _mesh(hsdp=False):
    """1-D mesh (FSDP2), or a (replicate=1, shard=WORLD) mesh: HSDP's layout, on 2 processes."""
    from torch.distributed.device_mesh import init_device_mesh

    if hsdp:
        return init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("replicate", "shard"))
    return init_device_mesh("cpu", (WORLD,))


def _fresh_pair(kind, seed=0, hsdp=False):
    torch.manual_seed(seed)
    ref = Net()
    sharded = _shard_model(copy.deepcopy(ref), hsdp)
    return ref, _make_opt(ref, kind), sharded, _make_opt(sharded, kind)


def _assert_matches_reference(ref, ref_opt, sharded, opt):
    ref_params = dict(ref.named_parameters())
    for name, p in sharded.named_parameters():
        assert fd.is_dtensor(p), name
        assert_close(p.to_local(), gloo_ranks.local_slice(ref_params[name].detach(), p), msg=f"param {name}")
        st, rst = opt.state[p], ref_opt.state[ref_params[name]]
        assert sorted(st) == sorted(rst), (name, sorted(st), sorted(rst))
        for key, v in st.items():
            if fd.is_dtensor(v):
                assert v.placements == p.placements, (name, key)
                assert_state_close(v.to_local(), gloo_ranks.local_slice(rst[key], p), msg=f"{name}.{key}")
            else:
                assert_state_close(v, rst[key], msg=f"{name}.{key}")


# ----------------------------------------------------------------------------------------------
# 8-bit state (docs/state8.md): eligible matrices whose FSDP2 shards are uneven or empty
# ----------------------------------------------------------------------------------------------

class Net8(nn.Module):
    """emb (37, 128): Shard(0) 19+18 rows; l1 (33, 128): 17+16; wide (3, 2048): 2+1 — all eligible for 8-bit
    state (rows of 128·k elements, ≥ 4096 elements). l1's bias, head (1, 33) and its bias keep 32-bit state
    (1-D / too small); rank 1 holds empty shards of the head. Embedding rows ≥ 11 never get a gradient: their
    blocks stay all-zero (scale 0)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(37, 128)
        self.l1 = nn.Linear(128, 33)
        self.wide = nn.Parameter(torch.randn(3, 2048) * 0.02)
        self.head = nn.Linear(33, 1)

    def forward(self, idx):
        h = self.emb(idx).mean(1)
        return self.head(torch.tanh(self.l1(h))) + 0.1 * (h.repeat(1, 16) @ self.wide.t()).sum(1, keepdim=True)


def _make_opt8(model, kind):
    mats = [model.emb.weight, model.l1.weight, model.wide]
    others = [model.l1.bias, model.head.weight, model.head.bias]
    groups = [dict(params=mats, state_bits=8), dict(params=others, weight_decay=0.0)]
    if kind == "adamc8":
        return AdamC(groups, lr=0.03, weight_decay=0.5)
    if kind == "adamhd8":
        return AdamHD(groups, lr=0.03, weight_decay=0.5, delta_mode="fixed", delta=0.05)
    if kind == "adamhd8_ema":
        return AdamHD(groups, lr=0.03, weight_decay=0.5, delta_mode="ema", delta_beta=0.9)
    raise ValueError(kind)


def _fresh8(kind, seed=0, sharded=False):
    """A Net8 (FSDP2-sharded or whole) initialised from ``seed`` and its optimizer."""
    torch.manual_seed(seed)
    model = Net8()
    if sharded:
        from torch.distributed.fsdp import fully_shard
        model = fully_shard(model, mesh=_mesh())
    return model, _make_opt8(model, kind)


def _assert_state8_matches(ref, ref_opt, sharded, opt, exact):
    """Params and state of the shards against the slices of the single-process run: bit for bit (``exact``),
    or to the fp32 tolerance with codes within 1 (δ from an all-reduced Σ|θ|: summation order differs)."""
    ref_params = dict(ref.named_parameters())
    n8 = 0
    for name, p in sharded.named_parameters():
        rp = ref_params[name]
        st, rst = opt.state[p], ref_opt.state[rp]
        assert sorted(st) == sorted(rst), (name, sorted(st), sorted(rst))
        n8 += "exp_avg_codes" in st
        pairs = [("param", p, rp.detach())] + [(k, v, rst[k]) for k, v in st.items()]
        for key, v, w in pairs:
            if not fd.is_dtensor(v):
                if exact:
                    assert torch.equal(v, w), f"{name}.{key}"
                else:
                    assert_close(v, w, msg=f"{name}.{key}")
                continue
            assert v.placements == p.placements, (name, key)
            local, want = v.to_local(), gloo_ranks.local_slice(w, p)
            if exact:
                assert torch.equal(local, want), f"{name}.{key}"
            else:
                assert_state_close(local, want, want.dtype, msg=f"{name}.{key}")
    assert n8 == 3, n8


def _train8(kind, steps, seed=0, rank=None, ckpt=None):
    """(model, opt) after ``steps`` steps of ``kind`` on the shared batches: single process (rank None) or this
    rank's FSDP2 shards; with ``ckpt`` the run starts from that DCP checkpoint (saved after step 2)."""
    model, optim = _fresh8(kind, seed, sharded=rank is not None)
    batches = _batches(4)
    first = 0
    if ckpt is not None:
        _dcp_load(model, optim, ckpt)
        first = 2
    _train(model, optim, batches[first:steps], first, rank)
    return model, optim


def _dcp_save(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)


def _dcp_load(model, opt, path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                         set_model_state_dict, set_optimizer_state_dict)

    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])


def _assert_same_run(a, a_opt, b, b_opt):
    """Two single-process runs: params and every state tensor bit for bit."""
    bp = dict(b.named_parameters())
    for n, p in a.named_parameters():
        assert torch.equal(p.detach(), bp[n].detach()), n
        assert a_opt.state[p].keys() == b_opt.state[bp[n]].keys(), n
        for k, v in a_opt.state[p].items():
            assert torch.equal(v, b_opt.state[bp[n]][k]), f"{n}.{k}"


# ----------------------------------------------------------------------------------------------
# Checks (run inside the spawned workers)
# ----------------------------------------------------------------------------------------------

def _check_parity(kind, hsdp=False):
    def check(rank):
        ref, ref_opt, sharded, opt = _fresh_pair(kind, hsdp=hsdp)
        if hsdp:
            assert all(len(p.placements) == 2 and p.placements[1].is_shard() for p in sharded.parameters())
        batches = _batches(STEPS)
        _train(ref, ref_opt, batches, 0)
        _train(sharded, opt, batches, 0, rank)
        _assert_matches_reference(ref, ref_opt, sharded, opt)
        if kind == "scionc_bf16m":
            assert all(opt.state[p]["momentum_buffer"].dtype == torch.bfloat16 for p in sharded.parameters())
    return check


def _check_layouts(rank):
    """The model really exercises uneven, empty and dim-1 shards."""
    _, _, sharded, _ = _fresh_pair("adamc")
    local = {n: (tuple(p.placements), tuple(p.to_local().shape)) for n, p in sharded.named_parameters()}
    from torch.distributed.tensor import Shard
    assert local["l1.weight"] == ((Shard(1),), (16, 4))
    assert local["emb.weight"][1] == ((6, 8) if rank == 0 else (5, 8))
    assert local["l4.weight"][1] == ((3, 16) if rank == 0 else (2, 16))
    assert local["head.weight"][1] == ((1, 5) if rank == 0 else (0, 5))
    assert local["head.bias"][1] == ((1,) if rank == 0 else (0,))


def _snapshot(model):
    return {n: p.to_local().detach().clone() for n, p in model.named_parameters()}


def _zero_lr_step(opt, model):
    """What DCP's state initialisation does: zero grads, lr 0, one step."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for g in opt.param_groups:
        g["lr"] = 0.0
    opt.step()
    opt.zero_grad(set_to_none=True)


def _check_zero_lr(kind):
    def check(rank):
        _, _, sharded, opt = _fresh_pair(kind)
        before = _snapshot(sharded)
        _zero_lr_step(opt, sharded)                # fresh state (DCP's path)
        assert len(opt.state) == len(before)
        _train(sharded, opt, _batches(2), 0, rank)
        before = _snapshot(sharded)
        _zero_lr_step(opt, sharded)                # trained state
        for n, p in sharded.named_parameters():
            assert torch.equal(p.to_local(), before[n]), f"{kind}: {n} changed by a zero-grad lr=0 step"
    return check


def _check_state_symmetric(rank):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    for kind in ("adamhd", "scionc"):
        _, _, sharded, opt = _fresh_pair(kind)
        _train(sharded, opt, _batches(2), 0, rank)
        osd = get_optimizer_state_dict(sharded, opt)
        layout, mus = [], {}
        for fqn, st in sorted(osd["state"].items()):
            for key, v in sorted(st.items()):
                layout.append((fqn, key, type(v).__name__, tuple(v.shape), str(v.dtype),
                               str(tuple(v.placements)) if fd.is_dtensor(v) else "plain"))
                if key == "delta_mu":
                    assert not fd.is_dtensor(v), "delta_mu is kept as a plain (replicated) tensor"
                    mus[fqn] = v.item()
        assert layout, kind
        assert (kind == "adamhd") == bool(mus)
        gathered = [None] * WORLD
        dist.all_gather_object(gathered, (layout, mus))
        assert gathered[0] == gathered[1], f"{kind}: optimizer state differs across ranks"


def _check_dcp_resume(kind, ckpt_root):
    def check(rank):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)

        batches = _batches(4)
        path = os.path.join(ckpt_root, kind)
        _, _, model, opt = _fresh_pair(kind)
        _train(model, opt, batches[:2], 0, rank)
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=path)
        _train(model, opt, batches[2:], 2, rank)                     # the uninterrupted run

        _, _, resumed, ropt = _fresh_pair(kind, seed=1)              # different init: the load must matter
        sd = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, ropt)}
        dcp.load(sd, checkpoint_id=path)
        set_model_state_dict(resumed, sd["model"])
        set_optimizer_state_dict(resumed, ropt, sd["optim"])
        _train(resumed, ropt, batches[2:], 2, rank)

        params = dict(model.named_parameters())
        for n, p in resumed.named_parameters():
            assert torch.equal(p.to_local(), params[n].to_local()), f"{kind}: param {n} differs after resume"
            for key, v in ropt.state[p].items():
                w = opt.state[params[n]][key]
                assert type(v) is type(w) and torch.equal(fd.local(v), fd.local(w)), f"{kind}: {n}.{key}"
    return check


def _check_dcp_switch_from_adamw(kind, ckpt_root):
    """A torch AdamW checkpoint (DCP) loaded into AdamHD/AdamC with set_optimizer_state_dict: the same as the
    single-process switch (AdamHD/AdamC.load_state_dict of AdamW's state dict, tested against a float64 closed
    form in test_switch_optimizer.py), params and every state tensor after the switched steps."""
    def check(rank):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict, get_optimizer_state_dict,
                                                             set_model_state_dict, set_optimizer_state_dict)

        new_opt = {"adamhd": lambda m: AdamHD(_param_groups(m, kind), lr=0.02, weight_decay=0.3, delta_beta=0.9),
                   "adamc": lambda m: AdamC(_param_groups(m, kind), lr=0.02, weight_decay=0.3)}[kind]
        adamw = lambda m: torch.optim.AdamW(_param_groups(m, kind), lr=0.03, betas=(0.8, 0.9), weight_decay=0.1)  # noqa: E731
        batches = _batches(4)
        path = os.path.join(ckpt_root, f"switch_{kind}")

        torch.manual_seed(0)
        ref = Net()
        ref_first = adamw(ref)
        _train(ref, ref_first, batches[:2], 0)
        ref_opt = new_opt(ref)
        ref_opt.load_state_dict(ref_first.state_dict())
        _train(ref, ref_opt, batches[2:], 2)

        torch.manual_seed(0)
        model = _shard_model(Net())
        first = adamw(model)
        _train(model, first, batches[:2], 0, rank)
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, first)},
                 checkpoint_id=path)

        torch.manual_seed(1)                                          # a fresh run: everything comes from the load
        resumed = _shard_model(Net())
        template = torch.optim.AdamW(resumed.parameters())            # only holds the AdamW state DCP loads
        sd = {"model": get_model_state_dict(resumed), "optim": get_optimizer_state_dict(resumed, template)}
        dcp.load(sd, checkpoint_id=path)
        set_model_state_dict(resumed, sd["model"])
        opt = new_opt(resumed)
        set_optimizer_state_dict(resumed, opt, sd["optim"])
        assert opt.param_groups[0]["weight_decay"] == 0.3 and opt.param_groups[0]["betas"] == (0.9, 0.999)
        _train(resumed, opt, batches[2:], 2, rank)
        _assert_matches_reference(ref, ref_opt, resumed, opt)
    return check


class _CountingLMO:
    """The per-tensor reference LMO, counting the matrices it is given on this rank."""

    def __init__(self):
        self.spectral = 0

    def __call__(self, inputs, **kw):
        if kw["lmo"] == "spectral":
            self.spectral += len(inputs)
            assert all(tuple(m.shape) in {(16, 8), (16, 16), (5, 16), (1, 5)} for m in inputs), \
                [tuple(m.shape) for m in inputs]  # whole matrices only, never a shard
        return scion_directions_reference(inputs, **kw)


def _count_total(n):
    t = torch.tensor([n])
    dist.all_reduce(t)
    return int(t)


def _check_fsdp_ns_split(rank):
    """ScionC under FSDP2: each rank orthogonalises only its share of the whole matrices."""
    _, _, sharded, opt = _fresh_pair("scionc")
    opt._lmo_fn = counter = _CountingLMO()
    _train(sharded, opt, _batches(1), 0, rank)
    assert counter.spectral == (3 if rank == 0 else 2), counter.spectral
    assert _count_total(counter.spectral) == 5


def _check_ddp_scionc(rank):
    from torch.nn.parallel import DistributedDataParallel as DDP

    torch.manual_seed(0)
    ref = Net()
    ddp = DDP(copy.deepcopy(ref))
    ref_opt = _make_opt(ref, "scionc")
    opt = fd.split_lmo_work(_make_opt(ddp.module, "scionc"))
    opt._lmo_fn = counter = _CountingLMO()
    batches = _batches(STEPS)
    _train(ref, ref_opt, batches, 0)
    _train(ddp, opt, batches, 0, rank)
    assert counter.spectral == STEPS * (3 if rank == 0 else 2), counter.spectral
    assert _count_total(counter.spectral) == STEPS * 5
    ref_params = dict(ref.named_parameters())
    for n, p in ddp.module.named_parameters():
        assert_close(p.detach(), ref_params[n].detach(), msg=f"param {n}")
        assert_close(opt.state[p]["momentum_buffer"], ref_opt.state[ref_params[n]]["momentum_buffer"], msg=n)


def _check_sharded_lmo_is_whole_matrix_lmo(rank):
    """DistributedLMO on DTensor shards == the reference LMO of the whole matrix, bit for bit
    (the owner runs the same per-matrix function on the reassembled matrix)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = _mesh()
    g = torch.Generator().manual_seed(7)
    cases = [((9, 6), Shard(0)), ((6, 9), Shard(1)), ((1, 4), Shard(0)), ((4, 1), Shard(1)), ((8, 8), Shard(0)),
             ((8, 8), Shard(0)), ((5, 3), Replicate())]
    fulls = [torch.randn(*shape, generator=g) for shape, _ in cases]
    dts = [distribute_tensor(f, mesh, [pl]) for f, (_, pl) in zip(fulls, cases)]
    layouts = [(fd._layout_key(d), tuple(d.shape)) for d in dts]
    for ns_dtype in (torch.float32, torch.bfloat16):
        lmo_fn = fd.DistributedLMO(layouts, scion_directions_reference)
        kw = dict(ns_steps=5, ns="classic", ns_dtype=ns_dtype)
        for kind in ("spectral", "sign", "bias"):
            out = lmo_fn([d.to_local() for d in dts], lmo=kind, **kw)
            for f, d, o in zip(fulls, dts, out):
                want = gloo_ranks.local_slice(reference_lmo(kind, f, **kw), d)
                if kind == "bias":  # RMS from an all-reduced Σm²: summation order differs
                    assert_close(o, want, msg=f"{kind} {tuple(f.shape)} {d.placements}")
                else:
                    assert torch.equal(o, want), f"{kind} {tuple(f.shape)} {d.placements} ns_dtype={ns_dtype}"


def _check_unsupported_layouts_raise(rank):
    """Layouts the spectral LMO cannot handle, and mis-laid-out grads, raise before any collective."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    mesh2 = init_device_mesh("cpu", (1, WORLD))
    full = torch.randn(4, 6)
    two_dims = distribute_tensor(full, mesh2, [Shard(0), Shard(1)])   # FSDP+TP-like 2-D sharding
    lmo_fn = fd.DistributedLMO([(fd._layout_key(two_dims), (4, 6))], scion_directions_reference)
    with pytest.raises(NotImplementedError, match="one mesh dim"):
        lmo_fn([two_dims.to_local()], lmo="spectral", ns_steps=5, ns="classic", ns_dtype=None)
    with pytest.raises(ValueError, match="Partial"):
        fd._layout_key(DTensor.from_local(full, _mesh(), [Partial()]))
    p = distribute_tensor(full, _mesh(), [Shard(0)])
    opt = AdamHD([p], lr=0.1)
    p.grad = full.clone()                                                # plain grad for a DTensor param
    with pytest.raises(ValueError, match="grad of a DTensor param"):
        opt.step()


# N-D weights: (global shape, placement, matrix_view given, the truth's view, whole matrices local?)
_ND_CASES = [
    ((3, 10, 6), "Shard(0)", "auto", "batch", True),        # expert stack over E, uneven 2+1: each rank its experts
    ((1, 4, 3), "Shard(0)", "auto", "batch", True),         # rank 1 holds no expert
    ((4, 10, 6), "Shard(1)", "batch", "batch", False),      # over d_out: exchanged like a sharded matrix
    ((2, 6, 10), "Shard(2)", "auto", "batch", False),       # over d_in
    ((5, 3, 2, 2), "Shard(0)", "auto", "flatten", False),   # conv kernel, flattened, sharded over d_out
    ((4, 6, 3), "Shard(2)", "flatten", "flatten", False),   # conv1d kernel sharded over its taps, flattened
    ((5, 3, 2, 2), "Shard(2)", "taps", "taps", True),       # per tap, sharded over taps: whole matrices local
    ((5, 3, 2, 2), "Shard(1)", "taps", "taps", False),
    ((6, 10), "Shard(0)", "transposed", "transposed", False),
]


def _placement(text):
    from torch.distributed.tensor import Shard
    return Shard(int(text[6:-1]))


def _check_nd_sharded_lmo_is_the_polar_factor(rank):
    """DistributedLMO on sharded N-D weights (float64) == the per-matrix SVD polar factor, sliced; a weight
    sharded along a dim that indexes matrices is computed where it lies, the others on one owner. The sign
    LMO divides by the view's global d_in."""
    from torch.distributed.tensor import distribute_tensor

    mesh = _mesh()
    g = torch.Generator().manual_seed(11)     # the same inputs on every rank
    for shape, pl, view, truth_view, local in _ND_CASES:
        full = well_conditioned(shape, truth_view, g)
        d = distribute_tensor(full, mesh, [_placement(pl)])
        seen = []

        def inner(inputs, **kw):
            seen.extend(tuple(m.shape) for m in inputs)
            return scion_directions_reference(inputs, **kw)

        lmo_fn = fd.DistributedLMO([(fd._layout_key(d), shape)], inner)
        out, = lmo_fn([d.to_local()], lmo="spectral", ns_steps=NS_STEPS, ns=NS, ns_dtype=None, matrix_view=view)
        assert_close(out, gloo_ranks.local_slice(spectral_truth(full, truth_view), d), msg=f"{shape} {pl} {view}")
        if local:
            assert seen == [tuple(d.to_local().shape)], (shape, pl, seen)
        else:
            assert seen in ([shape], []) and _count_total(len(seen)) == 1, (shape, pl, seen)
        out, = lmo_fn([d.to_local()], lmo="sign", ns_steps=NS_STEPS, ns=NS, ns_dtype=None, matrix_view=view)
        assert torch.equal(out, gloo_ranks.local_slice(sign_truth(full, truth_view), d)), f"sign {shape} {pl} {view}"


def _check_nd_scionc_steps_match_closed_form(rank):
    """ScionC steps on FSDP2-sharded expert stacks (fully_shard: Shard(0)) and on DTensor N-D weights sharded
    elsewhere, float64, against the float64 closed form with the per-matrix SVD polar factor."""
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import distribute_tensor

    mesh = _mesh()
    g = torch.Generator().manual_seed(12)
    alpha, lr, radius, c2 = 0.5, 0.05, 2.0, 1.5
    experts = nn.Module()
    experts.w_in = nn.Parameter(torch.randn(3, 10, 6, dtype=torch.float64, generator=g))
    experts.w_out = nn.Parameter(torch.randn(3, 6, 10, dtype=torch.float64, generator=g))
    full0 = [experts.w_in.detach().clone(), experts.w_out.detach().clone()]
    fully_shard(experts, mesh=mesh)
    params = [(experts.w_in, "batch", "auto"), (experts.w_out, "batch", "auto")]
    for shape, pl, view, truth_view, _ in _ND_CASES[2:6]:
        full = torch.randn(shape, dtype=torch.float64, generator=g)
        full0.append(full)
        params.append((nn.Parameter(distribute_tensor(full.clone(), mesh, [_placement(pl)])), truth_view, view))
    assert all(fd.is_dtensor(p) for p, _, _ in params)
    assert experts.w_in.placements[0].is_shard(0) and experts.w_in.to_local().shape[0] == (2 if rank == 0 else 1)
    opt = ScionC([{"params": [p], "matrix_view": v} for p, _, v in params], lr=lr, momentum=alpha, radius=radius,
                 norm_target=c2, ns=NS, ns_steps=NS_STEPS)
    theta = [f.clone() for f in full0]
    buf = [torch.zeros_like(f) for f in full0]
    s = lr * radius
    eta = s * s * (2 - alpha) / (2 * alpha * c2)
    for _ in range(2):
        for i, (p, truth_view, _) in enumerate(params):
            grad = (well_conditioned(p.shape, truth_view, g) - (1 - alpha) * buf[i]) / alpha
            p.grad = distribute_tensor(grad, mesh, list(p.placements))
            buf[i] = (1 - alpha) * buf[i] + alpha * grad
            theta[i] = (1 - eta) * theta[i] - s * spectral_truth(buf[i], truth_view)
        opt.step()
    for (p, truth_view, _), want, m in zip(params, theta, buf):
        assert_close(p.to_local(), gloo_ranks.local_slice(want, p), msg=f"param {tuple(p.shape)} {p.placements}")
        assert_close(opt.state[p]["momentum_buffer"].to_local(), gloo_ranks.local_slice(m, p),
                     msg=f"momentum {tuple(p.shape)}")


def _check_state8_parity(kind):
    def check(rank):
        ref, ref_opt = _train8(kind, STEPS)
        sharded, opt = _train8(kind, STEPS, rank=rank)
        _assert_state8_matches(ref, ref_opt, sharded, opt, exact=kind != "adamhd8_ema")
    return check


def _check_state8_dcp_from_one_process(ckpt_root):
    """A checkpoint the single process saved (before the workers started) loads into the 2-rank FSDP2 run,
    which then continues exactly like the 2-rank run that never stopped."""
    def check(rank):
        resumed, ropt = _train8("adamc8", 4, seed=1, rank=rank, ckpt=os.path.join(ckpt_root, "state8_ws1"))
        ref, ref_opt = _train8("adamc8", 4)
        _assert_state8_matches(ref, ref_opt, resumed, ropt, exact=True)
    return check


def _check_state8_dcp_save(ckpt_root):
    """Saves the 2-rank run after 2 steps (test_state8_dcp_saved_by_2_ranks_loads_in_1_process loads it)."""
    def check(rank):
        model, opt = _train8("adamc8", 2, rank=rank)
        _dcp_save(model, opt, os.path.join(ckpt_root, "state8_ws2"))
    return check


def _check_state8_needs_row_shards(rank):
    from torch.distributed.tensor import Shard, distribute_tensor

    p = nn.Parameter(distribute_tensor(torch.randn(64, 128), _mesh(), [Shard(1)]))
    with pytest.raises(NotImplementedError, match="Shard\\(0\\) or Replicate"):   # when the group is added
        AdamC([p], lr=0.1, state_bits=8)
    opt = AdamC([p], lr=0.1, state_bits=32)
    with pytest.raises(NotImplementedError, match="Shard\\(0\\) or Replicate"):
        opt.add_param_group({"params": [nn.Parameter(distribute_tensor(torch.randn(64, 128), _mesh(), [Shard(1)]))],
                             "state_bits": 8})
    assert len(opt.param_groups) == 1


def _checks(ckpt_root):
    checks = {f"parity_{k}": _check_parity(k) for k in ("adamhd", "adamhd_mean", "adamc", "scionc", "scionc_bf16m")}
    checks.update({f"parity_hsdp_{k}": _check_parity(k, hsdp=True) for k in ("adamhd", "scionc")})
    checks["layouts"] = _check_layouts
    checks.update({f"zero_lr_{k}": _check_zero_lr(k) for k in ("adamhd", "adamc", "scionc")})
    checks["state_symmetric"] = _check_state_symmetric
    checks.update({f"dcp_{k}": _check_dcp_resume(k, ckpt_root) for k in ("adamhd", "adamc", "scionc", "scionc_bf16m")})
    checks["fsdp_ns_split"] = _check_fsdp_ns_split
    checks["ddp_scionc"] = _check_ddp_scionc
    checks["sharded_lmo"] = _check_sharded_lmo_is_whole_matrix_lmo
    checks["unsupported"] = _check_unsupported_layouts_raise
    checks["nd_sharded_lmo"] = _check_nd_sharded_lmo_is_the_polar_factor
    checks["nd_scionc_steps"] = _check_nd_scionc_steps_match_closed_form
    checks.update({f"dcp_switch_{k}": _check_dcp_switch_from_adamw(k, ckpt_root) for k in ("adamhd", "adamc")})
    checks.update({f"state8_{k}": _check_state8_parity(k) for k in ("adamc8", "adamhd8", "adamhd8_ema")})
    checks["state8_dcp_from_1"] = _check_state8_dcp_from_one_process(ckpt_root)
    checks["state8_dcp_save"] = _check_state8_dcp_save(ckpt_root)
    checks["state8_row_shards"] = _check_state8_needs_row_shards
    return checks


def _worker(rank, out_dir):
    gloo_ranks.run_checks(rank, WORLD, out_dir, _checks(os.path.join(out_dir, "ckpt")))


@pytest.fixture(scope="module")
def spawned():
    """(per-rank results, the run's directory); before spawning, the single process saves the 8-bit
    checkpoint the workers load (a DCP checkpoint written at world size 1)."""
    with tempfile.TemporaryDirectory() as out_dir:
        model, opt = _train8("adamc8", 2)
        _dcp_save(model, opt, os.path.join(out_dir, "ckpt", "state8_ws1"))
        yield gloo_ranks.spawn(_worker, out_dir, WORLD, SPAWN_TIMEOUT_S), out_dir


@pytest.fixture(scope="module")
def results(spawned):
    return spawned[0]


def _assert_ok(results, name):
    failures = [f"rank {r}:\n{res.get(name, 'not run')}" for r, res in enumerate(results) if res.get(name) != "ok"]
    assert not failures, "\n".join(failures)


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["adamhd", "adamhd_mean", "adamc", "scionc", "scionc_bf16m"])
def test_fsdp2_matches_single_process(results, kind):
    """Params and every state tensor after N steps, FSDP2 shards vs the single-process run."""
    _assert_ok(results, f"parity_{kind}")


@pytest.mark.parametrize("kind", ["adamhd", "scionc"])
def test_hsdp_mesh_matches_single_process(results, kind):
    """A 2-D (replicate, shard) mesh: reductions and NS exchanges run over the shard dim only."""
    _assert_ok(results, f"parity_hsdp_{kind}")


def test_model_has_uneven_empty_and_dim1_shards(results):
    _assert_ok(results, "layouts")


@pytest.mark.parametrize("kind", ["adamhd", "adamc", "scionc"])
def test_zero_grad_zero_lr_step_leaves_params_bit_identical(results, kind):
    _assert_ok(results, f"zero_lr_{kind}")


def test_state_symmetric_across_ranks_and_delta_mu_replicated(results):
    _assert_ok(results, "state_symmetric")


@pytest.mark.parametrize("kind", ["adamhd", "adamc", "scionc", "scionc_bf16m"])
def test_dcp_resume_is_identical_to_uninterrupted_run(results, kind):
    _assert_ok(results, f"dcp_{kind}")


@pytest.mark.parametrize("kind", ["adamhd", "adamc"])
def test_dcp_adamw_checkpoint_switches_into_adamhd_and_adamc(results, kind):
    _assert_ok(results, f"dcp_switch_{kind}")


def test_fsdp2_newton_schulz_runs_once_per_whole_matrix(results):
    _assert_ok(results, "fsdp_ns_split")


def test_ddp_scionc_split_newton_schulz_matches_single_process(results):
    _assert_ok(results, "ddp_scionc")


def test_sharded_lmo_equals_whole_matrix_lmo(results):
    _assert_ok(results, "sharded_lmo")


def test_unsupported_layouts_and_mislaid_grads_raise(results):
    _assert_ok(results, "unsupported")


def test_sharded_nd_weights_get_the_per_matrix_polar_factor(results):
    """Expert stacks, conv kernels (flattened or per tap) and transposed weights, sharded on each dim."""
    _assert_ok(results, "nd_sharded_lmo")


def test_fsdp2_expert_stacks_scionc_steps_match_closed_form(results):
    _assert_ok(results, "nd_scionc_steps")


@pytest.mark.parametrize("kind", ["adamc8", "adamhd8", "adamhd8_ema"])
def test_state8_fsdp2_gives_the_single_process_codes(results, kind):
    """8-bit codes, scales, params of uneven/empty shards = the single process's, bit for bit (AdamC, fixed δ);
    with δ from an all-reduced Σ|θ| to the fp32 tolerance and codes within 1."""
    _assert_ok(results, f"state8_{kind}")


def test_state8_dcp_saved_by_1_process_loads_at_2_ranks(results):
    _assert_ok(results, "state8_dcp_from_1")


def test_state8_dcp_saved_by_2_ranks_loads_in_1_process(spawned):
    """The 2-rank checkpoint (after 2 steps) loaded by one process: the same state as the single-process
    run at step 2, and the same run afterwards."""
    per_rank, out_dir = spawned
    _assert_ok(per_rank, "state8_dcp_save")
    resumed, ropt = _train8("adamc8", 4, seed=1, ckpt=os.path.join(out_dir, "ckpt", "state8_ws2"))
    ref, ref_opt = _train8("adamc8", 4)
    _assert_same_run(resumed, ropt, ref, ref_opt)


def test_state8_needs_shard0_or_replicate(results):
    _assert_ok(results, "state8_row_shards")


# -- single-process (no spawn) -------------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 2, 5, 7, 16])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_chunk_sizes_follow_torch_chunk(n, world):
    want = [c.numel() for c in torch.arange(n).chunk(world)] if n else []
    want += [0] * (world - len(want))
    assert fd._chunk_sizes(n, world) == want


def test_split_lmo_work_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is initialised in this process")
    opt = ScionC([nn.Parameter(torch.randn(3, 3))])
    with pytest.raises(RuntimeError, match="process group"):
        fd.split_lmo_work(opt)
    with pytest.raises(TypeError, match="ScionC"):
        fd.split_lmo_work(AdamC([nn.Parameter(torch.randn(3))]))
