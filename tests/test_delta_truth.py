"""AdamHD's μ/δ bookkeeping and AdamC's corrected decay, on every backend, against the float64 closed form of
tests/float64_truth.py (which imports nothing of fusedecay).

Two levels:
  * the optimizer classes with ``backend`` = reference, cpu (the compiled CPU kernel), triton (the interpreter on
    CPU where no GPU exists) and cuda: the whole chain — μ_0 = mean|θ_0|, δ = c·μ inside the kernel, Σ|θ_t|
    after the decay, μ ← β0 μ + (1 − β0) mean|θ_t| — over several steps, with several groups (prox/euler,
    ema/mean/fixed δ, corrected and not, λ = 0), a cosine schedule (float and tensor lr), maximize, odd, empty
    and non-contiguous params and a param skipped for a step. Params, exp_avg, exp_avg_sq, step and delta_mu are
    compared after every step.
  * the kernels themselves (CPU with a 64-element chunk so tensors straddle chunks, Triton with 32-element
    blocks, CUDA): fed the truth's μ, their params and moments must follow the truth's update with δ = c·μ and
    their Σ|θ_t| must be the truth's sum over the *decayed* weights.
"""
import pytest
import torch

import float64_truth as T
from fusedecay import AdamC, AdamHD, backends
from snippets import cpu_backends, require
from tolerances import ATOL, RTOL, assert_close

F64 = torch.float64
STEPS = 5
ETA_MIN = 1e-3
SKIPPED = ("vec", 2)   # (param, step): its grad is None at that step
CUDA = torch.cuda.is_available()

SHAPES = {"mat": (13, 7), "vec": (40,), "nc": (5, 9), "empty": (0,), "long": (300,), "one": (1,), "sq": (6, 6),
          "plain": (9,)}

# Optimizer group options (lr: the cosine schedule's base), params by name.
ADAMHD_GROUPS = [
    dict(names=["mat", "vec", "nc", "empty"], lr=0.03, update="prox", delta_mode="ema", delta_scale=0.7,
         delta_beta=0.8, weight_decay=0.5),
    dict(names=["long", "one"], lr=0.02, update="euler", delta_mode="mean", delta_scale=1.5, weight_decay=0.3,
         corrected=True),
    dict(names=["sq"], lr=0.05, update="prox", delta_mode="fixed", delta=0.05, weight_decay=0.4, corrected=True,
         max_lr=0.08, betas=(0.8, 0.99), bias_correction=False),
    dict(names=["plain"], lr=0.01, update="euler", weight_decay=0.0),
]
ADAMC_GROUPS = [
    dict(names=["mat", "vec", "nc", "empty", "long", "one"], lr=0.03, weight_decay=0.5),
    dict(names=["sq"], lr=0.05, weight_decay=0.4, max_lr=0.08, betas=(0.8, 0.99)),
    dict(names=["plain"], lr=0.02, weight_decay=0.3, corrected=False),
]


def initial_values():
    return T.random_values(SHAPES, scale=0.5)


def grad_stream():
    return T.grad_stream(SHAPES, STEPS, SKIPPED)


def make_param(x, dtype, name, device):
    x = x.to(device, dtype)
    if name == "nc":   # a non-contiguous (5, 9) view of a (9, 5) tensor
        return torch.nn.Parameter(x.t().contiguous().t())
    return torch.nn.Parameter(x.clone())


def truth_for(kind, g, init_value, maximize):
    """The float64 truth of one tensor in group ``g`` of an AdamHD/AdamC optimizer."""
    corrected = g.get("corrected", kind == "AdamC")
    max_lr = g.get("max_lr", g["lr"]) if corrected else None   # default γ_max: the scheduler's initial_lr
    common = dict(weight_decay=g["weight_decay"], max_lr=max_lr, betas=g.get("betas", (0.9, 0.999)),
                  bias_correction=g.get("bias_correction", True), maximize=maximize)
    if kind == "AdamC":
        return T.AdamDecayTruth(init_value, decay="l2", **common)
    return T.AdamDecayTruth(init_value, decay=g["update"], delta_mode=g.get("delta_mode", "ema"),
                            delta=g.get("delta"), delta_scale=g.get("delta_scale", 1.0),
                            delta_beta=g.get("delta_beta", 0.99), **common)


