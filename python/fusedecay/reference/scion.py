"""Reference (eager, per-tensor, readable) ScionC: Scion with corrected decoupled weight decay.

Scion — Pethick et al., "Training Deep Learning Models with Norm-Constrained LMOs", arXiv 2502.07529:
each layer steps along the unit-norm maximiser (linear minimisation oracle, LMO) of its own norm,
applied to a momentum buffer. ScionC — Chou, "Correction of Decoupled Weight Decay", arXiv
2512.08217: for layers whose updates are independent of the weights at steady state, the decoupled
decay η_t is set from the squared *effective* step so that the weight norm settles at a target.

Equations implemented (the paper text was not available to us; these follow the agreed spec, which
was confirmed against the ScionC author's public code):

  m_t = (1 − α) m_{t−1} + α g_t                         momentum, α = weight on the new gradient
  s_l = γ_t ρ_l                                         step times the layer's radius
  θ_t = (1 − η_t) θ_{t−1} − s_l · lmo_l(m_t)
  η_t = s_l² (2 − α) / (2 α C_l²)      corrected     (γ_eff = s_l·sqrt((2 − α)/α), η = γ_eff²/(2C_l²))
  η_t = γ_t λ                          uncorrected (the output layer: its update stays correlated with θ)

Steady state (our documented reading of C_l²): with independent gradients, the momentum makes
successive LMO outputs correlate as (1 − α)^k, and E‖θ‖_F² → C_l² · E‖lmo(m)‖_F². For a unit-norm
LMO in the Frobenius sense that is C_l² itself; for Scion's operator-norm LMOs ‖lmo‖_F² depends on
the shape (spectral: ≈ d_out·min(d_out, d_in)/d_in; sign: d_out/d_in; bias: n), so C_l² is the
target in units of one LMO step's squared Frobenius norm.

``nesterov=True`` (the author's newer variant) uses m̂ = (1 − α) m_t + α g_t as the LMO input and
multiplies γ_eff by (1 + 4α − 6α² + 2α³)^(−1/2), i.e. η_t by its square.

LMOs, for a weight of shape (d_out, d_in):
  spectral  NS(m)·sqrt(d_out/d_in)     NS = orthogonal polar factor by Newton–Schulz
  sign      sign(m)/d_in
  bias      m / RMS(m)

Weights that are not one matrix (``matrix_view``, a param-group option; see docs/param_groups.md):
  "batch"       (..., d_out, d_in): the leading dims index independent matrices, e.g. an MoE expert
                stack (E, d_out, d_in) gets one orthogonalisation and one sqrt(d_out/d_in) per expert;
  "flatten"     (d_out, d_in, k, ...): one matrix (d_out, d_in·k·…), e.g. a conv kernel (d_out, d_in, k, k);
  "taps"        (d_out, d_in, k, ...): one (d_out, d_in) matrix per kernel tap (the alternative for convs);
  "transposed"  (..., d_in, d_out): stored input-major, e.g. transformers' GPT-2 ``Conv1D``;
  "auto"        (default) "batch" up to 3-D, "flatten" from 4-D (conv2d/3d kernels). A 3-D Conv1d kernel
                (d_out, d_in, k) is ambiguous with an expert stack: give it "flatten" explicitly
                (``fusedecay.param_groups`` does, from the module type).
The view decides what d_out and d_in are, so it applies to ``sign`` (sign(m)/d_in) as well.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

LMO_KINDS = ("spectral", "sign", "bias")
NS_KINDS = ("classic", "polar_express")
MATRIX_VIEWS = ("auto", "batch", "flatten", "taps", "transposed")

# Classic quintic Newton–Schulz coefficients (Keller Jordan's Muon): a, b, c for X ← aX + bX³ + cX⁵.
NS_CLASSIC_COEFFS: Tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

# Polar Express per-step coefficients, Amsel et al. 2025 (arXiv 2505.16932), as tabulated by the
# ScionC author. Steps 1–7 get a safety factor (a/1.01, b/1.01³, c/1.01⁵); later steps reuse the last.
_POLAR_EXPRESS_RAW = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
)
POLAR_EXPRESS_COEFFS = tuple((a / 1.01, b / 1.01 ** 3, c / 1.01 ** 5) for a, b, c in _POLAR_EXPRESS_RAW) + (
    (1.875, -1.25, 0.375),
)

NS_EPS = 1e-7      # added to the Frobenius norm before normalising X
RMS_EPS = 1e-12    # added under the square root of the bias LMO's mean square


def ns_coefficients(ns: str, steps: int) -> Sequence[Tuple[float, float, float]]:
    """The (a, b, c) of each Newton–Schulz step."""
    if ns == "classic":
        return [NS_CLASSIC_COEFFS] * steps
    if ns == "polar_express":
        table = list(POLAR_EXPRESS_COEFFS)
        return table[:steps] + [table[-1]] * max(0, steps - len(table))
    raise ValueError(f"unknown ns {ns!r}; expected one of {NS_KINDS}")


def resolve_matrix_view(view: str, ndim: int) -> str:
    """The concrete view ("batch" | "flatten" | "taps" | "transposed") of an ``ndim``-D weight under ``view``."""
    if view not in MATRIX_VIEWS:
        raise ValueError(f"Invalid matrix_view: {view!r} (expected one of {MATRIX_VIEWS})")
    if view == "auto":
        return "flatten" if ndim >= 4 else "batch"
    return view


def as_matrices(t: Tensor, view: str = "auto") -> Tensor:
    """``t`` as a (..., d_out, d_in) stack of matrices under ``view`` (a view of t when its layout allows)."""
    if t.ndim < 2:
        raise ValueError(f"a matrix LMO needs a tensor with >= 2 dims, got shape {tuple(t.shape)}")
    view = resolve_matrix_view(view, t.ndim)
    if view == "flatten":
        return t.reshape(t.shape[0], -1)
    if view == "taps":
        return t.permute(*range(2, t.ndim), 0, 1)
    if view == "transposed":
        return t.mT
    return t


def from_matrices(x: Tensor, view: str, shape) -> Tensor:
    """Inverse of :func:`as_matrices`: the (..., d_out, d_in) stack ``x`` back in the weight's ``shape``."""
    n = len(shape)
    view = resolve_matrix_view(view, n)
    if view == "taps":
        return x.permute(n - 2, n - 1, *range(n - 2))
    if view == "transposed":
        return x.mT
    return x.reshape(shape)


