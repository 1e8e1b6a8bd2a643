"""CPU C++ kernels (fusedecay._C, Backend "cpu") against the reference contract.

The CPU kernel shares the per-element math header (csrc/adam_decay_math.h), the chunk table and the
order of the two-level Σ|θ| reduction (csrc/chunk_table.h) with the CUDA kernel, so these tests also
cover the arithmetic and indexing the GPU runs. tests/test_cuda_kernels.py imports the helpers below.

The kernels come from the ahead-of-time `fusedecay._C` (`pip install -e . --no-build-isolation`, `python setup.py
build_ext --inplace`) or, without it, from the just-in-time build on first use (docs/install.md). Where neither
works (no compiler) this module skips, except under CI (CI=true), where it fails.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import pytest
import torch

from fusedecay import backends
from fusedecay.functional import adam_decay as functional_adam_decay
from fusedecay.functional import init_delta_mu, update_delta_mu
from fusedecay.reference import adam_decay_reference
from snippets import in_ci
from tolerances import assert_close, assert_low_precision_ok

try:
    cpp = importlib.import_module("fusedecay._cpp_backend")
except Exception as e:  # pragma: no cover - only without a compiler
    if in_ci():
        raise
    pytest.skip(f"fusedecay compiled extension unavailable: {type(e).__name__}: {e}", allow_module_level=True)


ODD_SHAPES = [(1,), (7,), (0,), (4097,), (33, 65), (3, 0, 2), (130, 129)]


@dataclass
class State:
    params: List[torch.Tensor]
    exp_avgs: List[torch.Tensor]
    exp_avg_sqs: List[torch.Tensor]
    steps: List[torch.Tensor]
    mus: List[torch.Tensor]
    sums: List[torch.Tensor] = field(default_factory=list)

    def clone(self) -> "State":
        c = lambda xs: [x.clone() for x in xs]  # noqa: E731
        return State(c(self.params), c(self.exp_avgs), c(self.exp_avg_sqs), c(self.steps), c(self.mus), c(self.sums))

    def to(self, dtype=None, moment_dtype=None) -> "State":
        """A copy with params (and μ) in `dtype` and moments in `moment_dtype` (keeps values)."""
        mu_dt = torch.float64 if dtype == torch.float64 else torch.float32
        return State([p.detach().to(dtype).clone() for p in self.params],
                     [m.to(moment_dtype).clone() for m in self.exp_avgs],
                     [v.to(moment_dtype).clone() for v in self.exp_avg_sqs],
                     [s.clone() for s in self.steps], [u.to(mu_dt).clone() for u in self.mus])


def make_state(shapes, dtype, moment_dtype=None, device="cpu", seed=0, warm=True) -> State:
    """Random params; moments either zero (warm=False) or random, as after a few steps."""
    moment_dtype = moment_dtype or dtype
    g = torch.Generator().manual_seed(seed)
    params, ms, vs = [], [], []
    for s in shapes:
        p = torch.randn(s, generator=g, dtype=torch.float64) * 0.5
        params.append(p.to(device=device, dtype=dtype))
        if warm:
            ms.append((torch.randn(s, generator=g, dtype=torch.float64) * 0.1).to(device=device, dtype=moment_dtype))
            vs.append((torch.rand(s, generator=g, dtype=torch.float64) * 0.01).to(device=device, dtype=moment_dtype))
        else:
            ms.append(torch.zeros(s, device=device, dtype=moment_dtype))
            vs.append(torch.zeros(s, device=device, dtype=moment_dtype))
    steps = [torch.tensor(3.0 if warm else 0.0, device=device) for _ in shapes]
    mus = [init_delta_mu(p) for p in params]
    return State(params, ms, vs, steps, mus)


def make_grads(shapes, nsteps, dtype, device="cpu", seed=1):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]
            for _ in range(nsteps)]


def run_contract(impl: Callable, st: State, grads_seq, *, delta_beta: Optional[float] = 0.99, **kw) -> State:
    """N steps of `impl` on `st` (in place), with steps += 1 before and μ's update after each call."""
    mu_dt = torch.float64 if st.params[0].dtype == torch.float64 else torch.float32
    n = len(st.params)
    for grads in grads_seq:
        torch._foreach_add_(st.steps, 1)
        sums = torch.full((n,), float("nan"), dtype=mu_dt, device=st.params[0].device)
        impl(st.params, grads, st.exp_avgs, st.exp_avg_sqs, st.steps, st.mus, sums, **kw)
        st.sums.append(sums.clone())
        if delta_beta is not None:
            update_delta_mu(st.mus, sums, [p.numel() for p in st.params], delta_beta, kw.get("found_inf"))
    return st


