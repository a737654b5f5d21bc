"""A layer's gradient ``∇W`` kept as its low-rank factors, and products of it with factors.

The gradient of a layer with weight matrix ``W`` (``d_out x d_in``, bias as an extra input
column) is ``∇W = Ē^T Ā`` with ``Ē`` the ``N T`` output-gradient rows and ``Ā`` the input rows
(Benzing 2022, App. I). Its rank is at most ``N T``; when that is below the layer widths the
Kronecker inverses are applied to ``Ē`` and ``Ā`` (cost ``~N T d^2``) instead of to the
``d_out x d_in`` matrix (cost ``~d^3``), chosen per layer (:func:`sandwich`). An
``nn.Embedding``'s gradient is formed by adding the output gradients into their tokens'
columns and kept dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from natgrad.linalg import token_matrix
from natgrad.precond.blocks import LayerBatch, TokenBatch


def augmented_inputs(inputs: Tensor, has_bias: bool) -> Tensor:
    """``Ā``: layer inputs ``(N, T, d_in)`` as ``(N T, d_in [+1])`` rows, bias column of ones."""
    rows = inputs.reshape(-1, inputs.shape[-1])
    if has_bias:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return rows


@dataclass
class LayerGradient:
    """A layer's ``∇W``: low rank, ``Ē^T Ā`` from ``grad_rows`` ``(R, d_out)`` and ``inputs``
    ``(R, d_in)``, or a dense ``matrix`` ``(d_out, d_in)`` (token inputs)."""

    grad_rows: Tensor | None = None
    inputs: Tensor | None = None
    matrix: Tensor | None = None

    @classmethod
    def of(cls, batch: LayerBatch, scale: float) -> LayerGradient:
        """``scale`` times the gradient of ``batch``'s loss-gradient rows.

        Dense where the rank ``N T`` is at least the widths, so that the low-rank form could
        not pay, and the adapter computes weight gradients without the rows ``A``
        (convolutions: no unfolded patches); low rank ``(Ē, Ā)`` otherwise.
        """
        rows = batch.loss_grads[0]
        if isinstance(batch, TokenBatch):
            matrix = token_matrix(batch.inputs, scale * rows, batch.module.num_embeddings).T
            return cls(matrix=matrix)
        rank, d_out = rows.shape[0] * rows.shape[1], rows.shape[-1]
        if (
            batch.layer_inputs
            and batch.adapter.grads_from_inputs
            and rank >= max(d_out, batch.d_in + int(batch.has_bias))
        ):
            weight = batch.adapter.weight_grad(batch.module, batch.layer_inputs, rows)
            if batch.has_bias:
                weight = torch.cat([weight, rows.sum(dim=(0, 1)).unsqueeze(1)], dim=1)
            return cls(matrix=weight.mul_(scale))
        return cls(scale * rows.reshape(-1, d_out), augmented_inputs(batch.inputs, batch.has_bias))

    def scaled(self, scale: float) -> LayerGradient:
        """``scale ∇W``."""
        if self.matrix is not None:
            return LayerGradient(matrix=scale * self.matrix)
        return LayerGradient(scale * self.grad_rows, self.inputs)

    def dense(self) -> Tensor:
        """``∇W`` as a ``(d_out, d_in)`` matrix."""
        return self.matrix if self.matrix is not None else self.grad_rows.T @ self.inputs

    def low_rank_pays(self, two_sided: bool) -> bool:
        """Whether applying the inverses to the low-rank factors is cheaper than to ``∇W``."""
        if self.matrix is not None:
            return False
        rank, d_out, d_in = self.inputs.shape[0], self.grad_rows.shape[1], self.inputs.shape[1]
        left_cost = d_out * d_out if two_sided else 0
        low_rank = rank * (left_cost + d_in * d_in + d_out * d_in)
        dense = rank * d_out * d_in + d_out * d_in * d_in + (d_out**2 * d_in if two_sided else 0)
        return low_rank <= dense


def times_right(matrix: Tensor, right: Tensor | None) -> Tensor:
    """``matrix @ right``: ``right`` a matrix, a diagonal kept as a vector, or the identity."""
    if right is None:
        return matrix
    return matrix * right if right.dim() == 1 else matrix @ right


def sandwich(left: Tensor | None, gradient: LayerGradient, right: Tensor | None) -> Tensor:
    """``left^T ∇W right``, as ``(Ē left)^T (Ā right)`` when the rank ``N T`` is small;
    ``None`` stands for the identity, a vector ``right`` for a diagonal."""
    if gradient.low_rank_pays(left is not None):
        mapped_grads = gradient.grad_rows if left is None else gradient.grad_rows @ left
        return mapped_grads.T @ times_right(gradient.inputs, right)
    matrix = gradient.dense()
    if left is not None:
        matrix = left.T @ matrix
    return times_right(matrix, right)


def split_sandwich(
    left: Tensor | None,
    gradient: LayerGradient,
    right: Tensor,
    has_bias: bool,
    out: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """:func:`sandwich` split into weight and bias parts, the weight written into ``out``.

    In the low-rank form the two parts are separate products, so the weight lands in the
    existing ``.grad`` without an intermediate ``d_out x d_in`` copy.
    """
    if gradient.low_rank_pays(left is not None):
        grad_rows, inputs = gradient.grad_rows, gradient.inputs
        d_weight = inputs.shape[1] - int(has_bias)
        mapped_grads = (grad_rows if left is None else grad_rows @ left).T
        mapped_inputs = times_right(inputs, right)
        weight = torch.mm(mapped_grads, mapped_inputs[:, :d_weight], out=out)
        return weight, (mapped_grads @ mapped_inputs[:, d_weight]) if has_bias else None
    return split_bias(sandwich(left, gradient, right), has_bias)


def split_bias(update: Tensor, has_bias: bool) -> tuple[Tensor, Tensor | None]:
    """A ``(d_out, d_in [+1])`` update as ``(weight, bias or None)``."""
    d_weight = update.shape[1] - int(has_bias)
    return update[:, :d_weight], (update[:, d_weight] if has_bias else None)


__all__ = [
    "LayerGradient",
    "augmented_inputs",
    "sandwich",
    "split_bias",
    "split_sandwich",
    "times_right",
]
