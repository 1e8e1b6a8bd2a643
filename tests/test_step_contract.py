"""What every step() promises, for every optimizer and every CPU backend (GPU counterparts marked ``cuda``).

* **GradScaler overflow changes nothing**: with ``torch.amp.GradScaler`` driving the step and a non-finite
  grad, params, ``exp_avg``, ``exp_avg_sq``, μ (``delta_mu``) and ``step`` are bitwise what they were; the next
  finite step then matches an unscaled run.
* **No host reads inside step()**: ``.item()``, ``float()``, ``bool()``, ``int()``, ``.tolist()``, ``.cpu()``,
  ``.numpy()`` are never called on a tensor (tests/host_sync_guard.py), with lr (and AdamC's max_lr) as
  tensors and GradScaler's grad_scale/found_inf set.
"""
import pytest
import torch

from fusedecay import AdamC, AdamHD, ScionC, available_backends
from host_sync_guard import HOST_READS, no_host_reads
from snippets import cpu_backends
from tolerances import assert_close

CPU_BACKENDS = cpu_backends()
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
SHAPES = [(9, 7), (13,), (1,), (0,), (70001,)]

ADAM_KINDS = {
    "adamhd-prox-ema": lambda ps, **kw: AdamHD(ps, weight_decay=0.2, **kw),
    "adamhd-euler-mean": lambda ps, **kw: AdamHD(ps, weight_decay=0.2, update="euler", delta_mode="mean", **kw),
    "adamhd-prox-fixed": lambda ps, **kw: AdamHD(ps, weight_decay=0.2, delta_mode="fixed", delta=0.3, **kw),
    "adamc": lambda ps, **kw: AdamC(ps, weight_decay=0.2, **kw),
}
STATE_KEYS = ("exp_avg", "exp_avg_sq", "delta_mu", "step")


def _params(device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device)) for s in SHAPES]


def _snapshot(opt, params):
    return ([p.detach().clone() for p in params],
            [{k: v.clone() for k, v in opt.state[p].items() if isinstance(v, torch.Tensor)} for p in params])


def _scaled_backward(scaler, params, seed, poison=False):
    """loss = Σ_i ⟨w_i, p_i⟩ with random w (so grad p_i = w_i), scaled by the GradScaler; ``poison`` puts an inf
    into one grad after backward, as an overflowing fp16 backward would."""
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(p.shape, generator=g).to(p.device) for p in params]
    loss = sum((w * p).sum() for w, p in zip(ws, params))
    scaler.scale(loss).backward()
    if poison:
        params[0].grad[0, 0] = float("inf")
    return ws


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("kind", list(ADAM_KINDS))
def test_gradscaler_overflow_leaves_params_and_all_state_untouched(kind, backend, device):
    if device == "cuda":
        backend = "auto"
    ps, qs = _params(device), _params(device)
    opt = ADAM_KINDS[kind](ps, lr=1e-2, backend=backend)
    ref = ADAM_KINDS[kind](qs, lr=1e-2, backend="reference")     # unscaled, never overflows
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 12)
    for step in range(3):
        ws = _scaled_backward(scaler, ps, seed=step)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        for q, w in zip(qs, ws):
            q.grad = w.clone()
        ref.step()
    params_before, state_before = _snapshot(opt, ps)
    assert all("step" in s and "exp_avg" in s for s in state_before)
    scale_before = scaler.get_scale()

    _scaled_backward(scaler, ps, seed=99, poison=True)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()
    assert scaler.get_scale() == scale_before / 2          # the scaler saw the overflow
    for i, (p, old, st) in enumerate(zip(ps, params_before, state_before)):
        assert torch.equal(p.detach(), old), f"param {i} changed by an overflow step"
        assert set(opt.state[p]) >= set(st)
        for key, v in st.items():
            assert torch.equal(opt.state[p][key], v), f"param {i}: {key} changed by an overflow step"

    # The next finite step is an ordinary step (state intact): it matches the unscaled reference.
    ws = _scaled_backward(scaler, ps, seed=3)
    scaler.step(opt)
    for q, w in zip(qs, ws):
        q.grad = w.clone()
    ref.step()
    for p, q in zip(ps, qs):
        assert_close(p.detach(), q.detach())
        for key in STATE_KEYS:
            if key in ref.state[q]:
                assert_close(opt.state[p][key].float(), ref.state[q][key].float(), torch.float32, msg=key)


def _scionc(ps, backend, lr):
    return ScionC([{"params": [ps[0]], "lmo": "spectral"},
                   {"params": [ps[1], ps[4]], "lmo": "bias"},
                   {"params": [ps[2]], "lmo": "sign", "corrected": False, "weight_decay": 0.1}],
                  lr=lr, backend=backend)


