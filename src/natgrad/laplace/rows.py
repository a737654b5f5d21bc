"""The curvature rows of a whole data set, collected batch by batch through natgrad's capture.

:class:`RowCollector` is a :class:`~natgrad.precond.base.Preconditioner` that never writes a
direction: each ``step`` hands the batch's curvature blocks
(:mod:`natgrad.precond.blocks`: neuron-view ``(A, E)`` layers, materialised rows of
normalisation layers and torch.func fallback tensors) to a sink, which keeps what its posterior
structure needs. The rows are those of natgrad's Fisher types (:mod:`natgrad.datapoints`) for
the per-datapoint losses ``l_n`` (the reduction factor removed):

=============  ===============================================  ===========
``fisher``     rows of datapoint ``n``                           row weight
=============  ===============================================  ===========
``exact``      ``J_n^T s_{nk}``, ``S_n S_n^T = H_n`` (GGN)       1
``mc``         ``J_n^T ∇_z l(z_n, y)``, ``M`` labels ``y``        ``1 / M``
``empirical``  ``∇l_n`` at the true label                         1
=============  ===============================================  ===========

so the weighted rows ``g_r`` of all datapoints give ``Σ_r g_r g_r^T``, the curvature of the
summed negative log-likelihood of the data set.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from natgrad.datapoints import output_vectors
from natgrad.likelihoods import Bernoulli, Categorical, Gaussian, Likelihood
from natgrad.precond.base import Preconditioner
from natgrad.precond.blocks import Block
from natgrad.precond.checks import check_count

LaplaceFisher = Literal["exact", "mc", "empirical"]
LAPLACE_FISHERS = ("exact", "mc", "empirical")
SUPPORTED_LIKELIHOODS = (Categorical, Gaussian, Bernoulli)


def check_laplace_likelihood(likelihood: Likelihood) -> Likelihood:
    """Return ``likelihood`` if its full log-likelihood is known to natgrad, else raise."""
    if type(likelihood) not in SUPPORTED_LIKELIHOODS:
        raise ValueError(
            f"Laplace needs the normalised log-likelihood of the model, which natgrad knows for "
            f"'categorical', 'gaussian' and 'bernoulli'; got {type(likelihood).__name__}: pass "
            "one of those names or a natgrad.likelihoods.Gaussian(variance=...)"
        )
    return likelihood


def loss_sum(likelihood: Likelihood, logits: Tensor, targets: Tensor) -> Tensor:
    """``Σ_n l_n``, the summed loss whose output gradients natgrad's rows are taken of."""
    if isinstance(likelihood, Categorical):
        return F.cross_entropy(logits, targets, reduction="sum")
    if isinstance(likelihood, Gaussian):
        return (logits - targets).pow(2).sum() / (2 * likelihood.variance)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="sum")


def log_likelihood(likelihood: Likelihood, logits: Tensor, targets: Tensor) -> Tensor:
    """``log p(y | x, θ)`` summed over the batch, normalising constants included.

    For the Gaussian ``-Σ_n ||z_n - y_n||^2 / (2 σ^2) - (N C / 2) log(2 π σ^2)``; categorical and
    Bernoulli likelihoods are normalised by their loss (``-Σ_n l_n``).
    """
    value = -loss_sum(likelihood, logits, targets)
    if isinstance(likelihood, Gaussian):
        value = value - 0.5 * logits.numel() * math.log(2 * math.pi * likelihood.variance)
    return value


class RowCollector(Preconditioner):
    """Capture of the curvature rows of each batch, for :class:`natgrad.laplace.Laplace`.

    ``sink(blocks, row_weight)`` receives every batch's blocks in model order (those of all
    ranks under ``distributed="global"``) and the weight of each row's outer product.
    """

    per_sample_blocks = True
    gathers_rows = True
    distributed_modes = ("global",)

    def __init__(
        self,
        model: nn.Module,
        likelihood: Likelihood,
        fisher: LaplaceFisher,
        sink: Callable[[list[Block], float], None],
        *,
        mc_samples: int = 1,
        **options: Any,
    ) -> None:
        if fisher not in LAPLACE_FISHERS:
            raise ValueError(f"unknown fisher={fisher!r}: choose one of {LAPLACE_FISHERS}")
        self.fisher = fisher
        self.mc_samples = check_count(mc_samples, "mc_samples")
        self.sink = sink
        super().__init__(model, likelihood=likelihood, reduction="sum", damping=1.0, **options)

    @property
    def row_weight(self) -> float:
        return 1.0 / self.mc_samples if self.fisher == "mc" else 1.0

    def _settings(self) -> str:
        return f"fisher={self.fisher}, likelihood={self.likelihood.name}"

    def _extra_output_vectors(self, logits: Tensor) -> Tensor | None:
        if self.fisher == "empirical":
            return None
        return output_vectors(self.fisher, self.likelihood, logits, self.mc_samples, self.generator)

    def _precondition(
        self, batches: list[Block], factor: float | Tensor, per_sample_output_grad: Tensor
    ) -> None:
        # the rows are those of l_n already: the datapoint weights c_r / R of the global
        # mean-loss objective (``factor`` after a gather) do not enter the curvature of the
        # summed log-likelihood
        self.sink(batches, self.row_weight)

    def _skip_step(self, reason: str) -> None:
        raise FloatingPointError(
            f"Laplace.fit: {reason}; the curvature at non-finite values is undefined: check the "
            "model's weights and the data"
        )

    def curvature_rows(self, block: Block) -> Tensor:
        """The block's curvature rows ``(K, N, ...)`` (unweighted) for this Fisher type."""
        if self.fisher == "empirical":
            return block.loss_grads
        if block.extra_grads is None:
            raise RuntimeError(f"module '{block.name}' received no extra datapoints this batch")
        return block.extra_grads


__all__ = [
    "LAPLACE_FISHERS",
    "LaplaceFisher",
    "RowCollector",
    "check_laplace_likelihood",
    "log_likelihood",
    "loss_sum",
]