def run_class_against_truth(kind, backend, dtype, *, maximize, tensor_lr, device="cpu"):
    init, grads = initial_values(), grad_stream()
    groups = ADAMHD_GROUPS if kind == "AdamHD" else ADAMC_GROUPS
    params = {k: make_param(v, dtype, k, device) for k, v in init.items()}
    assert not params["nc"].is_contiguous()
    opt_groups, truths = [], {}
    for g in groups:
        opts = {k: v for k, v in g.items() if k != "names"}
        if tensor_lr:
            opts["lr"] = torch.tensor(g["lr"], dtype=dtype, device=device)   # the scheduler fills it in place
        opt_groups.append(dict(opts, params=[params[n] for n in g["names"]]))
        for n in g["names"]:
            truths[n] = (g, truth_for(kind, g, init[n].to(dtype), maximize))
    cls = AdamHD if kind == "AdamHD" else AdamC
    opt = cls(opt_groups, maximize=maximize, backend=backend)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=STEPS, eta_min=ETA_MIN)
    for t, gs in enumerate(grads):
        for k, p in params.items():
            p.grad = None if gs[k] is None else gs[k].to(device, dtype)
        opt.step()
        sched.step()
        for k, p in params.items():
            g, tr = truths[k]
            if gs[k] is not None:
                tr.step(gs[k].to(dtype), T.cosine_lr(g["lr"], t, STEPS, ETA_MIN))
            what = f"{kind}/{backend} step {t}: {k}"
            st = opt.state[p]
            assert_close(p.detach().cpu(), tr.theta, dtype=dtype, msg=f"{what} param")
            assert_close(st["exp_avg"].cpu(), tr.m, dtype=dtype, msg=f"{what} exp_avg")
            assert_close(st["exp_avg_sq"].cpu(), tr.v, dtype=dtype, msg=f"{what} exp_avg_sq")
            assert float(st["step"]) == tr.t, what
            assert ("delta_mu" in st) == tr.tracks, what
            if tr.tracks:
                assert_close(st["delta_mu"].cpu(), tr.mu, dtype=dtype, msg=f"{what} delta_mu")
    for k, p in params.items():
        if p.numel():
            assert not torch.equal(p.detach().cpu().to(F64), init[k].to(dtype).to(F64)), k


VARIANTS = [dict(maximize=False, tensor_lr=False), dict(maximize=True, tensor_lr=True)]


def _variant_id(v):
    return "-".join(k for k, on in v.items() if on) or "plain"




@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kind", ["AdamHD", "AdamC"])
def test_class_matches_float64_truth(kind, backend, dtype, variant):
    if backend not in cpu_backends():
        pytest.skip(f"CPU extension not built: {backends.unavailable_reasons()}")
    run_class_against_truth(kind, backend, dtype, **variant)


@pytest.mark.triton
@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
@pytest.mark.parametrize("kind", ["AdamHD", "AdamC"])
def test_triton_class_matches_float64_truth(kind, variant):
    require("triton")
    run_class_against_truth(kind, "triton", torch.float32, device="cuda" if CUDA else "cpu", **variant)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("variant", VARIANTS, ids=_variant_id)
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", ["AdamHD", "AdamC"])
def test_cuda_class_matches_float64_truth(kind, dtype, variant):
    run_class_against_truth(kind, "cuda", dtype, device="cuda", **variant)


# ------------------------------------------------------------------------------------------------
# The kernels, fed the truth's μ
# ------------------------------------------------------------------------------------------------

KERNEL_SHAPES = [(37,), (5, 7), (0,), (130,), (3, 1, 11), (1,)]
KERNEL_LRS = [0.03, 0.025, 0.02, 0.012]


def run_kernel_against_truth(impl, dtype, device, *, decay, delta_mode, corrected, maximize=False):
    """Each step: steps += 1, μ and δ from the truth, one kernel call; params, moments and Σ|θ_t| vs the truth."""
    gen = torch.Generator().manual_seed(5)
    init = [torch.randn(s, generator=gen, dtype=F64) * 0.5 for s in KERNEL_SHAPES]
    mu_dtype = F64 if dtype == F64 else torch.float32
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.6, decay=decay,
                 delta_fixed=0.04 if delta_mode == "fixed" else None, delta_scale=0.8,
                 max_lr=0.05 if corrected else None, bias_correction=True, maximize=maximize)
    truths = [T.AdamDecayTruth(x.to(dtype), decay=decay, weight_decay=0.6, delta_mode=delta_mode, delta=0.04,
                               delta_scale=0.8, delta_beta=0.9, max_lr=hyper["max_lr"], maximize=maximize)
              for x in init]
    params = [x.to(device, dtype) for x in init]
    ms = [torch.zeros_like(p) for p in params]
    vs = [torch.zeros_like(p) for p in params]
    steps = [torch.zeros((), device=device) for _ in params]
    for t, lr in enumerate(KERNEL_LRS):
        grads = [torch.randn(s, generator=gen, dtype=F64).to(dtype) for s in KERNEL_SHAPES]
        deltas = [tr.current_delta() for tr in truths]
        mus = [(tr.mu if tr.mu is not None else torch.zeros((), dtype=F64)).to(device, mu_dtype) for tr in truths]
        torch._foreach_add_(steps, 1)
        sums = torch.full((len(params),), float("nan"), dtype=mu_dtype, device=device)
        impl(params, [g.to(device) for g in grads], ms, vs, steps, mus, sums, lr=lr, **hyper)
        for i, tr in enumerate(truths):
            tr.step(grads[i], lr)
            what = f"{decay}/{delta_mode} corrected={corrected} step {t} tensor {i} (δ = {float(deltas[i] or 0):.4g})"
            assert_close(params[i].cpu(), tr.theta, dtype=dtype, msg=f"{what}: param")
            assert_close(ms[i].cpu(), tr.m, dtype=dtype, msg=f"{what}: exp_avg")
            assert_close(vs[i].cpu(), tr.v, dtype=dtype, msg=f"{what}: exp_avg_sq")
            assert_close(sums[i].cpu(), tr.theta.abs().sum(), dtype=dtype, msg=f"{what}: Σ|θ_t|")


