"""The one place test tolerances live, set by dtype.

* float64: the reference against itself or against torch in float64 — rounding only (~1e-12).
* float32: kernels vs the reference, both in fp32 arithmetic with different operation order; the spec
  asks for ≤ 1e-5 relative on params and state after N steps.
* bfloat16 params: we do not compare against a fixed tolerance; the fused result's error against a
  float64 reference must be ≤ 2× the error of a same-dtype eager implementation (spec §5), with no
  additive slack.
"""
import torch

RTOL = {torch.float64: 1e-10, torch.float32: 1e-5}
ATOL = {torch.float64: 1e-12, torch.float32: 1e-6}
BF16_ERROR_FACTOR = 2.0
# State stored in bf16 after fp32 math (ScionC's momentum_dtype): round to nearest is within half an ulp,
# 2^-8 relative (8 significant bits), of the fp32 value, which is within the fp32 tolerance of the truth.
STORED_RTOL = {torch.bfloat16: 2.0 ** -8}


def assert_close(actual, expected, dtype=None, msg=""):
    dtype = dtype or expected.dtype
    torch.testing.assert_close(actual.to(expected.dtype), expected, rtol=RTOL[dtype], atol=ATOL[dtype], msg=msg or None)


def assert_state_close(actual, expected, dtype=torch.float32, msg=""):
    """Optimizer state of two implementations: 8-bit moment codes within one code (a last-bit difference before
    encoding can cross a rounding boundary), state stored in bf16 after fp32 math within one bf16 ulp (the same
    reason), every other tensor by assert_close at ``dtype``."""
    assert actual.dtype == expected.dtype, f"{msg}: {actual.dtype} vs {expected.dtype}"
    if expected.dtype in (torch.int8, torch.uint8):
        diff = (actual.to(torch.int32) - expected.to(torch.int32)).abs()
        assert (diff <= 1).all(), f"{msg}: codes differ by up to {int(diff.max())}"
    elif expected.dtype in STORED_RTOL:
        torch.testing.assert_close(actual.to(torch.float64), expected.to(torch.float64),
                                   rtol=2 * STORED_RTOL[expected.dtype] + RTOL[dtype], atol=ATOL[dtype],
                                   msg=msg or None)
    else:
        assert_close(actual, expected, dtype, msg)


def assert_stored_close(actual, expected64, msg=""):
    """A tensor stored in a narrower dtype (``actual.dtype``, a key of STORED_RTOL) against a float64 truth of
    the value before the rounding: within half an ulp of it, plus the fp32 tolerance of the math."""
    rtol = STORED_RTOL[actual.dtype] + RTOL[torch.float32]
    torch.testing.assert_close(actual.to(torch.float64), expected64.to(torch.float64), rtol=rtol,
                               atol=ATOL[torch.float32], msg=msg or None)


def rel_error(x, ref64):
    ref64 = ref64.to(torch.float64)
    return ((x.to(torch.float64) - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()


def low_precision_ok(fused, eager_same_dtype, ref64):
    """(ok, fused error, eager error): fused error vs float64 ≤ BF16_ERROR_FACTOR × the eager same-dtype error.

    No additive slack: one bf16 ulp (7.8e-3 relative) is more than a small decay term changes in a few steps
    (τ = 1e-3 over 5 steps is ~0.5 % of θ), so a slack would let a kernel that drops the decay pass
    (tests/test_tolerances.py shows the check rejecting one)."""
    e_fused = rel_error(fused, ref64)
    e_eager = rel_error(eager_same_dtype, ref64)
    return e_fused <= BF16_ERROR_FACTOR * e_eager, e_fused, e_eager


def assert_low_precision_ok(fused, eager_same_dtype, ref64, what=""):
    """bf16/fp16: fused error vs float64 ≤ BF16_ERROR_FACTOR × the eager same-dtype error (spec §5)."""
    ok, e_fused, e_eager = low_precision_ok(fused, eager_same_dtype, ref64)
    assert ok, f"{what}: fused rel err {e_fused:.3e} vs eager {e_eager:.3e}"
