"""Triton AdamHD/AdamC kernels (fusedecay.triton_kernels.adam_decay) against the float64 reference.

On a machine without a GPU these run through Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), float32 only, with small blocks so that small odd-sized tensors still span several
blocks. Tests marked ``cuda`` run the compiled kernels: bf16, large tensors, CUDA-graph replay,
torch.compile.
"""
import os

import pytest
import torch

from snippets import require  # noqa: E402

triton = require("triton")  # skipped without triton locally; CI must have it
pytestmark = pytest.mark.triton

from fusedecay import AdamC, AdamHD, backends  # noqa: E402
from fusedecay import functional as F  # noqa: E402
from fusedecay.reference import adam_decay_reference  # noqa: E402
from fusedecay.triton_kernels import adam_decay as K  # noqa: E402
import float64_truth as T  # noqa: E402
from tolerances import assert_close, assert_low_precision_ok, assert_state_close  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

# Odd sizes, an empty tensor, a 0-d scalar, a size-1 dim; with a 32-element block most span several blocks.
SHAPES = [(37,), (5, 7), (0,), (3, 1, 11), (), (130,)]
SMALL_BLOCK = 32


@pytest.fixture(autouse=True)
def _small_blocks(monkeypatch, request):
    """Small blocks (multi-block tensors at small sizes) except in the cuda tests; a fresh metadata cache."""
    if request.node.get_closest_marker("cuda") is None:
        monkeypatch.setattr(K, "DEFAULT_BLOCK", SMALL_BLOCK)
        monkeypatch.setattr(K, "DEFAULT_NUM_WARPS", 1)
    K.clear_cache()
    yield
    K.clear_cache()


def _tensors(shapes, seed, dtype=torch.float32, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]


def _state(shapes, seed, dtype=torch.float32, device=DEVICE):
    """params, exp_avgs, exp_avg_sqs (non-trivial), steps, delta_mus: a mid-training state."""
    params = _tensors(shapes, seed, dtype, device)
    exp_avgs = [0.1 * x for x in _tensors(shapes, seed + 1, dtype, device)]
    exp_avg_sqs = [0.01 * x.abs() for x in _tensors(shapes, seed + 2, dtype, device)]
    steps = [torch.tensor(float(3 + i), device=device) for i in range(len(shapes))]
    mus = [F.init_delta_mu(p) for p in params]
    return params, exp_avgs, exp_avg_sqs, steps, mus


def _f64(xs):
    return [x.detach().clone().to(torch.float64) for x in xs]


def _clone(xs):
    return [x.detach().clone() for x in xs]


def _assert_lists_close(actual, expected, what):
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert_close(a, e, dtype=torch.float32, msg=f"{what}[{i}]")


def _assert_states_close(got, expected):
    """(params, exp_avgs, exp_avg_sqs, steps, delta_mus) against the same five lists of a reference run."""
    for name, g, e in zip(("param", "exp_avg", "exp_avg_sq", "step", "delta_mu"), got, expected):
        _assert_lists_close(g, e, name)


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------

def test_backend_registered_for_this_machine():
    b = backends.available_backends().get("triton")
    assert b is not None, backends.unavailable_reasons()
    if INTERPRET:
        assert b.supports(torch.device("cpu"), torch.float32)
        assert not b.supports(torch.device("cpu"), torch.bfloat16)
        with pytest.raises(RuntimeError, match="does not support"):
            backends.resolve("triton", torch.device("cpu"), torch.float64)
    else:
        assert b.supports(torch.device("cuda"), torch.bfloat16)
        assert not b.supports(torch.device("cpu"), torch.float32)


# ------------------------------------------------------------------------------------------------
# The kernel contract (functional API) against the float64 reference
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("decay", ["l2", "prox", "euler"])
@pytest.mark.parametrize("corrected", [False, True])
def test_functional_matches_reference(decay, corrected):
    """Several steps, δ from μ (EMA), lr a tensor that changes per step: params, m, v, μ, step."""
    params, m, v, steps, mus = _state(SHAPES, seed=10)
    ref = [_f64(params), _f64(m), _f64(v), _clone(steps), _f64(mus)]
    lr = torch.tensor(2e-2, device=DEVICE)
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.5, decay=decay, delta_mode="ema",
              delta_scale=0.8, delta_beta=0.9, max_lr=0.05 if corrected else None)
    for t in range(3):
        lr.fill_(2e-2 * (1 + t))
        grads = _tensors(SHAPES, seed=100 + t)
        F.adam_decay(params, grads, m, v, steps, mus, lr=lr, backend="triton", **kw)
        F.adam_decay(ref[0], _f64(grads), ref[1], ref[2], ref[3], ref[4], lr=lr, backend="reference", **kw)
        for name, got, exp in zip(("param", "exp_avg", "exp_avg_sq", "step", "delta_mu"),
                                  (params, m, v, steps, mus), ref):
            _assert_lists_close(got, exp, f"step {t} {name}")


