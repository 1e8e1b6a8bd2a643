"""Every ScionC path against the float64 closed form of tests/float64_truth.py (which imports nothing of fusedecay).

Paths, all through the public ``ScionC`` class:
  * ``reference``: the per-tensor reference (``backend="reference"``);
  * ``auto``: the default CPU path, the foreach step of ``functional.scionc`` (``backend="auto"``);
  * ``batched``: ``_scion_fast``'s torch path (``backend="batched"`` on CPU);
  * ``triton``: ``_scion_fast``'s Triton path (the batched backend on CUDA), here under the Triton interpreter on
    CPU tensors (``_triton_applies`` is widened to CPU; which groups ran on Triton is asserted);
  * distributed: DTensor-sharded params (FSDP2's layout, ``distribute_tensor``) and replicated params with
    ``split_lmo_work`` (DDP), 2 gloo processes; each rank's shard against the slice of the truth.

Five groups cover every LMO (spectral with Polar Express and with the classic quintic, sign, bias), corrected η
with its (2 − α) factor and uncorrected η = γλ, Nesterov, maximize, a cosine schedule (torch's
CosineAnnealingLR; float and tensor lr), odd and empty sizes, a non-contiguous param and a param skipped for one
step. Params and momentum buffers are compared after every step, in float64 (tolerance 1e-10) and float32 (1e-5).
``test_truth_sees_a_doubled_decay_and_a_flipped_step`` shows, group by group, that the tolerances are tight
enough for a decay of 1 − 2η or a flipped step to fail whichever path runs.
"""
import tempfile

import pytest
import torch
import torch.distributed as dist

import float64_truth as T
import gloo_ranks
from fusedecay import ScionC
from fusedecay import _scion_fast as fast
from fusedecay import distributed as fd
from tolerances import ATOL, RTOL, assert_close, assert_stored_close

F64 = torch.float64
STEPS = 5
ETA_MIN = 0.002
SKIPPED = ("gain", 2)   # (param, step): its grad is None at that step

# name -> shape; "nc" is a non-contiguous param (a transposed view).
SHAPES = {"qkv": (12, 24), "proj_t": (24, 12), "fc": (16, 40),
          "odd": (7, 13), "square": (20, 20), "row": (1, 9), "nc": (24, 16),
          "emb": (50, 24), "empty": (0, 5), "head": (30, 24),
          "bias": (72,), "gain": (24,), "one": (1,)}

# Group options as ScionC takes them (lr is the cosine schedule's base), params by name.
GROUPS = [
    dict(names=["qkv", "proj_t", "fc"], lmo="spectral", lr=0.05, radius=2.0, ns="polar_express", ns_steps=10),
    dict(names=["odd", "square", "row", "nc"], lmo="spectral", lr=0.03, momentum=0.5, corrected=False,
         weight_decay=0.1, ns="classic", ns_steps=5),
    dict(names=["emb", "empty"], lmo="sign", lr=0.05, momentum=0.2, nesterov=True),
    dict(names=["head"], lmo="sign", lr=0.05, radius=2.0, corrected=False, weight_decay=0.2),
    dict(names=["bias", "gain", "one"], lmo="bias", lr=0.05, radius=0.5, norm_target=2.0),
]
NESTEROV_VARIES = (0, 4)   # groups whose nesterov follows the run's ``nesterov`` flag

TRUTH_KEYS = ("lmo", "momentum", "radius", "norm_target", "corrected", "weight_decay", "ns", "ns_steps", "nesterov")


def group_options(nesterov, maximize):
    out = []
    for i, g in enumerate(GROUPS):
        g = dict(g)
        if i in NESTEROV_VARIES:
            g["nesterov"] = nesterov
        g["maximize"] = maximize
        out.append(g)
    return out


def initial_values():
    return T.random_values(SHAPES, scale=0.3)


def grad_stream():
    return T.grad_stream(SHAPES, STEPS, SKIPPED)


