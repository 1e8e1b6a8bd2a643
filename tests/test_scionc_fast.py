"""ScionC fast path ("batched" backend) against the per-tensor reference, through the ScionC class.

Several groups (spectral / sign / bias; corrected and not; tall, wide, square; classic and Polar
Express; Nesterov; maximize), many steps, params *and* momentum buffers, against the fp32 reference and
against the float64 reference (fp32 tolerance). Nothing here is compared bitwise with the reference: the
batched path runs its matmuls as bmm, the reference as mm, and the two round differently on some CPUs.
The Triton element-wise kernels run under the interpreter here (fp32) and compiled on GPU.
"""
import pytest
import torch

import fusedecay.functional as FN
from fusedecay import ScionC, backends
from fusedecay import _scion_fast as fast
from fusedecay.reference.scion import scionc_step
from tolerances import assert_close, assert_low_precision_ok

STEPS = 8


def _model(dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"qkv": (24, 72), "proj": (24, 24), "fc": (96, 24), "fc2": (24, 96), "fc_b": (96, 24),
              "emb": (50, 24), "head": (50, 24), "bias": (72,), "gain": (24,), "odd": (7, 13)}
    return {k: torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).mul_(0.3).to(device, dtype))
            for k, s in shapes.items()}


def _groups(P, ns="classic", nesterov=False):
    return [
        dict(params=[P["qkv"], P["proj"], P["fc"], P["fc2"], P["fc_b"]], lmo="spectral", radius=2.0, ns=ns,
             nesterov=nesterov),
        dict(params=[P["odd"]], lmo="spectral", ns="polar_express" if ns == "classic" else "classic", ns_steps=3,
             corrected=False, weight_decay=0.1, momentum=0.5),
        dict(params=[P["emb"]], lmo="sign", radius=50.0, nesterov=not nesterov),
        dict(params=[P["head"]], lmo="sign", corrected=False, weight_decay=0.2, radius=30.0),
        dict(params=[P["bias"], P["gain"]], lmo="bias", radius=0.5, norm_target=2.0, nesterov=nesterov),
    ]


def _train(backend, *, dtype=torch.float32, ns="classic", nesterov=False, maximize=False, lr=0.05, steps=STEPS,
           device="cpu"):
    P = _model(dtype, device)
    opt = ScionC(_groups(P, ns, nesterov), lr=lr, maximize=maximize, backend=backend)
    g = torch.Generator().manual_seed(123)
    for step in range(steps):
        for name, p in P.items():
            if name == "gain" and step == 2:
                p.grad = None                      # a param skipped for one step
                continue
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64).to(device, dtype)
        opt.step()
    return P, opt


def _compare(a, oa, b, ob, cmp):
    for name in a:
        cmp(b[name].detach(), a[name].detach(), name)
        cmp(ob.state[b[name]]["momentum_buffer"], oa.state[a[name]]["momentum_buffer"], name + ".momentum")


@pytest.mark.parametrize("ns,nesterov,maximize", [("classic", False, False), ("polar_express", True, False),
                                                  ("classic", True, True)])
def test_batched_matches_reference_over_many_steps(ns, nesterov, maximize):
    a, oa = _train("reference", ns=ns, nesterov=nesterov, maximize=maximize)
    b, ob = _train("batched", ns=ns, nesterov=nesterov, maximize=maximize)
    _compare(a, oa, b, ob, lambda x, y, what: assert_close(x, y, msg=what))
    # The run must have moved the params (otherwise the comparison says nothing).
    assert not torch.allclose(a["qkv"].detach(), _model()["qkv"].detach())


def test_fp32_batched_step_within_fp32_tolerance_of_the_reference_run_in_float64():
    """Parity with the reference backend run in float64 (the independent truth is tests/test_scionc_truth.py)."""
    a, oa = _train("reference", dtype=torch.float64, ns="polar_express", nesterov=True)
    b, ob = _train("batched", ns="polar_express", nesterov=True)
    _compare(a, oa, b, ob, lambda x, y, what: assert_close(x, y, torch.float32, msg=what))