@pytest.mark.parametrize("decay", ["prox", "euler"])
def test_fixed_delta_float_lr_maximize_no_bias_correction_eps0(decay):
    """Also eps = 0: masked tail lanes (0/0) must not leak into Σ|θ|."""
    params, m, v, steps, _ = _state(SHAPES, seed=20)
    ref = [_f64(params), _f64(m), _f64(v), _clone(steps)]
    grads = _tensors(SHAPES, seed=21)
    kw = dict(lr=0.03, beta1=0.8, beta2=0.95, eps=0.0, weight_decay=2.0, decay=decay, delta_fixed=0.4,
              delta_scale=1.0, max_lr=0.06, bias_correction=False, maximize=True)
    sums = torch.empty(len(SHAPES), device=DEVICE)
    sums_ref = torch.empty(len(SHAPES), dtype=torch.float64, device=DEVICE)
    K.adam_decay(params, grads, m, v, steps, None, sums, **kw)
    adam_decay_reference(ref[0], _f64(grads), ref[1], ref[2], ref[3], None, sums_ref, **kw)
    for got, exp, name in zip((params, m, v), ref, ("param", "exp_avg", "exp_avg_sq")):
        _assert_lists_close(got, exp, name)
    assert_close(sums, sums_ref, dtype=torch.float32)


def test_bias_correction_late_step():
    """1 − β^t from the step tensor at t ~ 1e4 and at t = 1 (the cancellation-prone end)."""
    params, m, v, _, _ = _state([(50,), (9,)], seed=30)
    steps = [torch.tensor(1.0, device=DEVICE), torch.tensor(12345.0, device=DEVICE)]
    ref = [_f64(params), _f64(m), _f64(v)]
    grads = _tensors([(50,), (9,)], seed=31)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decay="l2", delta_fixed=None,
              delta_scale=1.0, max_lr=None, bias_correction=True, maximize=False)
    K.adam_decay(params, grads, m, v, steps, None, None, **kw)
    adam_decay_reference(ref[0], _f64(grads), ref[1], ref[2], steps, None, None, **kw)
    _assert_lists_close(params, ref[0], "param")


@pytest.mark.parametrize("decay,maximize", [("prox", False), ("prox", True), ("euler", True), ("l2", True)])
def test_grad_scale_and_found_inf(decay, maximize):
    shapes = [(37,), (0,), (6, 5)]
    params, m, v, steps, mus = _state(shapes, seed=40)
    grads = _tensors(shapes, seed=41)
    before = [_clone(params), _clone(m), _clone(v), _clone(steps), _clone(mus)]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.3, decay=decay, delta_mode="mean",
              delta_scale=1.5, maximize=maximize)
    scale = torch.tensor(1024.0, device=DEVICE)
    scaled = [g * scale for g in grads]
    # Overflow step: nothing moves (params, moments, μ, step) — no host sync involved.
    F.adam_decay(params, scaled, m, v, steps, mus, backend="triton", grad_scale=scale,
                 found_inf=torch.tensor(1.0, device=DEVICE), **kw)
    for got, old in zip((params, m, v, steps, mus), before):
        for a, b in zip(got, old):
            assert torch.equal(a, b)
    # Clean step with a scaled gradient = reference with the unscaled gradient.
    ref = [_f64(params), _f64(m), _f64(v), _clone(steps), _f64(mus)]
    F.adam_decay(params, scaled, m, v, steps, mus, backend="triton", grad_scale=scale,
                 found_inf=torch.tensor(0.0, device=DEVICE), **kw)
    F.adam_decay(*ref[:1], _f64(grads), *ref[1:], backend="reference", **kw)
    _assert_states_close((params, m, v, steps, mus), ref)


def test_found_inf_abs_sums_are_of_unchanged_params():
    params, m, v, steps, _ = _state([(70,), (3,)], seed=45)
    sums = torch.full((2,), -1.0, device=DEVICE)
    K.adam_decay(params, _tensors([(70,), (3,)], seed=46), m, v, steps, None, sums, lr=0.1, beta1=0.9,
                 beta2=0.99, eps=1e-8, weight_decay=0.1, decay="euler", delta_fixed=0.5, delta_scale=1.0,
                 max_lr=None, bias_correction=True, maximize=False, found_inf=torch.tensor(2.0, device=DEVICE))
    assert_close(sums, torch.stack([p.abs().sum() for p in params]), dtype=torch.float32)


def test_empty_tensors_only():
    params, m, v, steps, mus = _state([(0,), (0, 3)], seed=50)
    sums = torch.full((2,), -1.0, device=DEVICE)
    K.adam_decay(params, _tensors([(0,), (0, 3)], seed=51), m, v, steps, mus, sums, lr=0.1, beta1=0.9, beta2=0.99,
                 eps=1e-8, weight_decay=0.1, decay="prox", delta_fixed=None, delta_scale=1.0, max_lr=None,
                 bias_correction=True, maximize=False)
    assert torch.equal(sums, torch.zeros(2, device=DEVICE))