def hyper(decay="prox", corrected=False, lr=1e-2, delta_fixed=None, **over):
    kw = dict(lr=lr, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decay=decay, delta_fixed=delta_fixed,
              delta_scale=1.0, max_lr=(2e-2 if corrected else None), bias_correction=True, maximize=False)
    kw.update(over)
    return kw


def assert_states_close(got: State, want: State, dtype, what=""):
    for name in ("params", "exp_avgs", "exp_avg_sqs", "steps", "mus", "sums"):
        for i, (a, b) in enumerate(zip(getattr(got, name), getattr(want, name))):
            assert_close(a, b, dtype=dtype, msg=f"{what}: {name}[{i}]")


def assert_states_equal(a: State, b: State):
    for name in ("params", "exp_avgs", "exp_avg_sqs", "steps", "mus", "sums"):
        for x, y in zip(getattr(a, name), getattr(b, name)):
            assert torch.equal(x, y), name


def kernel(chunk_size=64):
    """The CPU kernel with a small chunk size, so odd sizes straddle many chunk boundaries."""
    def run(*args, **kw):
        return cpp.adam_decay(*args, chunk_size=chunk_size, **kw)
    return run


# ---- kernel contract vs the reference -------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("decay", ["l2", "prox", "euler"])
@pytest.mark.parametrize("corrected", [False, True])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_matches_reference(dtype, decay, corrected, tensor_lr):
    kw = hyper(decay, corrected)
    if tensor_lr:
        kw["lr"] = torch.tensor(kw["lr"])
        if corrected:
            kw["max_lr"] = torch.tensor(kw["max_lr"])
    st = make_state(ODD_SHAPES, dtype)
    grads = make_grads(ODD_SHAPES, 4, dtype)
    want = run_contract(adam_decay_reference, st.clone(), grads, **kw)
    got = run_contract(kernel(), st.clone(), grads, **kw)
    assert_states_close(got, want, dtype, f"{decay} corrected={corrected}")
    assert not torch.equal(got.params[3], st.params[3])  # it did step


@pytest.mark.parametrize("decay", ["prox", "euler"])
@pytest.mark.parametrize("delta", [0.05, 0.0, float("inf")])
def test_fixed_delta_and_limits(decay, delta):
    kw = hyper(decay, delta_fixed=delta, maximize=True, bias_correction=False)
    st = make_state(ODD_SHAPES, torch.float32)
    grads = make_grads(ODD_SHAPES, 3, torch.float32)
    want = run_contract(adam_decay_reference, st.clone(), grads, delta_beta=None, **kw)
    got = run_contract(kernel(), st.clone(), grads, delta_beta=None, **kw)
    assert_states_close(got, want, torch.float32, f"{decay} delta={delta}")


def test_cold_start_and_delta_mean():
    """Zero moments at t = 0 (bias correction matters most) and δ = c·mean|θ| (β0 = 0)."""
    shapes = [(4097,), (33, 65)]
    st = make_state(shapes, torch.float32, warm=False)
    grads = make_grads(shapes, 3, torch.float32)
    kw = hyper("prox", delta_scale=0.5)
    want = run_contract(adam_decay_reference, st.clone(), grads, delta_beta=0.0, **kw)
    got = run_contract(kernel(), st.clone(), grads, delta_beta=0.0, **kw)
    assert_states_close(got, want, torch.float32)


# λ for the bf16 checks: τ = γλ = 5e-3 per step, so 5 steps of decay move θ by ~2.5 %, well above bf16 rounding.
# (With τ = 1e-3 a kernel that drops the decay stays within 2× the eager error: the check would not see it.)
BF16_CHECK_WEIGHT_DECAY = 0.5


