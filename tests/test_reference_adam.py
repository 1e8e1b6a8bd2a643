"""The reference AdamHD/AdamC against torch's optimizers and against independent formulas (float64)."""
import copy
import math

import pytest
import torch

from fusedecay import AdamC, AdamHD
from fusedecay.reference import huber_grad, huber_prox
from tolerances import assert_close

F64 = torch.float64
SHAPES = [(7, 5), (13,), (1,), (0,), (4, 3, 2)]


def make_params(seed=0, shapes=SHAPES, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def clone_params(ps):
    return [torch.nn.Parameter(p.detach().clone()) for p in ps]


def grad_stream(params, steps, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params] for _ in range(steps)]


def set_grads(params, grads):
    for p, g in zip(params, grads):
        p.grad = g.clone()


def run(opt, params, grads, sched=None, before_step=None):
    for t, gs in enumerate(grads):
        set_grads(params, gs)
        if before_step is not None:
            before_step(t)
        opt.step()
        if sched is not None:
            sched.step()


def assert_state_matches(ours, theirs, p_ours, p_theirs):
    for a, b in zip(p_ours, p_theirs):
        assert_close(a.detach(), b.detach())
        sa, sb = ours.state[a], theirs.state[b]
        assert_close(sa["exp_avg"], sb["exp_avg"])
        assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"])
        assert float(sa["step"]) == float(sb["step"])


@pytest.mark.parametrize("update", ["prox", "euler"])
@pytest.mark.parametrize("delta_mode", ["ema", "mean", "fixed"])
def test_adamhd_without_decay_is_adam(update, delta_mode):
    ps = make_params()
    qs = clone_params(ps)
    kw = dict(delta=0.3) if delta_mode == "fixed" else {}
    ours = AdamHD([{"params": ps[:2], "lr": 1e-2}, {"params": ps[2:], "lr": 3e-3, "betas": (0.8, 0.99)}],
                  weight_decay=0.0, update=update, delta_mode=delta_mode, backend="reference", **kw)
    torch_adam = torch.optim.Adam([{"params": qs[:2], "lr": 1e-2}, {"params": qs[2:], "lr": 3e-3, "betas": (0.8, 0.99)}])
    grads = grad_stream(ps, 20)
    run(ours, ps, grads)
    run(torch_adam, qs, grads)
    assert_state_matches(ours, torch_adam, ps, qs)


def test_adamhd_euler_with_huge_delta_is_adamw():
    ps = make_params(2)
    qs = clone_params(ps)
    ours = AdamHD(ps, lr=1e-2, weight_decay=0.1, update="euler", delta_mode="fixed", delta=1e30, backend="reference")
    ref = torch.optim.AdamW(qs, lr=1e-2, weight_decay=0.1)
    grads = grad_stream(ps, 20)
    run(ours, ps, grads)
    run(ref, qs, grads)
    assert_state_matches(ours, ref, ps, qs)


def test_adamhd_prox_with_huge_delta_is_proximal_l2():
    """θ_t = (θ_{t−1} − γu_t)/(1 + γλ): Adam (no decay) steps followed by division, done independently."""
    lr, wd = 1e-2, 0.2
    ps = make_params(3)
    qs = clone_params(ps)
    ours = AdamHD(ps, lr=lr, weight_decay=wd, update="prox", delta_mode="fixed", delta=1e30, backend="reference")
    adam = torch.optim.Adam(qs, lr=lr)
    grads = grad_stream(ps, 15)
    run(ours, ps, grads)
    for gs in grads:
        set_grads(qs, gs)
        adam.step()
        with torch.no_grad():
            for q in qs:
                q.div_(1 + lr * wd)
    assert_state_matches(ours, adam, ps, qs)


@pytest.mark.parametrize("update", ["prox", "euler"])
def test_tiny_delta_approaches_no_decay(update):
    lr, wd, steps, delta = 1e-2, 0.5, 10, 1e-9
    ps = make_params(4)
    qs = clone_params(ps)
    ours = AdamHD(ps, lr=lr, weight_decay=wd, update=update, delta_mode="fixed", delta=delta, backend="reference")
    adam = torch.optim.Adam(qs, lr=lr)
    grads = grad_stream(ps, steps)
    run(ours, ps, grads)
    run(adam, qs, grads)
    for p, q in zip(ps, qs):
        # Each step moves a coordinate by at most τδ more than Adam does (prox: at most τ|θ̃|/(1+τ) ≤ τδ inside).
        bound = steps * lr * wd * delta * 1.0001
        assert (p - q).abs().max().item() <= bound if p.numel() else True
    # ... and the decay is active at all: with a moderate δ the result differs from Adam.
    rs = make_params(4)
    AdamHD_mod = AdamHD(rs, lr=lr, weight_decay=wd, update=update, delta_mode="fixed", delta=0.1, backend="reference")
    run(AdamHD_mod, rs, grads)
    assert (rs[0] - qs[0]).abs().max().item() > 100 * steps * lr * wd * delta


