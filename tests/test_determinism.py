"""Thread-count determinism of AdamHD's δ bookkeeping (README: "deterministic Σ|θ|").

μ_0 = mean|θ_0| and every later Σ|θ_t| must not depend on how many threads reduce them: torch's own
``x.abs().sum()`` does (a (1000, 777) fp32 tensor sums differently at 1 and 2 threads), so two runs of one
job on different thread counts would start δ from different values. Both the CPU kernel and the eager
reference must give params, moments and μ bitwise equal at 1 and 2 threads, over several steps.
"""
import pytest
import torch

from fusedecay import AdamHD
from snippets import cpu_backends

BACKENDS = cpu_backends()
SHAPES = [(1000, 777), (33001,), (5, 3), (0,), (70000,)]


def _torch_sum_depends_on_threads(x):
    sums = []
    for n in (1, 2):
        torch.set_num_threads(n)
        sums.append(x.abs().sum())
    return not torch.equal(*sums)


def _run(backend, threads, dtype):
    """4 steps; returns the params, the optimizer and μ of every param after every step (β0 = 0.99, the
    default, so a difference in μ_0 is still visible in μ_4)."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in SHAPES]
    opt = AdamHD(params, lr=1e-2, weight_decay=0.3, delta_mode="ema", backend=backend)
    mus = []
    for _ in range(4):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
        mus.append(torch.stack([opt.state[p]["delta_mu"] for p in params]))
    return params, opt, mus


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", BACKENDS)
def test_params_state_and_mu_bitwise_equal_at_1_and_2_threads(backend, dtype):
    before = torch.get_num_threads()
    try:
        # The premise: on this input torch's plain sum does depend on the thread count.
        assert _torch_sum_depends_on_threads(torch.randn(1000, 777, generator=torch.Generator().manual_seed(0)))
        a, oa, mus_a = _run(backend, 1, dtype)
        b, ob, mus_b = _run(backend, 2, dtype)
    finally:
        torch.set_num_threads(before)
    for t, (x, y) in enumerate(zip(mus_a, mus_b), start=1):
        assert torch.equal(x, y), f"μ after step {t}: {x.tolist()} vs {y.tolist()}"
    for i, (p, q) in enumerate(zip(a, b)):
        assert torch.equal(p, q), f"param {i} {tuple(p.shape)}"
        for key in ("exp_avg", "exp_avg_sq", "delta_mu", "step"):
            assert torch.equal(oa.state[p][key], ob.state[q][key]), f"param {i} {tuple(p.shape)}: {key}"


# 8-bit and full-precision moments in one group: the CPU op runs both formats' chunks in one parallel region, where a
# thread done with its own run of chunks claims the ones left in the others' (csrc/cpu/adam_decay_cpu.cpp). A chunk
# run twice or skipped, or a partial sum written by the wrong part, changes params, codes or μ against one thread.
MIXED_SHAPES = [(1000, 384), (70000,), (3, 5), (256, 128), (0,), (40000,), (129, 256)]


def _run_mixed(threads):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(0.1 * torch.randn(s, generator=g)) for s in MIXED_SHAPES]
    opt = AdamHD(params, lr=1e-2, weight_decay=0.3, delta_mode="ema", backend="cpu", state_bits=8)
    mus = []
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        mus.append(torch.stack([opt.state[p]["delta_mu"] for p in params]))
    return params, opt, mus


@pytest.mark.skipif("cpu" not in BACKENDS, reason="needs the compiled CPU backend")
def test_mixed_state_formats_bitwise_equal_at_1_2_and_3_threads():
    before = torch.get_num_threads()
    try:
        runs = [_run_mixed(n) for n in (1, 2, 3)]
    finally:
        torch.set_num_threads(before)
    a, oa, mus_a = runs[0]
    # Both formats are present (the premise).
    assert "exp_avg_codes" in oa.state[a[0]] and "exp_avg" in oa.state[a[1]]
    for threads, (b, ob, mus_b) in zip((2, 3), runs[1:]):
        for t, (x, y) in enumerate(zip(mus_a, mus_b), start=1):
            assert torch.equal(x, y), f"{threads} threads, μ after step {t}: {x.tolist()} vs {y.tolist()}"
        for i, (p, q) in enumerate(zip(a, b)):
            assert torch.equal(p, q), f"{threads} threads, param {i} {tuple(p.shape)}"
            for key, x in oa.state[p].items():
                assert torch.equal(x, ob.state[q][key]), f"{threads} threads, param {i} {tuple(p.shape)}: {key}"