def check_bf16_error_within_eager(shapes, moment_dtype, decay, device="cpu", chunk_size=64, impl=None):
    """Fused bf16 vs float64 reference: error ≤ the tolerance factor × an eager bf16 run's (shared with the CUDA
    tests). ``impl``: the multi-tensor function under check (default: the compiled kernel)."""
    base = make_state(shapes, torch.bfloat16, moment_dtype, device=device)
    grads = make_grads(shapes, 5, torch.bfloat16, device=device)
    kw = hyper(decay, weight_decay=BF16_CHECK_WEIGHT_DECAY)
    ref64 = run_contract(adam_decay_reference, base.to(torch.float64, torch.float64),
                         [[g.double() for g in gs] for gs in grads], **kw)
    eager = run_contract(adam_decay_reference, base.clone(), grads, **kw)
    fused = run_contract(impl or kernel(chunk_size), base.clone(), grads, **kw)
    for name in ("params", "exp_avgs", "exp_avg_sqs"):
        for i in range(len(shapes)):
            f, e, r = (getattr(s, name)[i] for s in (fused, eager, ref64))
            assert f.dtype == e.dtype
            assert_low_precision_ok(f, e, r, what=f"{decay} {name}[{i}]")
    assert_low_precision_ok(torch.stack(fused.sums), torch.stack(eager.sums), torch.stack(ref64.sums), what="sums")