def _independent_adamhd(params, grads, *, lr, wd, beta0, c, update, mode):
    """AdamHD written out from the spec with torch's Adam for u_t and our own δ bookkeeping."""
    qs = clone_params(params)
    adam = torch.optim.Adam(qs, lr=lr)
    mu = [q.detach().abs().mean() if q.numel() else torch.zeros((), dtype=F64) for q in qs]
    for gs in grads:
        set_grads(qs, gs)
        prev = [q.detach().clone() for q in qs]
        adam.step()  # θ̃ = θ − γu
        with torch.no_grad():
            for i, q in enumerate(qs):
                delta = c * mu[i]
                tau = lr * wd
                if update == "prox":
                    y = q.detach().clone()
                    inside = y.abs() <= (1 + tau) * delta
                    q.copy_(torch.where(inside, y / (1 + tau), y - tau * delta * torch.sign(y)))
                else:
                    q.sub_(tau * prev[i].clamp(-delta.item(), delta.item()))
                m = q.abs().mean() if q.numel() else torch.zeros((), dtype=F64)
                mu[i] = m if mode == "mean" else beta0 * mu[i] + (1 - beta0) * m
    return qs, adam, mu


@pytest.mark.parametrize("update", ["prox", "euler"])
@pytest.mark.parametrize("mode", ["mean", "ema"])
def test_delta_tracks_mean_magnitude_as_specified(update, mode):
    lr, wd, beta0, c = 3e-2, 0.3, 0.9, 0.7
    ps = make_params(5)
    grads = grad_stream(ps, 12)
    ours = AdamHD(ps, lr=lr, weight_decay=wd, update=update, delta_mode=mode, delta_scale=c, delta_beta=beta0,
                  backend="reference")
    run(ours, ps, grads)
    qs, adam, mu = _independent_adamhd(make_params(5), grads, lr=lr, wd=wd, beta0=beta0, c=c, update=update, mode=mode)
    assert_state_matches(ours, adam, ps, qs)
    for p, m in zip(ps, mu):
        assert_close(ours.state[p]["delta_mu"], m.to(F64))


def test_huber_prox_elementwise_both_branches_and_boundary():
    tau, delta = 0.25, 0.4
    edge = (1 + tau) * delta
    y = torch.tensor([0.0, 0.1, -0.3, edge, -edge, edge * (1 + 1e-12), 0.9, -2.0, 7.5], dtype=F64)
    got = huber_prox(y, tau, delta)
    want = torch.tensor([v / (1 + tau) if abs(v) <= edge else v - tau * delta * math.copysign(1, v) for v in y.tolist()],
                        dtype=F64)
    assert_close(got, want)
    # Continuity at the boundary: both branches give ±δ there.
    assert_close(got[3], torch.tensor(delta, dtype=F64))
    assert_close(got[4], torch.tensor(-delta, dtype=F64))
    # It is the minimiser of ½(x − y)² + τH_δ(x): no point on a fine grid does better.
    grid = torch.linspace(-10, 10, 200001, dtype=F64)
    h = torch.where(grid.abs() <= delta, 0.5 * grid ** 2, delta * grid.abs() - 0.5 * delta ** 2)
    for yi, xi in zip(y.tolist(), got.tolist()):
        obj = lambda x, hx: 0.5 * (x - yi) ** 2 + tau * hx  # noqa: E731
        hx = 0.5 * xi ** 2 if abs(xi) <= delta else delta * abs(xi) - 0.5 * delta ** 2
        assert obj(torch.tensor(xi, dtype=F64), hx) <= obj(grid, h).min() + 1e-12


def test_huber_grad_is_clip():
    x = torch.randn(1000, dtype=F64) * 3
    assert torch.equal(huber_grad(x, 0.5), x.clamp(-0.5, 0.5))
    assert torch.equal(huber_grad(x, torch.tensor(0.5, dtype=F64)), x.clamp(-0.5, 0.5))


