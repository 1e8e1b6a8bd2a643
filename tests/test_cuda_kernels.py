"""CUDA kernels (fusedecay._C_cuda, Backend "cuda") against the reference contract.

Every test is marked ``cuda`` and skipped without a GPU (or without the built CUDA extension); the CPU
counterparts in tests/test_cpp_kernels.py run the same math header, chunk table and reduction order.
Helpers (state builders, the N-step driver) are shared with that module.
"""
from __future__ import annotations

import pytest
import torch

from test_cpp_kernels import (ODD_SHAPES, State, adam_decay_reference, assert_states_close, assert_states_equal,
                              check_bf16_error_within_eager, cpp, hyper, make_grads, make_state, run_contract)
from tolerances import assert_close, assert_low_precision_ok, assert_state_close

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

DEV = "cuda"


@pytest.fixture(autouse=True)
def _needs_cuda_backend():
    if cpp.CUDA_BACKEND is None:
        pytest.skip(f"CUDA extension not built: {cpp.cuda_unavailable_reason}")


def kernel(chunk_size=0):
    def run(*args, **kw):
        return cpp.adam_decay(*args, chunk_size=chunk_size, **kw)
    return run


def on_device(kw):
    return {k: (v.to(DEV) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("decay", ["l2", "prox", "euler"])
@pytest.mark.parametrize("corrected", [False, True])
@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("chunk_size", [64, 0])
def test_matches_reference(dtype, decay, corrected, tensor_lr, chunk_size):
    kw = hyper(decay, corrected)
    if tensor_lr:
        kw["lr"] = torch.tensor(kw["lr"], device=DEV)
        if corrected:
            kw["max_lr"] = torch.tensor(kw["max_lr"], device=DEV)
    st = make_state(ODD_SHAPES, dtype, device=DEV)
    grads = make_grads(ODD_SHAPES, 4, dtype, device=DEV)
    want = run_contract(adam_decay_reference, st.clone(), grads, **kw)
    got = run_contract(kernel(chunk_size), st.clone(), grads, **kw)
    assert_states_close(got, want, dtype, f"{decay} corrected={corrected}")


@pytest.mark.parametrize("decay", ["prox", "euler"])
@pytest.mark.parametrize("delta", [0.05, 0.0, float("inf")])
def test_fixed_delta_and_limits(decay, delta):
    kw = hyper(decay, delta_fixed=delta, maximize=True, bias_correction=False)
    st = make_state(ODD_SHAPES, torch.float32, device=DEV)
    grads = make_grads(ODD_SHAPES, 3, torch.float32, device=DEV)
    want = run_contract(adam_decay_reference, st.clone(), grads, delta_beta=None, **kw)
    got = run_contract(kernel(64), st.clone(), grads, delta_beta=None, **kw)
    assert_states_close(got, want, torch.float32)


@pytest.mark.parametrize("moment_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("decay", ["l2", "prox", "euler"])
def test_bf16_error_within_eager(moment_dtype, decay):
    check_bf16_error_within_eager([(4097,), (130, 129), (7,), (0,), (1 << 20,)], moment_dtype, decay, device=DEV,
                                  chunk_size=0)


def test_cpu_and_cuda_kernels_agree():
    shapes = [(4097,), (130, 129), (7,), (0,), (200000,)]
    st = make_state(shapes, torch.float32)
    grads = make_grads(shapes, 3, torch.float32)
    kw = hyper("prox", corrected=True)
    cpu = run_contract(cpp.adam_decay, st.clone(), grads, **kw)
    dev_st = State(*[[x.to(DEV) for x in xs] for xs in (st.params, st.exp_avgs, st.exp_avg_sqs, st.steps, st.mus)])
    gpu = run_contract(cpp.adam_decay, dev_st, [[g.to(DEV) for g in gs] for gs in grads], **kw)
    for name in ("params", "exp_avgs", "exp_avg_sqs", "mus", "sums"):
        for a, b in zip(getattr(gpu, name), getattr(cpu, name)):
            assert_close(a.cpu(), b, torch.float32, msg=name)


def test_unaligned_and_non_contiguous():
    """Views at odd storage offsets take the scalar path; strided slices go through a copy."""
    views = [torch.randn(10001, device=DEV)[1:], torch.randn(4001, device=DEV)[3:4000],
             torch.randn(40, 66, device=DEV)[:, ::2], torch.randn(33, 17, device=DEV).t()]

    def state(ps):
        return State(ps, [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
                     [torch.tensor(0.0, device=DEV) for _ in ps], [p.abs().mean() for p in ps])

    st, ref = state(views), state([p.clone() for p in views])
    assert views[0].data_ptr() % 16 != 0 and views[1].data_ptr() % 16 != 0
    grads = [[torch.randn(p.shape, device=DEV) for p in views] for _ in range(3)]
    run_contract(adam_decay_reference, ref, grads, **hyper("euler"))
    run_contract(kernel(), st, grads, **hyper("euler"))
    assert_states_close(st, ref, torch.float32)


def test_found_inf_and_grad_scale():
    shapes = [(4097,), (7,), (0,)]
    st = make_state(shapes, torch.float32, device=DEV)
    grads = [[g * 512.0 for g in gs] for gs in make_grads(shapes, 1, torch.float32, device=DEV)]
    kw = hyper("euler", grad_scale=torch.tensor(512.0, device=DEV), found_inf=torch.tensor(1.0, device=DEV))
    skipped = run_contract(kernel(), st.clone(), grads, delta_beta=None, **kw)
    for a, b in zip(skipped.params + skipped.exp_avgs + skipped.exp_avg_sqs, st.params + st.exp_avgs + st.exp_avg_sqs):
        assert torch.equal(a, b)
    want = run_contract(adam_decay_reference, st.clone(), grads, delta_beta=None, **kw)
    assert_close(skipped.sums[0], want.sums[0], torch.float32)
    kw["found_inf"] = torch.tensor(0.0, device=DEV)
    want = run_contract(adam_decay_reference, st.clone(), grads, delta_beta=None, **kw)
    got = run_contract(kernel(), st.clone(), grads, delta_beta=None, **kw)
    assert_states_close(got, want, torch.float32)


def test_deterministic_reruns():
    shapes = [(3000001,), (70000,), (5,)]
    st = make_state(shapes, torch.float32, device=DEV)
    grads = make_grads(shapes, 2, torch.float32, device=DEV)
    a = run_contract(kernel(), st.clone(), grads, **hyper("prox"))
    b = run_contract(kernel(), st.clone(), grads, **hyper("prox"))
    assert_states_equal(a, b)


def test_one_update_launch_for_many_tensors():
    shapes = [(37,)] * 600 + [(100000,)]
    st = make_state(shapes, torch.float32, device=DEV)
    grads = make_grads(shapes, 1, torch.float32, device=DEV)
    run_contract(kernel(), st.clone(), grads, **hyper("prox"))  # warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        run_contract(kernel(), st, grads, delta_beta=None, **hyper("prox"))
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert sum("adam_decay_kernel" in n for n in names) == 1
    assert sum("reduce_abs_sums_kernel" in n for n in names) == 1


def test_cuda_graph_capture_replay_with_tensor_lr():
    shapes = [(4097,), (33, 65), (7,)]
    st = make_state(shapes, torch.float32, device=DEV)
    ref = st.clone()
    lr = torch.tensor(1e-2, device=DEV)
    max_lr = torch.tensor(2e-2, device=DEV)
    static_grads = [torch.zeros(s, device=DEV) for s in shapes]
    sums = torch.zeros(len(shapes), device=DEV)
    kw = hyper("prox", corrected=True)
    kw.update(lr=lr, max_lr=max_lr)

    def step():
        torch._foreach_add_(st.steps, 1)
        cpp.adam_decay(st.params, static_grads, st.exp_avgs, st.exp_avg_sqs, st.steps, st.mus, sums, **kw)

    all_grads = make_grads(shapes, 4, torch.float32, device=DEV)
    lrs = [1e-2, 5e-3, 2e-3, 1e-3]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up step outside the graph (also allocates everything once)
        torch._foreach_copy_(static_grads, all_grads[0])
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    got_sums = []
    for t in range(1, 4):
        torch._foreach_copy_(static_grads, all_grads[t])
        lr.fill_(lrs[t])
        graph.replay()
        got_sums.append(sums.clone())
    torch.cuda.synchronize()

    for t in range(4):
        torch._foreach_add_(ref.steps, 1)
        rs = torch.zeros(len(shapes), device=DEV)
        rkw = dict(kw, lr=torch.tensor(lrs[t], device=DEV))
        adam_decay_reference(ref.params, all_grads[t], ref.exp_avgs, ref.exp_avg_sqs, ref.steps, ref.mus, rs, **rkw)
        if t >= 1:
            assert_close(got_sums[t - 1], rs, torch.float32, msg=f"sums after replay {t}")
    for name in ("params", "exp_avgs", "exp_avg_sqs", "steps"):
        for a, b in zip(getattr(st, name), getattr(ref, name)):
            assert_close(a, b, torch.float32, msg=name)


@pytest.mark.parametrize("opt_name", ["AdamHD", "AdamC"])
def test_grad_scaler_end_to_end(opt_name):
    import fusedecay

    def build(backend):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 4)).to(DEV)
        cls = getattr(fusedecay, opt_name)
        opt = cls(model.parameters(), lr=1e-2, weight_decay=0.1, backend=backend)
        return model, opt, torch.amp.GradScaler("cuda", init_scale=2.0 ** 10)

    runs = {}
    for backend in ("reference", "cuda"):
        model, opt, scaler = build(backend)
        g = torch.Generator(device=DEV).manual_seed(1)
        for it in range(5):
            x = torch.randn(16, 32, device=DEV, generator=g)
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(x).float().pow(2).mean()
            if it == 2:
                loss = loss * float("inf")  # a step GradScaler must skip
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        runs[backend] = (model, opt)
    (m_ref, o_ref), (m_cuda, o_cuda) = runs["reference"], runs["cuda"]
    for a, b in zip(m_cuda.parameters(), m_ref.parameters()):
        assert_close(a.detach(), b.detach(), torch.float32)
        assert o_cuda.state[a]["step"].item() == o_ref.state[b]["step"].item() == 4.0  # the inf step was skipped
        for k, v in o_ref.state[b].items():
            assert_close(o_cuda.state[a][k], v, torch.float32, msg=k)


def test_tensor_over_2_pow_31_elements():
    """64-bit indexing: the last elements of a > 2^31-element tensor are updated correctly."""
    n = (1 << 31) + 1000
    need = n * (2 + 2 + 2 + 2 + 4) + (1 << 30)  # p, g, m, v in bf16 + one fp32 copy for the exact sum
    if torch.cuda.mem_get_info()[0] < need:
        pytest.skip("not enough free GPU memory for a > 2^31-element tensor")
    p = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    g = torch.randn(n, device=DEV, dtype=torch.bfloat16)
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    step = torch.tensor(1.0, device=DEV)
    slices = (slice(0, 4096), slice(n - 4096, n))
    before = [[x[sl].clone() for x in (p, g, m, v)] for sl in slices]
    sums = torch.empty(1, device=DEV)
    kw = hyper("euler", delta_fixed=0.5)
    cpp.adam_decay([p], [g], [m], [v], [step], None, sums, **kw)
    for sl, (bp, bg, bm, bv) in zip(slices, before):
        eager = [x.clone() for x in (bp, bg, bm, bv)]
        ref64 = [x.double() for x in (bp, bg, bm, bv)]
        for st in (eager, ref64):
            adam_decay_reference([st[0]], [st[1]], [st[2]], [st[3]], [step], None, None, **kw)
        assert not torch.equal(p[sl], bp)
        assert_low_precision_ok(p[sl], eager[0], ref64[0], what="params")
        assert_low_precision_ok(m[sl], eager[2], ref64[2], what="exp_avg")
    exact = p.float().abs_().sum(dtype=torch.float64)  # one fp32 copy, as budgeted above
    assert_close(sums[0].double(), exact.to(sums.device), torch.float32)


def test_scalar_tensor_devices():
    """grad_scale / found_inf must sit on the params' device; a CPU lr is read on the host eagerly and
    refused inside a CUDA-graph capture (its value would be frozen into the graph)."""
    shapes = [(4097,), (5,)]
    grads = make_grads(shapes, 1, torch.float32, device=DEV)
    for name, val in (("grad_scale", torch.tensor(2.0)), ("found_inf", torch.tensor(0.0))):
        with pytest.raises(ValueError, match=name):
            run_contract(kernel(), make_state(shapes, torch.float32, device=DEV), grads, **hyper("prox", **{name: val}))
    st, ref = make_state(shapes, torch.float32, device=DEV), make_state(shapes, torch.float32, device=DEV)
    run_contract(kernel(), st, grads, **hyper("prox", lr=torch.tensor(3e-3)))
    run_contract(adam_decay_reference, ref, grads, **hyper("prox", lr=torch.tensor(3e-3, device=DEV)))
    assert_states_close(st, ref, torch.float32)
    from cuda_capture import assert_refused_during_capture
    st = make_state(shapes, torch.float32, device=DEV)
    assert_refused_during_capture(
        lambda: cpp.adam_decay(st.params, grads[0], st.exp_avgs, st.exp_avg_sqs, st.steps, st.mus, None,
                               **hyper("prox", lr=torch.tensor(3e-3))), "captured")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("backend", ["cuda", "triton", "reference"])
def test_params_on_two_gpus_with_one_grad_scaler(backend):
    """GradScaler keeps grad_scale / found_inf (and here lr) on cuda:0; buckets on cuda:1 get their own copies."""
    from fusedecay import functional as F
    if backend == "triton":
        pytest.importorskip("triton")  # GPU-only test: never runs in CI
    shapes = [(4097,), (33,)]
    st0 = make_state(shapes, torch.float32, device="cuda:0")
    st1 = make_state(shapes, torch.float32, device="cuda:1", seed=1)
    ref = [make_state(shapes, torch.float32, device="cuda:0"), make_state(shapes, torch.float32, device="cuda:0", seed=1)]
    grads = [g * 256.0 for g in make_grads(shapes, 1, torch.float32, device="cuda:0")[0]]
    kw = dict(lr=torch.tensor(1e-2, device="cuda:0"), beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1,
              decay="prox", delta_mode="ema", grad_scale=torch.tensor(256.0, device="cuda:0"),
              found_inf=torch.tensor(0.0, device="cuda:0"))
    F.adam_decay(st0.params + st1.params, grads + [g.to("cuda:1") for g in grads], st0.exp_avgs + st1.exp_avgs,
                 st0.exp_avg_sqs + st1.exp_avg_sqs, st0.steps + st1.steps, st0.mus + st1.mus, backend=backend, **kw)
    for r in ref:
        F.adam_decay(r.params, grads, r.exp_avgs, r.exp_avg_sqs, r.steps, r.mus, backend="reference", **kw)
    for got, want in ((st0, ref[0]), (st1, ref[1])):
        for name in ("params", "exp_avgs", "exp_avg_sqs", "steps", "mus"):
            for a, b in zip(getattr(got, name), getattr(want, name)):
                assert_close(a.to("cuda:0"), b, torch.float32, msg=name)


# ---- 8-bit state (docs/state8.md) and the fused μ update ------------------------------------------

@pytest.mark.parametrize("decay", ["l2", "prox", "euler"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [128, 0])
def test_state8_matches_cpu_kernel_every_step(decay, param_dtype, chunk_size):
    """From the same state each step, the CUDA 8-bit kernel and the CPU one (tested bit for bit against decode →
    fp32 kernel → encode) agree: params, scales, Σ|θ| and μ to the fp32 tolerance (bf16 params: to one bf16
    rounding), codes within 1 (a GPU may contract multiply-adds differently)."""
    from test_state8 import Q_SHAPES, clone_state, grads_for, hyper as hyper8, q8_state, step_q8
    st = q8_state(Q_SHAPES, seed=11, param_dtype=param_dtype)
    for k in range(3):
        grads = grads_for(Q_SHAPES, seed=60 + k, dtype=param_dtype)
        want = clone_state(st)
        s_want = step_q8(cpp.adam_decay, want, grads, **hyper8(decay))
        got = {name: [x.to(DEV) for x in xs] for name, xs in st.items()}
        s_got = step_q8(kernel(chunk_size), got, [g.to(DEV) for g in grads], **hyper8(decay))
        assert_close(s_got.cpu(), s_want, dtype=torch.float32)
        for name in want:
            for x, y in zip(got[name], want[name]):
                x = x.cpu()
                if y.dtype == torch.bfloat16:
                    torch.testing.assert_close(x, y, rtol=2 ** -7, atol=1e-6)
                else:
                    assert_state_close(x, y, msg=name)
        st = want


def test_one_call_mixing_8bit_and_full_precision_state_equals_a_call_per_format():
    """The CUDA backend takes 8-bit and full-precision entries in one call (one launch group per format): the same
    bits as one call per format."""
    from test_state8 import clone_state, grads_for, hyper as hyper8, mixed_state, step_q8, step_split_by_format
    st, shapes = mixed_state(torch.float32, seed=3)
    st = {k: [None if x is None else x.to(DEV) for x in xs] for k, xs in st.items()}
    one, split = clone_state(st), clone_state(st)
    for k in range(2):
        grads = [g.to(DEV) for g in grads_for(shapes, seed=70 + k)]
        s_one = step_q8(kernel(256), one, grads, **hyper8("prox"))
        s_split = step_split_by_format(kernel(256), split, grads, **hyper8("prox"))
        assert torch.equal(s_one, s_split.to(DEV))
        for name in one:
            for x, y in zip(one[name], split[name]):
                assert (x is None and y is None) or torch.equal(x, y), name


def test_increment_steps_is_refused():
    """``increment_steps`` is the CPU kernel's: the CUDA op raises before writing anything."""
    st = make_state([(7,), (300,)], torch.float32, device=DEV)
    before = st.clone()
    with pytest.raises(ValueError, match="increment_steps"):
        cpp.adam_decay(st.params, make_grads([(7,), (300,)], 1, torch.float32, device=DEV)[0], st.exp_avgs,
                       st.exp_avg_sqs, st.steps, st.mus, None, increment_steps=True, **hyper("prox"))
    assert_states_equal(st, before)


def test_fused_mu_without_abs_sums_is_refused():
    """Only the CPU kernel keeps the sums of a fused μ update to itself: the CUDA op asks for abs_sums, before writing
    anything (fusedecay.functional gives it them: the CUDA backend does not set ``mu_without_abs_sums``)."""
    st = make_state([(7,), (300,)], torch.float32, device=DEV)
    before = st.clone()
    with pytest.raises(ValueError, match="delta_beta needs abs_sums"):
        cpp.adam_decay(st.params, make_grads([(7,), (300,)], 1, torch.float32, device=DEV)[0], st.exp_avgs,
                       st.exp_avg_sqs, st.steps, st.mus, None, delta_beta=0.9, **hyper("prox"))
    assert_states_equal(st, before)


def test_state8_found_inf_writes_nothing():
    from test_state8 import Q_SHAPES, clone_state, grads_for, hyper as hyper8, q8_state, step_q8
    st = {name: [x.to(DEV) for x in xs] for name, xs in q8_state(Q_SHAPES, seed=12).items()}
    before = clone_state(st)
    step_q8(kernel(), st, [g.to(DEV) for g in grads_for(Q_SHAPES)], found_inf=torch.tensor(1.0, device=DEV),
            **hyper8("prox"))
    for name in st:
        assert all(torch.equal(x, y) for x, y in zip(st[name], before[name])), name


def test_fused_mu_update_matches_update_delta_mu():
    from fusedecay.functional import update_delta_mu
    st = make_state(ODD_SHAPES, torch.float32, device=DEV)
    grads = make_grads(ODD_SHAPES, 1, torch.float32, device=DEV)[0]
    a, b = st.clone(), st.clone()
    torch._foreach_add_(a.steps, 1)
    torch._foreach_add_(b.steps, 1)
    sa = torch.zeros(len(ODD_SHAPES), device=DEV)
    sb = torch.zeros(len(ODD_SHAPES), device=DEV)
    numels = [3 * p.numel() + 1 for p in st.params]
    cpp.adam_decay(a.params, grads, a.exp_avgs, a.exp_avg_sqs, a.steps, a.mus, sa, delta_beta=0.9, numels=numels,
                   **hyper("prox"))
    cpp.adam_decay(b.params, grads, b.exp_avgs, b.exp_avg_sqs, b.steps, b.mus, sb, **hyper("prox"))
    update_delta_mu(b.mus, sb, numels, 0.9)
    assert torch.equal(sa, sb)
    for x, y in zip(a.mus, b.mus):
        assert_close(x, y, dtype=torch.float32)
