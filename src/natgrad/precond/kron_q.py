"""FishLeg's Kronecker ``Q = (L Lᵀ) ⊗ (R Rᵀ)``: products and auxiliary gradients that use the
factors' triangular structure (Garcia et al. 2023, App. A.5, eq. 53).

``L`` (``d_out x d_out``) and ``R`` (``d_in x d_in``) are lower triangular. A product with one
of them touches only its lower triangle: split into ``k`` column blocks, ``x L`` needs rows
``s:`` of block ``[s, s+b)`` and ``x Lᵀ`` columns ``:s+b`` of ``x``, about ``(k + 1) / 2k`` of a
dense product's flops. The products use blocks of :data:`PRODUCT_BLOCK` columns starting at
its multiples (:func:`product_blocks`); the auxiliary gradients and Adam's state keep the
factors' lower triangles in at most :data:`MAX_BLOCKS` column blocks (:func:`lower_blocks`).
The zero triangle is read only inside the diagonal blocks, so the factors' upper triangles
must hold zeros (FishLeg keeps them so).

``Q`` applied to a layer-shaped matrix ``M`` (``d_out x d_in``) is ``L Lᵀ M R Rᵀ``; to a
low-rank gradient ``Eᵀ A`` (``E`` the ``n x d_out`` output-gradient rows, ``A`` the
``n x d_in`` input rows) it is ``Xᵀ Y`` with ``X = E L Lᵀ`` and ``Y = A R Rᵀ``, about
``n d^2`` flops per factor instead of ``d^3`` (App. A.7).

The auxiliary gradients are those of the surrogate ``s = <Q u, W>`` with ``W = (F + γI) v - u``
held constant (``v = Q u``), whose gradient is that of ``A(λ) = ½ vᵀ(F + γI)v - uᵀv``
(eq. 20-21):

* ``u`` dense, ``P = u R Rᵀ``, ``K = L Lᵀ u``: ``∇L = tril((P Wᵀ + W Pᵀ) L)``,
  ``∇R = tril((Wᵀ K + Kᵀ W) R)``;
* ``u = Eᵀ A``, ``Z = Y Wᵀ``, ``Z' = X W``: ``∇L = tril(Zᵀ (E L) + Eᵀ (Z L))``,
  ``∇R = tril(Z'ᵀ (A R) + Aᵀ (Z' R))``, all products of rank ``n``.

Each is ``tril`` of a product, formed block by block without the blocks above the diagonal
(:func:`tril_product`) and kept in the column blocks that hold the lower triangle
(:func:`lower_blocks`), the layout FishLeg's Adam works on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

MAX_BLOCKS = 4
"""Column blocks of the lower triangle kept for Adam and the auxiliary gradients (4: ~62% of
a dense product's flops)."""
MIN_BLOCK_WIDTH = 128
"""Narrowest block worth a separate product; a factor below ``2 x`` this is used densely."""
PRODUCT_BLOCK = 128
"""Columns of a block of :func:`times_lower` and :func:`times_lower_t` (the last may be
narrower): ~56% of a dense product's flops for ``d = 1000``. Measured at one thread (MKL, rows
``N = 32`` and ``100`` times ``d = 785``, ``1000``, ``1001``): ``L Lᵀ`` applied in
0.62-0.69 of the dense products' time, against 0.70-0.77 with four blocks of ``d / 4``
columns (block starts at multiples of 128 are aligned in memory)."""


def block_width(size: int) -> int:
    """Width of the column blocks of a ``size x size`` triangular factor (``size``: one
    block, a dense product)."""
    blocks = max(1, min(MAX_BLOCKS, size // MIN_BLOCK_WIDTH))
    return -(-size // blocks)


def product_blocks(size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the column blocks of a triangular product with a ``size x size``
    factor: :data:`PRODUCT_BLOCK` wide from column 0, a last block narrower than half that
    joined to the one before (one block below ``2 x`` :data:`MIN_BLOCK_WIDTH`: a dense
    product)."""
    if size < 2 * MIN_BLOCK_WIDTH:
        return [(0, size)]
    starts = list(range(0, size, PRODUCT_BLOCK))
    if size - starts[-1] < PRODUCT_BLOCK // 2:
        starts.pop()
    return list(zip(starts, [*starts[1:], size], strict=True))


def times_lower(x: Tensor, lower: Tensor) -> Tensor:
    """``x @ lower`` for a lower-triangular ``lower``: column block ``[s, e)`` of the
    product is ``x[:, s:] @ lower[s:, s:e]``."""
    blocks = product_blocks(lower.shape[0])
    if len(blocks) == 1:
        return x @ lower
    return torch.cat([x[:, start:] @ lower[start:, start:stop] for start, stop in blocks], dim=1)


def times_lower_t(x: Tensor, lower: Tensor) -> Tensor:
    """``x @ lower.T`` for a lower-triangular ``lower``: column block ``[s, e)`` of the
    product is ``x[:, :e] @ lower[s:e, :e].T``."""
    blocks = product_blocks(lower.shape[0])
    if len(blocks) == 1:
        return x @ lower.T
    return torch.cat([x[:, :stop] @ lower[start:stop, :stop].T for start, stop in blocks], dim=1)


def gram_times(x: Tensor, lower: Tensor) -> Tensor:
    """``x @ lower @ lower.T``."""
    return times_lower_t(times_lower(x, lower), lower)


def column_blocks(size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of the column blocks of a ``size x size`` factor."""
    width = block_width(size)
    return [(start, min(start + width, size)) for start in range(0, size, width)]


def lower_blocks(matrix: Tensor) -> list[Tensor]:
    """Views of the parts of a square matrix that hold its lower triangle: rows ``s:`` of each
    column block ``[s, e)`` (about ``(k + 1) / 2k`` of the entries). FishLeg's Adam and the
    auxiliary gradients use this layout."""
    return [matrix[start:, start:stop] for start, stop in column_blocks(matrix.shape[0])]


def from_blocks(blocks: list[Tensor], size: int) -> Tensor:
    """The lower-triangular matrix whose :func:`lower_blocks` are ``blocks``."""
    matrix = blocks[0].new_zeros(size, size)
    for view, block in zip(lower_blocks(matrix), blocks, strict=True):
        view.copy_(block)
    return matrix.tril_()


def tril_product(
    left: Tensor, right: Tensor, out: list[Tensor], right_lower: bool = False
) -> list[Tensor]:
    """``tril(left @ right)`` (square) written into its :func:`lower_blocks` ``out``: column
    block ``[s, e)`` needs rows ``s:`` of the product, and only rows ``s:`` of ``right`` if it
    is lower triangular (``right_lower``)."""
    for (start, stop), block in zip(column_blocks(left.shape[0]), out, strict=True):
        inner = start if right_lower else 0
        torch.mm(left[start:, inner:], right[inner:, start:stop], out=block)
        block[: stop - start].tril_()
    return out


def apply_dense(matrix: Tensor, left: Tensor, right: Tensor) -> Tensor:
    """``L Lᵀ M R Rᵀ``."""
    return gram_times(gram_times(matrix, right).T, left).T


@dataclass
class LowRankProduct:
    """``Q (Eᵀ A) = Xᵀ Y`` with the intermediate products the auxiliary gradient reuses."""

    grad_rows: Tensor
    inputs: Tensor
    grad_rows_left: Tensor  # E L
    inputs_right: Tensor  # A R
    left_rows: Tensor  # X = E L Lᵀ
    right_rows: Tensor  # Y = A R Rᵀ

    @classmethod
    def of(cls, grad_rows: Tensor, inputs: Tensor, left: Tensor, right: Tensor) -> LowRankProduct:
        """The products of rows ``E``, ``A`` (in the factors' dtype) with ``L``, ``R``."""
        grad_rows, inputs = grad_rows.to(left.dtype), inputs.to(right.dtype)
        grad_rows_left, inputs_right = times_lower(grad_rows, left), times_lower(inputs, right)
        return cls(
            grad_rows,
            inputs,
            grad_rows_left,
            inputs_right,
            times_lower_t(grad_rows_left, left),
            times_lower_t(inputs_right, right),
        )

    def dense(self) -> Tensor:
        """``Xᵀ Y``, the ``d_out x d_in`` matrix ``Q (Eᵀ A)``."""
        return self.left_rows.T @ self.right_rows

    def factor_gradients(
        self, weights: Tensor, left: Tensor, right: Tensor, out: tuple[list[Tensor], ...]
    ) -> None:
        """``(∇L, ∇R)`` of ``<Xᵀ Y, W>`` into ``out`` (their :func:`lower_blocks`)."""
        weights = weights.to(left.dtype)
        for rows, mapped, factor, other, grad in (
            (self.grad_rows, self.grad_rows_left, left, self.right_rows @ weights.T, out[0]),
            (self.inputs, self.inputs_right, right, self.left_rows @ weights, out[1]),
        ):
            # Zᵀ (E L) + Eᵀ (Z L) as one product of rank 2n, its lower triangle only
            stacked_rows = torch.cat([other, rows]).T
            stacked_mapped = torch.cat([mapped, times_lower(other, factor)])
            tril_product(stacked_rows, stacked_mapped, grad)


def dense_factor_gradients(
    direction: Tensor,
    weights: Tensor,
    left: Tensor,
    right: Tensor,
    out: tuple[list[Tensor], ...],
) -> None:
    """``(∇L, ∇R)`` of ``<L Lᵀ u R Rᵀ, W>`` for a dense ``u`` into ``out`` (their
    :func:`lower_blocks`)."""
    direction, weights = direction.to(left.dtype), weights.to(left.dtype)
    mapped_right = gram_times(direction, right)  # P = u R Rᵀ
    mapped_left = gram_times(direction.T, left).T  # K = L Lᵀ u
    symmetric = mapped_right @ weights.T
    tril_product(symmetric + symmetric.T, left, out[0], right_lower=True)
    symmetric = weights.T @ mapped_left
    tril_product(symmetric + symmetric.T, right, out[1], right_lower=True)


__all__ = [
    "MAX_BLOCKS",
    "PRODUCT_BLOCK",
    "LowRankProduct",
    "apply_dense",
    "block_width",
    "column_blocks",
    "dense_factor_gradients",
    "from_blocks",
    "gram_times",
    "lower_blocks",
    "product_blocks",
    "times_lower",
    "times_lower_t",
    "tril_product",
]