def test_auto_resolves_to_batched_on_cuda_only():
    # resolve() only reads the device type, so this needs no GPU.
    assert backends.resolve("auto", torch.device("cuda"), torch.bfloat16, op="scionc").name == "batched"
    assert backends.resolve("batched", torch.device("cpu"), torch.float32, op="scionc").name == "batched"
    assert "batched" not in backends.AUTO_ORDER["cpu"]   # measured slower than the loop on CPU (docs/scion.md)


def test_float64_and_tensor_lr():
    a, oa = _train("reference", dtype=torch.float64, lr=torch.tensor(0.03, dtype=torch.float64), steps=4)
    b, ob = _train("batched", dtype=torch.float64, lr=torch.tensor(0.03, dtype=torch.float64), steps=4)
    _compare(a, oa, b, ob, lambda x, y, what: assert_close(x, y, msg=what))


def test_bf16_params_error_within_band():
    ref64, _ = _train("reference", dtype=torch.float64, steps=4)
    eager, _ = _train("reference", dtype=torch.bfloat16, steps=4)
    fused, _ = _train("batched", dtype=torch.bfloat16, steps=4)
    for name in ref64:
        assert fused[name].dtype == torch.bfloat16
        assert_low_precision_ok(fused[name].detach(), eager[name].detach(), ref64[name].detach(), what=name)


def test_explicit_lmo_fn_still_takes_precedence():
    P = _model()
    calls = []

    def lmo_fn(inputs, **kw):
        calls.append(len(inputs))
        return FN.scion_directions_reference(inputs, **kw)
    ps = [P["qkv"], P["fc"]]
    for p in ps:
        p.grad = torch.randn_like(p)
    bufs = [torch.zeros_like(p) for p in ps]
    FN.scionc(ps, [p.grad for p in ps], bufs, lr=0.1, momentum=0.1, lmo="spectral", radius=1.0, norm_target=1.0,
              corrected=True, weight_decay=0.0, backend="batched", lmo_fn=lmo_fn)
    assert calls == [2]


def test_sign_directions_match_reference():
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(s, generator=g) for s in [(5, 7), (11,), (3, 1)]]
    xs[0][0, 0] = 0.0
    for d, r in zip(fast.scion_directions(xs, lmo="sign", ns_steps=5, ns="classic", ns_dtype=None),
                    FN.scion_directions_reference(xs, lmo="sign", ns_steps=5, ns="classic", ns_dtype=None)):
        assert torch.equal(d, r)
    with pytest.raises(ValueError, match="lmo"):
        fast.scion_directions(xs, lmo="frobenius", ns_steps=5, ns="classic", ns_dtype=None)


# ---------------------------------------------------------------------------------------------
# Triton element-wise path (interpreter on CPU in fp32; compiled on GPU)
# ---------------------------------------------------------------------------------------------

from snippets import require  # noqa: E402

require("triton")  # skipped without triton locally; CI must have it
from fusedecay.triton_kernels import scion_update as tk  # noqa: E402

SMALL = [(24, 40), (40, 24), (24, 40), (17, 17)]


def _reference_steps(params, grads_per_step, bufs, **kw):
    for grads in grads_per_step:
        for p, g, b in zip(params, grads, bufs):
            scionc_step(p, g, b, **kw)


@pytest.mark.triton
@pytest.mark.parametrize("tensor_lr", [False, True])
@pytest.mark.parametrize("lmo,ns,nesterov,maximize,corrected", [
    ("spectral", "classic", False, False, True),
    ("spectral", "polar_express", True, True, False),
    ("sign", "classic", True, False, True),
    ("sign", "classic", False, True, False),
])
def test_triton_step_matches_reference(lmo, ns, nesterov, maximize, corrected, tensor_lr):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(4)
    params = [torch.randn(s, generator=gen).to(device) for s in SMALL]
    bufs = [torch.randn(s, generator=gen).mul_(0.1).to(device) for s in SMALL]
    grads = [[torch.randn(s, generator=gen).to(device) for s in SMALL] for _ in range(3)]
    p_ref, b_ref = [p.clone() for p in params], [b.clone() for b in bufs]
    hyper = dict(lr=0.03, momentum=0.2, radius=1.5, norm_target=1.5, corrected=corrected,
                 weight_decay=0.0 if corrected else 0.1, ns_steps=5, ns=ns, ns_dtype=torch.float32,
                 nesterov=nesterov, maximize=maximize)
    lrs = [0.03, 0.02, 0.01]
    lr_t = torch.tensor(lrs[0], device=device)
    for gs, lr in zip(grads, lrs):
        lr_t.fill_(lr)  # a tensor lr is read by the kernels (the value written here, as a scheduler would)
        fast._step_triton(params, gs, bufs, lmo=lmo, **dict(hyper, lr=lr_t if tensor_lr else lr))
    for gs, lr in zip(grads, lrs):
        _reference_steps(p_ref, [gs], b_ref, lmo_kind=lmo, **dict(hyper, lr=lr))
    for p, r in zip(params, p_ref):
        assert_close(p, r)
    for b, r in zip(bufs, b_ref):
        assert_close(b, r)