def test_adamc_constant_lr_is_adamw():
    ps = make_params(6)
    qs = clone_params(ps)
    ours = AdamC([{"params": ps[:3]}, {"params": ps[3:], "weight_decay": 0.3}], lr=2e-2, weight_decay=0.1,
                 backend="reference")
    ref = torch.optim.AdamW([{"params": qs[:3]}, {"params": qs[3:], "weight_decay": 0.3}], lr=2e-2, weight_decay=0.1)
    grads = grad_stream(ps, 20)
    run(ours, ps, grads)
    run(ref, qs, grads)
    assert_state_matches(ours, ref, ps, qs)


@pytest.mark.parametrize("corrected", [True, False])
def test_adamc_cosine_schedule_follows_lambda_t(corrected):
    """λ_t = λ·γ_t/γ_max (γ_max = the scheduler's initial_lr); corrected=False is plain AdamW decay."""
    lr0, wd, steps = 5e-2, 0.4, 25
    ps = make_params(7)
    qs = clone_params(ps)
    ours = AdamC(ps, lr=lr0, weight_decay=wd, corrected=corrected, backend="reference")
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(ours, T_max=steps)
    adam = torch.optim.Adam(qs, lr=lr0)
    sched_q = torch.optim.lr_scheduler.CosineAnnealingLR(adam, T_max=steps)
    grads = grad_stream(ps, steps)
    run(ours, ps, grads, sched)
    seen = []
    for gs in grads:
        set_grads(qs, gs)
        lr_t = adam.param_groups[0]["lr"]
        lam_t = wd * lr_t / lr0 if corrected else wd
        seen.append(lr_t * lam_t)
        with torch.no_grad():
            for q in qs:
                q.mul_(1 - lr_t * lam_t)  # u_t does not depend on θ, so decaying first is AdamW's order
        adam.step()
        sched_q.step()
    assert_state_matches(ours, adam, ps, qs)
    assert max(seen) > 5 * min(x for x in seen if x > 0)  # the schedule really moved the decay


def test_adamhd_corrected_uses_scheduled_lambda():
    lr0, wd = 4e-2, 0.3
    ps = make_params(8, shapes=[(9, 4)])
    ours = AdamHD(ps, lr=lr0, weight_decay=wd, update="euler", delta_mode="fixed", delta=1e30, corrected=True,
                  max_lr=0.08, backend="reference")
    qs = clone_params(ps)
    ref = AdamC(qs, lr=lr0, weight_decay=wd, max_lr=0.08, backend="reference")
    grads = grad_stream(ps, 10)
    run(ours, ps, grads)
    run(ref, qs, grads)
    assert_state_matches(ours, ref, ps, qs)


def test_lr_tensor_equals_float_lr():
    ps, qs = make_params(9), make_params(9)
    a = AdamHD(ps, lr=1e-2, backend="reference")
    b = AdamHD(qs, lr=torch.tensor(1e-2, dtype=F64), backend="reference")
    grads = grad_stream(ps, 8)
    run(a, ps, grads)
    run(b, qs, grads)
    assert_state_matches(a, b, ps, qs)


def test_maximize_is_minimizing_the_negation():
    ps, qs = make_params(10), make_params(10)
    a = AdamHD(ps, lr=1e-2, maximize=True, backend="reference")
    b = AdamHD(qs, lr=1e-2, backend="reference")
    grads = grad_stream(ps, 6)
    run(a, ps, grads)
    run(b, qs, [[-g for g in gs] for gs in grads])
    assert_state_matches(a, b, ps, qs)


def test_grad_scale_and_found_inf():
    ps, qs = make_params(11), make_params(11)
    a = AdamHD(ps, lr=1e-2, backend="reference")
    b = AdamHD(qs, lr=1e-2, backend="reference")
    grads = grad_stream(ps, 5)
    for t, gs in enumerate(grads):
        set_grads(ps, [g * 8 for g in gs])
        a.grad_scale = torch.tensor(8.0, dtype=torch.float32)
        a.found_inf = torch.tensor(0.0)
        a.step()
        set_grads(qs, gs)
        b.step()
    assert_state_matches(a, b, ps, qs)
    before = [p.detach().clone() for p in ps]
    mus = [a.state[p]["delta_mu"].clone() for p in ps]
    set_grads(ps, [g * float("inf") for g in grads[0]])
    a.found_inf = torch.tensor(1.0)
    a.step()
    for p, old, mu in zip(ps, before, mus):
        assert torch.equal(p.detach(), old)
        assert torch.equal(a.state[p]["delta_mu"], mu)
        assert float(a.state[p]["step"]) == 5.0