@pytest.mark.parametrize("moment_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("decay", ["l2", "prox", "euler"])
def test_bf16_error_within_eager(moment_dtype, decay):
    check_bf16_error_within_eager([(4097,), (130, 129), (7,), (0,)], moment_dtype, decay)


@pytest.mark.parametrize("decay", ["l2", "prox", "euler"])
def test_bf16_check_rejects_a_kernel_that_drops_the_decay(decay):
    """The bf16 check above can fail: a bf16 update that forgets the decay term is rejected."""
    def no_decay(*args, **kw):
        adam_decay_reference(*args, **dict(kw, weight_decay=0.0))
    with pytest.raises(AssertionError, match="fused rel err"):
        check_bf16_error_within_eager([(4097,), (130, 129), (7,)], torch.float32, decay, impl=no_decay)


def test_non_contiguous_params():
    """Dense non-contiguous (transposed, channels_last) run in place; strided slices go through a copy."""
    g = torch.Generator().manual_seed(3)
    big = torch.randn(40, 66, generator=g)
    views = [big[:, ::2], torch.randn(33, 17, generator=g).t(),
             torch.randn(2, 3, 5, 4, generator=g).to(memory_format=torch.channels_last), torch.randn(9, generator=g)]
    st = State(views, [torch.zeros_like(p) for p in views], [torch.zeros_like(p) for p in views],
               [torch.tensor(0.0) for _ in views], [init_delta_mu(p) for p in views])
    # grads: contiguous for the slice and the channels_last one (a layout mismatch), matching for the others
    grads = [[torch.randn(p.shape, generator=g) if i in (0, 2) else torch.randn_like(p).copy_(torch.randn(p.shape, generator=g))
              for i, p in enumerate(views)] for _ in range(3)]
    ref_st = State([p.clone() for p in views], [torch.zeros_like(p) for p in views], [torch.zeros_like(p) for p in views],
                   [torch.tensor(0.0) for _ in views], [init_delta_mu(p) for p in views])
    untouched = big[:, 1::2].clone()
    kw = hyper("euler")
    run_contract(adam_decay_reference, ref_st, grads, **kw)
    run_contract(kernel(), st, grads, **kw)
    assert_states_close(st, ref_st, torch.float32)
    assert torch.equal(big[:, 1::2], untouched)  # the columns between the slice's are not written
    assert views[2].is_contiguous(memory_format=torch.channels_last)


def test_found_inf_skips_and_grad_scale_unscales():
    shapes = [(4097,), (7,), (0,)]
    st = make_state(shapes, torch.float32)
    grads = make_grads(shapes, 1, torch.float32)
    scale = torch.tensor(1024.0)
    scaled = [[x * 1024.0 for x in gs] for gs in grads]
    kw = hyper("prox", grad_scale=scale, found_inf=torch.tensor(1.0))
    skipped = run_contract(kernel(), st.clone(), scaled, delta_beta=None, **kw)
    for a, b in zip(skipped.params + skipped.exp_avgs + skipped.exp_avg_sqs, st.params + st.exp_avgs + st.exp_avg_sqs):
        assert torch.equal(a, b)
    want_skip = run_contract(adam_decay_reference, st.clone(), scaled, delta_beta=None, **kw)
    assert_close(skipped.sums[0], want_skip.sums[0], torch.float32)
    kw["found_inf"] = torch.tensor(0.0)
    want = run_contract(adam_decay_reference, st.clone(), scaled, delta_beta=None, **kw)
    got = run_contract(kernel(), st.clone(), scaled, delta_beta=None, **kw)
    assert_states_close(got, want, torch.float32)
    plain = run_contract(adam_decay_reference, st.clone(), grads, delta_beta=None, **hyper("prox"))
    assert_states_close(got, plain, torch.float32, "unscaled grads")


def test_deterministic_and_thread_count_independent():
    shapes = [(300001,), (70000,), (5,), (65536 * 2,)]
    st = make_state(shapes, torch.float32)
    grads = make_grads(shapes, 2, torch.float32)
    kw = hyper("prox")
    a = run_contract(cpp.adam_decay, st.clone(), grads, **kw)
    b = run_contract(cpp.adam_decay, st.clone(), grads, **kw)
    assert_states_equal(a, b)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        c = run_contract(cpp.adam_decay, st.clone(), grads, **kw)
    finally:
        torch.set_num_threads(threads)
    assert_states_equal(a, c)
    want = run_contract(adam_decay_reference, st.clone(), grads, **kw)
    assert_states_close(a, want, torch.float32)


def test_empty_inputs():
    cpp.adam_decay([], [], [], [], [], [], None, **hyper("prox"))  # no-op
    st = make_state([(0,), (0, 3)], torch.float32)
    run_contract(cpp.adam_decay, st, make_grads([(0,), (0, 3)], 1, torch.float32), **hyper("euler"))
    assert st.sums[0].tolist() == [0.0, 0.0]


def test_negative_zero_delta_clips_like_zero_in_vector_lanes_and_tail():
    """δ = −0.0 (accepted by the op: it is not below 0) must act as δ = 0 in the vector body and the scalar tail
    alike: the vector clip takes the limit from δ's bit pattern, where −0.0 has the sign bit set."""
    shapes = [(4097,), (7,)]
    grads = make_grads(shapes, 1, torch.float32)[0]
    runs = []
    for d in (0.0, -0.0):
        st = make_state(shapes, torch.float32)
        cpp.adam_decay(st.params, grads, st.exp_avgs, st.exp_avg_sqs, st.steps, None, None,
                       **hyper("prox", delta_fixed=d))
        runs.append(st.params)
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_without_abs_sums():
    shapes = [(4097,), (7,)]
    st = make_state(shapes, torch.float32)
    grads = make_grads(shapes, 1, torch.float32)[0]
    kw = hyper("l2")
    want = st.clone()
    adam_decay_reference(want.params, grads, want.exp_avgs, want.exp_avg_sqs, want.steps, None, None, **kw)
    cpp.adam_decay(st.params, grads, st.exp_avgs, st.exp_avg_sqs, st.steps, None, None, **kw)
    for a, b in zip(st.params + st.exp_avgs, want.params + want.exp_avgs):
        assert_close(a, b, torch.float32)


# ---- chunk table and reduction order ---------------------------------------------------------------

def test_chunk_table_edges():
    rows = torch.ops.fusedecay._chunk_table([0, 1, 64, 65, 200, 0, 128], 64).tolist()
    assert rows == [[1, 0, 0, 1], [2, 0, 0, 64], [3, 0, 0, 64], [3, 1, 64, 1],
                    [4, 0, 0, 64], [4, 1, 64, 64], [4, 2, 128, 64], [4, 3, 192, 8], [6, 0, 0, 64], [6, 1, 64, 64]]
    big = torch.ops.fusedecay._chunk_table([65536 * 3 + 1], 0).tolist()  # default chunk size
    assert [r[2:] for r in big] == [[0, 65536], [65536, 65536], [131072, 65536], [196608, 1]]
    assert torch.ops.fusedecay._chunk_table([], 64).shape == (0, 4)
    assert torch.ops.fusedecay._chunk_table([0, 0], 64).shape == (0, 4)
    for bad in (100, -64):
        with pytest.raises(ValueError, match="chunk_size"):
            torch.ops.fusedecay._chunk_table([10], bad)


def test_chunk_table_covers_every_element_once():
    g = torch.Generator().manual_seed(5)
    numels = torch.randint(0, 1000, (40,), generator=g).tolist() + [0, 4096, 4097]
    rows = torch.ops.fusedecay._chunk_table(numels, 128)
    for i, n in enumerate(numels):
        mine = rows[rows[:, 0] == i]
        assert mine[:, 3].sum().item() == n
        assert mine[:, 1].tolist() == list(range(len(mine)))  # chunk order
        if len(mine):
            assert (mine[:, 2] == mine[:, 1] * 128).all() and (mine[:-1, 3] == 128).all()
    assert rows[:, 0].tolist() == sorted(rows[:, 0].tolist())  # tensor-major


def test_sum_partials_is_left_to_right_in_chunk_order():
    numels = [0, 130, 64, 1, 1000]
    nchunks = torch.ops.fusedecay._chunk_table(numels, 64).shape[0]
    partials = torch.randn(nchunks, dtype=torch.float64) * torch.logspace(-8, 8, nchunks, dtype=torch.float64)
    got = torch.ops.fusedecay._sum_partials(partials, numels, 64).tolist()
    want, c = [], 0
    for n in numels:
        s = 0.0
        for _ in range((n + 63) // 64):
            s += partials[c].item()
            c += 1
        want.append(s)
    assert got == want  # bit-identical: the same order


def test_abs_sum_across_chunk_boundaries():
    shapes = [(1000,), (64,), (65,)]
    sums = {}
    for cs in (64, 128, 0):
        st = make_state(shapes, torch.float32)
        run_contract(kernel(cs), st, make_grads(shapes, 1, torch.float32), **hyper("prox"))
        exact = torch.stack([p.double().abs().sum() for p in st.params])
        assert_close(st.sums[0], exact.float(), torch.float32)
        sums[cs] = st.sums[0]
    assert_close(sums[64], sums[0], torch.float32)


# ---- argument errors -------------------------------------------------------------------------------

def _call(**over):
    st = make_state([(5,)], torch.float32)
    args = dict(params=st.params, grads=[torch.randn(5)], exp_avgs=st.exp_avgs, exp_avg_sqs=st.exp_avg_sqs,
                state_steps=st.steps, delta_mus=st.mus, abs_sums=torch.empty(1))
    kw = hyper("prox")
    for k, v in over.items():
        (args if k in args else kw)[k] = v
    cpp.adam_decay(*args.values(), **kw)


@pytest.mark.parametrize("over, match", [
    (dict(decay="huber"), "decay"),
    (dict(grads=[]), "grads"),
    (dict(grads=[torch.randn(6)]), "grads"),
    (dict(grads=[torch.randn(5, dtype=torch.float64)]), "grads"),
    (dict(state_steps=[torch.tensor(1.0, dtype=torch.float64)]), "state_steps"),
    (dict(delta_mus=None), "delta_mus"),
    (dict(abs_sums=torch.empty(1, dtype=torch.float64)), "abs_sums"),
    (dict(exp_avgs=[torch.zeros(5, dtype=torch.float16)]), "exp_avg"),
    (dict(lr=torch.ones(2)), "lr"),
    (dict(beta1=1.0), "beta1"),
])
def test_bad_arguments_raise_value_error(over, match):
    with pytest.raises(ValueError, match=match):
        _call(**over)


def test_float16_params_rejected():
    p = torch.zeros(3, dtype=torch.float16)
    with pytest.raises(ValueError, match="params"):
        cpp.adam_decay([p], [p.clone()], [p.clone()], [p.clone()], [torch.tensor(1.0)], None, None, **hyper("l2"))


# ---- through the optimizer classes -----------------------------------------------------------------

def _clone_params(params):
    return [torch.nn.Parameter(p.detach().clone()) for p in params]


def _run_optimizer(opt_cls, params, groups_kw, backend, nsteps=4, seed=11):
    params = _clone_params(params)
    groups = [dict(params=params[:2], **groups_kw[0]), dict(params=params[2:], **groups_kw[1])]
    opt = opt_cls(groups, backend=backend)
    g = torch.Generator().manual_seed(seed)
    for _ in range(nsteps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(p.dtype)
        opt.step()
    return params, opt


@pytest.mark.parametrize("opt_name", ["AdamHD", "AdamC"])
def test_optimizer_classes_cpu_backend(opt_name):
    import fusedecay

    base = [torch.randn(17, 9), torch.randn(9), torch.randn(4097), torch.randn(3, 5).t()]
    if opt_name == "AdamHD":
        kws = [dict(lr=1e-2, update="prox", delta_mode="ema", weight_decay=0.1),
               dict(lr=3e-3, update="euler", delta_mode="fixed", delta=0.3, corrected=True, weight_decay=0.05)]
    else:
        kws = [dict(lr=1e-2, weight_decay=0.1), dict(lr=torch.tensor(3e-3), corrected=False, weight_decay=0.05)]
    cls = getattr(fusedecay, opt_name)
    pr, opt_r = _run_optimizer(cls, base, kws, "reference")
    pc, opt_c = _run_optimizer(cls, base, kws, "cpu")
    for a, b in zip(pc, pr):
        assert_close(a.detach(), b.detach(), torch.float32)
        for k, v in opt_r.state[b].items():
            assert_close(opt_c.state[a][k], v, torch.float32, msg=f"state {k}")


def test_adamc_constant_lr_matches_torch_adamw():
    base = [torch.randn(33, 7), torch.randn(7)]
    ours = _clone_params(base)
    theirs = _clone_params(base)
    import fusedecay

    o1 = fusedecay.AdamC(ours, lr=1e-2, weight_decay=0.1, backend="cpu")
    o2 = torch.optim.AdamW(theirs, lr=1e-2, weight_decay=0.1, fused=True)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        for a, b in zip(ours, theirs):
            a.grad = torch.randn(a.shape, generator=g)
            b.grad = a.grad.clone()
        o1.step()
        o2.step()
    for a, b in zip(ours, theirs):
        assert_close(a.detach(), b.detach(), torch.float32)


def test_auto_backend_picks_cpu():
    assert backends.resolve("auto", torch.device("cpu"), torch.float32).name == "cpu"
    assert backends.resolve("auto", torch.device("cpu"), torch.bfloat16).name == "cpu"


def test_functional_with_cpu_backend_matches_reference():
    shapes = [(4097,), (7,), (0,)]
    runs = {}
    for be in ("reference", "cpu"):
        st = make_state(shapes, torch.float32)
        for grads in make_grads(shapes, 3, torch.float32):
            functional_adam_decay(st.params, grads, st.exp_avgs, st.exp_avg_sqs, st.steps, st.mus, lr=1e-2, beta1=0.9,
                                  beta2=0.999, eps=1e-8, weight_decay=0.1, decay="prox", delta_mode="ema",
                                  delta_scale=2.0, backend=be)
        runs[be] = st
    assert_states_close(runs["cpu"], runs["reference"], torch.float32)


def test_opcheck():
    """torch.library's own checks of the schema (mutation annotations, fake/meta kernel)."""
    st = make_state([(33,), (5, 3)], torch.float32)
    args = (st.params, [torch.randn_like(p) for p in st.params], st.exp_avgs, st.exp_avg_sqs, st.steps, st.mus,
            torch.empty(2))
    kw = dict(lr=1e-2, lr_tensor=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decay="prox",
              delta_fixed=None, delta_scale=1.0, max_lr=None, max_lr_tensor=None, bias_correction=True,
              maximize=False, grad_scale=None, found_inf=None, chunk_size=0)
    torch.library.opcheck(torch.ops.fusedecay.adam_decay_.default, args, kw,
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_abs_sums_op_matches_float64(dtype):
    """fusedecay::abs_sums_ (μ_0's Σ|θ_0|, reduced like the update's Σ|θ_t|): float64 truth within the math
    dtype's tolerance, for odd, empty, non-dense and chunk-straddling tensors; bad ``out`` raises; opcheck.
    (Its thread-count independence is tested in test_determinism.py.)"""
    g = torch.Generator().manual_seed(21)
    xs = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in [(4097,), (0,), (1,), (130, 129)]]
    xs.append(torch.randn(40, 66, generator=g, dtype=torch.float64).to(dtype)[:, ::3])   # not dense
    math = torch.float64 if dtype == torch.float64 else torch.float32
    out = torch.empty(len(xs), dtype=math)
    torch.ops.fusedecay.abs_sums_(xs, out, chunk_size=64)
    truth = torch.stack([x.double().abs().sum() for x in xs])
    assert_close(out, truth.to(math), dtype=math)
    default_chunks = torch.empty(len(xs), dtype=math)
    torch.ops.fusedecay.abs_sums_(xs, default_chunks)
    assert_close(default_chunks, truth.to(math), dtype=math)
    with pytest.raises(ValueError, match="out"):
        torch.ops.fusedecay.abs_sums_(xs, torch.empty(2, dtype=math))
    torch.library.opcheck(torch.ops.fusedecay.abs_sums_.default, (xs[:3], torch.empty(3, dtype=math)), {},
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("decay", ["prox", "euler"])
def test_non_finite_values_match_the_reference(decay):
    """NaN and ±inf in grads and params, in vector lanes and in the scalar tail (17 elements): the same
    non-finite positions as the reference, the finite values within tolerance (the vector clip takes
    sign(x)·min(|x|, δ) on bit patterns; a NaN θ stays NaN however the clip treats it)."""
    st = make_state([(17,), (33, 3)], torch.float32)
    grads = make_grads([(17,), (33, 3)], 2, torch.float32)
    for g in grads:
        g[0][[0, 16]] = float("nan")
        g[1][5, 1] = float("inf")
    st.params[0][3] = float("nan")
    st.params[1][7, 2] = -float("inf")
    kw = hyper(decay, delta_fixed=0.05)
    want = run_contract(adam_decay_reference, st.clone(), grads, delta_beta=None, **kw)
    got = run_contract(kernel(), st.clone(), grads, delta_beta=None, **kw)
    for name in ("params", "exp_avgs", "exp_avg_sqs"):
        for a, b in zip(getattr(got, name), getattr(want, name)):
            assert torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.isinf(a), torch.isinf(b)), name
            fin = torch.isfinite(b)
            assert_close(a[fin], b[fin], dtype=torch.float32, msg=name)


def test_steps_incremented_inside_the_update_op():
    """``increment_steps=True`` (the CPU backend's call from functional.adam_decay): t ← t + 1 inside the op, after its
    checks. The same params, moments, sums and steps as incrementing before the call; nothing at all (steps included)
    with found_inf set or when a check fails."""
    shapes = [(4097,), (7,), (0,), (33, 65)]
    st = make_state(shapes, torch.float32)
    grads = make_grads(shapes, 3, torch.float32)
    before = run_contract(kernel(), st.clone(), grads, delta_beta=None, **hyper("prox"))
    inside = st.clone()
    for gs in grads:
        sums = torch.full((len(shapes),), float("nan"))
        cpp.adam_decay(inside.params, gs, inside.exp_avgs, inside.exp_avg_sqs, inside.steps, inside.mus, sums,
                       chunk_size=64, increment_steps=True, **hyper("prox"))
        inside.sums.append(sums)
    assert_states_equal(inside, before)
    assert [float(t) for t in inside.steps] == [6.0] * len(shapes)

    skipped = st.clone()
    cpp.adam_decay(skipped.params, grads[0], skipped.exp_avgs, skipped.exp_avg_sqs, skipped.steps, skipped.mus,
                   torch.empty(len(shapes)), increment_steps=True, **hyper("prox", found_inf=torch.tensor(1.0)))
    assert_states_equal(skipped, st)
    bad = st.clone()
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        cpp.adam_decay(bad.params, [grads[0][0], torch.randn(8)] + grads[0][2:], bad.exp_avgs, bad.exp_avg_sqs,
                       bad.steps, bad.mus, torch.empty(len(shapes)), increment_steps=True, **hyper("prox"))
    with pytest.raises(ValueError, match="found_inf"):
        cpp.adam_decay(bad.params, grads[0], bad.exp_avgs, bad.exp_avg_sqs, bad.steps, bad.mus,
                       torch.empty(len(shapes)), increment_steps=True, **hyper("prox", found_inf=torch.ones(2)))
    assert_states_equal(bad, st)


def test_increment_steps_op():
    """The CPU step increment (functional.adam_decay's t ← t + 1 on the CPU) = torch's add of 1, and checks dtypes."""
    steps = [torch.tensor(0.0), torch.tensor(16777216.0), torch.tensor(3.5)]
    want = [s + 1 for s in steps]
    torch.ops.fusedecay._increment_steps_(steps)
    assert all(torch.equal(a, b) for a, b in zip(steps, want))
    with pytest.raises(ValueError, match=r"steps\[1\]"):
        torch.ops.fusedecay._increment_steps_([torch.tensor(1.0), torch.tensor(1.0, dtype=torch.float64)])