def test_rerun_is_bit_identical():
    """Same inputs twice → identical params, state and Σ|θ| (ordered reduction, no atomics)."""
    shapes = [(300,), (17, 19), (5,)]
    outs = []
    for _ in range(2):
        K.clear_cache()
        params, m, v, steps, mus = _state(shapes, seed=60)
        sums = torch.empty(len(shapes), device=DEVICE)
        for t in range(2):
            K.adam_decay(params, _tensors(shapes, seed=61 + t), m, v, steps, mus, sums, lr=3e-2, beta1=0.9,
                         beta2=0.999, eps=1e-8, weight_decay=0.2, decay="prox", delta_fixed=None,
                         delta_scale=1.0, max_lr=None, bias_correction=True, maximize=False)
        outs.append(params + m + v + [sums])
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_non_contiguous_params():
    """A transposed (dense) param runs in place; a strided slice is staged and written back."""
    base = _tensors([(12, 10)], seed=70)[0]
    transposed = base.t()                     # dense, permuted strides: updated as a flat array
    big = _tensors([(9, 16)], seed=71)[0]
    sliced = big[:, ::3]                      # not dense: contiguous stand-in + copy back
    params = [transposed, sliced]
    m = [torch.zeros_like(p, memory_format=torch.preserve_format) + 0.01 for p in params]
    v = [torch.zeros_like(p, memory_format=torch.preserve_format) + 1e-4 for p in params]
    steps = [torch.tensor(1.0, device=DEVICE) for _ in params]
    grads = [torch.randn_like(p, memory_format=torch.preserve_format) for p in params]
    grads[1] = torch.randn(sliced.shape, device=DEVICE)  # contiguous grad for a strided param
    ref = [_f64(params), _f64(m), _f64(v)]
    untouched = big[:, 1::3].clone()
    kw = dict(lr=0.05, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.4, decay="euler", delta_fixed=0.3,
              delta_scale=1.0, max_lr=None, bias_correction=True, maximize=False)
    sums = torch.empty(2, device=DEVICE)
    K.adam_decay(params, grads, m, v, steps, None, sums, **kw)
    adam_decay_reference(ref[0], _f64(grads), ref[1], ref[2], steps, None, None, **kw)
    for got, exp, name in zip((params, m, v), ref, ("param", "exp_avg", "exp_avg_sq")):
        _assert_lists_close(got, exp, name)
    assert_close(base.t(), ref[0][0], dtype=torch.float32)      # the storage behind the view moved
    assert_close(big[:, ::3], ref[0][1], dtype=torch.float32)
    assert torch.equal(big[:, 1::3], untouched)                # neighbours of the slice did not
    assert_close(sums, torch.stack([r.abs().sum() for r in ref[0]]), dtype=torch.float32)


def test_mixed_moment_dtypes_split_into_launches():
    """A float16 exp_avg_sq for one tensor: a second launch, Σ|θ| still lands in the right slots."""
    shapes = [(37,), (9,), (50,)]
    params, m, v, steps, _ = _state(shapes, seed=75)
    v[1] = v[1].to(torch.float16)
    ref = [_f64(params), _f64(m), [x.clone() for x in v]]
    ref[2] = [x.to(torch.float64) if x.dtype == torch.float32 else x for x in ref[2]]
    grads = _tensors(shapes, seed=76)
    sums = torch.empty(3, device=DEVICE)
    sums_ref = torch.empty(3, dtype=torch.float64, device=DEVICE)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decay="l2", delta_fixed=None,
              delta_scale=1.0, max_lr=None, bias_correction=True, maximize=False)
    K.adam_decay(params, grads, m, v, steps, None, sums, **kw)
    adam_decay_reference(ref[0], _f64(grads), ref[1], ref[2], steps, None, sums_ref, **kw)
    assert [len(plans) for plans in K._PLAN_CACHE.values()] == [2]
    assert v[1].dtype == torch.float16
    _assert_lists_close(params, ref[0], "param")
    _assert_lists_close(m, ref[1], "exp_avg")
    assert_close(sums, sums_ref, dtype=torch.float32)


def test_metadata_built_once_in_steady_state(monkeypatch):
    """Same tensors → cached device metadata (no host→device copy); new grad storage → rebuilt, still right."""
    calls = []
    real = K._build_plans
    monkeypatch.setattr(K, "_build_plans", lambda *a, **k: calls.append(1) or real(*a, **k))
    params, m, v, steps, _ = _state(SHAPES, seed=80)
    grads = _tensors(SHAPES, seed=81)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decay="l2", delta_fixed=None,
              delta_scale=1.0, max_lr=None, bias_correction=True, maximize=False)
    for _ in range(3):
        K.adam_decay(params, grads, m, v, steps, None, None, **kw)
    assert len(calls) == 1
    ref = [_f64(params), _f64(m), _f64(v)]
    new_grads = [g.clone() * 2 for g in grads]  # new storage
    K.adam_decay(params, new_grads, m, v, steps, None, None, **kw)
    assert len(calls) == 2
    adam_decay_reference(ref[0], _f64(new_grads), ref[1], ref[2], steps, None, None, **kw)
    _assert_lists_close(params, ref[0], "param")