def test_none_grads_are_skipped_and_get_no_state():
    ps = make_params(12)
    opt = AdamHD(ps, lr=1e-2, backend="reference")
    ps[0].grad = torch.randn_like(ps[0])
    before = ps[1].detach().clone()
    opt.step()
    assert len(opt.state[ps[1]]) == 0 and torch.equal(ps[1].detach(), before)
    assert float(opt.state[ps[0]]["step"]) == 1.0


def test_non_contiguous_params():
    base = torch.randn(8, 6, dtype=F64)
    p = torch.nn.Parameter(base.t())  # non-contiguous view layout
    assert not p.is_contiguous()
    q = torch.nn.Parameter(base.t().contiguous())
    a = AdamHD([p], lr=1e-2, backend="reference")
    b = AdamHD([q], lr=1e-2, backend="reference")
    grads = grad_stream([p], 5)
    run(a, [p], grads)
    run(b, [q], grads)
    assert_state_matches(a, b, [p], [q])


@pytest.mark.parametrize("make", [
    lambda ps: AdamHD(ps, lr=1e-2, weight_decay=0.1, delta_mode="ema", backend="reference"),
    lambda ps: AdamHD(ps, lr=1e-2, weight_decay=0.1, update="euler", delta_mode="mean", backend="reference"),
    lambda ps: AdamC(ps, lr=1e-2, weight_decay=0.1, backend="reference"),
])
def test_state_dict_round_trip_resumes_bit_identically(make):
    ps = make_params(14)
    grads = grad_stream(ps, 10)
    opt = make(ps)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    run(opt, ps, grads[:4], sched)
    saved_opt = copy.deepcopy(opt.state_dict())  # state_dict() aliases live state, like a file would not
    saved_sched = copy.deepcopy(sched.state_dict())
    saved_params = [p.detach().clone() for p in ps]
    run(opt, ps, grads[4:], sched)

    qs = [torch.nn.Parameter(x.clone()) for x in saved_params]
    opt2 = make(qs)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=10)
    opt2.load_state_dict(saved_opt)
    sched2.load_state_dict(saved_sched)
    run(opt2, qs, grads[4:], sched2)
    for p, q in zip(ps, qs):
        assert torch.equal(p.detach(), q.detach())
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[q][k]), k


