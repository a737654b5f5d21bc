"""Exact mini-batch natural gradients by the Woodbury identity: NGD, EF, iEF, F(M), TENGraD.

With the damped curvature of the batch loss ``C = J̃^T J̃`` (``J̃``: datapoint gradients scaled
by ``sqrt(c w)``, ``c`` the reduction factor, ``w`` the row weight of the Fisher type), the
update direction is computed in the ``K N``-dimensional datapoint space, never in parameter
space:

* right-hand side in the span of the rows (``empirical``, ``ief``, ``ief_matrix``; Wu et al.
  2024, eq. 17, 19 and 5)::

      Δ = (J̃^T J̃ + λI)^{-1} J̃^T b = J̃^T (J̃ J̃^T + λI)^{-1} b,

  with ``b = sqrt(c) 1`` (EF: ``J̃^T b = ∇L``), ``b = sqrt(c) s_iEF`` (iEF), or rows divided
  by ``sqrt(s_n)`` and ``b = sqrt(c s_iEF)`` (iEF matrix: ``J̃^T b = ∇L`` again);
* right-hand side the loss gradient (``mc``, ``exact``; Wu et al. 2024, eq. 24; Benzing 2022,
  eq. 19-23; Shrestha 2023, eq. 40)::

      Δ = (J̃^T J̃ + λI)^{-1} ∇L = λ^{-1} [∇L - J̃^T (J̃ J̃^T + λI)^{-1} J̃ ∇L],

  where ``J̃ ∇L`` is a cross-Gram of the curvature rows with the true-label rows, so ``∇L`` is
  never formed either.

Per-token datapoints of token-level logits (``Categorical(datapoint="token")``): the
true-label rows are back-propagated as extra rows, one output vector per token position
(:func:`natgrad.datapoints.per_token`), and ``b`` has one entry per (token, sequence); sampled
labels are split by position the same way.

When the datapoints outnumber the parameters of a solve (``K N > P``, small models such as
the two-parameter problems of Kunstner et al. 2019) the same damped system is solved in
parameter space instead, with the ``P x P`` matrix built from the materialised datapoint
gradients: cheaper, and better conditioned at tiny damping.

With data parallelism (:mod:`natgrad.distributed`) the datapoints of the global batch carry
weights ``c_n`` (``c_r / R`` for the datapoints of rank ``r``) instead of one factor ``c``:
the rows are scaled by ``sqrt(c_n w)`` and ``b`` by ``sqrt(c_n)``, and ``∇L = sum_n c_n g_n``.

``structure="full"`` solves one system over all blocks (``J̃ J̃^T`` summed over blocks);
``structure="layer"`` solves one per block (block-diagonal NGD; TENGraD, Shrestha 2023,
eq. 39-43). A block is a neuron-view layer, whose direction is a single product ``E_u^T A`` (see
:func:`natgrad.linalg.jtu`), or a module whose per-sample gradient rows ``G_b`` are
materialised (normalisation layers, the torch.func fallback), which adds ``G_b G_b^T`` to the
Gram and whose direction is ``G_b^T u`` (:mod:`natgrad.precond.blocks`). The updates are exact
for models mixing both kinds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from torch import Tensor, nn

from natgrad.datapoints import (
    FisherType,
    check_fisher,
    needs_extra_backprop,
    output_vectors,
    per_token,
    row_multipliers,
    row_weight,
    target_coefficients,
)
from natgrad.linalg import (
    SolveReport,
    damped_solve,
    damped_solves,
    furthest_fallback,
    mirror_upper_,
)
from natgrad.precond.base import Preconditioner
from natgrad.precond.blocks import Block, add_into
from natgrad.precond.checks import Damping, check_count

Structure = Literal["full", "layer"]
STRUCTURES: tuple[Structure, ...] = get_args(Structure)
BATCHED_SOLVE_ENTRIES = 2**20
"""Matrix entries (float64: 8 MiB) of the layer systems solved together in one batch."""


class NGD(Preconditioner):
    """Damped mini-batch natural gradient of any Fisher type, solved by Woodbury.

    Exact on models built from ``nn.Linear``, ``nn.Conv2d``, ``nn.Embedding``, normalisation
    layers (``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.BatchNorm*d``; train-mode BatchNorm as
    defined in :mod:`natgrad.direct`) and any other trainable tensor (the torch.func fallback).

    Parameters
    ----------
    model
        The model; its forward pass must return the logits ``(N, C)``.
    fisher
        ``"empirical"`` (EF), ``"ief"`` (the iEF update, Wu et al. 2024, eq. 19),
        ``"ief_matrix"`` (the gradient preconditioned by the damped iEF matrix), ``"mc"``
        (``F(M)`` with ``mc_samples`` sampled labels per datapoint) or ``"exact"`` (the exact
        Fisher / GGN of the batch). See :mod:`natgrad.datapoints`.
    structure
        ``"full"`` (one solve over all preconditioned modules) or ``"layer"`` (block-diagonal,
        one block per module).
    damping
        ``λ > 0``, or a callable ``step -> λ``.
    mc_samples
        ``M >= 1``, the labels sampled per datapoint for ``fisher="mc"``.
    **options
        The options every preconditioner takes (:class:`~natgrad.precond.base.Preconditioner`:
        ``likelihood``, ``reduction``, ``unsupported``, ``overrides``, ``seed``,
        ``process_group``, ``fallback_chunk_size``), and ``distributed``: ``"auto"``,
        ``"off"``, ``"global"`` (every rank solves the system of the global batch from
        all-gathered rows) or ``"local"`` (each rank solves its shard, the directions are
        averaged); see :mod:`natgrad.distributed`.
    """

    per_sample_blocks = True
    gathers_rows = True
    distributed_modes = ("global", "local")

    def __init__(
        self,
        model: nn.Module,
        *,
        fisher: FisherType = "empirical",
        structure: Structure = "full",
        damping: Damping = 1e-3,
        mc_samples: int = 1,
        **options: Any,
    ) -> None:
        self.fisher = check_fisher(fisher)
        if structure not in STRUCTURES:
            raise ValueError(f"unknown structure={structure!r}: choose one of {STRUCTURES}")
        self.structure = structure
        self.mc_samples = check_count(mc_samples, "mc_samples")
        self._loss_output_grad: Tensor | None = None
        super().__init__(model, damping=damping, **options)

    def _settings(self) -> str:
        settings = f"fisher={self.fisher}, structure={self.structure}, " + super()._settings()
        if self.fisher == "mc":
            settings += f", mc_samples={self.mc_samples}"
        return settings

    def _on_output_grad(self, output: Tensor, grad: Tensor) -> None:
        if not (
            needs_extra_backprop(self.fisher)
            or self._per_token(output)
            or self.communicator.active  # the base class seeds the generator per rank and step
        ):
            # the user's backward pass gives every row: nothing to back-propagate here (and no
            # check of the logits, which guards only the sampling of labels)
            self._extra_grads = None
            self._extra_vectors = None
            return
        self._loss_output_grad = grad  # per-token true-label rows are built from it
        try:
            super()._on_output_grad(output, grad)
        finally:
            self._loss_output_grad = None

    def _per_token(self, logits: Tensor) -> bool:
        """Whether each token of token-level logits is a datapoint of its own."""
        return self.likelihood.datapoint == "token" and logits.dim() == 3

    def _extra_output_vectors(self, logits: Tensor) -> Tensor | None:
        if needs_extra_backprop(self.fisher):
            vectors = output_vectors(
                self.fisher, self.likelihood, logits, self.mc_samples, self.generator
            )
            # the exact Fisher's columns are per token already; sampled labels are split
            return (
                per_token(vectors) if self._per_token(logits) and self.fisher == "mc" else vectors
            )
        if not self._per_token(logits):
            return None
        # per-token datapoints: the loss gradient of each token position, back-propagated alone
        grad = self._loss_output_grad
        counted = self.likelihood.counted(logits, grad)
        factor = self.likelihood.reduction_factor(
            logits, self.reduction, *(() if counted is None else (counted,))
        )
        return per_token((grad / factor).unsqueeze(0))

    def _directions_to_average(self, batches: list[Block]) -> list[nn.Parameter]:
        if self.communicator.mode == "local":
            return [param for batch in batches for param in batch.parameters()]
        return []

    def _precondition(
        self, batches: list[Block], factor: float | Tensor, per_sample_output_grad: Tensor
    ) -> None:
        """Build each group's ``K N x K N`` system and solve the small ones together (one
        batched Cholesky for the blocks of ``structure="layer"``, up to
        :data:`BATCHED_SOLVE_ENTRIES` matrix entries at a time), then write the directions."""
        groups = [batches] if self.structure == "full" else [[batch] for batch in batches]
        damping = self.current_damping()
        weights = _datapoint_weights(factor, per_sample_output_grad)
        # one weight c for every datapoint (no data parallelism): the row scale is a number
        row_scale: float | Tensor = (
            math.sqrt(factor * row_weight(self.fisher, self.mc_samples))
            if not isinstance(factor, Tensor)
            else (weights * row_weight(self.fisher, self.mc_samples)).sqrt()
        )
        # the true-label rows' output gradients: one per datapoint, or per (token, sequence)
        row_grads, row_weights = per_sample_output_grad, weights
        if self._per_token(per_sample_output_grad):
            row_grads = per_sample_output_grad.transpose(0, 1).flatten(0, 1)
            row_weights = weights.repeat(per_sample_output_grad.shape[1])
        multipliers = row_multipliers(self.fisher, row_grads)
        target = None
        if not needs_extra_backprop(self.fisher):
            root_weights = (
                math.sqrt(factor) if not isinstance(factor, Tensor) else row_weights.sqrt()
            )
            target = target_coefficients(self.fisher, row_grads, root_weights)
        pending: list[_System] = []
        reports: list[SolveReport] = []

        def solve_pending() -> None:
            solutions, report = damped_solves([(s.curvature, s.rhs) for s in pending], damping)
            reports.append(report)
            for system, solution in zip(pending, solutions, strict=True):
                system.write(solution, weights, damping, target is None)
            pending.clear()

        for group in groups:
            rows, carried = zip(*(_curvature_rows(b, multipliers) for b in group), strict=True)
            sets, num = rows[0].shape[:2]
            scale = row_scale if isinstance(row_scale, float) else row_scale.repeat(sets)
            if _fewer_parameters_than(group, sets * num):
                unscaled = [e if c == 1.0 else e / c for e, c in zip(rows, carried, strict=True)]
                reports.append(
                    self._solve_in_parameter_space(group, unscaled, scale, weights, target, damping)
                )
                continue
            curvature = _scaled_curvature(group, rows, carried, scale)
            if target is None:
                rhs = scale * sum(
                    _times_loss_rows(b, e, c, weights)
                    for b, e, c in zip(group, rows, carried, strict=True)
                )
            else:
                rhs = target
            pending.append(_System(group, list(rows), list(carried), scale, curvature, rhs))
            if sum(system.curvature.numel() for system in pending) > BATCHED_SOLVE_ENTRIES:
                solve_pending()
        if pending:
            solve_pending()
        self.last_solve = furthest_fallback(reports)

    def _solve_in_parameter_space(
        self,
        group: list[Block],
        rows: list[Tensor],
        row_scale: float | Tensor,
        weights: Tensor,
        target: Tensor | None,
        damping: float,
    ) -> SolveReport:
        """The same damped system with the ``P x P`` curvature, when ``K N > P``; returns how
        the solve went. ``target``: the weighted target coefficients, or ``None`` when the
        rows are extra datapoints (``mc`` / ``exact``).

        Small models (few parameters, many datapoints) are cheaper and better conditioned this
        way: the Woodbury form divides by ``λ`` after a subtraction that loses digits when the
        ``K N`` datapoints span far fewer than ``K N`` directions.
        """
        if isinstance(row_scale, Tensor):
            row_scale = row_scale.unsqueeze(1)
        jacobian = row_scale * torch.cat(
            [b.per_datapoint_grads(e) for b, e in zip(group, rows, strict=True)], dim=1
        )
        if target is None:
            true_rows = torch.cat([b.per_datapoint_grads(b.loss_grads) for b in group], dim=1)
            rhs = weights @ true_rows
        else:
            rhs = jacobian.T @ target
        direction, report = damped_solve(jacobian.T @ jacobian, rhs, damping)
        offset = 0
        for batch in group:
            batch.write_flat(direction[offset : offset + batch.num_params])
            offset += batch.num_params
        return report


@dataclass
class _System:
    """One group's damped Woodbury system ``(curvature + λ I) x = rhs`` and what turns its
    solution into the group's direction."""

    group: list[Block]
    rows: list[Tensor]
    carried: list[float]
    """The factor each block's rows carry (:func:`_curvature_rows`)."""
    scale: float | Tensor
    curvature: Tensor
    rhs: Tensor

    def write(self, solution: Tensor, weights: Tensor, damping: float, extra: bool) -> None:
        """Write ``J^T u`` of the solution into the group's ``.grad``; ``extra``: the rows are
        extra datapoints (``mc``/``exact``), combined with the loss gradients (Woodbury)."""
        sets = self.rows[0].shape[0]
        if extra:
            extra_coefficients = (-self.scale * solution / damping).reshape(sets, -1)
            for batch, rows in zip(self.group, self.rows, strict=True):
                batch.write_combination(rows, extra_coefficients, weights / damping)
        else:
            coefficients = (self.scale * solution).reshape(sets, -1)
            for batch, rows, carried in zip(self.group, self.rows, self.carried, strict=True):
                batch.write_combination(
                    rows, coefficients if carried == 1.0 else coefficients / carried
                )