def test_errors_name_the_argument():
    params, m, v, steps, _ = _state([(5,)], seed=90)
    grads = _tensors([(5,)], seed=91)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decay="prox", delta_fixed=None,
              delta_scale=1.0, max_lr=None, bias_correction=True, maximize=False)
    with pytest.raises(ValueError, match="delta_mus"):
        K.adam_decay(params, grads, m, v, steps, None, None, **kw)
    with pytest.raises(ValueError, match="params\\[0\\]: dtype torch.int8"):   # code dtypes are for moments only
        K.adam_decay([params[0].to(torch.int8)], grads, m, v, steps, None, None, **{**kw, "decay": "l2"})
    with pytest.raises(ValueError, match="grads\\[0\\]: dtype torch.uint8"):
        K.adam_decay(params, [grads[0].to(torch.uint8)], m, v, steps, None, None, **{**kw, "decay": "l2"})
    with pytest.raises(ValueError, match="decay"):
        K.adam_decay(params, grads, m, v, steps, None, None, **{**kw, "decay": "l1"})
    with pytest.raises(ValueError, match="state_steps"):
        K.adam_decay(params, grads, m, v, [torch.tensor(1, device=DEVICE)], None, None, **{**kw, "decay": "l2"})
    with pytest.raises(ValueError, match="exp_avgs"):
        K.adam_decay(params, grads, [torch.zeros(4, device=DEVICE)], v, steps, None, None, **{**kw, "decay": "l2"})
    with pytest.raises(ValueError, match="abs_sums"):
        K.adam_decay(params, grads, m, v, steps, None, torch.empty(3, device=DEVICE), **{**kw, "decay": "l2"})
    with pytest.raises(ValueError, match="lr"):
        K.adam_decay(params, grads, m, v, steps, None, None, **{**kw, "decay": "l2", "lr": torch.ones(2)})
    assert torch.equal(steps[0], torch.tensor(3.0, device=DEVICE))  # nothing ran


# ------------------------------------------------------------------------------------------------
# Through the optimizer classes: δ modes, param groups, tensor lr, schedules
# ------------------------------------------------------------------------------------------------

def _groups(params, lr):
    """Three groups: decayed matrices, an odd-sized vector group with its own lr, no-decay biases."""
    return [{"params": params[:2]}, {"params": params[2:4], "lr": lr * 0.5 if isinstance(lr, float) else lr},
            {"params": params[4:], "weight_decay": 0.0}]


def _run_pair(make_opt, shapes, steps, lr_schedule=None, seed=0):
    """The same optimizer with backend="triton" (fp32) and "reference" (fp64); compare every step."""
    p32 = [torch.nn.Parameter(x) for x in _tensors(shapes, seed)]
    p64 = [torch.nn.Parameter(x.detach().double()) for x in p32]
    opt, ref = make_opt(p32, "triton"), make_opt(p64, "reference")
    for t in range(steps):
        for a, b, g in zip(p32, p64, _tensors(shapes, seed + 1 + t)):
            a.grad, b.grad = g, g.double()
        if lr_schedule is not None:
            for o in (opt, ref):
                for group in o.param_groups:
                    lr_schedule(group, t)
        opt.step()
        ref.step()
        for i, (a, b) in enumerate(zip(p32, p64)):
            assert_close(a.detach(), b.detach(), dtype=torch.float32, msg=f"step {t} param {i}")
            sa, sb = opt.state[a], ref.state[b]
            assert set(sa) == set(sb)
            for k in sa:
                assert_close(sa[k], sb[k], dtype=torch.float32, msg=f"step {t} param {i} state {k}")
    return opt, p32


@pytest.mark.parametrize("delta_mode", ["fixed", "mean", "ema"])
@pytest.mark.parametrize("update", ["prox", "euler"])
def test_adamhd_class_matches_reference(delta_mode, update):
    shapes = [(13, 7), (40,), (3, 5), (1,), (0,), (9,)]
    delta = 0.2 if delta_mode == "fixed" else None
    corrected = delta_mode != "mean"
    lr = torch.tensor(0.02, device=DEVICE)

    def make(ps, backend):
        return AdamHD(_groups(ps, lr), lr=lr, weight_decay=0.7, update=update, delta_mode=delta_mode, delta=delta,
                      delta_scale=0.9, delta_beta=0.8, corrected=corrected, max_lr=0.04, backend=backend)

    _run_pair(make, shapes, steps=3, lr_schedule=lambda g, t: g["lr"].fill_(0.02 * (1 + t)), seed=1)


@pytest.mark.parametrize("lr_kind", ["float", "tensor"])
def test_adamc_class_with_schedule_matches_reference(lr_kind):
    """AdamC, γ_max = lr at construction (a tensor too), lr following a schedule; one uncorrected group."""
    shapes = [(11, 6), (25,), (4,), (7, 3), (2,)]
    lr0 = 0.05 if lr_kind == "float" else torch.tensor(0.05, device=DEVICE)

    def make(ps, backend):
        return AdamC([{"params": ps[:3]}, {"params": ps[3:], "corrected": False}], lr=lr0, weight_decay=0.3,
                     backend=backend)

    def schedule(group, t):
        if lr_kind == "float":
            group["lr"] = 0.05 / (1 + t)
        else:
            group["lr"].fill_(0.05 / (1 + t))

    _run_pair(make, shapes, steps=3, lr_schedule=schedule, seed=2)