def make_param(x, dtype, name):
    if name == "nc":   # stored transposed: a non-contiguous (24, 16) view of a (16, 24) tensor
        return torch.nn.Parameter(x.to(dtype).t().contiguous().t())
    return torch.nn.Parameter(x.to(dtype).clone())


def truth_run(init, grads, options, dtype, eta_mul=1.0, step_sign=1.0):
    """Float64 truth from the initial values and grads rounded to ``dtype`` (so only the update's arithmetic
    differs): per step, a list of {name: (θ, m)}."""
    theta = {k: v.to(dtype).to(F64) for k, v in init.items()}
    mom = {k: torch.zeros_like(v) for k, v in theta.items()}
    history = []
    for t, gs in enumerate(grads):
        for g in options:
            lr = T.cosine_lr(g["lr"], t, STEPS, ETA_MIN)
            kw = {k: g[k] for k in TRUTH_KEYS if k in g}
            for name in g["names"]:
                if gs[name] is None:
                    continue
                theta[name], mom[name] = T.scionc_step(theta[name], mom[name], gs[name].to(dtype).to(F64), lr=lr,
                                                       maximize=g["maximize"], eta_mul=eta_mul,
                                                       step_sign=step_sign, **kw)
        history.append({k: (theta[k].clone(), mom[k].clone()) for k in theta})
    return history


def optimizer_groups(params, options, dtype, tensor_lr, device="cpu"):
    out = []
    for g in options:
        g = dict(g)
        names = g.pop("names")
        if tensor_lr:
            g["lr"] = torch.tensor(g["lr"], dtype=dtype, device=device)   # the scheduler fills it in place
        out.append(dict(g, params=[params[n] for n in names]))
    return out


def check_against_truth(path, dtype, *, nesterov, maximize, tensor_lr, device="cpu", ns_dtype=None):
    init, grads = initial_values(), grad_stream()
    options = group_options(nesterov, maximize)
    params = {k: make_param(v.to(device), dtype, k) for k, v in init.items()}
    assert not params["nc"].is_contiguous()
    backend = {"reference": "reference", "auto": "auto", "batched": "batched", "triton": "batched"}[path]
    groups = optimizer_groups(params, options, dtype, tensor_lr, device)
    opt = ScionC([dict(g, ns_dtype=ns_dtype) for g in groups], backend=backend)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=ETA_MIN)
    truth = truth_run(init, grads, options, dtype)
    for t, gs in enumerate(grads):
        for k, p in params.items():
            p.grad = None if gs[k] is None else gs[k].to(device, dtype)
        opt.step()
        sched.step()
        for k, p in params.items():
            want_theta, want_m = truth[t][k]
            assert p.dtype == dtype
            assert_close(p.detach().cpu(), want_theta, dtype=dtype, msg=f"{path} step {t}: param {k}")
            assert_close(opt.state[p]["momentum_buffer"].cpu(), want_m, dtype=dtype,
                         msg=f"{path} step {t}: momentum {k}")
    # The run moved every param with a nonempty grad (a comparison of unmoved params would say little).
    for k, p in params.items():
        if p.numel():
            assert not torch.equal(p.detach().cpu().to(F64), init[k].to(dtype).to(F64)), k


VARIANTS = [dict(nesterov=False, maximize=False, tensor_lr=False),
            dict(nesterov=True, maximize=True, tensor_lr=True)]


def _variant_id(v):
    return "-".join(k for k, on in v.items() if on) or "plain"


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("path", ["reference", "auto", "batched"])
def test_cpu_paths_match_float64_truth(path, dtype, variant):
    check_against_truth(path, dtype, **variant)


