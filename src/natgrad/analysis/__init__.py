"""Measurements of Fisher approximations: γ indicator, cosines, gradient-norm imbalance."""

from natgrad.analysis.compare import MethodFactory, compare_updates, method_update
from natgrad.analysis.quality import (
    BatchFisher,
    cosine_similarity,
    gamma,
    gradient_norm_imbalance,
    natural_gradient_cg,
    per_sample_gradient_norms,
    per_sample_gradients,
)

__all__ = [
    "BatchFisher",
    "MethodFactory",
    "compare_updates",
    "cosine_similarity",
    "gamma",
    "gradient_norm_imbalance",
    "method_update",
    "natural_gradient_cg",
    "per_sample_gradient_norms",
    "per_sample_gradients",
]