def test_adamc_constant_lr_is_torch_adamw():
    shapes = [(21, 4), (9,), (0,)]
    ps = [torch.nn.Parameter(x) for x in _tensors(shapes, 3)]
    qs = [torch.nn.Parameter(x.detach().clone()) for x in ps]
    opt = AdamC(ps, lr=0.01, weight_decay=0.2, backend="triton")
    ref = torch.optim.AdamW(qs, lr=0.01, weight_decay=0.2, foreach=False)
    for t in range(3):
        for a, b, g in zip(ps, qs, _tensors(shapes, 30 + t)):
            a.grad, b.grad = g, g.clone()
        opt.step()
        ref.step()
    for a, b in zip(ps, qs):
        assert_close(a.detach(), b.detach(), dtype=torch.float32)
        assert_close(opt.state[a]["exp_avg_sq"], ref.state[b]["exp_avg_sq"], dtype=torch.float32)


def _compile_no_recompile(device):
    """torch.compile of step(): a changing tensor lr must not recompile; results equal eager."""
    torch._dynamo.reset()
    shapes = [(19, 3), (8,)]
    ps = [torch.nn.Parameter(x) for x in _tensors(shapes, 4, device=device)]
    qs = [torch.nn.Parameter(x.detach().clone()) for x in ps]
    lr_a, lr_b = torch.tensor(0.01, device=device), torch.tensor(0.01, device=device)
    opt = AdamHD(ps, lr=lr_a, update="prox", corrected=True, max_lr=0.05, backend="triton")
    eager = AdamHD(qs, lr=lr_b, update="prox", corrected=True, max_lr=0.05, backend="triton")
    compiled_step = torch.compile(opt.step, backend="eager" if device == "cpu" else "inductor")
    try:
        for t in range(4):
            for a, b, g in zip(ps, qs, _tensors(shapes, 40 + t, device=device)):
                a.grad, b.grad = g, g.clone()
            lr_a.fill_(0.01 * (t + 1))
            lr_b.fill_(0.01 * (t + 1))
            if t == 0:
                compiled_step()
            else:
                with torch._dynamo.config.patch(error_on_recompile=True):
                    compiled_step()
            eager.step()
            for a, b in zip(ps, qs):
                assert_close(a.detach(), b.detach(), dtype=torch.float32)
    finally:
        torch._dynamo.reset()


def test_torch_compile_tensor_lr_no_recompile_cpu():
    if not INTERPRET:
        pytest.skip("the CPU path of the triton backend exists only under TRITON_INTERPRET=1")
    _compile_no_recompile("cpu")


def test_scalar_tensor_device_rules():
    """lr on the CPU with GPU params is read on the host (no device sync), refused inside a CUDA-graph
    capture; grad_scale / found_inf must be on the params' device. (Only devices are compared here, so
    this runs without a GPU.)"""
    gpu = torch.device("cuda", 0)
    assert K._device_scalar("lr", torch.tensor(0.25), gpu) == (None, 0.25)
    with pytest.raises(ValueError, match="lr: a CPU tensor while the step is being captured"):
        K._device_scalar("lr", torch.tensor(0.25), gpu, capturing=True)
    with pytest.raises(ValueError, match="max_lr: on meta"):
        K._device_scalar("max_lr", torch.tensor(0.25, device="meta"), gpu)
    with pytest.raises(ValueError, match="grad_scale: on cpu"):
        K._device_tensor("grad_scale", torch.tensor(2.0), gpu)
    assert K._device_scalar("lr", 0.5, gpu) == (None, 0.5)


def test_cache_hit_still_checks_grad_sizes():
    """A grad of another size at a recycled address (same data_ptr) must not reuse the cached plan."""
    shapes = [(37,), (5, 7)]
    params, m, v, steps, mus = _state(shapes, seed=150)
    buf = torch.randn(64)
    grads = [buf[:37], torch.randn(5, 7)]
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decay="prox", delta_mode="ema")
    F.adam_decay(params, grads, m, v, steps, mus, backend="triton", **kw)
    with pytest.raises(ValueError, match="grads\\[0\\] has 36 elements"):
        F.adam_decay(params, [buf[:36], grads[1]], m, v, steps, mus, backend="triton", **kw)


# ------------------------------------------------------------------------------------------------
# 8-bit state (docs/state8.md) and the fused μ update
# ------------------------------------------------------------------------------------------------

def _q8_on_device(st):
    return {k: [x.to(DEVICE) for x in v] for k, v in st.items()}


def _triton8(*args, **kw):
    """The Triton kernel with 128-element blocks: the same Σ|θ| partials for 8-bit and fp32 state."""
    return K.adam_decay(*args, block_size=128, **kw)