def _scaled_curvature(
    group: list[Block], rows: Sequence[Tensor], carried: Sequence[float], scale: float | Tensor
) -> Tensor:
    """``diag(s) (sum_b J_b J_b^T) diag(s)``, each block's Gram added in place to the first's
    (:func:`~natgrad.precond.blocks.add_into`), in the dtype the blocks' Grams and ``s``
    promote to; a number ``s`` scales every row alike. Block ``b``'s rows are ``carried[b]``
    times those of ``J_b``. The blocks' Grams need to be right only on and above the diagonal
    blocks (``upper=True``): their sum is mirrored onto the lower triangle once."""
    curvature = None
    for batch, batch_rows, factor in zip(group, rows, carried, strict=True):
        if factor == 1.0:
            curvature = batch.gram(batch_rows, into=curvature, upper=True)
        else:
            gram = batch.gram(batch_rows, upper=True).div_(factor**2)
            curvature = add_into(gram, curvature)
    mirror_upper_(curvature)
    if isinstance(scale, float):
        return curvature.mul_(scale * scale)
    curvature = curvature.to(torch.result_type(curvature, scale))
    return curvature.mul_(scale.unsqueeze(1)).mul_(scale)


def _fewer_parameters_than(group: list[Block], count: int) -> bool:
    """Whether the blocks of ``group`` hold fewer than ``count`` parameters, summed only as
    far as needed (usually the first layer decides)."""
    total = 0
    for batch in group:
        total += batch.num_params
        if total >= count:
            return False
    return True


