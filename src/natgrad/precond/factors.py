"""Batch statistics of the Kronecker factors and how they are folded into moving averages.

A layer's factor statistic ``scale * rows^T rows`` (the input covariance ``Σ_A`` of the rows
``Ā``, or the output-gradient covariance ``Σ_G``; Benzing 2022, eq. 2-6) is kept as its rows,
so that folding it into the layer's exponential moving average is in-place GEMMs without a
``d x d`` temporary (:meth:`Outer.fold_into`). The statistic is symmetric: the fold may update
only the blocks of :data:`FOLD_BLOCK` rows on and above the diagonal (about half the flops),
leaving the rest of the lower triangle stale until :func:`symmetrise_upper_` restores it, once,
before the factor is read. An ``nn.Embedding``'s input statistic is diagonal (one-hot inputs)
and kept as a vector (:func:`input_statistic`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from natgrad.adapters import LayerAdapter
from natgrad.linalg import mirror_upper_, token_frequencies, upper_addmm_
from natgrad.precond.layer_gradient import augmented_inputs

FOLD_BLOCK = 128
"""Rows of a factor updated by one GEMM when only its upper triangle is folded
(:meth:`Outer.fold_into` with ``upper=True``)."""


@dataclass
class Outer:
    """A batch statistic ``scale * rows^T rows`` kept as its rows, so that folding it into a
    moving average is in-place GEMMs (:meth:`fold_into`); or, with ``rows=None``, a tensor
    ``diagonal`` (a diagonal factor's vector) that is folded elementwise."""

    rows: Tensor | None
    scale: float = 1.0
    diagonal: Tensor | None = None

    def dense(self) -> Tensor:
        """The statistic as a tensor (the diagonal's vector for a diagonal statistic)."""
        if self.rows is None:
            return self.diagonal
        return self.scale * (self.rows.T @ self.rows)

    def fold_into(self, average: Tensor | None, decay: float, upper: bool = False) -> Tensor:
        """``decay * average + (1 - decay) * statistic``, written into ``average`` (no temporary
        of its size), or ``(1 - decay) * statistic`` as a new tensor if ``average`` is None.

        With ``upper=True`` only the blocks of :data:`FOLD_BLOCK` rows on and above the
        diagonal of ``average`` are updated, one GEMM per block row (about half the flops of
        the whole product, the statistic being symmetric); the rest of the lower triangle is
        left stale, for :func:`symmetrise_upper_` to restore before the matrix is read.
        """
        if self.rows is None:
            if average is None:
                return (1 - decay) * self.diagonal
            return average.mul_(decay).add_(self.diagonal, alpha=1 - decay)
        alpha = (1 - decay) * self.scale
        rows = self.rows
        if average is None:
            return torch.mm(rows.T, rows).mul_(alpha)
        if not upper:
            return average.addmm_(rows.T, rows, beta=decay, alpha=alpha)
        return upper_addmm_(average, rows.T, beta=decay, alpha=alpha, block=FOLD_BLOCK)


def symmetrise_upper_(matrix: Tensor) -> Tensor:
    """The whole symmetric matrix after :meth:`Outer.fold_into` with ``upper=True``: the
    blocks of :data:`FOLD_BLOCK` rows above the diagonal copied onto the lower triangle."""
    return mirror_upper_(matrix, FOLD_BLOCK)


def input_statistic(
    adapter: LayerAdapter, module: nn.Module, rows: Tensor, dtype: torch.dtype
) -> Outer:
    """``Σ_A`` of one batch's input rows as an :class:`Outer`: ``Ā^T Ā / (N T)``, or the
    diagonal ``(num_embeddings,)`` for token inputs (module docstring)."""
    if adapter.token_inputs:
        return Outer(None, diagonal=token_frequencies(rows, module.num_embeddings, dtype))
    inputs = augmented_inputs(rows, adapter.has_bias(module))
    return Outer(inputs, 1.0 / inputs.shape[0])


__all__ = ["FOLD_BLOCK", "Outer", "input_statistic", "symmetrise_upper_"]