@pytest.mark.parametrize("decay", ["l2", "prox", "euler"])
def test_state8_step_is_decode_fp32_step_encode(decay):
    """QUANT runs the fp32 kernel's element math between csrc/state8.h's decode and encode: bit for bit under
    the interpreter (codes within 1 where a GPU may contract differently)."""
    from test_state8 import Q_SHAPES, clone_state, grads_for, hyper, q8_state, step_q8, step_via_fp32
    st = _q8_on_device(q8_state(Q_SHAPES))
    a, b = clone_state(st), clone_state(st)
    for k in range(3):
        grads = [x.to(DEVICE) for x in grads_for(Q_SHAPES, seed=30 + k)]
        kw = hyper(decay, maximize=k == 1)
        sa = step_q8(_triton8, a, grads, **kw)
        sb = step_via_fp32(_triton8, b, grads, **kw)
        for name in a:
            for i, (x, y) in enumerate(zip(a[name], b[name])):
                if INTERPRET:
                    assert torch.equal(x, y), f"step {k}: {name}[{i}]"
                else:
                    assert_state_close(x, y, msg=f"step {k}: {name}[{i}]")
        assert_close(sa, sb, dtype=torch.float32)


def test_state8_matches_reference_and_cpu_kernel():
    """One step from the same state: the reference (and the CPU kernel, when built) agree with Triton to the
    fp32 tolerance on params, scales, Σ|θ| and μ, and to ±1 on codes."""
    from test_state8 import Q_SHAPES, clone_state, grads_for, hyper, q8_state, step_q8
    impls = {"reference": adam_decay_reference}
    if "cpu" in backends.available_backends():
        impls["cpu"] = backends.available_backends()["cpu"].adam_decay
    st = q8_state(Q_SHAPES, seed=4)
    grads = grads_for(Q_SHAPES, seed=40)
    got = _q8_on_device(clone_state(st))
    s_got = step_q8(_triton8, got, [g.to(DEVICE) for g in grads], **hyper("prox"))
    for name, impl in impls.items():
        want = clone_state(st)
        s_want = step_q8(impl, want, grads, **hyper("prox"))
        assert_close(s_got.cpu(), s_want, dtype=torch.float32, msg=name)
        for key in want:
            for x, y in zip(got[key], want[key]):
                assert_state_close(x.cpu(), y, msg=f"{name}: {key}")


@pytest.mark.parametrize("case", ["tie_case", "dense_case"])
def test_state8_codes_are_the_nearest_value_ties_to_even(case):
    import test_state8
    st, grads, kw, (want_m, want_v) = getattr(test_state8, case)(DEVICE)
    step_q8 = test_state8.step_q8
    step_q8(_triton8, st, grads, **kw)
    assert torch.equal(st["exp_avgs"][0].cpu(), want_m) and torch.equal(st["exp_avg_sqs"][0].cpu(), want_v)


def test_state8_errors_name_the_argument():
    from test_state8 import q8_state
    st = _q8_on_device(q8_state([(1, 128)]))
    args = (st["params"], [torch.zeros_like(st["params"][0])], st["exp_avgs"], st["exp_avg_sqs"], st["steps"], None,
            None)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decay="l2", delta_fixed=None,
              delta_scale=1.0, max_lr=None, bias_correction=True, maximize=False)
    with pytest.raises(ValueError, match="8-bit codes need exp_avg_scales"):
        K.adam_decay(*args, **kw)
    with pytest.raises(ValueError, match=r"exp_avg_scales\[0\]"):
        K.adam_decay(*args, exp_avg_scales=[st["exp_avg_scales"][0][:, :0]], exp_avg_sq_scales=st["exp_avg_sq_scales"],
                     **kw)


@pytest.mark.parametrize("with_found_inf", [False, True])
def test_fused_mu_update_is_update_delta_mu(with_found_inf):
    """μ updated in the reduction kernel = functional.update_delta_mu on the sums it writes (exact in the
    interpreter), skipped when found_inf is set; global sizes via numels."""
    params, m, v, steps, mus = _state(SHAPES, seed=50)
    grads = _tensors(SHAPES, seed=51)
    numels = [2 * max(p.numel(), 1) + 3 for p in params]
    fi = torch.tensor(1.0 if with_found_inf else 0.0, device=DEVICE)
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decay="prox", delta_fixed=None,
              delta_scale=1.0, max_lr=None, bias_correction=True, maximize=False, found_inf=fi)
    b = [_clone(x) for x in (params, m, v, steps, mus)]
    mu0 = [float(x) for x in mus]
    sa, sb = (torch.zeros(len(SHAPES), device=DEVICE) for _ in range(2))
    K.adam_decay(params, grads, m, v, steps, mus, sa, delta_beta=0.9, numels=numels, **kw)
    for p, s, m0, mu, n in zip(params, sa, mu0, mus, numels):   # the float64 formula, independent of the package
        assert_close(s.double().cpu(), p.double().abs().sum().cpu(), torch.float32)
        want = T.mu_update(m0, float(p.double().abs().sum()), n, 0.9, skipped=with_found_inf)
        assert_close(mu.double().cpu(), torch.tensor(want, dtype=torch.float64), torch.float32)
    K.adam_decay(b[0], grads, b[1], b[2], b[3], b[4], sb, **kw)
    F.update_delta_mu(b[4], sb, numels, 0.9, fi)
    assert torch.equal(sa, sb)
    for x, y in zip(mus, b[4]):
        if INTERPRET:
            assert torch.equal(x, y)
        else:
            assert_close(x, y, dtype=torch.float32)


