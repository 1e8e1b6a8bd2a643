"""Batched Newton–Schulz and the Triton symmetric kernel against the per-layer reference and float64.

* exact mode (CPU default: the reference's operations on a stack) and fused mode both stay within fp32
  tolerance of the float64 NS. Neither is compared bitwise with the per-layer reference: a batched matmul
  (bmm) and a single one (mm) are different BLAS calls, which round differently on some CPUs (MKL on
  Intel picks other kernels for them);
* fused mode (GPU default: transposed shapes merged, baddbmm epilogues) and the symmetric kernel
  (Triton interpreter on CPU, fp32) stay within fp32 tolerance of the float64 NS and aligned with
  the float64 SVD polar factor;
* the symmetric kernel's error against float64 is no worse than torch.matmul's.
"""
import pytest
import torch

from fusedecay.newton_schulz import (_chain_fused, newton_schulz_batched, newton_schulz_stack, shape_groups,
                                     spectral_directions)
from fusedecay.reference.scion import newton_schulz, ns_coefficients, spectral_lmo
from tolerances import RTOL, assert_low_precision_ok, rel_error

# Tall, wide, square, odd sizes, repeats (same shape and transposed shape), a vector-like sliver.
SHAPES = [(48, 80), (80, 48), (48, 80), (33, 33), (80, 48), (5, 3), (1, 7), (33, 33)]
NS_CASES = [("classic", 5), ("polar_express", 5), ("polar_express", 9), ("classic", 1)]


def _mats(shapes=SHAPES, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for s in shapes]


@pytest.mark.parametrize("ns,steps", NS_CASES)
def test_exact_batched_matches_the_reference_ns_run_in_float64(ns, steps):
    """Parity with the readable reference (it shares the NS coefficients); the independent float64 truth of the
    spectral LMO is tests/test_scionc_truth.py."""
    mats = _mats()
    out = newton_schulz_batched(mats, steps, ns, exact=True)
    for i, (o, m) in enumerate(zip(out, mats)):
        assert o.shape == m.shape and o.dtype == m.dtype
        assert rel_error(o, newton_schulz(m.double(), steps, ns)) <= RTOL[torch.float32], f"matrix {i} {tuple(m.shape)}"


def test_cpu_default_directions_match_the_reference_spectral_lmo_run_in_float64():
    mats = _mats(seed=1)
    for m, d in zip(mats, spectral_directions(mats, 5, "polar_express")):
        assert d.shape == m.shape and d.dtype == m.dtype
        assert rel_error(d, spectral_lmo(m.double(), 5, "polar_express")) <= RTOL[torch.float32], tuple(m.shape)


def test_grouping_merges_transposed_shapes_only_in_fused_mode():
    mats = _mats()
    exact = shape_groups(mats, merge_transposed=False)
    fused = shape_groups(mats, merge_transposed=True)
    assert sorted(len(v) for v in exact.values()) == [1, 1, 2, 2, 2]
    assert sorted(len(v) for v in fused.values()) == [1, 1, 2, 4]


@pytest.mark.parametrize("ns,steps", NS_CASES)
def test_fused_mode_matches_the_reference_ns_run_in_float64(ns, steps):
    mats = _mats(seed=2)
    out = newton_schulz_batched(mats, steps, ns, exact=False)
    for o, m in zip(out, mats):
        ref64 = newton_schulz(m.double(), steps, ns)
        assert o.shape == m.shape
        assert rel_error(o, ref64) <= RTOL[torch.float32], f"{tuple(m.shape)}"


@pytest.mark.parametrize("ns", ["classic", "polar_express"])
def test_fast_paths_against_float64_svd_polar_factor(ns):
    """X = U p(Σ) Vᵀ: Uᵀ X V is diagonal (to fp32 precision) with the float64 NS's singular values."""
    mats = _mats([(48, 80), (80, 48), (40, 64)], seed=3)
    for mode in (True, False):
        for o, m in zip(newton_schulz_batched(mats, 5, ns, exact=mode), mats):
            U, _, Vh = torch.linalg.svd(m.double(), full_matrices=False)
            C = U.mT @ o.double() @ Vh.mT
            off = C - torch.diag_embed(torch.diagonal(C))
            assert (off.norm() / C.norm()).item() <= RTOL[torch.float32]
            sv = torch.linalg.svdvals(o.double())
            sv64 = torch.linalg.svdvals(newton_schulz(m.double(), 5, ns))
            torch.testing.assert_close(sv, sv64, rtol=RTOL[torch.float32], atol=0.0)


def test_bf16_fused_error_within_band_of_eager_bf16():
    """bf16 in fused mode (as on GPU): error vs float64 ≤ 2× the eager bf16 reference's (tolerances.py)."""
    mats = _mats(seed=4)
    out = newton_schulz_batched(mats, 5, "classic", torch.bfloat16, exact=False)
    for o, m in zip(out, mats):
        eager = newton_schulz(m, 5, "classic", torch.bfloat16)
        assert_low_precision_ok(o, eager, newton_schulz(m.double(), 5, "classic"), what=str(tuple(m.shape)))