def check_bf16_momentum_against_truth(path, *, nesterov, maximize, tensor_lr, device="cpu", ns_dtype=None):
    """fp32 params with ``momentum_dtype=torch.bfloat16``: each step against the float64 step from the state it
    started from (the stored bf16 buffers and the params, so a last-bit difference in an earlier rounding to bf16
    is not carried on): params to the fp32 tolerance — the LMO must see the unrounded m_t — and buffers in bf16,
    within half a bf16 ulp of the truth's m_t."""
    init, grads = initial_values(), grad_stream()
    options = group_options(nesterov, maximize)
    params = {k: make_param(v.to(device), torch.float32, k) for k, v in init.items()}
    backend = {"reference": "reference", "auto": "auto", "batched": "batched", "triton": "batched"}[path]
    groups = optimizer_groups(params, options, torch.float32, tensor_lr, device)
    opt = ScionC([dict(g, ns_dtype=ns_dtype) for g in groups], backend=backend, momentum_dtype=torch.bfloat16)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=ETA_MIN)
    for t, gs in enumerate(grads):
        before = {}
        for k, p in params.items():
            m = opt.state[p]["momentum_buffer"].cpu().to(F64) if p in opt.state else torch.zeros(p.shape, dtype=F64)
            before[k] = (p.detach().cpu().to(F64), m)
            p.grad = None if gs[k] is None else gs[k].to(device, torch.float32)
        opt.step()
        sched.step()
        for g in options:
            kw = {key: g[key] for key in TRUTH_KEYS if key in g}
            for k in g["names"]:
                p, (theta, m) = params[k], before[k]
                if gs[k] is None:
                    want_theta, want_m = theta, m
                else:
                    want_theta, want_m = T.scionc_step(theta, m, gs[k].to(torch.float32).to(F64),
                                                       lr=T.cosine_lr(g["lr"], t, STEPS, ETA_MIN),
                                                       maximize=g["maximize"], **kw)
                buf = opt.state[p]["momentum_buffer"]
                assert p.dtype == torch.float32 and buf.dtype == torch.bfloat16, (k, p.dtype, buf.dtype)
                assert_close(p.detach().cpu(), want_theta, dtype=torch.float32, msg=f"{path} step {t}: param {k}")
                assert_stored_close(buf.cpu(), want_m, msg=f"{path} step {t}: momentum {k}")


@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
@pytest.mark.parametrize("path", ["reference", "auto", "batched"])
def test_bf16_momentum_matches_float64_truth(path, variant):
    check_bf16_momentum_against_truth(path, **variant)


@pytest.mark.triton
@pytest.mark.parametrize("momentum", ["param_dtype", "bf16"])
@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
def test_triton_path_matches_float64_truth(monkeypatch, variant, momentum):
    """The batched backend's Triton step (fp32 kernels, fp32 Newton–Schulz), driven by the ScionC class: compiled
    on a GPU, under the interpreter on CPU tensors elsewhere; momentum buffers in the params' fp32 or in bf16."""
    ran = []
    real_step = fast._step_triton

    def triton_applies_on_cpu(params, grads, bufs, lr, lmo):
        return (lmo in ("spectral", "sign") and params[0].dtype in (torch.float32, torch.bfloat16, torch.float16)
                and all(t.is_contiguous() for lst in (params, grads, bufs) for t in lst))

    def step_triton(params, *args, **kw):
        ran.append((kw["lmo"], tuple(tuple(p.shape) for p in params)))
        return real_step(params, *args, **kw)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":   # under the interpreter: let the CPU tensors take the Triton path
        monkeypatch.setattr(fast, "_triton_applies", triton_applies_on_cpu)
    monkeypatch.setattr(fast, "_step_triton", step_triton)
    if momentum == "bf16":
        check_bf16_momentum_against_truth("triton", device=device, ns_dtype=torch.float32, **variant)
    else:
        check_against_truth("triton", torch.float32, device=device, ns_dtype=torch.float32, **variant)
    # hidden (spectral), emb and head (sign) ran on Triton every step; "odd" holds a non-contiguous param and
    # "bias" is not a Triton LMO, so those took the torch path.
    per_step = [("spectral", ((12, 24), (24, 12), (16, 40))), ("sign", ((50, 24), (0, 5))), ("sign", ((30, 24),))]
    assert ran == per_step * STEPS