# ------------------------------------------------------------------------------------------------
# GPU: compiled kernels
# ------------------------------------------------------------------------------------------------

@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("moment_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decay", ["l2", "prox", "euler"])
def test_bf16_params_error_vs_eager(decay, moment_dtype):
    """bf16 params: fused error vs float64 ≤ 2× the same-dtype eager reference's error (spec §5)."""
    shapes = [(1023, 77), (4099,), (0,), (31,)]
    p0, m0, v0, _, mu0 = _state(shapes, seed=110)
    # τ = γλ·γ/γ_max = 5e-3 per step: 4 steps of decay (~2 %) stand well above bf16 rounding, so a kernel that
    # dropped the decay would fail the 2× rule (see test_cpp_kernels.test_bf16_check_rejects_...).
    kw = dict(lr=torch.tensor(1e-2, device="cuda"), beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=1.0,
              decay=decay, delta_mode="ema", delta_scale=1.0, delta_beta=0.9, max_lr=0.02)
    runs = {}
    for name, dt, mdt, backend in (("fused", torch.bfloat16, moment_dtype, "triton"),
                                   ("eager", torch.bfloat16, moment_dtype, "reference"),
                                   ("ref64", torch.float64, torch.float64, "reference")):
        p = [x.to(dt) for x in p0]
        m, v = [x.to(mdt) for x in m0], [x.to(mdt) for x in v0]
        steps = [torch.tensor(1.0, device="cuda") for _ in shapes]
        mus = [x.to(torch.float64 if dt == torch.float64 else torch.float32) for x in mu0]
        for t in range(4):
            grads = [g.to(dt) for g in _tensors(shapes, seed=111 + t)]
            F.adam_decay(p, grads, m, v, steps, mus, backend=backend, **kw)
        runs[name] = (p, m, v)
    for k, what in enumerate(("param", "exp_avg", "exp_avg_sq")):
        for i, s in enumerate(shapes):
            if runs["ref64"][k][i].numel() == 0:
                continue
            assert_low_precision_ok(runs["fused"][k][i], runs["eager"][k][i], runs["ref64"][k][i], f"{what}[{i}]")


@pytest.mark.cuda
@needs_cuda
def test_large_and_many_tensors_cuda():
    """A > 2^24-element tensor plus 300 small ones, fp32, against the reference on the GPU."""
    shapes = [(4097, 4099)] + [(i % 37 + 1, 3) for i in range(300)]
    params, m, v, steps, mus = _state(shapes, seed=120)
    ref = [_clone(params), _clone(m), _clone(v), _clone(steps), _clone(mus)]
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decay="prox", delta_mode="ema",
              delta_scale=1.0, delta_beta=0.99)
    for t in range(2):
        grads = _tensors(shapes, seed=121 + t)
        F.adam_decay(params, grads, m, v, steps, mus, backend="triton", **kw)
        F.adam_decay(ref[0], grads, ref[1], ref[2], ref[3], ref[4], backend="reference", **kw)
    _assert_states_close((params, m, v, steps, mus), ref)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("opt_cls", ["AdamC", "AdamHD-fixed"])
def test_cuda_graph_replay_with_changing_lr(opt_cls):
    shapes = [(257, 33), (1000,), (5,)]
    ps = [torch.nn.Parameter(x) for x in _tensors(shapes, 130)]
    qs = [torch.nn.Parameter(x.detach().clone()) for x in ps]
    lr_g, lr_e = torch.tensor(0.01, device="cuda"), torch.tensor(0.01, device="cuda")

    def make(params, lr):
        if opt_cls == "AdamC":
            return AdamC(params, lr=lr, weight_decay=0.1, max_lr=0.05, backend="triton")
        return AdamHD(params, lr=lr, weight_decay=0.1, delta_mode="fixed", delta=0.5, corrected=True, max_lr=0.05,
                      backend="triton")

    opt, eager = make(ps, lr_g), make(qs, lr_e)
    static_grads = _tensors(shapes, 131)
    for p, g in zip(ps, static_grads):
        p.grad = g
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up: compiles kernels, builds and caches the device metadata
            opt.step()
    torch.cuda.current_stream().wait_stream(s)
    for p, q in zip(ps, qs):  # restart both from the same point
        q.data.copy_(p.data)
        eager.state[q] = {k: v.clone() for k, v in opt.state[p].items()}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    _replay_against_eager(graph, opt, eager, ps, qs, static_grads, lambda n: n.clone(), lr_g, lr_e, shapes, 132,
                          ("exp_avg", "step"))


def _replay_against_eager(graph, opt, eager, ps, qs, static, grad_of, lr_g, lr_e, shapes, seed, keys):
    """Three replays with new inputs in ``static`` and a new lr each, each followed by the same eager step."""
    for t in range(3):
        new = _tensors(shapes, seed + t)
        for x, n, q in zip(static, new, qs):
            x.copy_(n)
            q.grad = grad_of(n)
        lr_g.fill_(0.01 * (t + 2))
        lr_e.fill_(0.01 * (t + 2))
        graph.replay()
        eager.step()
        for p, q in zip(ps, qs):
            assert_close(p.detach(), q.detach(), dtype=torch.float32)
            for k in keys:
                assert_close(opt.state[p][k], eager.state[q][k], dtype=torch.float32, msg=k)


