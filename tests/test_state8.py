"""8-bit blockwise optimizer state (docs/state8.md): the codec, the CPU kernel, the optimizer option.

Truths: the F8 code against the nearest representable value computed in float64 from the format's closed
form; the kernel's 8-bit step against (reference decode → the same kernel's fp32 step → reference encode),
which runs the same operations on the same data, so it must agree bit for bit; and against the eager
reference step, which orders its float32 operations differently (params, scales and μ to the fp32
tolerance, codes equal except for rare ±1 flips where an ulp moves a value across a rounding boundary).
"""
from __future__ import annotations

import copy
import importlib
import os

import pytest
import torch

os.environ.setdefault("FUSEDECAY_JIT", "1")

from fusedecay import AdamC, AdamHD  # noqa: E402
from fusedecay.functional import update_delta_mu  # noqa: E402
from fusedecay.reference import adam_decay_reference  # noqa: E402
from fusedecay.reference import state8 as S  # noqa: E402
from snippets import in_ci  # noqa: E402
import float64_truth as T  # noqa: E402
from tolerances import assert_close, assert_state_close  # noqa: E402

try:
    cpp = importlib.import_module("fusedecay._cpp_backend")
except Exception:  # pragma: no cover - only without a compiler
    if in_ci():
        raise
    cpp = None
needs_cpp = pytest.mark.skipif(cpp is None, reason="compiled extension unavailable")

F32 = torch.float32
# Eligible-size shapes for kernel tests (a multiple of 128 per tensor): one block, odd row counts, an empty
# tensor, rows of several blocks; with chunk_size 128/256 most of them span several chunks.
Q_SHAPES = [(1, 128), (3, 256), (37, 128), (0, 128), (5, 384), (2, 3, 128)]


# ------------------------------------------------------------------------------------------------
# The F8 code against float64 truth
# ------------------------------------------------------------------------------------------------

def f8_values(exp_bits: int) -> torch.Tensor:
    """Every code's value in float64, from the format's closed form (3 mantissa bits, bias 2^E − 1)."""
    bias, mbits = 2 ** exp_bits - 1, 3
    vals = []
    for c in range(2 ** (exp_bits + mbits)):
        e, f = c >> mbits, c & (2 ** mbits - 1)
        vals.append(f * 2.0 ** (1 - bias - mbits) if e == 0 else 2.0 ** (e - bias) * (1 + f / 2 ** mbits))
    return torch.tensor(vals, dtype=torch.float64)


def nearest_code(x: torch.Tensor, exp_bits: int) -> torch.Tensor:
    """Index of the nearest value (ties to the even code), computed in float64."""
    vals = f8_values(exp_bits)
    d = (x.to(torch.float64)[:, None] - vals[None, :]).abs()
    best = d.min(dim=1, keepdim=True).values
    ties = d == best
    idx = torch.arange(len(vals)).expand_as(d)
    even = torch.where(ties & (idx % 2 == 0), idx, len(vals))
    any_tie = ties.sum(dim=1) > 1
    return torch.where(any_tie, even.min(dim=1).values, d.argmin(dim=1))


def sample_unit_interval(n: int, seed: int, exp_bits: int) -> torch.Tensor:
    """x in [0, 1]: log-uniform over the format's range and beyond, every code value, every midpoint."""
    g = torch.Generator().manual_seed(seed)
    bias = 2 ** exp_bits - 1
    logu = torch.exp2(-torch.rand(n, generator=g, dtype=torch.float64) * (bias + 6))
    vals = f8_values(exp_bits)
    used = vals[vals <= 1.0]
    mids = (used[1:] + used[:-1]) / 2
    x = torch.cat([logu, used, mids, torch.tensor([0.0, 1.0, 2.0 ** -126, 2.0 ** -149])])
    return x.to(F32)


@pytest.mark.parametrize("exp_bits", [S.EXP_BITS_M, S.EXP_BITS_V])
def test_f8_encode_rounds_to_nearest_value_ties_to_even(exp_bits):
    x = sample_unit_interval(20000, exp_bits, exp_bits)
    assert x.dtype == F32 and torch.equal(x.to(torch.float64), x.to(torch.float64).clamp(0, 1))
    got = S.f8_encode(x, exp_bits)
    want = nearest_code(x, exp_bits)
    assert torch.equal(got, want), (x[got != want][:5], got[got != want][:5], want[got != want][:5])


@pytest.mark.parametrize("exp_bits", [S.EXP_BITS_M, S.EXP_BITS_V])
def test_f8_decode_is_the_closed_form_and_inverts_encode(exp_bits):
    codes = torch.arange(2 ** (exp_bits + 3))
    values = S.f8_decode(codes, exp_bits)
    assert values.dtype == F32
    assert torch.equal(values.to(torch.float64), f8_values(exp_bits))
    assert torch.equal(S.f8_encode(values, exp_bits), codes)
    # 1.0 — a block's largest element — is the code (2^E − 1)·8 and decodes exactly.
    one = (2 ** exp_bits - 1) * 8
    assert S.f8_encode(torch.ones(1), exp_bits).item() == one and values[one].item() == 1.0


def test_f8_nan_and_out_of_range_saturate():
    x = torch.tensor([float("nan"), -float("nan"), float("inf"), 3.0])
    assert S.f8_encode(x, S.EXP_BITS_M).tolist() == [127] * 4
    assert S.f8_encode(x, S.EXP_BITS_V).tolist() == [255] * 4


# ------------------------------------------------------------------------------------------------
# Blockwise quantisation (reference)
# ------------------------------------------------------------------------------------------------

def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN matching NaN."""
    return a.shape == b.shape and bool(((a == b) | (torch.isnan(a) & torch.isnan(b))).all())


def moments(shape, seed=0, spread=3.0):
    """m (signed) and v (≥ 0) whose magnitudes spread over several orders within each block."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.randn(shape, generator=g) * spread)
    m = torch.randn(shape, generator=g) * scale * 1e-3
    v = (torch.randn(shape, generator=g) * scale * 1e-3) ** 2
    return m, v


def test_eligibility_and_scale_shape():
    assert S.eligible((32, 128)) and S.scale_shape((32, 128)) == (32, 1)
    assert S.eligible((8, 4, 128)) and S.scale_shape((8, 4, 128)) == (8, 4)
    assert S.eligible((64, 3 * 128)) and S.scale_shape((0, 256)) == (0, 2)
    assert not S.eligible((4096,))            # 1-D (biases, norms)
    assert not S.eligible((31, 128))          # below MIN_NUMEL
    assert not S.eligible((100, 100))         # row not a multiple of BLOCK
    assert not S.eligible((128, 96))          # numel is, the rows are not: blocks would straddle rows
    assert not S.eligible((64, 3, 3, 3))      # conv kernel rows of 27


