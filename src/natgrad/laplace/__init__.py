"""Laplace posteriors over a network's weights from natgrad's curvature (Benzing 2022 App. C, G).

:class:`Laplace` fits ``N(θ*, Λ^{-1})`` with ``Λ = diag(τ) + Σ_n J_n^T H_n J_n`` over a whole
data set from the same rows natgrad's preconditioners use; see :mod:`natgrad.laplace.laplace`.
"""

from natgrad.laplace.laplace import STRUCTURES, Laplace
from natgrad.laplace.posteriors import KRON_DAMPINGS

__all__ = ["KRON_DAMPINGS", "STRUCTURES", "Laplace"]