def _times_loss_rows(batch: Block, rows: Tensor, carried: float, weights: Tensor) -> Tensor:
    """``J_e J_L^T w`` of curvature rows carrying the factor ``carried`` and the block's
    true-label rows (their own factor divided out through ``w``, without copying them)."""
    loss_rows, loss_factor = batch.loss_rows()
    return batch.gram_times(rows, loss_rows, weights / (carried * loss_factor))


def _datapoint_weights(factor: float | Tensor, per_sample_output_grad: Tensor) -> Tensor:
    """``c_n`` of every datapoint, ``(N,)``: the reduction factor, or the given weights."""
    if isinstance(factor, Tensor):
        return factor
    return per_sample_output_grad.new_full((per_sample_output_grad.shape[0],), factor)


def _curvature_rows(batch: Block, multipliers: Tensor | None) -> tuple[Tensor, float]:
    """The rows of the curvature and the factor ``c`` they carry (the rows are ``c`` times
    those of ``J``): extra datapoints (``mc``, ``exact``, per-token true-label rows), or the
    true-label rows as the loss gave them (:meth:`~natgrad.precond.blocks.LayerBatch.loss_rows`,
    not copied to divide ``c`` out), each scaled by its datapoint's multiplier (``ief_matrix``,
    one per row in row order; ``c`` folded into them)."""
    if batch.extra_grads is not None:
        rows, carried = batch.extra_grads, 1.0
    else:
        rows, carried = batch.loss_rows()
    if multipliers is None:
        return rows, carried
    trailing = (1,) * (rows.dim() - 2)
    return rows * (multipliers / carried).reshape(rows.shape[0], rows.shape[1], *trailing), 1.0


