"""Measurements of Fisher approximations: γ indicator, cosines, gradient-norm imbalance, and
how well FishLeg's learned ``Q`` inverts the damped Fisher."""

from natgrad.analysis.compare import MethodFactory, compare_updates, method_update
from natgrad.analysis.fishleg_quality import QQuality, q_quality
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
    "QQuality",
    "compare_updates",
    "cosine_similarity",
    "gamma",
    "gradient_norm_imbalance",
    "method_update",
    "natural_gradient_cg",
    "per_sample_gradient_norms",
    "per_sample_gradients",
    "q_quality",
]