def test_float64_inputs_stay_float64():
    mats = _mats([(20, 30), (30, 20)], dtype=torch.float64)
    for o, m in zip(newton_schulz_batched(mats), mats):
        assert o.dtype == torch.float64
        assert rel_error(o, newton_schulz(m)) <= RTOL[torch.float64]


def test_empty_list_and_bad_arguments():
    assert newton_schulz_batched([]) == []
    with pytest.raises(ValueError, match="2-D"):
        newton_schulz_batched([torch.randn(4)])
    with pytest.raises(ValueError, match="steps"):
        newton_schulz_batched([torch.randn(3, 4)], steps=0)
    with pytest.raises(ValueError, match="ns"):
        newton_schulz_batched([torch.randn(3, 4)], ns="cubic")
    with pytest.raises(ValueError, match="wide"):
        newton_schulz_stack(torch.randn(2, 5, 3))


# ---------------------------------------------------------------------------------------------
# Triton symmetric kernel (interpreter on CPU, fp32; compiled on GPU)
# ---------------------------------------------------------------------------------------------

from snippets import require  # noqa: E402

triton = require("triton")  # skipped without triton locally; CI must have it
from fusedecay.triton_kernels.symmetric_matmul import symmetric_matmul  # noqa: E402

SYM_SHAPES = [(2, 70, 45), (1, 33, 100), (3, 5, 3)]


# Where a GPU exists the kernels are compiled (conftest.py turns the interpreter on only without one),
# so the inputs must be GPU tensors there.
KDEV = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.triton
@pytest.mark.parametrize("n,M,K", SYM_SHAPES)
def test_symmetric_kernel_error_no_worse_than_torch_matmul(n, M, K):
    g = torch.Generator().manual_seed(M * K)
    x = torch.randn(n, M, K, generator=g).to(KDEV)
    ref = x.double() @ x.double().mT
    c = symmetric_matmul(x)
    assert torch.equal(c, c.mT), "mirrored result must be exactly symmetric"
    assert rel_error(c, ref) <= rel_error(x @ x.mT, ref) + torch.finfo(torch.float32).eps
    # Epilogue form used by NS: b·A + c·A Aᵀ with A symmetric.
    A = c
    bb, cc = -4.775, 2.0315
    ref2 = bb * A.double() + cc * (A.double() @ A.double())
    c2 = symmetric_matmul(A, alpha=cc, beta=bb, add=A)
    assert torch.equal(c2, c2.mT)
    assert rel_error(c2, ref2) <= rel_error(bb * A + cc * (A @ A), ref2) + torch.finfo(torch.float32).eps


@pytest.mark.triton
def test_symmetric_kernel_2d_input_and_out_argument():
    x = torch.randn(20, 9, device=KDEV)
    out = torch.empty(1, 20, 20, device=KDEV)
    r = symmetric_matmul(x, out=out)
    assert r.shape == (20, 20) and r.data_ptr() == out.data_ptr()
    assert rel_error(r, x.double() @ x.double().T) <= RTOL[torch.float32]


@pytest.mark.triton
def test_symmetric_kernel_bad_arguments():
    with pytest.raises(ValueError, match="x must be"):
        symmetric_matmul(torch.randn(5))
    with pytest.raises(ValueError, match="add must"):
        symmetric_matmul(torch.randn(2, 4, 6), add=torch.randn(2, 4, 6))
    with pytest.raises(ValueError, match="out must"):
        symmetric_matmul(torch.randn(4, 6), out=torch.empty(4, 6))


@pytest.mark.triton
@pytest.mark.parametrize("ns", ["classic", "polar_express"])
def test_ns_chain_on_symmetric_kernel_matches_float64(ns):
    mats = _mats([(40, 72), (40, 72)], seed=5, device=KDEV)
    x = torch.stack(mats)
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) * 1.01)
    coeffs = ns_coefficients(ns, 5)
    sym = _chain_fused(x, coeffs, symmetric=True)
    plain = _chain_fused(x, coeffs, symmetric=False)
    ref = _chain_fused(x.double(), coeffs, symmetric=False)
    assert rel_error(sym, ref) <= RTOL[torch.float32]
    assert rel_error(plain, ref) <= RTOL[torch.float32]


# ---------------------------------------------------------------------------------------------
# GPU (bf16, compiled Triton)
# ---------------------------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("ns", ["classic", "polar_express"])
@pytest.mark.parametrize("sym_rows", [None, 1])
def test_cuda_bf16_batched_ns_error_band(ns, sym_rows):
    mats = _mats([(256, 768), (768, 256), (256, 256), (300, 1000)], seed=6, device="cuda")
    out = newton_schulz_batched(mats, 5, ns, torch.bfloat16, symmetric_min_rows=sym_rows)
    for o, m in zip(out, mats):
        eager = newton_schulz(m, 5, ns, torch.bfloat16)
        assert_low_precision_ok(o, eager, newton_schulz(m.double(), 5, ns), what=f"{tuple(m.shape)}")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_symmetric_kernel_no_worse_than_cublas(dtype):
    x = torch.randn(4, 1024, 3072, device="cuda").to(dtype)
    ref = x.double() @ x.double().mT
    c = symmetric_matmul(x)
    assert torch.equal(c, c.mT)
    assert rel_error(c, ref) <= rel_error(x @ x.mT, ref) + torch.finfo(dtype).eps
