"""The bf16 acceptance rule in tolerances.py must be able to fail.

A bf16 kernel is accepted when its error against float64 is at most BF16_ERROR_FACTOR × the error of an eager
bf16 implementation. Here the "kernel" under check is deliberately wrong — AdamW that drops the decay term — and
the rule must reject it when the decay moved θ by more than bf16 rounding does: τ = γλ = 2.5e-3 per step, 5
steps (~1.2 % of θ). One bf16 ulp of additive slack (7.8e-3) would accept it: the test checks that too. The updates are written out in this file (no project code), so the test checks the rule, not an
implementation. (At τ = 1e-3 over 5 steps, ~0.5 % of θ, a missing decay hides in bf16 rounding even without
slack: the kernel checks use λ large enough to make the decay visible, e.g. test_cpp_kernels.)
"""
import pytest
import torch

from tolerances import BF16_ERROR_FACTOR, assert_state_close, assert_stored_close, low_precision_ok

LR, WD, B1, B2, EPS, STEPS = 1e-2, 0.25, 0.9, 0.999, 1e-8, 5


def _adamw(theta0, grads, dtype, decay=True):
    """AdamW with bias correction; math in fp32 (fp64 for the float64 truth), stored in ``dtype`` each step."""
    math = torch.float64 if dtype == torch.float64 else torch.float32
    theta = theta0.to(dtype)
    m = torch.zeros_like(theta)
    v = torch.zeros_like(theta)
    for t, g in enumerate(grads, start=1):
        g = g.to(dtype).to(math)
        m = (m.to(math) * B1 + g * (1 - B1)).to(dtype)
        v = (v.to(math) * B2 + g * g * (1 - B2)).to(dtype)
        u = (m.to(math) / (1 - B1 ** t)) / ((v.to(math) / (1 - B2 ** t)).sqrt() + EPS)
        keep = 1 - LR * WD if decay else 1.0
        theta = (theta.to(math) * keep - LR * u).to(dtype)
    return theta


def test_bf16_rule_rejects_an_update_that_drops_the_decay():
    g = torch.Generator().manual_seed(0)
    theta0 = torch.randn(4096, generator=g, dtype=torch.float64)
    grads = [torch.randn(4096, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    truth = _adamw(theta0, grads, torch.float64)
    eager = _adamw(theta0, grads, torch.bfloat16)
    no_decay = _adamw(theta0, grads, torch.bfloat16, decay=False)

    assert low_precision_ok(eager, eager, truth)[0]            # the eager implementation passes its own bar
    ok, e_wrong, e_eager = low_precision_ok(no_decay, eager, truth)
    assert not ok, f"a bf16 update without decay was accepted: err {e_wrong:.3e} vs eager {e_eager:.3e}"
    assert e_wrong <= BF16_ERROR_FACTOR * e_eager + torch.finfo(torch.bfloat16).eps   # what a slack would hide


def test_state_rule_allows_one_code_and_rejects_two():
    codes = torch.tensor([0, 5, -7, 127], dtype=torch.int8)
    assert_state_close(codes + torch.tensor([0, 1, -1, 0], dtype=torch.int8), codes)
    with pytest.raises(AssertionError, match="differ by up to 2"):
        assert_state_close(codes + torch.tensor([0, 2, 0, 0], dtype=torch.int8), codes)
    with pytest.raises(AssertionError):   # floats go through the fp32 table
        assert_state_close(torch.tensor([1.0]), torch.tensor([1.001]))


def test_bf16_state_rules_allow_rounding_and_reject_more():
    """State stored in bf16: against a float64 truth, round to nearest passes and truncation (up to a whole ulp)
    fails; between two implementations, one ulp apart passes and two fail."""
    x = torch.linspace(1.0, 2.0, 1001, dtype=torch.float64)[1:-1] * 1.37
    nearest = x.to(torch.float32).to(torch.bfloat16)
    truncated = (x.to(torch.float32).view(torch.int32) & ~0xFFFF).view(torch.float32).to(torch.bfloat16)
    assert_stored_close(nearest, x)
    with pytest.raises(AssertionError):
        assert_stored_close(truncated, x)
    one = torch.tensor([1.5, -3.0, 0.25], dtype=torch.bfloat16)
    ulp = torch.tensor([2.0 ** -7, 2.0 ** -6, 2.0 ** -9], dtype=torch.bfloat16)   # one ulp of each value
    assert_state_close(one + ulp, one)
    with pytest.raises(AssertionError):
        assert_state_close(one + 2 * ulp, one)
    with pytest.raises(AssertionError, match="float32 vs"):   # a buffer in another dtype is a difference too
        assert_state_close(one.float(), one)