def test_quantize_relative_error_and_block_maxima():
    m, v = moments((64, 256), spread=1.0)
    mc, ms = S.quantize_exp_avg(m)
    vc, vs = S.quantize_exp_avg_sq(v)
    assert mc.dtype == torch.int8 and vc.dtype == torch.uint8 and ms.shape == vs.shape == (64, 2)
    blocks = m.reshape(-1, S.BLOCK)
    assert torch.equal(ms.reshape(-1), blocks.abs().amax(1))
    assert torch.equal(vs.reshape(-1), S.ieee_sqrt(v.reshape(-1, S.BLOCK)).amax(1))
    assert mc.abs().max() <= 120 and vc.max() <= 248
    m2 = S.dequantize_exp_avg(mc, ms)
    w, w2 = S.ieee_sqrt(v), S.ieee_sqrt(S.dequantize_exp_avg_sq(vc, vs))
    # The block maxima decode exactly; 3 mantissa bits: relative error ≤ 1/16 in the normal range.
    assert torch.equal(m2.reshape(-1, S.BLOCK).abs().amax(1), ms.reshape(-1))
    assert torch.equal(torch.sign(m2[m2 != 0]), torch.sign(m[m2 != 0]))
    big_m = m.abs() >= 2.0 ** -14 * ms.repeat_interleave(S.BLOCK, 1)
    assert big_m.float().mean() > 0.95 and ((m2 - m).abs() <= m.abs() / 16 * (1 + 1e-6))[big_m].all()
    big_w = w >= 2.0 ** -30 * vs.repeat_interleave(S.BLOCK, 1)
    assert big_w.float().mean() > 0.99 and ((w2 - w).abs() <= w / 16 * (1 + 1e-6))[big_w].all()
    # Decode → encode gives back the same bits (conversions round-trip).
    assert all(torch.equal(a, b) for a, b in zip(S.quantize_exp_avg(m2), (mc, ms)))
    assert all(torch.equal(a, b) for a, b in zip(S.quantize_exp_avg_sq(S.dequantize_exp_avg_sq(vc, vs)), (vc, vs)))


def test_blocks_are_independent_and_special_blocks():
    m, v = moments((4, 256), seed=1)
    m[0, :128] = 0.0                                 # all-zero block: scale 0, codes 0, decodes to 0
    m[1, 128:] = 1e-40                               # a block of subnormals: stored as zeros
    m[2, 5] = float("nan")                           # NaN poisons its own block only
    mc, ms = S.quantize_exp_avg(m)
    out = S.dequantize_exp_avg(mc, ms)
    assert ms[0, 0] == 0 and (mc[0, :128] == 0).all() and (out[0, :128] == 0).all()
    assert (mc[1, 128:] == 0).all() and (out[1, 128:] == 0).all()
    assert torch.isnan(ms[2, 0]) and torch.isnan(out[2, :128]).all() and not torch.isnan(out[2, 128:]).any()
    m2 = m.clone()
    m2[3, 128:] *= 7.0                               # touch one block: only its codes/scale may change
    mc2, ms2 = S.quantize_exp_avg(m2)
    keep = torch.ones_like(mc, dtype=torch.bool)
    keep[3, 128:] = False
    assert torch.equal(mc2[keep], mc[keep]) and same(ms2[:3], ms[:3]) and ms2[3, 0] == ms[3, 0]


# ------------------------------------------------------------------------------------------------
# The CPU kernel
# ------------------------------------------------------------------------------------------------

def q8_state(shapes, seed=0, param_dtype=F32, warm=True):
    """params, int8/uint8 codes, scales, steps, μ of a mid-training 8-bit state."""
    g = torch.Generator().manual_seed(seed)
    params, mc, vc, ms, vs = [], [], [], [], []
    for k, s in enumerate(shapes):
        params.append((torch.randn(s, generator=g) * 0.5).to(param_dtype))
        m, v = moments(s, seed=seed + 7 * k) if warm else (torch.zeros(s), torch.zeros(s))
        v = v + m * m  # as in Adam, √v ≥ |m| roughly: steps of order lr, not m/ε
        (a, b), (c, d) = S.quantize_exp_avg(m), S.quantize_exp_avg_sq(v)
        mc.append(a)
        ms.append(b)
        vc.append(c)
        vs.append(d)
    steps = [torch.tensor(3.0 if warm else 0.0) for _ in shapes]
    mus = [p.float().abs().mean() if p.numel() else torch.tensor(0.0) for p in params]
    return dict(params=params, exp_avgs=mc, exp_avg_sqs=vc, exp_avg_scales=ms, exp_avg_sq_scales=vs, steps=steps,
                mus=mus)


def clone_state(st):
    return {k: [None if x is None else x.clone() for x in v] for k, v in st.items()}


def grads_for(shapes, seed=1, dtype=F32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) * 1e-2 for s in shapes]


def hyper(decay="prox", **over):
    kw = dict(lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decay=decay, delta_fixed=None,
              delta_scale=1.0, max_lr=None, bias_correction=True, maximize=False)
    kw.update(over)
    return kw


def _device_of(st):
    """Where the kernel runs (Σ|θ| goes there too)."""
    return st["params"][0].device if st["params"] else torch.device("cpu")


def step_q8(impl, st, grads, delta_beta=0.9, **kw):
    """One step of an 8-bit contract implementation on ``st`` (in place); returns Σ|θ_t| per tensor. With
    ``increment_steps=True`` the implementation increments the steps itself."""
    if not kw.get("increment_steps", False):
        torch._foreach_add_(st["steps"], 1)
    sums = torch.full((len(st["params"]),), float("nan"), device=_device_of(st))
    tracks = kw["decay"] != "l2" and kw.get("delta_fixed") is None
    impl(st["params"], grads, st["exp_avgs"], st["exp_avg_sqs"], st["steps"], st["mus"] if tracks else None, sums,
         exp_avg_scales=st["exp_avg_scales"], exp_avg_sq_scales=st["exp_avg_sq_scales"],
         delta_beta=delta_beta if tracks else None, **kw)
    return sums


def step_via_fp32(impl, st, grads, delta_beta=0.9, **kw):
    """The same step as decode → ``impl``'s fp32-moment step → encode, with the reference codec."""
    m = [S.dequantize_exp_avg(c, s) for c, s in zip(st["exp_avgs"], st["exp_avg_scales"])]
    v = [S.dequantize_exp_avg_sq(c, s) for c, s in zip(st["exp_avg_sqs"], st["exp_avg_sq_scales"])]
    torch._foreach_add_(st["steps"], 1)
    sums = torch.full((len(st["params"]),), float("nan"), device=_device_of(st))
    tracks = kw["decay"] != "l2" and kw.get("delta_fixed") is None
    impl(st["params"], grads, m, v, st["steps"], st["mus"] if tracks else None, sums,
         delta_beta=delta_beta if tracks else None, **kw)
    for i in range(len(m)):
        (st["exp_avgs"][i], st["exp_avg_scales"][i]) = S.quantize_exp_avg(m[i])
        (st["exp_avg_sqs"][i], st["exp_avg_sq_scales"][i]) = S.quantize_exp_avg_sq(v[i])
    return sums


