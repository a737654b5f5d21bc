"""Approximation quality of updates: the γ indicator, cosines and gradient-norm imbalance.

The iEF work (Wu et al. 2024; its main paper's eq. 15) judges an update ``Δ`` by

    γ(Δ) = (Δ^T F Δ)^{1/2} / |Δ^T ∇L|,

with ``F`` the exact Fisher (GGN) of the batch. γ is invariant to the scale of ``Δ`` and, by
Cauchy-Schwarz in the ``F`` inner product, minimal exactly for the natural-gradient direction
``F^{-1} ∇L`` (where ``F`` is singular: ``F^+ ∇L`` when ``∇L`` lies in its range). Results are
reported as ratios such as ``γ_EF / γ_SGD`` (smaller is closer to NGD). The gradient-norm
imbalance of a batch is ``max_n ||∇l_n|| / min_n ||∇l_n||`` (Wu et al. 2024, sec. 6-8).

Everything uses Fisher-vector products (:mod:`natgrad.fisher_vector`); no Fisher matrix is
formed unless :meth:`BatchFisher.dense` is asked for.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from natgrad.fisher_vector import fisher_vector_product, flatten
from natgrad.likelihoods import Likelihood, check_reduction, get_likelihood
from natgrad.precond.base import Preconditioner
from natgrad.precond.blocks import Block


class BatchFisher:
    """The exact Fisher of one batch as a linear operator on flat parameter vectors.

    Parameters
    ----------
    model
        The model; its forward pass must return logits ``(N, C)``.
    inputs
        The batch inputs (a tensor, or a tuple of forward arguments).
    likelihood, reduction
        The loss the Fisher belongs to.
    params
        The parameters the operator acts on (default: every trainable parameter), in the order
        of the flat vectors.
    """

    def __init__(
        self,
        model: nn.Module,
        inputs: Tensor | tuple,
        likelihood: str | Likelihood = "categorical",
        reduction: str = "mean",
        params: Sequence[nn.Parameter] | None = None,
    ) -> None:
        self.model = model
        self.model_args = inputs if isinstance(inputs, tuple) else (inputs,)
        self.likelihood = get_likelihood(likelihood)
        self.reduction = check_reduction(reduction)
        chosen = {id(p) for p in (params or [p for p in model.parameters() if p.requires_grad])}
        self.params = {n: p for n, p in model.named_parameters() if id(p) in chosen}
        if not self.params:
            raise ValueError("BatchFisher needs at least one parameter of the model")
        self.size = sum(p.numel() for p in self.params.values())

    def split(self, vector: Tensor) -> list[Tensor]:
        """A flat vector as one block per parameter."""
        if vector.dim() != 1 or vector.numel() != self.size:
            raise ValueError(
                f"expected a flat vector of {self.size} entries (the parameters' total size), "
                f"got shape {tuple(vector.shape)}"
            )
        blocks, offset = [], 0
        for param in self.params.values():
            blocks.append(vector[offset : offset + param.numel()].reshape(param.shape))
            offset += param.numel()
        return blocks

    def matvec(self, vector: Tensor) -> Tensor:
        """``F v`` for a flat vector ``v``."""
        blocks = self.split(vector)
        return flatten(
            fisher_vector_product(
                self.model, self.model_args, self.params, blocks, self.likelihood, self.reduction
            )
        )

    def dense(self) -> Tensor:
        """The ``P x P`` matrix, column by column (for small models and tests)."""
        param = next(iter(self.params.values()))
        eye = torch.eye(self.size, dtype=param.dtype, device=param.device)
        return torch.stack([self.matvec(column) for column in eye], dim=1)


def gamma(fisher: BatchFisher, update: Tensor, gradient: Tensor) -> float:
    """``γ(Δ) = (Δ^T F Δ)^{1/2} / |Δ^T ∇L|`` for flat vectors ``update`` and ``gradient``."""
    _check_same_shape(update, gradient)
    if not bool(gradient.abs().max() > 0):
        raise ValueError("γ is undefined for a zero gradient (the denominator Δ^T ∇L is 0)")
    alignment = torch.dot(update, gradient).abs().item()
    if alignment == 0:
        raise ValueError("γ is undefined: the update is orthogonal to the gradient")
    curvature = torch.dot(update, fisher.matvec(update)).item()
    return math.sqrt(max(curvature, 0.0)) / alignment


def cosine_similarity(first: Tensor, second: Tensor) -> float:
    """Cosine of the angle between two flat vectors."""
    _check_same_shape(first, second)
    norms = first.norm() * second.norm()
    if not bool(norms > 0):
        raise ValueError("the cosine similarity of a zero vector is undefined")
    return (torch.dot(first, second) / norms).item()


def gradient_norm_imbalance(norms: Tensor) -> float:
    """``max ||∇l_n|| / min ||∇l_n||``; infinite when a datapoint has a zero gradient."""
    if norms.numel() == 0:
        raise ValueError("the imbalance of an empty batch is undefined")
    smallest = norms.min().item()
    return math.inf if smallest == 0 else norms.max().item() / smallest


def natural_gradient_cg(
    fisher: BatchFisher,
    gradient: Tensor,
    damping: float,
    tolerance: float = 1e-10,
    max_iterations: int | None = None,
) -> Tensor:
    """``(F + λI)^{-1} ∇L`` by conjugate gradients on Fisher-vector products.

    For batches whose ``N C`` is too large for the Woodbury solve of
    :class:`natgrad.NGD` (``fisher="exact"``), which gives the same direction.
    """
    if not damping > 0:
        raise ValueError(f"damping must be positive, got {damping}")
    solution = torch.zeros_like(gradient)
    residual = gradient.clone()
    direction = residual.clone()
    residual_sq = torch.dot(residual, residual)
    target = tolerance**2 * residual_sq
    for _ in range(max_iterations or 10 * gradient.numel()):
        if residual_sq <= target:
            break
        product = fisher.matvec(direction) + damping * direction
        step = residual_sq / torch.dot(direction, product)
        solution += step * direction
        residual -= step * product
        new_residual_sq = torch.dot(residual, residual)
        direction = residual + (new_residual_sq / residual_sq) * direction
        residual_sq = new_residual_sq
    return solution


class _GradientRecorder(Preconditioner):
    """Reads the per-sample rows of a batch without changing any gradient."""

    per_sample_blocks = True

    def _precondition(
        self, batches: list[Block], factor: float, per_sample_output_grad: Tensor
    ) -> None:
        self.batches = batches
        self.norms_sq = sum(b.gram(b.loss_grads).diagonal() for b in batches)


def _record(
    model: nn.Module,
    inputs: Tensor,
    loss_fn: Callable[[Tensor], Tensor],
    likelihood: str | Likelihood,
    reduction: str,
) -> _GradientRecorder:
    recorder = _GradientRecorder(model, likelihood=likelihood, reduction=reduction)
    try:
        logits = model(inputs)
        loss_fn(logits).backward()
        recorder.step(logits)
    finally:
        recorder.remove()
    return recorder


def per_sample_gradients(
    model: nn.Module,
    inputs: Tensor,
    loss_fn: Callable[[Tensor], Tensor],
    likelihood: str | Likelihood = "categorical",
    reduction: str = "mean",
) -> Tensor:
    """The ``(N, P)`` matrix of per-datapoint gradients ``∇l_n`` (no reduction factor).

    Materialised from the neuron view and the per-sample rows of normalisation layers and
    torch.func fallback tensors, in the order of ``model.parameters()`` (every trainable
    parameter is covered, none left to the plain gradient); for small models and analyses
    (the preconditioners never form it for dense layers).
    """
    recorder = _record(model, inputs, loss_fn, likelihood, reduction)
    return torch.cat([b.per_datapoint_grads(b.loss_grads) for b in recorder.batches], dim=1)


def per_sample_gradient_norms(
    model: nn.Module,
    inputs: Tensor,
    loss_fn: Callable[[Tensor], Tensor],
    likelihood: str | Likelihood = "categorical",
    reduction: str = "mean",
) -> Tensor:
    """``||∇l_n||`` of every datapoint (per-datapoint loss, no reduction factor).

    From the diagonal of the Gram matrix of the neuron view, never forming per-sample
    gradients. ``loss_fn(logits)`` computes the batch loss. The model's ``.grad`` is left as
    ``loss.backward()`` leaves it.
    """
    recorder = _record(model, inputs, loss_fn, likelihood, reduction)
    return recorder.norms_sq.clamp_min(0).sqrt()


def _check_same_shape(first: Tensor, second: Tensor) -> None:
    if first.shape != second.shape or first.dim() != 1:
        raise ValueError(
            f"expected two flat vectors of one shape, got {tuple(first.shape)} and "
            f"{tuple(second.shape)}: flatten the update like the parameters"
        )


__all__ = [
    "BatchFisher",
    "cosine_similarity",
    "gamma",
    "gradient_norm_imbalance",
    "natural_gradient_cg",
    "per_sample_gradient_norms",
    "per_sample_gradients",
]
