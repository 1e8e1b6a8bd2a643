"""Readable eager implementations of the update rules: the ground truth for every kernel."""
from . import state8
from .adam_decay import (DECAY_KINDS, adam_decay_reference, adam_decay_step, adam_direction, decay_coefficient,
                         delta_mu_update, huber_grad, huber_prox, math_dtype)
from .scion import (LMO_KINDS, MATRIX_VIEWS, NS_CLASSIC_COEFFS, NS_KINDS, POLAR_EXPRESS_COEFFS, as_matrices, bias_lmo,
                    from_matrices, lmo, matrix_batch_dims, matrix_dims, nesterov_factor, newton_schulz, ns_coefficients,
                    resolve_matrix_view, scion_decay, scionc_step, sign_lmo, spectral_lmo)

__all__ = [
    "DECAY_KINDS", "adam_decay_reference", "adam_decay_step", "adam_direction", "decay_coefficient", "delta_mu_update",
    "state8", "huber_grad", "huber_prox", "math_dtype", "LMO_KINDS", "MATRIX_VIEWS", "NS_CLASSIC_COEFFS", "NS_KINDS",
    "POLAR_EXPRESS_COEFFS", "as_matrices", "bias_lmo", "from_matrices", "lmo", "matrix_batch_dims", "matrix_dims",
    "nesterov_factor", "newton_schulz", "ns_coefficients", "resolve_matrix_view", "scion_decay", "scionc_step",
    "sign_lmo", "spectral_lmo",
]