def matrix_batch_dims(ndim: int, view: str = "auto") -> Tuple[int, ...]:
    """The dims of an ``ndim``-D weight that index whole matrices under ``view`` (a shard along one of them
    holds whole matrices)."""
    view = resolve_matrix_view(view, ndim)
    if view == "flatten" or ndim < 2:
        return ()
    if view == "taps":
        return tuple(range(2, ndim))
    return tuple(range(ndim - 2))


def matrix_dims(shape, view: str = "auto") -> Tuple[int, int]:
    """(d_out, d_in) of one matrix of a weight of ``shape`` under ``view``; (1, 1) below 2-D."""
    if len(shape) < 2:
        return 1, 1
    view = resolve_matrix_view(view, len(shape))
    if view == "flatten":
        return shape[0], math.prod(shape[1:])
    if view == "taps":
        return shape[0], shape[1]
    if view == "transposed":
        return shape[-1], shape[-2]
    return shape[-2], shape[-1]


def newton_schulz(m: Tensor, steps: int = 5, ns: str = "classic", dtype: Optional[torch.dtype] = None) -> Tensor:
    """Approximate orthogonal polar factor of ``m`` (..., d_out, d_in); batched over leading dims.

    X is normalised by its Frobenius norm (×1.01 for Polar Express) so every singular value is ≤ 1,
    transposed to the wide orientation (fewer FLOPs for X Xᵀ), then iterated
    X ← aX + (bA + cA²)X with A = X Xᵀ. Computed in ``dtype`` (default: m's dtype).
    """
    if m.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix, got shape {tuple(m.shape)}")
    x = m.to(dtype or m.dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT
    scale = 1.01 if ns == "polar_express" else 1.0
    x = x / (torch.linalg.matrix_norm(x, keepdim=True) * scale + NS_EPS)
    for a, b, c in ns_coefficients(ns, steps):
        A = x @ x.mT
        B = b * A + c * (A @ A)
        x = a * x + B @ x
    if tall:
        x = x.mT
    return x.to(m.dtype)


def spectral_lmo(m: Tensor, steps: int = 5, ns: str = "classic", dtype: Optional[torch.dtype] = None,
                 matrix_view: str = "auto") -> Tensor:
    """Unit step of the RMS→RMS operator norm: NS(m)·sqrt(d_out/d_in), per matrix of ``matrix_view``."""
    x = as_matrices(m, matrix_view)
    d_out, d_in = x.shape[-2], x.shape[-1]
    return from_matrices(newton_schulz(x, steps, ns, dtype) * math.sqrt(d_out / d_in), matrix_view, m.shape)


def sign_lmo(m: Tensor, matrix_view: str = "auto") -> Tensor:
    """Unit step of the (scaled) ℓ∞→ℓ1 dual: sign(m)/d_in (d_in of ``matrix_view``; 1 for a vector)."""
    return torch.sign(m) / matrix_dims(m.shape, matrix_view)[1]


def bias_lmo(m: Tensor) -> Tensor:
    """Unit step of the RMS norm: m / sqrt(mean(m²) + ε)."""
    return m / torch.sqrt(m.square().mean() + RMS_EPS)


def lmo(kind: str, m: Tensor, *, ns_steps: int = 5, ns: str = "classic", ns_dtype: Optional[torch.dtype] = None,
        matrix_view: str = "auto") -> Tensor:
    if kind == "spectral":
        return spectral_lmo(m, ns_steps, ns, ns_dtype, matrix_view)
    if kind == "sign":
        return sign_lmo(m, matrix_view)
    if kind == "bias":
        return bias_lmo(m)
    raise ValueError(f"unknown lmo {kind!r}; expected one of {LMO_KINDS}")


def nesterov_factor(alpha: float) -> float:
    """(1 + 4α − 6α² + 2α³)^(−1/2): the author's γ_eff correction for the Nesterov variant."""
    return (1 + 4 * alpha - 6 * alpha ** 2 + 2 * alpha ** 3) ** -0.5


def scion_decay(step_size, *, momentum: float, norm_target: float, corrected: bool, lr, weight_decay: float,
                nesterov: bool = False):
    """η_t for one layer: s²(2 − α)/(2αC²) (corrected) or γλ (uncorrected)."""
    if corrected:
        eta = step_size * step_size * (2 - momentum) / (2 * momentum * norm_target)
        if nesterov:
            eta = eta * nesterov_factor(momentum) ** 2
        return eta
    return lr * weight_decay


def scionc_step(param: Tensor, grad: Tensor, momentum_buffer: Tensor, *, lr, momentum: float, lmo_kind: str,
                radius: float, norm_target: float, corrected: bool, weight_decay: float, ns_steps: int = 5,
                ns: str = "classic", ns_dtype: Optional[torch.dtype] = None, nesterov: bool = False,
                maximize: bool = False, matrix_view: str = "auto") -> None:
    """One ScionC step on one tensor, in place."""
    dt = torch.float64 if param.dtype == torch.float64 else torch.float32
    g = grad.to(dt)
    if maximize:
        g = -g
    buf = momentum_buffer.to(dt).mul_(1 - momentum).add_(g, alpha=momentum)   # m_t
    momentum_buffer.copy_(buf)
    direction_input = buf.mul(1 - momentum).add_(g, alpha=momentum) if nesterov else buf
    d = lmo(lmo_kind, direction_input, ns_steps=ns_steps, ns=ns, ns_dtype=ns_dtype, matrix_view=matrix_view).to(dt)
    lr = lr.to(dt) if isinstance(lr, Tensor) else lr
    s = lr * radius                                                            # s_l = γ_t ρ_l
    eta = scion_decay(s, momentum=momentum, norm_target=norm_target, corrected=corrected, lr=lr,
                      weight_decay=weight_decay, nesterov=nesterov)            # η_t
    param.copy_(param.to(dt) * (1 - eta) - s * d)