def _differs_beyond_tolerance(a, b, dtype):
    return not torch.allclose(a, b, rtol=RTOL[dtype], atol=ATOL[dtype])


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_truth_sees_a_doubled_decay_and_a_flipped_step(dtype):
    """For every group, the truth with η → 2η, and with the step's sign flipped, differs from the truth beyond
    the tolerance the path tests use, at the first step already: so either mutation fails those tests whichever
    path (and whichever group) it hits."""
    init, grads = initial_values(), grad_stream()
    for variant in VARIANTS:
        options = group_options(variant["nesterov"], variant["maximize"])
        good = truth_run(init, grads[:1], options, dtype)[0]
        for mutation in (dict(eta_mul=2.0), dict(step_sign=-1.0)):
            bad = truth_run(init, grads[:1], options, dtype, **mutation)[0]
            for g in options:
                nonempty = [n for n in g["names"] if init[n].numel()]
                assert all(_differs_beyond_tolerance(bad[n][0], good[n][0], dtype) for n in nonempty), \
                    (mutation, g["names"], variant)


def test_truth_closed_forms_on_hand_made_inputs():
    """The truth's own LMOs and η on inputs whose answers are known without it."""
    # spectral, Polar Express: the polar factor of Q·diag(s)·Wᵀ is Q Wᵀ.
    gen = torch.Generator().manual_seed(3)
    Q, _ = torch.linalg.qr(torch.randn(6, 4, generator=gen, dtype=F64))
    W, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen, dtype=F64))
    m = Q @ torch.diag(torch.tensor([3.0, 2.0, 1.0, 0.5], dtype=F64)) @ W.T
    assert_close(T.spectral_direction(m, "polar_express", 10), Q @ W.T * (6 / 4) ** 0.5)
    # classic: one quintic step on a matrix with one singular value σ: σ/(σ + 1e-7) through a + b + c.
    x = torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=F64)
    r = 2.0 / (2.0 + 1e-7)
    a, b, c = T.NS_CLASSIC
    assert_close(T.spectral_direction(x, "classic", 1), torch.tensor([[a * r + b * r ** 3 + c * r ** 5, 0.0],
                                                                         [0.0, 0.0]], dtype=F64))
    assert_close(T.sign_direction(torch.tensor([[-2.0, 0.0, 3.0]], dtype=F64)),
                 torch.tensor([[-1 / 3, 0.0, 1 / 3]], dtype=F64))
    assert_close(T.bias_direction(torch.tensor([3.0, -4.0], dtype=F64)),
                 torch.tensor([3.0, -4.0], dtype=F64) / (12.5 + 1e-12) ** 0.5)
    # η: corrected (0.1·2)²·(2 − 0.1)/(2·0.1·1.5); uncorrected 0.1·0.3; Nesterov divides by 1 + 4α − 6α² + 2α³.
    assert T.scionc_eta(0.1, radius=2.0, momentum=0.1, norm_target=1.5, corrected=True, weight_decay=0.0,
                        nesterov=False) == pytest.approx(0.04 * 1.9 / 0.3, rel=1e-15)
    assert T.scionc_eta(0.1, radius=2.0, momentum=0.1, norm_target=1.5, corrected=False, weight_decay=0.3,
                        nesterov=True) == pytest.approx(0.03, rel=1e-15)
    assert T.scionc_eta(0.1, radius=2.0, momentum=0.5, norm_target=1.5, corrected=True, weight_decay=0.0,
                        nesterov=True) == pytest.approx(0.04 * 1.5 / 1.5 / 1.75, rel=1e-15)
    # Polar Express truth refuses an input it could not reach: a nearly singular matrix.
    with pytest.raises(AssertionError, match="ill-conditioned"):
        T.spectral_direction(torch.diag(torch.tensor([1.0, 1e-5], dtype=F64)), "polar_express", 10)