class EF(NGD):
    """Empirical-Fisher natural gradient (Wu et al. 2024, eq. 17): ``NGD(fisher="empirical")``.

    Options as for :class:`NGD`, without ``fisher`` and ``mc_samples``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        structure: Structure = "full",
        damping: Damping = 1e-3,
        **options: Any,
    ) -> None:
        super().__init__(model, fisher="empirical", structure=structure, damping=damping, **options)


class IEF(NGD):
    """Improved empirical Fisher (Wu et al. 2024, eq. 19): ``NGD(fisher="ief")``.

    Options as for :class:`NGD`, without ``fisher`` and ``mc_samples``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        structure: Structure = "full",
        damping: Damping = 1e-3,
        **options: Any,
    ) -> None:
        super().__init__(model, fisher="ief", structure=structure, damping=damping, **options)


class TENGraD(NGD):
    """Exact per-layer (block-diagonal) natural gradient, Shrestha 2023, App. A.5 eq. 39-43
    (TENGraD: Soori et al. 2021).

    ``NGD(structure="layer")``; the paper uses the empirical Fisher (eq. 37), the default here,
    and any other ``fisher`` gives block-diagonal NGD of that type. Options as for
    :class:`NGD`, without ``structure``.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        fisher: FisherType = "empirical",
        damping: Damping = 1e-3,
        mc_samples: int = 1,
        **options: Any,
    ) -> None:
        super().__init__(
            model,
            fisher=fisher,
            structure="layer",
            damping=damping,
            mc_samples=mc_samples,
            **options,
        )


__all__ = ["EF", "IEF", "NGD", "STRUCTURES", "Structure", "TENGraD"]