def assert_equal_states(a, b, what=""):
    for k in a:
        for i, (x, y) in enumerate(zip(a[k], b[k])):
            assert (x is None and y is None) or torch.equal(x, y), f"{what}: {k}[{i}]"


def kernel(chunk_size):
    def run(*args, **kw):
        return cpp.adam_decay(*args, chunk_size=chunk_size, **kw)
    return run


@needs_cpp
@pytest.mark.parametrize("decay", ["l2", "prox", "euler"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk_size", [128, 0])
def test_kernel_step_is_decode_fp32_step_encode_bit_for_bit(decay, param_dtype, chunk_size):
    """The 8-bit kernel runs the fp32 kernel's element function between the codec's decode and encode."""
    st = q8_state(Q_SHAPES, param_dtype=param_dtype)
    a, b = clone_state(st), clone_state(st)
    for k in range(4):
        grads = grads_for(Q_SHAPES, seed=10 + k, dtype=param_dtype)
        kw = hyper(decay, maximize=k == 2, lr=torch.tensor(1e-2) if k == 3 else 1e-2)
        sa = step_q8(kernel(chunk_size), a, grads, **kw)
        sb = step_via_fp32(kernel(chunk_size), b, grads, **kw)
        assert torch.equal(sa, sb)
        assert_equal_states(a, b, f"step {k}")
    assert any(not torch.equal(x, y) for x, y in zip(a["exp_avgs"], st["exp_avgs"]) if x.numel())


@needs_cpp
@pytest.mark.parametrize("decay,corrected", [("l2", True), ("prox", False), ("euler", False), ("prox", True)])
def test_kernel_matches_reference_every_step(decay, corrected):
    """Each step from the same state: params, scales, Σ|θ| and μ to the fp32 tolerance; codes equal but for
    ±1 flips of values within float32 rounding of a code boundary (the two order their operations differently)."""
    st = q8_state(Q_SHAPES, seed=3)
    kw = hyper(decay, max_lr=2e-2 if corrected else None)
    flips = total = 0
    for k in range(4):
        grads = grads_for(Q_SHAPES, seed=20 + k)
        ref = clone_state(st)
        s_ref = step_q8(adam_decay_reference, ref, grads, **kw)
        s_got = step_q8(kernel(256), st, grads, **kw)
        assert_close(s_got, s_ref, dtype=F32)
        for name in ("params", "exp_avg_scales", "exp_avg_sq_scales", "mus"):
            for i, (x, y) in enumerate(zip(st[name], ref[name])):
                assert_close(x, y, dtype=F32, msg=f"step {k}: {name}[{i}]")
        for name in ("exp_avgs", "exp_avg_sqs"):
            for x, y in zip(st[name], ref[name]):
                d = (x.to(torch.int32) - y.to(torch.int32)).abs()
                assert d.numel() == 0 or d.max() <= 1
                flips += int((d != 0).sum())
                total += d.numel()
    assert flips <= max(2, total // 10000), f"{flips} of {total} codes differ"


def codes_case(x: torch.Tensor, device="cpu"):
    """A one-step problem whose moments are chosen values: β1 = β2 = 0 makes m = g and √v = |g| exactly (for
    |g| ≥ 2^−62; below that both codes are 0 either way), and every block's maximum 2 puts |g|/2 = x in the
    codec exactly. x: float64 values in [0, 1], exact in float32. Returns (state, grads, hyper, expected
    (exp_avg codes, exp_avg_sq codes)) — the expected ones from the float64 nearest-value truth."""
    x = torch.cat([x, x.new_zeros(-len(x) % 127)]).reshape(-1, 127)
    x = torch.cat([torch.ones(len(x), 1, dtype=x.dtype), x], dim=1)      # every block's maximum: x = 1
    g = (torch.cat([x, -x]) * 2).to(F32)
    assert torch.equal(g.double(), torch.cat([x, -x]) * 2)               # the values are exact in float32
    st = q8_state([tuple(g.shape)], warm=False)
    kw = hyper("l2", beta1=0.0, beta2=0.0, weight_decay=0.0)
    code_m = nearest_code(g.abs().reshape(-1) / 2, S.EXP_BITS_M).reshape(g.shape)
    want_m = torch.where(g < 0, -code_m, code_m).to(torch.int8)
    want_v = nearest_code(g.abs().reshape(-1) / 2, S.EXP_BITS_V).reshape(g.shape).to(torch.uint8)
    to = lambda xs: [t.to(device) for t in xs]  # noqa: E731
    return {k: to(v) for k, v in st.items()}, [g.to(device)], kw, (want_m, want_v)


def code_midpoints() -> torch.Tensor:
    """The midpoint between every two neighbouring code values ≤ 1 of both formats (exact in float32)."""
    mids = []
    for eb in (S.EXP_BITS_M, S.EXP_BITS_V):
        used = f8_values(eb)[f8_values(eb) <= 1.0]
        mids.append((used[1:] + used[:-1]) / 2)
    return torch.cat(mids)


def tie_case(device="cpu"):
    """Moments exactly on the F8 rounding midpoints (ties go to the even code)."""
    return codes_case(code_midpoints(), device)


def dense_case(device="cpu"):
    """Moments on both sides of every midpoint (one float32 ulp away), on every code value, at float32's
    subnormals and log-uniform over [2^−70, 1]: what each implementation's rounding must get right."""
    mids = code_midpoints().to(F32)
    near = torch.cat([torch.nextafter(mids, torch.zeros_like(mids)), torch.nextafter(mids, torch.ones_like(mids))])
    values = torch.cat([f8_values(eb) for eb in (S.EXP_BITS_M, S.EXP_BITS_V)])
    g = torch.Generator().manual_seed(5)
    logu = torch.exp2(-torch.rand(6000, generator=g, dtype=torch.float64) * 70).to(F32)
    tiny = torch.tensor([2.0 ** -149, 3 * 2.0 ** -149, 2.0 ** -127, 2.0 ** -126, 0.0])
    x = torch.cat([near.double(), values[values <= 1.0], logu.double(), tiny.double()])
    return codes_case(x, device)


@needs_cpp
@pytest.mark.parametrize("impl", ["reference", "cpu"])
@pytest.mark.parametrize("case", [tie_case, dense_case])
def test_codes_are_the_nearest_value_ties_to_even(impl, case):
    st, grads, kw, (want_m, want_v) = case()
    step_q8(adam_decay_reference if impl == "reference" else kernel(128), st, grads, **kw)
    assert torch.equal(st["exp_avgs"][0], want_m) and torch.equal(st["exp_avg_sqs"][0], want_v)


def special_blocks_state(param_dtype):
    """One 128-element block per row, each of a kind that decides how the CPU kernel's vector loop treats it
    (csrc/cpu/adam_decay_cpu.cpp, Q8Codec: a block whose codes and new values are all normal runs without the
    subnormal branches), and grads that keep each kind through the steps (g = 0 where a moment must stay put)."""
    g = torch.Generator().manual_seed(41)
    rows = 15
    m = torch.randn(rows, 128, generator=g) * 1e-3
    v = m * m + torch.rand(rows, 128, generator=g) * 1e-6
    grad = torch.randn(rows, 128, generator=g) * 1e-2
    # 0: plain (every code normal). 1: one |m| at 2^−20 of the block's largest (code 0); 2: one at 2^−16 (a
    # subnormal code); 3: one √v at 2^−32 of the largest (a subnormal code of v); g = 0 there, so they stay small
    m[1, 5] = m[1].abs().max() * 2.0 ** -20
    m[2, 9] = -m[2].abs().max() * 2.0 ** -16
    v[3, 7] = v[3].max() * 2.0 ** -64
    grad[1, 5] = grad[2, 9] = grad[3, 7] = 0.0
    m[4], v[4], grad[4] = 0.0, 0.0, 0.0                       # 4: all zero (scales 0)
    m[5] = float("nan")                                       # 5: m NaN throughout (scale NaN)
    m[6, 3] = float("inf")                                    # 6: an infinite m (scale inf, r = 0)
    m[7, ::3], grad[7, ::3] = -0.0, -0.0                      # 7: −0 moments
    m[8] = torch.sign(m[8]) * 2.0 ** 126 * (1 + torch.rand(128, generator=g))   # 8: scale > 2^126 (r subnormal)
    v[8], grad[8] = 1.0, 0.0
    grad[9, 17] = float("nan")                                # 9: NaN from the grad (new scale NaN)
    v[10] = v[10] * 2.0 ** 100                                # 10: large √v scale, small m
    # 11–14: scales at the limit of the decode that folds the exponent rebase into the scale (s·2^112 for m, s·2^96
    # for √v must stay finite: s < 2^16, s < 2^32) and just below it; g = 0, so the first step decodes them as stored
    m[11] = torch.linspace(0.5, 1.0, 128) * 2.0 ** 16         # 11: m scale 2^16 exactly
    m[12] = torch.linspace(0.5, 1.0, 128) * (2.0 ** 16 - 2.0 ** -8)   # 12: the largest m scale below 2^16
    v[13] = torch.linspace(0.25, 1.0, 128) * 2.0 ** 64        # 13: √v scale 2^32 exactly
    v[14] = torch.linspace(0.25, 1.0, 128) * (2.0 ** 32 - 2.0 ** 8) ** 2   # 14: a √v scale just below 2^32
    grad[11:] = 0.0
    (mc, ms), (vc, vs) = S.quantize_exp_avg(m), S.quantize_exp_avg_sq(v)
    params = (torch.randn(rows, 128, generator=g) * 0.5).to(param_dtype)
    st = dict(params=[params], exp_avgs=[mc], exp_avg_sqs=[vc], exp_avg_scales=[ms], exp_avg_sq_scales=[vs],
              steps=[torch.tensor(3.0)], mus=[params.float().abs().mean()])
    return st, [grad.to(param_dtype)]


def boundary_blocks_state(param_dtype):
    """With β1 = β2 = 0 (m = g, √v = |g|), blocks whose smallest |m|/max is exactly 2^−14 (m's smallest normal
    code: no subnormal branch needed), twice that, or in the binade below it (2^−15, 1.5·2^−15: subnormal codes 4
    and 6, where the normal branch alone would give other codes), and their codes after a step. The values are
    exact in the param dtype."""
    tiny = 2.0 ** -14
    rows = []
    for x in (tiny, tiny * 2, tiny / 2, tiny * 0.75):
        r = torch.linspace(0.5, 1.0, 128, dtype=param_dtype)
        r[0], r[40] = 1.0, x
        rows.append(torch.cat([r, -r]).reshape(2, 128) * 2)
    grad = torch.cat(rows)
    st = q8_state([tuple(grad.shape)], warm=False, param_dtype=param_dtype)
    return st, [grad]


@needs_cpp
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("decay", ["prox", "l2"])
def test_every_kind_of_block_steps_as_decode_fp32_step_encode(param_dtype, decay):
    """Blocks with and without subnormal codes, zero, NaN, infinite, −0 and huge-scale blocks, and blocks on the
    boundary of the normal codes, each stepped by the 8-bit kernel bit for bit as (reference decode → the kernel's
    fp32 step → reference encode), NaNs compared by their bits."""
    from cpu_forms import as_bits
    for st, grads, kw in [(*special_blocks_state(param_dtype), hyper(decay)),
                          (*boundary_blocks_state(param_dtype), hyper(decay, beta1=0.0, beta2=0.0))]:
        a, b = clone_state(st), clone_state(st)
        for k in range(3):
            sa = step_q8(kernel(0), a, grads, **kw)
            sb = step_via_fp32(kernel(0), b, grads, **kw)
            assert torch.equal(as_bits(sa), as_bits(sb)), f"step {k}: sums"
            for key in a:
                for i, (x, y) in enumerate(zip(a[key], b[key])):
                    assert torch.equal(as_bits(x), as_bits(y)), f"step {k}: {key}[{i}]"
        assert torch.isnan(a["exp_avg_scales"][0]).any() or kw["beta1"] == 0.0


@needs_cpp
def test_thread_count_and_rerun_do_not_change_bits():
    shapes = [(1024, 768), (300, 128)]
    st = q8_state(shapes, seed=5)
    grads = grads_for(shapes)
    runs = []
    threads = torch.get_num_threads()
    for n in (threads, 1, threads):
        torch.set_num_threads(n)
        try:
            s = clone_state(st)
            step_q8(cpp.adam_decay, s, grads, **hyper("prox"))
        finally:
            torch.set_num_threads(threads)
        runs.append(s)
    assert_equal_states(runs[0], runs[1], "1 thread")
    assert_equal_states(runs[0], runs[2], "rerun")


@needs_cpp
def test_non_contiguous_params_use_row_major_blocks():
    """A transposed param is walked through a contiguous copy: its blocks are rows of the logical shape."""
    base = q8_state([(256, 128)], seed=6)
    st = clone_state(base)
    st["params"] = [base["params"][0].t().contiguous().t()]  # same values, column-major storage
    assert not st["params"][0].is_contiguous()
    grads = [grads_for([(128, 256)])[0].t()]
    ref = clone_state(base)
    step_q8(cpp.adam_decay, st, grads, **hyper("euler"))
    step_q8(cpp.adam_decay, ref, [grads[0].contiguous()], **hyper("euler"))
    assert_equal_states(st, ref)


@needs_cpp
@pytest.mark.parametrize("impl", ["reference", "cpu"])
def test_found_inf_writes_nothing_and_grad_scale_unscales(impl):
    impl = adam_decay_reference if impl == "reference" else cpp.adam_decay
    st = q8_state(Q_SHAPES, seed=8)
    before = clone_state(st)
    grads = grads_for(Q_SHAPES)
    sums = step_q8(impl, st, grads, found_inf=torch.tensor(1.0), **hyper("prox"))
    for k in ("params", "exp_avgs", "exp_avg_sqs", "exp_avg_scales", "exp_avg_sq_scales", "mus"):
        assert all(torch.equal(x, y) for x, y in zip(st[k], before[k])), k
    assert_close(sums, torch.stack([p.abs().sum() for p in before["params"]]), dtype=F32)
    a, b = clone_state(before), clone_state(before)
    step_q8(impl, a, [g * 1024 for g in grads], grad_scale=torch.tensor(1024.0), found_inf=torch.tensor(0.0),
            **hyper("prox"))
    step_q8(impl, b, grads, **hyper("prox"))
    assert_equal_states(a, b)  # dividing by a power of two is exact


@needs_cpp
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_found_inf", [False, True])
def test_fused_mu_update_is_update_delta_mu(param_dtype, with_found_inf):
    """The kernel's reduction stage updates μ with the arithmetic of functional.update_delta_mu (after the sums
    it writes), honouring found_inf and the global sizes of sharded tensors; also when the caller passes no
    abs_sums (the CPU kernel then keeps the sums to itself)."""
    shapes = [(37,), (5, 7), (0,), (4097,)]
    g = torch.Generator().manual_seed(4)
    params = [torch.randn(s, generator=g, dtype=param_dtype) for s in shapes]
    zeros = [torch.zeros_like(p) for p in params]
    mus = [p.abs().mean() if p.numel() else torch.zeros((), dtype=param_dtype) for p in params]
    grads = [torch.randn_like(p) for p in params]
    numels = [74, 35, 0, 12291]
    fi = torch.tensor(1.0 if with_found_inf else 0.0)
    a_p, b_p = [p.clone() for p in params], [p.clone() for p in params]
    a_mu, b_mu = [m.clone() for m in mus], [m.clone() for m in mus]
    a_s, b_s = torch.zeros(4, dtype=param_dtype), torch.zeros(4, dtype=param_dtype)
    steps = lambda: [torch.tensor(2.0) for _ in shapes]  # noqa: E731
    kw = hyper("prox", found_inf=fi)
    cpp.adam_decay(a_p, grads, [z.clone() for z in zeros], [z.clone() for z in zeros], steps(), a_mu, a_s,
                   delta_beta=0.95, numels=numels, **kw)
    cpp.adam_decay(b_p, grads, [z.clone() for z in zeros], [z.clone() for z in zeros], steps(), b_mu, b_s, **kw)
    update_delta_mu(b_mu, b_s, numels, 0.95, fi)
    assert torch.equal(a_s, b_s)
    assert all(torch.equal(x, y) for x, y in zip(a_mu, b_mu))
    # without abs_sums (what fusedecay.functional passes the CPU backend): the sums stay inside, the rest is the same
    c_p, c_mu = [p.clone() for p in params], [m.clone() for m in mus]
    cpp.adam_decay(c_p, grads, [z.clone() for z in zeros], [z.clone() for z in zeros], steps(), c_mu, None,
                   delta_beta=0.95, numels=numels, **kw)
    assert all(torch.equal(x, y) for x, y in zip(c_p + c_mu, a_p + a_mu))
    # and against the float64 formula, independent of the package: Σ|θ_t| of the updated params, then μ
    for p, s, mu0, mu, n in zip(a_p, a_s, mus, a_mu, numels):
        assert_close(s.double(), p.double().abs().sum(), param_dtype)
        want = T.mu_update(float(mu0), float(p.double().abs().sum()), n, 0.95, skipped=with_found_inf)
        assert_close(mu.double(), torch.tensor(want, dtype=torch.float64), param_dtype)
    assert with_found_inf == all(torch.equal(x, y) for x, y in zip(a_mu, mus))


@needs_cpp
@pytest.mark.parametrize("edit,match", [
    (lambda st: st.update(exp_avg_scales=None, exp_avg_sq_scales=None), "int8 moments are 8-bit state"),
    (lambda st: st["exp_avg_sqs"].__setitem__(1, st["exp_avg_sqs"][1].to(torch.int8)), "uint8 exp_avg_sq"),
    (lambda st: st["exp_avg_scales"].__setitem__(1, st["exp_avg_scales"][1][:2]), r"exp_avg_scales\[1\]"),
    (lambda st: st["exp_avg_sq_scales"].__setitem__(0, st["exp_avg_sq_scales"][0].double()),
     r"exp_avg_sq_scales\[0\]"),
    (lambda st: st["exp_avg_sqs"].__setitem__(0, torch.zeros(1, 256, dtype=torch.uint8)[:, ::2]), "contiguous"),
    (lambda st: st.update(exp_avg_sq_scales=None), "given together"),
])
def test_bad_8bit_arguments_raise_before_writing(edit, match):
    st = q8_state([(1, 128), (3, 256)])
    before = clone_state(st)
    edit(st)
    with pytest.raises(ValueError, match=match):
        cpp.adam_decay(st["params"], grads_for([(1, 128), (3, 256)]), st["exp_avgs"], st["exp_avg_sqs"],
                       [torch.tensor(1.0)] * 2, None, None, exp_avg_scales=st["exp_avg_scales"],
                       exp_avg_sq_scales=st["exp_avg_sq_scales"], **hyper("l2"))
    assert all(torch.equal(x, y) for x, y in zip(st["params"], before["params"]))


@needs_cpp
def test_bad_sizes_and_chunk_size_for_8bit_state():
    p = [torch.randn(100)]
    m, v = [torch.zeros(100, dtype=torch.int8)], [torch.zeros(100, dtype=torch.uint8)]
    with pytest.raises(ValueError, match="multiple of 128 elements"):
        cpp.adam_decay(p, [torch.randn(100)], m, v, [torch.tensor(1.0)], None, None, exp_avg_scales=[torch.zeros(1)],
                       exp_avg_sq_scales=[torch.zeros(1)], **hyper("l2"))
    st = q8_state([(1, 128)])
    with pytest.raises(ValueError, match="chunk_size"):
        cpp.adam_decay(st["params"], grads_for([(1, 128)]), st["exp_avgs"], st["exp_avg_sqs"], st["steps"], None,
                       None, exp_avg_scales=st["exp_avg_scales"], exp_avg_sq_scales=st["exp_avg_sq_scales"],
                       chunk_size=64, **hyper("l2"))


def mixed_state(param_dtype, seed=0):
    """A launch's lists mixing 8-bit entries (scales given) and full-precision ones (scale entries None), in an
    interleaved order, with odd, empty and multi-chunk sizes on both sides."""
    q8 = q8_state(Q_SHAPES, seed=seed, param_dtype=param_dtype)
    full_shapes = [(7,), (0,), (300,), (33, 65)]
    g = torch.Generator().manual_seed(seed + 100)
    order = [("q", 0), ("f", 0), ("q", 1), ("q", 2), ("f", 1), ("q", 3), ("f", 2), ("q", 4), ("f", 3), ("q", 5)]
    st = {k: [] for k in q8}
    shapes = []
    for kind, i in order:
        if kind == "q":
            for k in q8:
                st[k].append(q8[k][i])
            shapes.append(Q_SHAPES[i])
        else:
            s = full_shapes[i]
            st["params"].append((torch.randn(s, generator=g) * 0.5).to(param_dtype))
            st["exp_avgs"].append((torch.randn(s, generator=g) * 1e-2).to(param_dtype))
            st["exp_avg_sqs"].append((torch.rand(s, generator=g) * 1e-4).to(param_dtype))
            st["exp_avg_scales"].append(None)
            st["exp_avg_sq_scales"].append(None)
            st["steps"].append(torch.tensor(3.0))
            st["mus"].append(st["params"][-1].float().abs().mean() if st["params"][-1].numel() else torch.tensor(0.0))
            shapes.append(s)
    return st, shapes


def step_split_by_format(impl, st, grads, delta_beta=0.9, **kw):
    """The step as one call per state format (what a backend that takes one format per call gets)."""
    torch._foreach_add_(st["steps"], 1)
    n = len(st["params"])
    sums = torch.full((n,), float("nan"), device=_device_of(st))
    tracks = kw["decay"] != "l2" and kw.get("delta_fixed") is None
    for quantized in (True, False):
        idx = [i for i in range(n) if (st["exp_avg_scales"][i] is not None) == quantized]
        sub = lambda lst: [lst[i] for i in idx]  # noqa: E731
        part = torch.full((len(idx),), float("nan"), device=sums.device)
        impl(sub(st["params"]), sub(grads), sub(st["exp_avgs"]), sub(st["exp_avg_sqs"]), sub(st["steps"]),
             sub(st["mus"]) if tracks else None, part,
             exp_avg_scales=sub(st["exp_avg_scales"]) if quantized else None,
             exp_avg_sq_scales=sub(st["exp_avg_sq_scales"]) if quantized else None,
             delta_beta=delta_beta if tracks else None, **kw)
        sums[idx] = part
    return sums


@needs_cpp
@pytest.mark.parametrize("decay", ["l2", "prox", "euler"])
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.bfloat16])
def test_one_call_mixing_8bit_and_full_precision_state_equals_a_call_per_format(decay, param_dtype):
    """The CPU op takes 8-bit and full-precision entries in one call (the optimizer's step makes one call for a
    group): every tensor, Σ|θ| and μ as with one call per format, bit for bit, over several steps, also with the
    steps incremented inside the op."""
    st, shapes = mixed_state(param_dtype)
    split, one, inside = clone_state(st), clone_state(st), clone_state(st)
    for k in range(3):
        grads = grads_for(shapes, seed=10 + k, dtype=param_dtype)
        s_split = step_split_by_format(kernel(256), split, grads, **hyper(decay))
        s_one = step_q8(kernel(256), one, grads, **hyper(decay))
        s_inside = step_q8(kernel(256), inside, grads, increment_steps=True, **hyper(decay))
        assert torch.equal(s_one, s_split) and torch.equal(s_inside, s_split), f"step {k}: Σ|θ|"
        assert_equal_states(one, split, f"step {k}, one call")
        assert_equal_states(inside, split, f"step {k}, steps incremented in the op")
    assert all(float(t) == 6.0 for t in inside["steps"])


@needs_cpp
def test_scale_lists_hold_the_8bit_entries_only():
    """The op's scale lists have one entry per 8-bit param (int8 exp_avg), in order; another count raises before
    anything is written, naming the lists."""
    st, shapes = mixed_state(torch.float32)
    before = clone_state(st)
    q = sum(s is not None for s in st["exp_avg_scales"])
    ms = [s for s in st["exp_avg_scales"] if s is not None]
    vs = [s for s in st["exp_avg_sq_scales"] if s is not None]
    kw = dict(lr=1e-2, lr_tensor=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decay="l2",
              delta_fixed=None, delta_scale=1.0, max_lr=None, max_lr_tensor=None, bias_correction=True,
              maximize=False, grad_scale=None, found_inf=None, increment_steps=True)
    args = (st["params"], grads_for(shapes), st["exp_avgs"], st["exp_avg_sqs"], st["steps"], None, None)
    for bad_m, bad_v in ((ms[:-1], vs[:-1]), (ms + ms[:1], vs + vs[:1]), (ms, vs[:-1])):
        with pytest.raises(ValueError, match=rf"exp_avg_scales: {len(bad_m)} and {len(bad_v)} entries for {q} params "
                                             r"with 8-bit \(int8\) exp_avgs"):
            torch.ops.fusedecay.adam_decay_(*args, exp_avg_scales=bad_m, exp_avg_sq_scales=bad_v, **kw)
    swapped = [ms[1], ms[0]] + ms[2:]   # wrong order: the first 8-bit entry gets the second's scales
    with pytest.raises(ValueError, match=r"exp_avg_scales\[0\] \(of params\[0\]\)"):
        torch.ops.fusedecay.adam_decay_(*args, exp_avg_scales=swapped, exp_avg_sq_scales=vs, **kw)
    assert_equal_states(st, before, "after the errors")
    torch.ops.fusedecay.adam_decay_(*args, exp_avg_scales=ms, exp_avg_sq_scales=vs, **kw)
    assert not torch.equal(st["params"][0], before["params"][0]) and float(st["steps"][0]) == 4.0


@needs_cpp
def test_opcheck_with_8bit_state_and_fused_mu():
    st = q8_state([(3, 128), (1, 256)])
    args = (st["params"], grads_for([(3, 128), (1, 256)]), st["exp_avgs"], st["exp_avg_sqs"], st["steps"], st["mus"],
            torch.empty(2))
    kw = dict(lr=1e-2, lr_tensor=None, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, decay="prox",
              delta_fixed=None, delta_scale=1.0, max_lr=None, max_lr_tensor=None, bias_correction=True,
              maximize=False, grad_scale=None, found_inf=None, chunk_size=0, exp_avg_scales=st["exp_avg_scales"],
              exp_avg_sq_scales=st["exp_avg_sq_scales"], delta_beta=0.9, mu_numels=[384, 256],
              increment_steps=True)   # the schema marks the steps written too
    torch.library.opcheck(torch.ops.fusedecay.adam_decay_.default, args, kw,
                          test_utils=("test_schema", "test_faketensor"))


# ------------------------------------------------------------------------------------------------
# Optimizer option state_bits=8
# ------------------------------------------------------------------------------------------------

# Eligible matrices, a 1-D bias, a small matrix and a matrix whose rows are not a multiple of 128.
OPT_SHAPES = [(64, 128), (40, 256), (300,), (8, 128), (50, 100)]


def make_params(shapes=OPT_SHAPES, seed=0, dtype=F32):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter((torch.randn(s, generator=g) * 0.1).to(dtype)) for s in shapes]


