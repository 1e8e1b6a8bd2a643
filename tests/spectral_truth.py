"""Float64 truth for the spectral LMO of N-D weights, written without the package's helpers.

The unit spectral step of a (d_out, d_in) matrix M = U S Vᵀ is U Vᵀ·sqrt(d_out/d_in) (the orthogonal polar
factor, from an SVD here). How an N-D weight is read as matrices (``matrix_view``) is spelled out per case:
an expert stack (E, d_out, d_in) is E matrices, a conv kernel (d_out, d_in, k, k) flattened is one
(d_out, d_in·k·k) matrix, per tap it is k·k matrices W[:, :, i, j], and a transposed weight (d_in, d_out)
is the matrix Wᵀ.

Newton–Schulz only approximates the polar factor; with Polar Express and enough steps it converges to
float64 rounding when the singular values are not too spread, so the inputs here have every matrix's
singular values in [0.5, 1] (``well_conditioned``).
"""
import itertools
import math

import torch

NS_STEPS = 10   # Polar Express steps that reach float64 rounding on the inputs below
NS = "polar_express"


def polar64(m: torch.Tensor) -> torch.Tensor:
    u, _, vh = torch.linalg.svd(m.to(torch.float64), full_matrices=False)
    return u @ vh


def _unit_step(m: torch.Tensor) -> torch.Tensor:
    d_out, d_in = m.shape
    return polar64(m) * math.sqrt(d_out / d_in)


def spectral_truth(w: torch.Tensor, view: str) -> torch.Tensor:
    """The spectral LMO of weight ``w`` under ``view``, in float64, matrix by matrix."""
    w = w.to(torch.float64)
    out = torch.empty_like(w)
    if view == "batch":
        for idx in itertools.product(*map(range, w.shape[:-2])):
            out[idx] = _unit_step(w[idx])
    elif view == "flatten":
        out = _unit_step(w.reshape(w.shape[0], -1)).reshape(w.shape)
    elif view == "taps":
        for idx in itertools.product(*map(range, w.shape[2:])):
            out[(slice(None), slice(None)) + idx] = _unit_step(w[(slice(None), slice(None)) + idx])
    elif view == "transposed":
        for idx in itertools.product(*map(range, w.shape[:-2])):
            out[idx] = _unit_step(w[idx].T).T
    else:
        raise ValueError(view)
    return out


def sign_truth(w: torch.Tensor, view: str) -> torch.Tensor:
    """sign(w)/d_in with d_in the input dim of ``view``'s matrices."""
    d_in = {"batch": w.shape[-1], "flatten": math.prod(w.shape[1:]), "taps": w.shape[1],
            "transposed": w.shape[-2]}[view]
    return torch.sign(w.to(torch.float64)) / d_in


def _matrix(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    k = min(rows, cols)
    u = torch.linalg.qr(torch.randn(rows, k, dtype=torch.float64, generator=g))[0]
    v = torch.linalg.qr(torch.randn(cols, k, dtype=torch.float64, generator=g))[0]
    s = 0.5 + 0.5 * torch.rand(k, dtype=torch.float64, generator=g)
    return u @ torch.diag(s) @ v.T


def well_conditioned(shape, view: str, g: torch.Generator) -> torch.Tensor:
    """A float64 weight of ``shape`` whose every matrix under ``view`` has singular values in [0.5, 1]."""
    w = torch.empty(shape, dtype=torch.float64)
    if view == "batch":
        for idx in itertools.product(*map(range, shape[:-2])):
            w[idx] = _matrix(shape[-2], shape[-1], g)
    elif view == "flatten":
        w = _matrix(shape[0], math.prod(shape[1:]), g).reshape(shape)
    elif view == "taps":
        for idx in itertools.product(*map(range, shape[2:])):
            w[(slice(None), slice(None)) + idx] = _matrix(shape[0], shape[1], g)
    elif view == "transposed":
        for idx in itertools.product(*map(range, shape[:-2])):
            w[idx] = _matrix(shape[-1], shape[-2], g).T
    else:
        raise ValueError(view)
    return w
