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

from dataclasses import dataclass, replace

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
    """A layer's ``∇W`` (bias column last when ``has_bias``): low rank,
    ``scale Ē^T Ā`` from ``grad_rows`` ``(R, d_out)`` and ``inputs`` ``(R, d_in)``, kept
    without their bias column of ones and unscaled (so that forming it copies nothing), or a
    dense ``matrix`` ``(d_out, d_in [+1])``, ``scale`` included (token inputs, and
    convolutions whose rank is at least their widths)."""

    grad_rows: Tensor | None = None
    inputs: Tensor | None = None
    has_bias: bool = False
    scale: float = 1.0
    matrix: Tensor | None = None

    @classmethod
    def of(cls, batch: LayerBatch, scale: float) -> LayerGradient:
        """``scale`` times the gradient of ``batch``'s loss-gradient rows.

        Dense where the rank ``N T`` is at least the widths, so that the low-rank form could
        not pay, and the adapter computes weight gradients without the rows ``A``
        (convolutions: no unfolded patches); low rank ``(Ē, Ā)`` otherwise.
        """
        # the rows as stored, their reduction factor folded into the scale (no divided copy)
        stored, carried = batch.loss_rows()
        rows, scale = stored[0], scale / carried
        if isinstance(batch, TokenBatch):
            matrix = token_matrix(batch.inputs, scale * rows, batch.module.num_embeddings).T
            return cls(has_bias=batch.has_bias, matrix=matrix)
        rank, d_out = rows.shape[0] * rows.shape[1], rows.shape[-1]
        if (
            batch.layer_inputs
            and batch.adapter.grads_from_inputs
            and rank >= max(d_out, batch.d_in + int(batch.has_bias))
        ):
            weight = batch.adapter.weight_grad(batch.module, batch.layer_inputs, rows)
            if batch.has_bias:
                weight = torch.cat([weight, rows.sum(dim=(0, 1)).unsqueeze(1)], dim=1)
            return cls(has_bias=batch.has_bias, matrix=weight.mul_(scale))
        inputs = batch.inputs
        return cls(
            rows.reshape(-1, d_out), inputs.reshape(-1, inputs.shape[-1]), batch.has_bias, scale
        )

    def scaled(self, scale: float) -> LayerGradient:
        """``scale ∇W`` (without a copy in the low-rank form)."""
        if self.matrix is not None:
            return replace(self, matrix=scale * self.matrix)
        return replace(self, scale=scale * self.scale)

    def scaled_rows(self) -> Tensor:
        """``scale Ē``."""
        return self.grad_rows if self.scale == 1.0 else self.scale * self.grad_rows

    def augmented_inputs(self) -> Tensor:
        """``Ā``, the input rows with the bias column of ones."""
        return augmented_inputs(self.inputs, self.has_bias)

    def dense(self) -> Tensor:
        """``∇W`` as a ``(d_out, d_in [+1])`` matrix."""
        if self.matrix is not None:
            return self.matrix
        return self.scaled_rows().T @ self.augmented_inputs()

    def low_rank_pays(self, two_sided: bool) -> bool:
        """Whether applying the inverses to the low-rank factors is cheaper than to ``∇W``."""
        if self.matrix is not None:
            return False
        rank, d_out = self.inputs.shape[0], self.grad_rows.shape[1]
        d_in = self.inputs.shape[1] + int(self.has_bias)
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
        rows = gradient.scaled_rows()
        mapped_grads = rows if left is None else rows @ left
        return mapped_grads.T @ times_right(gradient.augmented_inputs(), right)
    matrix = gradient.dense()
    if left is not None:
        matrix = left.T @ matrix
    return times_right(matrix, right)


def split_sandwich(
    left: Tensor | None, gradient: LayerGradient, right: Tensor, out: Tensor | None
) -> tuple[Tensor, Tensor | None]:
    """:func:`sandwich` split into weight and bias parts, the weight written into ``out``.

    ``right`` (a matrix or a diagonal kept as a vector, over the inputs and the bias column)
    is applied by its blocks, ``Ā right = A right[:d, :] + 1 right[d, :]``, so that no bias
    column is appended to the rows and every product has the weight's widths (a width of
    ``d + 1`` is an odd size for the BLAS kernels); the scale goes into the product with
    ``right``. The weight lands in ``out`` (the existing ``.grad``) without an intermediate
    ``d_out x d_in`` copy.
    """
    if gradient.matrix is not None:
        return split_bias(sandwich(left, gradient, right), gradient.has_bias)
    has_bias, scale = gradient.has_bias, gradient.scale
    d_in = gradient.inputs.shape[1]
    if gradient.low_rank_pays(left is not None):
        # (Ē left)^T (Ā right): the right factor maps the rows, the left factor the gradients
        grad_rows = gradient.grad_rows
        mapped_grads = (grad_rows if left is None else grad_rows @ left).T
        mapped, mapped_bias = map_rows(gradient.inputs, right, has_bias, scale)
        weight = torch.mm(mapped_grads, mapped, out=out)
        return weight, None if mapped_bias is None else mapped_grads @ mapped_bias
    # left^T (scale Ē^T Ā) right from the dense ∇W = [G_W, g_b], its bias column kept apart
    grad_rows = gradient.scaled_rows()
    weight_grad = grad_rows.T @ gradient.inputs
    bias_grad = grad_rows.sum(dim=0) if has_bias else None
    if left is not None:
        weight_grad = left.T @ weight_grad
        bias_grad = None if bias_grad is None else left.T @ bias_grad
    if right.dim() == 1:
        weight = torch.mul(weight_grad, right[:d_in], out=out)
        return weight, None if bias_grad is None else bias_grad * right[d_in]
    weight = torch.mm(weight_grad, right[:d_in, :d_in], out=out)
    if bias_grad is None:
        return weight, None
    weight.addr_(bias_grad, right[d_in, :d_in])
    return weight, torch.addmv(bias_grad * right[d_in, d_in], weight_grad, right[:d_in, d_in])


def map_rows(
    inputs: Tensor, right: Tensor, has_bias: bool, scale: float
) -> tuple[Tensor, Tensor | None]:
    """``scale Ā right`` as its weight columns ``(R, d_in)`` and its bias column ``(R,)``
    (``None`` without bias), from the rows ``A`` without their column of ones: ``right`` a
    matrix ``(d_in [+1], d_in [+1])`` or a diagonal kept as a vector."""
    d_in = inputs.shape[1]
    if right.dim() == 1:
        mapped = inputs * (scale * right[:d_in])
        bias = inputs.new_full((inputs.shape[0],), scale) * right[d_in] if has_bias else None
        return mapped, bias
    if not has_bias:
        mapped = inputs @ right
        return (mapped if scale == 1.0 else mapped.mul_(scale)), None
    # A right[:d, :d] + 1 right[d, :d] and A right[:d, d] + right[d, d], scaled, one GEMM each
    mapped = torch.addmm(right[d_in, :d_in], inputs, right[:d_in, :d_in], beta=scale, alpha=scale)
    bias = torch.addmv(right[d_in, d_in], inputs, right[:d_in, d_in], beta=scale, alpha=scale)
    return mapped, bias


def split_bias(update: Tensor, has_bias: bool) -> tuple[Tensor, Tensor | None]:
    """A ``(d_out, d_in [+1])`` update as ``(weight, bias or None)``."""
    d_weight = update.shape[1] - int(has_bias)
    return update[:, :d_weight], (update[:, d_weight] if has_bias else None)


__all__ = [
    "LayerGradient",
    "augmented_inputs",
    "map_rows",
    "sandwich",
    "split_bias",
    "split_sandwich",
    "times_right",
]