KERNEL_CASES = [("prox", "ema", False), ("prox", "mean", True), ("euler", "ema", True), ("euler", "fixed", False),
                ("l2", "fixed", True)]


def _cpu_kernel(chunk_size=64):
    cpp = require("fusedecay._cpp_backend")

    def run(*args, **kw):
        return cpp.adam_decay(*args, chunk_size=chunk_size, **kw)
    return run


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("decay,delta_mode,corrected", KERNEL_CASES)
def test_cpu_kernel_matches_float64_truth(decay, delta_mode, corrected, dtype):
    run_kernel_against_truth(_cpu_kernel(), dtype, "cpu", decay=decay, delta_mode=delta_mode, corrected=corrected,
                             maximize=decay == "euler")


@pytest.mark.triton
@pytest.mark.parametrize("decay,delta_mode,corrected", KERNEL_CASES)
def test_triton_kernel_matches_float64_truth(monkeypatch, decay, delta_mode, corrected):
    require("triton")
    from fusedecay.triton_kernels import adam_decay as K
    if not CUDA:   # small blocks: tensors span several blocks at these sizes
        monkeypatch.setattr(K, "DEFAULT_BLOCK", 32)
        monkeypatch.setattr(K, "DEFAULT_NUM_WARPS", 1)
    K.clear_cache()
    try:
        run_kernel_against_truth(K.adam_decay, torch.float32, "cuda" if CUDA else "cpu", decay=decay,
                                 delta_mode=delta_mode, corrected=corrected, maximize=decay == "euler")
    finally:
        K.clear_cache()


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("chunk_size", [64, 0])
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("decay,delta_mode,corrected", KERNEL_CASES)
def test_cuda_kernel_matches_float64_truth(decay, delta_mode, corrected, dtype, chunk_size):
    if backends.available_backends().get("cuda") is None:
        pytest.skip(f"CUDA extension not built: {backends.unavailable_reasons()}")
    run_kernel_against_truth(_cpu_kernel(chunk_size), dtype, "cuda", decay=decay, delta_mode=delta_mode,
                             corrected=corrected, maximize=decay == "euler")


# ------------------------------------------------------------------------------------------------
# The truth itself
# ------------------------------------------------------------------------------------------------

def test_truth_delta_bookkeeping_by_hand():
    """μ_0 = mean|θ_0|, δ = c·μ, μ ← β0 μ + (1 − β0) mean|θ_t| after the step, on a two-element tensor with a
    zero gradient (u = 0, so θ_t is the decay alone: prox inside the quadratic zone divides by 1 + τ)."""
    tr = T.AdamDecayTruth(torch.tensor([0.2, -0.6], dtype=F64), decay="prox", weight_decay=0.5, delta_mode="ema",
                          delta_scale=2.0, delta_beta=0.75)
    # c·mean|θ_0|
    assert float(tr.current_delta()) == pytest.approx(2.0 * 0.4, rel=RTOL[F64], abs=ATOL[F64])
    tr.step(torch.zeros(2, dtype=F64), lr=0.1)                               # τ = 0.05; |θ̃| ≤ (1 + τ)δ
    assert tr.theta.tolist() == pytest.approx([0.2 / 1.05, -0.6 / 1.05], rel=RTOL[F64], abs=ATOL[F64])
    # μ from the decayed weights
    assert float(tr.mu) == pytest.approx(0.75 * 0.4 + 0.25 * 0.4 / 1.05, rel=RTOL[F64], abs=ATOL[F64])
    tr = T.AdamDecayTruth(torch.tensor([3.0], dtype=F64), decay="prox", weight_decay=0.5, delta_mode="fixed",
                          delta=0.5)
    tr.step(torch.zeros(1, dtype=F64), lr=0.1)                               # outside: θ − τδ sign(θ)
    assert tr.theta.tolist() == pytest.approx([3.0 - 0.05 * 0.5], rel=RTOL[F64], abs=ATOL[F64])
    assert T.mean_abs(torch.zeros(0, dtype=F64)).item() == 0.0
    # corrected: λ_t = λγ_t/γ_max, l2 with a zero gradient is θ(1 − γ·λγ/γ_max)
    tr = T.AdamDecayTruth(torch.tensor([1.0], dtype=F64), decay="l2", weight_decay=0.5, max_lr=0.2)
    tr.step(torch.zeros(1, dtype=F64), lr=0.1)
    assert tr.theta.tolist() == pytest.approx([1 - 0.1 * 0.5 * 0.1 / 0.2], rel=RTOL[F64], abs=ATOL[F64])