@pytest.mark.triton
def test_momentum_to_stack_writes_transposed_slot():
    dev = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels need GPU tensors
    g, m = torch.randn(9, 4, device=dev), torch.randn(9, 4, device=dev)
    slot = torch.empty(4, 9, device=dev)
    m0 = m.clone()
    tk.momentum_to_stack(g, m, slot, alpha=0.25, nesterov=True, maximize=False)
    m_ref = m0 * 0.75 + 0.25 * g
    assert_close(m, m_ref)
    assert_close(slot, (m_ref * 0.75 + 0.25 * g).T)
    p = torch.randn(9, 4, device=dev)
    p0 = p.clone()
    tk.apply_direction(p, slot, keep=0.9, step=0.5)
    assert_close(p, p0 * 0.9 - 0.5 * slot.T)
    with pytest.raises(ValueError, match="slot shape"):
        tk.apply_direction(p, torch.empty(9, 4, device=dev), keep=1.0, step=1.0)
    with pytest.raises(ValueError, match="contiguous"):
        tk.momentum_to_stack(g.T, m.T, slot.T, alpha=0.1, nesterov=False, maximize=False)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_batched_class_within_band(dtype):
    """bf16 NS on GPU (the default ns_dtype): error vs a float64 run ≤ 2× the eager reference's."""
    ref64, _ = _train("reference", dtype=torch.float64, device="cuda", steps=4)
    eager, _ = _train("reference", dtype=dtype, device="cuda", steps=4)
    fused, _ = _train("batched", dtype=dtype, device="cuda", steps=4)
    for name in ref64:
        assert_low_precision_ok(fused[name].detach(), eager[name].detach(), ref64[name].detach(), what=name)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_with_tensor_lr():
    """A device lr keeps ScionC on the Triton path and can be captured: replays see the new lr."""
    shapes = [(64, 96), (96, 64), (32, 32)]
    gen = torch.Generator().manual_seed(9)
    init = [torch.randn(s, generator=gen) * 0.05 for s in shapes]
    ps = [torch.nn.Parameter(x.cuda()) for x in init]
    qs = [torch.nn.Parameter(x.cuda()) for x in init]
    lr_g, lr_e = torch.tensor(0.02, device="cuda"), torch.tensor(0.02, device="cuda")
    opt = ScionC(ps, lr=lr_g, lmo="spectral", radius=2.0, backend="batched", ns_dtype=torch.float32)
    ref = ScionC(qs, lr=lr_e, lmo="spectral", radius=2.0, backend="reference", ns_dtype=torch.float32)
    static = [torch.randn(s, generator=gen).cuda() for s in shapes]
    for p, g in zip(ps, static):
        p.grad = g
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        opt.step()
    torch.cuda.current_stream().wait_stream(side)
    for p, q, g in zip(ps, qs, static):
        q.grad = g.clone()
    ref.step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    for t, lr in enumerate((0.01, 0.005)):
        new = [torch.randn(s, generator=gen).cuda() for s in shapes]
        for g, n, q in zip(static, new, qs):
            g.copy_(n)
            q.grad = n.clone()
        lr_g.fill_(lr)
        lr_e.fill_(lr)
        graph.replay()
        ref.step()
        for p, q in zip(ps, qs):
            assert_close(p.detach(), q.detach(), dtype=torch.float32, msg=f"replay {t}")
