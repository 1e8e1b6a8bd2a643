"""ScionC's spectral (and sign) LMO on weights that are not one matrix: MoE expert stacks (E, d_out, d_in),
conv kernels flattened or per tap, Conv1d kernels, transposed (d_in, d_out) weights, an empty stack.

Every path (reference, the foreach path ``backend="auto"`` runs on CPU, the batched backend and its fused
mode) is compared with a float64 truth built matrix by matrix from an SVD polar factor
(tests/spectral_truth.py), at the LMO and over several optimizer steps. The distributed path is tested in
test_distributed.py against the same truth.
"""
import math

import pytest
import torch

import fusedecay._scion_fast as fast
from fusedecay import ScionC
from fusedecay import functional as FN
from fusedecay import newton_schulz as NSB
from fusedecay.reference import lmo as reference_lmo
from spectral_truth import NS, NS_STEPS, sign_truth, spectral_truth, well_conditioned
from tolerances import assert_close

# (shape, the matrix_view given to ScionC (None: its default "auto"), the view the truth uses)
CASES = [
    ((3, 10, 6), None, "batch"),             # expert stack, tall experts
    ((2, 6, 10), "batch", "batch"),          # wide experts
    ((10, 6), None, "batch"),                # a plain matrix: batched with the experts of the same shape
    ((5, 3, 2, 2), None, "flatten"),         # conv2d kernel: "auto" flattens 4-D weights
    ((4, 6, 3), "flatten", "flatten"),       # conv1d kernel: 3-D, so it must say "flatten"
    ((5, 3, 2, 2), "taps", "taps"),          # the other choice for convs: one matrix per tap
    ((6, 10), "transposed", "transposed"),   # stored (d_in, d_out), as transformers' Conv1D
    ((2, 6, 10), "transposed", "transposed"),
    ((0, 4, 3), None, "batch"),              # no experts
]
# A second weight in the same call whose matrices are 10x6 under the same view (same-shape matrices share
# one batched Newton–Schulz chain, so a stack's experts and another param's matrix are computed together).
OTHER_SHAPE = {"batch": (10, 6), "flatten": (10, 3, 2, 1), "taps": (10, 6, 1, 2), "transposed": (6, 10)}
IDS = [f"{'x'.join(map(str, s))}-{v or 'auto'}" for s, v, _ in CASES]


def _directions(path, inputs, view, ns_dtype=None):
    kw = dict(lmo="spectral", ns_steps=NS_STEPS, ns=NS, ns_dtype=ns_dtype, matrix_view=view or "auto")
    if path == "reference":
        return [reference_lmo("spectral", m, ns_steps=NS_STEPS, ns=NS, ns_dtype=ns_dtype, matrix_view=view or "auto")
                for m in inputs]
    if path == "functional":
        return FN.scion_directions_reference(inputs, **kw)
    if path == "batched":
        return fast.scion_directions(inputs, **kw)
    if path == "batched_fused":   # the GPU mode (transposed shapes merged, baddbmm chain), run on CPU
        return NSB.spectral_directions(inputs, NS_STEPS, NS, ns_dtype, matrix_view=view or "auto", exact=False)
    raise ValueError(path)


@pytest.mark.parametrize("path", ["reference", "functional", "batched", "batched_fused"])
@pytest.mark.parametrize("shape, view, truth_view", CASES, ids=IDS)
def test_spectral_direction_is_the_polar_factor_per_matrix(path, shape, view, truth_view):
    g = torch.Generator().manual_seed(hash(shape) % 1000)
    m = well_conditioned(shape, truth_view, g)
    other = well_conditioned(OTHER_SHAPE[truth_view], truth_view, g)    # 10x6 matrices: batched with the experts
    d, d_other = _directions(path, [m, other], view)
    assert d.shape == m.shape and d.dtype == torch.float64
    assert_close(d, spectral_truth(m, truth_view), msg=f"{path} {shape} {view}")
    assert_close(d_other, spectral_truth(other, truth_view))


@pytest.mark.parametrize("path", ["reference", "functional", "batched"])
@pytest.mark.parametrize("shape, view, truth_view", CASES, ids=IDS)
def test_sign_direction_divides_by_the_views_input_dim(path, shape, view, truth_view):
    m = torch.randn(shape, dtype=torch.float64)
    kw = dict(ns_steps=5, ns="classic", ns_dtype=None, matrix_view=view or "auto")
    if path == "reference":
        d = reference_lmo("sign", m, **kw)
    else:
        d = (FN.scion_directions_reference if path == "functional" else fast.scion_directions)([m], lmo="sign", **kw)[0]
    assert torch.equal(d, sign_truth(m, truth_view))


# ----------------------------------------------------------------------------------------------
# Optimizer steps against a float64 closed form
# ----------------------------------------------------------------------------------------------

STEPS = 3
ALPHA = 0.5              # momentum α: weight on the new gradient
LR = 0.05                # γ_max of a cosine schedule over the steps
RADIUS = 2.0
NORM_TARGET = 1.5        # C²
PLAIN_DECAY = 0.3        # λ of the one uncorrected group


def _lr(t):
    return LR * 0.5 * (1 + math.cos(math.pi * t / STEPS))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("backend", ["reference", "auto", "batched"])