# ------------------------------------------------------------------------------------------------
# Distributed: 2 gloo processes
# ------------------------------------------------------------------------------------------------

WORLD = 2
SPAWN_TIMEOUT_S = 240


def _placements():
    """name -> placement on a 1-D mesh of 2: uneven rows, dim-1 shards, an empty shard, a replicated tensor."""
    from torch.distributed.tensor import Replicate, Shard
    return {"qkv": Shard(0), "proj_t": Shard(1), "fc": Shard(0), "odd": Shard(0), "square": Shard(1),
            "row": Shard(0), "nc": Shard(0), "emb": Shard(0), "empty": Shard(0), "head": Shard(1),
            "bias": Shard(0), "gain": Replicate(), "one": Shard(0)}


def _distributed_run(layout, backend, dtype, variant):
    """``layout``: "dtensor" (sharded DTensor params) or "ddp" (replicated plain params, split_lmo_work)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    init, grads = initial_values(), grad_stream()
    options = group_options(variant["nesterov"], variant["maximize"])
    mesh = init_device_mesh("cpu", (WORLD,))
    if layout == "dtensor":
        pls = _placements()
        params = {k: torch.nn.Parameter(distribute_tensor(v.to(dtype), mesh, [pls[k]])) for k, v in init.items()}
    else:
        params = {k: make_param(v, dtype, k) for k, v in init.items()}
    opt = ScionC(optimizer_groups(params, options, dtype, variant["tensor_lr"]), backend=backend)
    if layout == "ddp":
        fd.split_lmo_work(opt)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=ETA_MIN)
    truth = truth_run(init, grads, options, dtype)
    for t, gs in enumerate(grads):
        for k, p in params.items():
            if gs[k] is None:
                p.grad = None
            elif layout == "dtensor":
                p.grad = distribute_tensor(gs[k].to(dtype), mesh, list(p.placements))
            else:
                p.grad = gs[k].to(dtype)
        opt.step()
        sched.step()
        for k, p in params.items():
            want_theta, want_m = truth[t][k]
            buf = opt.state[p]["momentum_buffer"]
            if layout == "dtensor":
                assert fd.is_dtensor(p) and fd.is_dtensor(buf), k
                got_theta, got_m = p.to_local(), buf.to_local()
                want_theta, want_m = gloo_ranks.local_slice(want_theta, p), gloo_ranks.local_slice(want_m, p)
            else:
                got_theta, got_m = p.detach(), buf
            assert_close(got_theta.detach(), want_theta, dtype=dtype, msg=f"{layout} {backend} step {t}: param {k}")
            assert_close(got_m, want_m, dtype=dtype, msg=f"{layout} {backend} step {t}: momentum {k}")


def _distributed_cases():
    cases = {}
    for layout in ("dtensor", "ddp"):
        for backend in ("auto", "batched"):
            for dtype, dname in ((F64, "f64"), (torch.float32, "f32")):
                for variant in VARIANTS:
                    cases[f"{layout}-{backend}-{dname}-{_variant_id(variant)}"] = (layout, backend, dtype, variant)
    return cases


DISTRIBUTED_CASES = _distributed_cases()


def _worker(rank, out_dir):
    checks = {name: (lambda _rank, c=case: _distributed_run(*c)) for name, case in DISTRIBUTED_CASES.items()}
    gloo_ranks.run_checks(rank, WORLD, out_dir, checks)


@pytest.fixture(scope="module")
def distributed_results():
    with tempfile.TemporaryDirectory() as out_dir:
        yield gloo_ranks.spawn(_worker, out_dir, WORLD, SPAWN_TIMEOUT_S)


@pytest.mark.distributed
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
@pytest.mark.parametrize("case", list(DISTRIBUTED_CASES))
def test_distributed_matches_float64_truth(distributed_results, case):
    failures = [f"rank {r}:\n{res.get(case, 'not run')}" for r, res in enumerate(distributed_results)
                if res.get(case) != "ok"]
    assert not failures, "\n".join(failures)