SYNC_CASES = {
    "adamhd-prox-ema": lambda ps, lr, b: AdamHD(ps, lr=lr, weight_decay=0.2, backend=b),
    "adamhd-euler-mean-corrected": lambda ps, lr, b: AdamHD(ps, lr=lr, weight_decay=0.2, update="euler",
                                                            delta_mode="mean", corrected=True, backend=b),
    "adamc-tensor-max-lr": lambda ps, lr, b: AdamC(ps, lr=lr, max_lr=lr * 2, weight_decay=0.2, backend=b),
    "scionc": lambda ps, lr, b: _scionc(ps, b, lr),
}


SYNC_RUNS = [(case, backend) for case in SYNC_CASES
             for backend in (["reference", "batched"] if case == "scionc" else CPU_BACKENDS)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case,backend", SYNC_RUNS)
def test_step_reads_no_tensor_on_the_host(case, backend, device):
    if device == "cuda":
        backend = "auto"
    ps = _params(device)
    lr = torch.tensor(1e-2, device=device)
    opt = SYNC_CASES[case](ps, lr, backend)
    if case != "scionc":
        opt.grad_scale = torch.tensor(4.0, device=device)
        opt.found_inf = torch.tensor(0.0, device=device)
    before = [p.detach().clone() for p in ps]
    for step in range(3):   # the first step creates the state (μ_0 included), later ones reuse it
        for p in ps:
            p.grad = torch.randn_like(p)
        with no_host_reads():
            opt.step()
        lr.mul_(0.9)        # a scheduler writing into the tensor lr
    assert any(not torch.equal(p.detach(), b) for p, b in zip(ps, before))


def test_the_guard_catches_every_kind_of_host_read():
    x = torch.ones(2)
    reads = {"item": lambda: x[0].item(), "tolist": lambda: x.tolist(), "cpu": lambda: x.cpu(), "numpy": lambda: x.numpy(),
             "__float__": lambda: float(x[0]), "__int__": lambda: int(x[0]), "__bool__": lambda: bool(x[0]),
             "__index__": lambda: [0, 1][x.long()[0]], "__array__": lambda: __import__("numpy").asarray(x)}
    assert set(reads) == set(HOST_READS)
    for name, read in reads.items():
        with no_host_reads(), pytest.raises(AssertionError, match="host read"):
            read()
    assert x.sum().item() == 2.0          # restored afterwards


# ---------------------------------------------------------------------------------------------
# λ = 0 through the decay formulas themselves. The optimizers route weight_decay == 0 to the plain "l2" update
# (functional.adam_decay's bypass); here each backend's multi-tensor function is called directly, so the Huber
# prox / Euler formulas and the corrected coefficient run with τ = 0 and must reduce to Adam.
# ---------------------------------------------------------------------------------------------

FORMULAS = [("prox", 0.3, None), ("prox", None, None), ("euler", 0.3, None), ("euler", None, 0.02),
            ("l2", None, 0.02)]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("decay,delta_fixed,max_lr", FORMULAS)
def test_zero_weight_decay_through_the_decay_formulas_is_adam(backend, decay, delta_fixed, max_lr):
    impl = available_backends()[backend].adam_decay
    f64 = torch.float64
    ours = [p.detach().double().clone() for p in _params(seed=5)]
    torch_params = [torch.nn.Parameter(p.clone()) for p in ours]
    adam = torch.optim.Adam(torch_params, lr=1e-2, betas=(0.9, 0.99), eps=1e-8, foreach=False)
    m = [torch.zeros_like(p) for p in ours]
    v = [torch.zeros_like(p) for p in ours]
    steps = [torch.zeros((), dtype=torch.float32) for _ in ours]
    mus = None if delta_fixed is not None or decay == "l2" else [torch.tensor(0.5, dtype=f64) for _ in ours]
    sums = torch.zeros(len(ours), dtype=f64)
    g = torch.Generator().manual_seed(6)
    for _ in range(5):
        grads = [torch.randn(p.shape, generator=g, dtype=f64) for p in ours]
        torch._foreach_add_(steps, 1)
        impl(ours, grads, m, v, steps, mus, sums, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0,
             decay=decay, delta_fixed=delta_fixed, delta_scale=1.0, max_lr=max_lr, bias_correction=True,
             maximize=False)
        for q, gr in zip(torch_params, grads):
            q.grad = gr
        adam.step()
    for i, (p, q) in enumerate(zip(ours, torch_params)):
        assert_close(p, q.detach(), msg=f"param {i}")
        assert_close(m[i], adam.state[q]["exp_avg"], msg=f"exp_avg {i}")
        assert_close(v[i], adam.state[q]["exp_avg_sq"], msg=f"exp_avg_sq {i}")
    assert not torch.equal(ours[0], _params(seed=5)[0].double())