def test_scionc_steps_on_nd_weights_match_the_float64_closed_form(backend, dtype):
    g = torch.Generator().manual_seed(3)
    params, groups = [], []
    for k, (shape, view, truth_view) in enumerate(CASES):
        p = torch.nn.Parameter(torch.randn(shape, dtype=torch.float64, generator=g).to(dtype))
        group = {"params": [p], "radius": RADIUS}
        if view is not None:
            group["matrix_view"] = view
        if k == len(CASES) - 2:        # one uncorrected group: η = γλ
            group.update(corrected=False, weight_decay=PLAIN_DECAY)
        params.append((p, truth_view, not group.get("corrected", True)))
        groups.append(group)
    opt = ScionC(groups, lr=LR, momentum=ALPHA, norm_target=NORM_TARGET, ns=NS, ns_steps=NS_STEPS, backend=backend)

    theta = [p.detach().to(torch.float64).clone() for p, _, _ in params]   # the truth, in float64
    buf = [torch.zeros_like(t) for t in theta]
    for t in range(STEPS):
        lr = _lr(t)
        for grp in opt.param_groups:
            grp["lr"] = lr
        s = lr * RADIUS
        for i, (p, view, plain) in enumerate(params):
            # a gradient that makes the new momentum well conditioned, so Newton–Schulz has converged
            target = well_conditioned(p.shape, view, g)
            p.grad = ((target - (1 - ALPHA) * buf[i]) / ALPHA).to(dtype)
            buf[i] = (1 - ALPHA) * buf[i] + ALPHA * p.grad.to(torch.float64)           # m_t
            eta = lr * PLAIN_DECAY if plain else s * s * (2 - ALPHA) / (2 * ALPHA * NORM_TARGET)
            theta[i] = (1 - eta) * theta[i] - s * spectral_truth(buf[i], view)        # θ_t
        opt.step()
    for (p, view, _), want, m in zip(params, theta, buf):
        assert p.dtype == dtype
        assert_close(p.detach(), want, dtype=dtype, msg=f"param {tuple(p.shape)} {view}")
        assert_close(opt.state[p]["momentum_buffer"], m, dtype=dtype, msg=f"momentum {tuple(p.shape)} {view}")


def test_scionc_rejects_a_bad_matrix_view_and_spectral_on_vectors():
    with pytest.raises(ValueError, match="matrix_view"):
        ScionC([torch.nn.Parameter(torch.randn(2, 3, 4))], matrix_view="experts")
    with pytest.raises(ValueError, match=">= 2 dims"):
        ScionC([torch.nn.Parameter(torch.randn(4))], lmo="spectral")


@pytest.mark.triton
def test_triton_passes_take_sign_groups_of_any_shape_and_leave_nd_spectral_to_the_torch_path(monkeypatch):
    """The batched backend's Triton step (under the interpreter on CPU tensors, as tests/test_scionc_truth.py
    drives it): a sign group of a flattened conv kernel runs there with d_in = d_in·k·k; expert-stack and
    transposed spectral groups go to the torch path; all match the float64 closed form."""
    ran = []
    real_step = fast._step_triton

    def step_triton(params, *args, **kw):
        ran.append((kw["lmo"], kw["matrix_view"], tuple(tuple(p.shape) for p in params)))
        return real_step(params, *args, **kw)

    if not torch.cuda.is_available():
        monkeypatch.setattr(fast, "_triton_applies", lambda params, grads, bufs, lr, lmo: lmo in ("spectral", "sign"))
    monkeypatch.setattr(fast, "_step_triton", step_triton)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(5)
    cases = [((3, 10, 6), "auto", "batch", "spectral"), ((6, 10), "transposed", "transposed", "spectral"),
             ((5, 3, 2, 2), "flatten", "flatten", "sign"), ((10, 6), "auto", "batch", "spectral")]
    params = [torch.nn.Parameter(torch.randn(shape, generator=g).to(device)) for shape, _, _, _ in cases]
    opt = ScionC([{"params": [p], "matrix_view": view, "lmo": lmo} for p, (_, view, _, lmo) in zip(params, cases)],
                 lr=LR, momentum=1.0, radius=RADIUS, norm_target=NORM_TARGET, ns=NS, ns_steps=NS_STEPS,
                 ns_dtype=torch.float32, backend="batched")
    want = []
    s = LR * RADIUS
    eta = s * s * (2 - 1.0) / (2 * 1.0 * NORM_TARGET)
    for p, (shape, _, truth_view, lmo) in zip(params, cases):
        grad = well_conditioned(shape, truth_view, g)
        p.grad = grad.to(device=device, dtype=torch.float32)
        d = spectral_truth(grad, truth_view) if lmo == "spectral" else sign_truth(grad, truth_view)
        want.append((1 - eta) * p.detach().double().cpu() - s * d)
    opt.step()
    assert ran == [("sign", "flatten", ((5, 3, 2, 2),)), ("spectral", "auto", ((10, 6),))]
    for p, w, case in zip(params, want, cases):
        assert_close(p.detach().cpu(), w, dtype=torch.float32, msg=str(case))