BAD = [
    (dict(lr=-1.0), ValueError, "lr"),
    (dict(eps=-1e-8), ValueError, "eps"),
    (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    (dict(betas=(1.0, 0.999)), ValueError, "betas"),
    (dict(betas=(0.9, -0.1)), ValueError, "betas"),
    (dict(delta_mode="fixed", delta=0.0), ValueError, "delta"),
    (dict(delta_mode="fixed"), ValueError, "delta"),
    (dict(delta_scale=0.0), ValueError, "delta_scale"),
    (dict(delta_beta=1.0), ValueError, "delta_beta"),
    (dict(update="sgd"), ValueError, "update"),
    (dict(delta_mode="median"), ValueError, "delta_mode"),
    (dict(backend="cuda-ish"), ValueError, "backend"),
    (dict(max_lr=0.0, corrected=True), ValueError, "max_lr"),
    # Only lr and max_lr may be tensors: the kernels take the others as scalars (a tensor would be a host read
    # at every step, a device sync on GPU).
    (dict(betas=(torch.tensor(0.9), 0.999)), TypeError, r"betas\[0\]"),
    (dict(eps=torch.tensor(1e-8)), TypeError, "eps"),
    (dict(weight_decay=torch.tensor(0.1)), TypeError, "weight_decay"),
    (dict(delta_scale=torch.tensor(1.0)), TypeError, "delta_scale"),
    (dict(delta_beta=torch.tensor(0.9)), TypeError, "delta_beta"),
    (dict(delta_mode="fixed", delta=torch.tensor(0.1)), TypeError, "delta"),
]


@pytest.mark.parametrize("kwargs,exc,name", BAD)
def test_bad_hyperparameters_raise_naming_the_argument(kwargs, exc, name):
    p = make_params(15, shapes=[(3,)])
    with pytest.raises(exc, match=name):
        AdamHD(p, **kwargs)


def test_bad_param_group_changes_nothing():
    ps = make_params(16)
    opt = AdamHD(ps[:2], lr=1e-2, backend="reference")
    with pytest.raises(ValueError, match="delta_scale"):
        opt.add_param_group({"params": ps[2:], "delta_scale": -1.0})
    assert len(opt.param_groups) == 1


def test_sparse_and_complex_grads_raise():
    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = AdamHD([p], backend="reference")
    p.grad = torch.randn(5, 3).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        opt.step()
    assert len(opt.state[p]) == 0
    with pytest.raises(TypeError, match="complex"):
        AdamHD([torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))])


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_fp32_moments_for_bf16_params(backend):
    """moment_dtype=float32 keeps Adam's state in fp32 for bf16 params: the state really is fp32, it survives a
    state_dict round trip, and the params track a float64 run more closely than with bf16 moments."""
    g = torch.Generator().manual_seed(21)
    w64 = torch.randn(33, 17, generator=g, dtype=F64)
    grads = [torch.randn(33, 17, generator=g, dtype=F64) for _ in range(30)]

    def train(dtype, moment_dtype):
        p = torch.nn.Parameter(w64.to(dtype))
        opt = AdamHD([p], lr=1e-2, weight_decay=0.1, moment_dtype=moment_dtype, backend=backend)
        for x in grads:
            p.grad = x.to(dtype)
            opt.step()
        return p, opt

    ref, _ = train(F64, None)
    p32, opt32 = train(torch.bfloat16, torch.float32)
    p16, _ = train(torch.bfloat16, None)
    st = opt32.state[p32]
    assert st["exp_avg"].dtype == st["exp_avg_sq"].dtype == torch.float32 and p32.dtype == torch.bfloat16
    err32 = ((p32.double() - ref).norm() / ref.norm()).item()
    err16 = ((p16.double() - ref).norm() / ref.norm()).item()
    assert err32 < err16, (err32, err16)
    saved = copy.deepcopy(opt32.state_dict())
    q = torch.nn.Parameter(p32.detach().clone())
    opt = AdamHD([q], lr=1e-2, weight_decay=0.1, moment_dtype=torch.float32, backend=backend)
    opt.load_state_dict(saved)
    assert opt.state[q]["exp_avg"].dtype == torch.float32
    assert torch.equal(opt.state[q]["exp_avg_sq"], st["exp_avg_sq"])


def test_bad_moment_dtype_raises():
    with pytest.raises(ValueError, match="moment_dtype"):
        AdamC([torch.nn.Parameter(torch.randn(3))], moment_dtype=torch.int32)


def test_tensor_lr_and_max_lr_are_accepted():
    p = make_params(15, shapes=[(3,)])
    AdamC(p, lr=torch.tensor(1e-3), max_lr=torch.tensor(2e-3)).step()


@pytest.mark.parametrize("path", ["cpu-stacked", "foreach"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_found_inf", [False, True])
def test_update_delta_mu_matches_the_scalar_formula_bit_for_bit(dtype, with_found_inf, path):
    """μ ← β·μ + (1 − β)·Σ|θ|/numel, per tensor, as 0-d ops would compute it (the CPU path stacks the
    tensors, the GPU path uses foreach ops with the sizes as scalars: both must equal this)."""
    from fusedecay import functional

    def update_delta_mu(mus, sums, numels, beta, found_inf):
        if path == "foreach":
            skip = found_inf.bool() if found_inf is not None else None
            functional._update_delta_mu_foreach(mus, sums, [float(max(n, 1)) for n in numels], beta, skip)
        else:
            functional.update_delta_mu(mus, sums, numels, beta, found_inf)
    g = torch.Generator().manual_seed(3)
    numels = [1, 3, 0, 5, 2 ** 25 + 1, 7, 12345]
    mus = [torch.rand((), generator=g, dtype=dtype) for _ in numels]
    sums = torch.rand(len(numels), generator=g, dtype=dtype) * 1000
    beta = 0.99
    expect = [m * beta + (s / float(max(n, 1))) * (1 - beta) for m, s, n in zip(mus, sums.unbind(0), numels)]
    before = [m.clone() for m in mus]
    update_delta_mu(mus, sums, numels, beta, torch.tensor(1.0) if with_found_inf else None)
    for got, want, old in zip(mus, expect, before):
        assert torch.equal(got, old if with_found_inf else want)