def run_steps(opt, params, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        for p in params:
            p.grad = (torch.randn(p.shape, generator=g) * 1e-2).to(p.dtype)
        opt.step()


def groups(params, **g8):
    """Two groups: the first with 8-bit state, the second (the last two params) without decay and 32-bit."""
    return [dict(params=params[:3], state_bits=8, **g8), dict(params=params[3:], weight_decay=0.0)]


def test_state_layout_and_bytes_per_param():
    ps = make_params()
    opt = AdamHD(groups(ps), lr=1e-2, backend="reference")
    run_steps(opt, ps, 1)
    st = [opt.state[p] for p in ps]
    for i in (0, 1):  # eligible, 8-bit group
        assert st[i]["exp_avg_codes"].dtype == torch.int8 and st[i]["exp_avg_sq_codes"].dtype == torch.uint8
        assert st[i]["exp_avg_scales"].shape == S.scale_shape(ps[i].shape) and "exp_avg" not in st[i]
        nbytes = sum(st[i][k].numel() * st[i][k].element_size() for k in
                     ("exp_avg_codes", "exp_avg_sq_codes", "exp_avg_scales", "exp_avg_sq_scales"))
        assert nbytes / ps[i].numel() == 2 + 8 / S.BLOCK
    for i in (2, 3, 4):  # 1-D / 32-bit group / ineligible rows
        assert st[i]["exp_avg"].dtype == F32 and "exp_avg_codes" not in st[i]


@needs_cpp
@pytest.mark.parametrize("make", [
    lambda ps, b: AdamHD(groups(ps), lr=1e-2, weight_decay=0.1, delta_mode="ema", delta_beta=0.9, backend=b),
    lambda ps, b: AdamHD(groups(ps, update="euler"), lr=1e-2, weight_decay=0.1, delta_mode="mean", backend=b),
    lambda ps, b: AdamC(groups(ps), lr=1e-2, weight_decay=0.1, backend=b),
])
def test_optimizer_cpu_backend_matches_reference(make):
    runs = {}
    for b in ("reference", "cpu"):
        ps = make_params()
        opt = make(ps, b)
        run_steps(opt, ps, 3)
        runs[b] = (ps, opt)
    (pr, ref), (pc, got) = runs["reference"], runs["cpu"]
    for p, q in zip(pr, pc):
        assert_close(q.detach(), p.detach(), dtype=F32)
        for k, v in ref.state[p].items():
            assert_state_close(got.state[q][k], v, F32, msg=k)


@needs_cpp
@pytest.mark.parametrize("opt_cls", [AdamHD, AdamC])
def test_cpu_step_is_one_op_call_and_equals_a_call_per_format(monkeypatch, opt_cls):
    """On the CPU a step makes one op call per param group, 8-bit and full-precision entries together, increments
    the steps inside it (no call of its own) and passes no abs_sums for the fused μ update. The same bits as one call
    per format after a separate increment, with abs_sums (the path of backends without these shortcuts), over several
    steps, one of them skipped by found_inf."""
    calls = []
    real = cpp.CPU_BACKEND.adam_decay

    def counting(*a, **k):
        calls.append((len(a[0]), sum(s is not None for s in k["exp_avg_scales"] or []), k.get("increment_steps"),
                      a[6] is None))
        real(*a, **k)

    runs = []
    for shortcuts in (True, False):
        monkeypatch.setattr(cpp.CPU_BACKEND, "adam_decay", counting)
        monkeypatch.setattr(cpp.CPU_BACKEND, "mixed_moment_formats", shortcuts)
        monkeypatch.setattr(cpp.CPU_BACKEND, "increments_steps", shortcuts)
        monkeypatch.setattr(cpp.CPU_BACKEND, "mu_without_abs_sums", shortcuts)
        increments = []
        monkeypatch.setattr(torch.ops.fusedecay, "_increment_steps_", lambda steps: (increments.append(len(steps)),
                                                                                     [t.add_(1) for t in steps]))
        ps = make_params()
        opt = opt_cls([dict(params=ps, state_bits=8)], lr=1e-2, weight_decay=0.1, backend="cpu")
        calls.clear()
        run_steps(opt, ps, 2)
        opt.grad_scale, opt.found_inf = torch.tensor(1.0), torch.tensor(1.0)   # as GradScaler hands them over
        run_steps(opt, ps, 1, seed=5)
        opt.found_inf = torch.tensor(0.0)
        run_steps(opt, ps, 1, seed=6)
        runs.append((ps, opt, list(calls), list(increments)))
        monkeypatch.undo()
    (ps, opt, calls_one, inc_one), (qs, ref, calls_split, inc_split) = runs
    tracks = opt_cls is AdamHD   # AdamHD's μ update is fused: on the CPU without an abs_sums tensor per step
    assert calls_one == [(5, 2, True, True)] * 4 and inc_one == [], (calls_one, inc_one)
    assert calls_split == [(2, 2, None, not tracks), (3, 0, None, not tracks)] * 4 and inc_split == [5] * 4, (
        calls_split, inc_split)
    for p, q in zip(ps, qs):
        assert torch.equal(p.detach(), q.detach())
        assert opt.state[p].keys() == ref.state[q].keys()
        for k, v in ref.state[q].items():
            assert torch.equal(opt.state[p][k], v), k
        assert float(opt.state[p]["step"]) == 3.0


@pytest.mark.parametrize("opt_cls", [AdamHD, AdamC])
def test_state_dict_round_trip_resumes_bit_identically(opt_cls):
    ps = make_params()
    opt = opt_cls(groups(ps), lr=1e-2, backend="auto")
    run_steps(opt, ps, 3)
    saved = copy.deepcopy(opt.state_dict())
    params_then = [p.detach().clone() for p in ps]
    run_steps(opt, ps, 2, seed=9)
    qs = [torch.nn.Parameter(x.clone()) for x in params_then]
    opt2 = opt_cls(groups(qs), lr=1e-2, backend="auto")
    opt2.load_state_dict(saved)
    run_steps(opt2, qs, 2, seed=9)
    for p, q in zip(ps, qs):
        assert torch.equal(p.detach(), q.detach())
        assert opt.state[p].keys() == opt2.state[q].keys()
        for k, v in opt.state[p].items():
            assert torch.equal(v, opt2.state[q][k]), k


def test_loading_converts_between_8bit_and_full_precision_state():
    ps = make_params()
    opt32 = AdamHD(ps, lr=1e-2, backend="reference")  # one group, full precision
    run_steps(opt32, ps, 2)
    sd32 = copy.deepcopy(opt32.state_dict())
    # full precision → 8-bit: codes are the reference encoding of the saved moments
    opt8 = AdamHD(ps, lr=1e-2, state_bits=8, backend="reference")
    opt8.load_state_dict(sd32)
    assert opt8.param_groups[0]["state_bits"] == 8  # the optimizer keeps its own format
    for i, p in enumerate(ps):
        st, saved = opt8.state[p], sd32["state"][i]
        if S.eligible(p.shape):
            assert "exp_avg" not in st
            assert torch.equal(st["exp_avg_codes"], S.quantize_exp_avg(saved["exp_avg"])[0])
            assert torch.equal(st["exp_avg_sq_scales"], S.quantize_exp_avg_sq(saved["exp_avg_sq"])[1])
        else:
            assert torch.equal(st["exp_avg"], saved["exp_avg"])
    # 8-bit → full precision: the decoded values; and back to 8-bit: the same bits
    sd8 = copy.deepcopy(opt8.state_dict())
    back = AdamHD(ps, lr=1e-2, backend="reference")
    back.load_state_dict(sd8)
    assert back.param_groups[0]["state_bits"] == 32
    for i, p in enumerate(ps):
        if S.eligible(p.shape):
            saved = sd8["state"][i]
            assert torch.equal(back.state[p]["exp_avg"],
                               S.dequantize_exp_avg(saved["exp_avg_codes"], saved["exp_avg_scales"]))
    again = AdamHD(ps, lr=1e-2, state_bits=8, backend="reference")
    again.load_state_dict(copy.deepcopy(back.state_dict()))
    for i, p in enumerate(ps):
        for k, v in sd8["state"][i].items():
            assert torch.equal(again.state[p][k], v), k


def test_bf16_params_get_8bit_state_and_fp64_params_keep_theirs():
    ps = make_params(dtype=torch.bfloat16)
    opt = AdamHD(ps, lr=1e-2, state_bits=8, backend="reference")
    run_steps(opt, ps, 1)
    assert "exp_avg_codes" in opt.state[ps[0]]
    ps64 = make_params(dtype=torch.float64)
    opt64 = AdamHD(ps64, lr=1e-2, state_bits=8, backend="reference")
    run_steps(opt64, ps64, 1)
    assert opt64.state[ps64[0]]["exp_avg"].dtype == torch.float64


@pytest.mark.parametrize("bits", [16, 4, "8"])
def test_bad_state_bits_raise(bits):
    with pytest.raises(ValueError, match="state_bits"):
        AdamHD(make_params(), state_bits=bits)
    opt = AdamC(make_params()[:1])
    with pytest.raises(ValueError, match="state_bits"):
        opt.add_param_group(dict(params=make_params()[1:2], state_bits=bits))
    assert len(opt.param_groups) == 1


def _cpu_forms_here_and_in_a_subprocess(tmp_path, **env):
    """tests/cpu_forms.py's outputs from this process, the names of those that differ in any bit from the same run
    in a subprocess with ``env`` added to its environment, and the kernel configuration of each side (what the
    kernel runs: cpu_forms.kernel_config())."""
    import subprocess
    import sys
    import cpu_forms
    here = cpu_forms.run()
    path = tmp_path / "other.pt"
    subprocess.run([sys.executable, cpu_forms.__file__, str(path)], check=True, env=dict(os.environ, **env),
                   timeout=300)
    saved = torch.load(path)
    other = saved["outputs"]
    assert sorted(other) == sorted(here)
    differ = [k for k in here if not torch.equal(cpu_forms.as_bits(here[k]), cpu_forms.as_bits(other[k]))]
    return here, differ, (cpu_forms.kernel_config(), saved["config"])


def _cpu_has_avx512_form() -> bool:
    """Whether this machine can run the CPU kernel's AVX-512 form: x86-64 Linux (the build that has it: GCC, which
    the extension is built with here) and the five AVX-512 subsets it needs, from /proc/cpuinfo."""
    import platform
    if platform.system() != "Linux" or platform.machine() != "x86_64":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    return all(f in flags for f in ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"))


@needs_cpp
def test_both_vector_forms_of_the_cpu_kernel_give_the_same_bits(tmp_path):
    """The CPU kernel's AVX-512 form and its split-register form (AVX2, the baseline, other architectures) of the
    same lane operations: every output bit for bit, on inputs with NaNs of both signs, infinities, −0, float32
    subnormals and values across 40 binades, for 8-bit, fp32 and bf16 moments, fp32 and bf16 params, three decays.
    The subprocess runs the split form (FUSEDECAY_CPU_VECTORS=split); this process the form its CPU picks, so on
    a CPU without AVX-512 both sides run the split form and this checks only that reruns agree."""
    here, differ, (config_here, config_other) = _cpu_forms_here_and_in_a_subprocess(tmp_path,
                                                                                 FUSEDECAY_CPU_VECTORS="split")
    assert not differ, differ[:10]
    assert not config_other["avx512_form"]                         # the subprocess did run the split form
    if _cpu_has_avx512_form() and os.environ.get("FUSEDECAY_CPU_VECTORS") != "split":
        assert config_here["avx512_form"], config_here             # and this process the AVX-512 one
    assert any(torch.isnan(t).any() for t in here.values() if t.is_floating_point())   # the special values got in


@needs_cpp
def test_software_prefetch_distance_changes_no_bit_and_a_bad_value_raises(tmp_path):
    """The CPU kernel's software prefetch with element-wise moments is on by default on Intel CPUs only, and
    FUSEDECAY_CPU_PREFETCH sets its distance (docs/kernels.md): every distance gives the same bits (the run of
    tests/cpu_forms.py: 8-bit, fp32 and bf16 moments), and a value that is not an element count from 0 to 65536
    raises ValueError, naming the variable, before anything is written."""
    import subprocess
    import sys
    import cpu_forms
    # this process runs its distance (by default 512 on Intel, 0 elsewhere), the subprocess another one
    other = 128 if cpu_forms.kernel_config()["prefetch"] == 64 else 64
    _, differ, (config_here, config_other) = _cpu_forms_here_and_in_a_subprocess(tmp_path,
                                                                                 FUSEDECAY_CPU_PREFETCH=str(other))
    assert not differ, differ[:10]
    assert config_other["prefetch"] == other != config_here["prefetch"], (config_here, config_other)
    probe = (
        "import sys, torch; sys.path.insert(0, sys.argv[1])\n"
        "from fusedecay import _cpp_backend as cpp\n"
        "p, g, m, v = torch.ones(64), torch.ones(64), torch.zeros(64), torch.zeros(64)\n"
        "try:\n"
        "    cpp.adam_decay([p], [g], [m], [v], [torch.tensor(1.0)], None, None, lr=0.1, beta1=0.9, beta2=0.999,\n"
        "                   eps=1e-8, weight_decay=0.0, decay='l2', delta_fixed=None, delta_scale=1.0, max_lr=None,\n"
        "                   bias_correction=True, maximize=False)\n"
        "except ValueError as e:\n"
        "    print('raised:', e); print('unchanged:', bool((p == 1).all() and (m == 0).all()))\n"
    )
    python_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(cpu_forms.__file__))), "python")
    for bad in ("65537", "512x"):
        env = dict(os.environ, FUSEDECAY_CPU_PREFETCH=bad)
        out = subprocess.run([sys.executable, "-c", probe, python_dir], env=env, timeout=300, capture_output=True,
                             text=True, check=True).stdout
        assert "raised:" in out and "FUSEDECAY_CPU_PREFETCH" in out and f"'{bad}'" in out, (bad, out)
        assert "unchanged: True" in out, (bad, out)