@pytest.mark.cuda
@needs_cuda
def test_torch_compile_tensor_lr_no_recompile_cuda():
    _compile_no_recompile("cuda")


@pytest.mark.cuda
@needs_cuda
def test_cuda_graph_capture_with_fresh_grads_survives_cache_eviction():
    """Whole-step capture as in training (grads allocated inside the graph, so the metadata cache misses
    during capture: the upload must be capture-legal), then the eager cache is cleared and overfilled;
    replays must still read the captured plan. AdamHD prox with EMA δ (Σ|θ| and μ on the device)."""
    shapes = [(257, 33), (1000,), (5,), (0,)]
    ps = [torch.nn.Parameter(x) for x in _tensors(shapes, 140)]
    qs = [torch.nn.Parameter(x.detach().clone()) for x in ps]
    lr_g, lr_e = torch.tensor(0.01, device="cuda"), torch.tensor(0.01, device="cuda")
    opt = AdamHD(ps, lr=lr_g, weight_decay=0.1, delta_mode="ema", backend="triton")
    eager = AdamHD(qs, lr=lr_e, weight_decay=0.1, delta_mode="ema", backend="reference")
    static_in = _tensors(shapes, 141)

    def step():
        for p, x in zip(ps, static_in):
            p.grad = x * 2.0  # a fresh tensor (the graph's pool during capture), like backward's grads
        opt.step()

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(s)
    for p, q in zip(ps, qs):
        q.data.copy_(p.data)
        eager.state[q] = {k: v.clone() for k, v in opt.state[p].items()}
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    K.clear_cache()
    for i in range(K.CACHE_SIZE + 6):  # overfill the eager cache with other tensor sets
        other = _tensors([(3 + i,)], 1000 + i)
        F.adam_decay(other, _tensors([(3 + i,)], 2000 + i), _clone(other), [x.abs() for x in other],
                     [torch.tensor(1.0, device="cuda")], None, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                     weight_decay=0.1, decay="l2", backend="triton")
    _replay_against_eager(graph, opt, eager, ps, qs, static_in, lambda n: n * 2.0, lr_g, lr_e, shapes, 142,
                          ("exp_avg", "exp_avg_sq", "step", "delta_mu"))


@pytest.mark.cuda
@needs_cuda
def test_cpu_lr_refused_inside_capture():
    shapes = [(129,)]
    params, m, v, steps, mus = _state(shapes, seed=160)
    grads = _tensors(shapes, 161)
    kw = dict(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decay="prox", delta_mode="ema")
    F.adam_decay(params, grads, m, v, steps, mus, lr=torch.tensor(1e-3), backend="triton", **kw)  # eager: fine
    from cuda_capture import assert_refused_during_capture
    assert_refused_during_capture(
        lambda: F.adam_decay(params, grads, m, v, steps, mus, lr=torch.tensor(1e-3), backend="triton", **kw),
        "captured in a CUDA graph")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_launches_on_the_params_device():
    shapes = [(4099,), (17,)]
    params, m, v, steps, mus = (_clone(x) for x in _state(shapes, seed=170, device="cuda:1"))
    ref = [_clone(params), _clone(m), _clone(v), _clone(steps), _clone(mus)]
    grads = _tensors(shapes, 171, device="cuda:1")
    kw = dict(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decay="prox", delta_mode="ema")
    with torch.cuda.device(0):
        F.adam_decay(params, grads, m, v, steps, mus, backend="triton", **kw)
    F.adam_decay(ref[0], grads, ref[1], ref[2], ref[3], ref[4], backend="reference", **kw)
    _assert_states_close((params, m, v, steps, mus), ref)


@pytest.mark.cuda
@needs_cuda
def test_plan_built_during_capture_is_not_reused_eagerly():
    """A capture records the metadata upload without running it: until the graph's first replay that plan holds
    no data, so an eager step on the same tensors must build its own."""
    shapes = [(300,), (17, 5)]
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decay="prox", delta_mode="ema")
    warm = _state(shapes, seed=189)  # other tensors: compiles the kernels outside the capture
    F.adam_decay(warm[0], _tensors(shapes, 188), *warm[1:], backend="triton", **kw)
    params, m, v, steps, mus = _state(shapes, seed=190)
    grads = _tensors(shapes, 191)
    ref = [_clone(params), _clone(m), _clone(v), _clone(steps), _clone(mus)]
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        with torch.cuda.graph(graph):
            F.adam_decay(params, grads, m, v, steps, mus, backend="triton", **kw)
    torch.cuda.current_stream().wait_stream(side)
    F.adam_decay(params, grads, m, v, steps, mus, backend="triton", **kw)  # no replay yet
    F.adam_decay(ref[0], grads, *ref[1:], backend="reference", **kw)
    _assert_states_close((params, m, v, steps, mus), ref)
