"""How far FishLeg's learned ``Q(λ)`` has moved and how well it inverts the damped Fisher.

FishLeg (Garcia et al. 2023, eq. 10-14) learns ``Q(λ) ≈ (F + γI)^{-1}`` by minimising an
auxiliary loss with Adam; ``Q`` starts at ``Q_0 = s I`` (``s = init_scale``). A ``Q`` that never
learned makes FishLeg momentum SGD with step ``η s``, which training curves alone do not show.
These measurements make it visible:

* :func:`q_movement`: ``‖Q − Q_0‖_F / ‖Q_0‖_F`` over all preconditioned layers (``Q`` is
  block-diagonal, one block per layer), from the Kronecker identities
  ``‖A ⊗ B‖_F = ‖A‖_F ‖B‖_F`` and ``tr(A ⊗ B) = tr A tr B``, so no block is formed;
* :func:`q_eigenvalue_range`: the smallest and largest eigenvalue of ``Q`` (a Kronecker
  block's eigenvalues are the products of its factors' eigenvalues);
* :func:`q_alignment`: the cosine between ``Q u`` and ``(F + γI)^{-1} u`` for a direction ``u``,
  ``F`` the exact Fisher of a probe batch restricted to the preconditioned layers (solved by
  conjugate gradients on Fisher-vector products): 1 when ``Q`` inverts the damped Fisher along
  ``u``; it comes with the relative residual the solve reached, so an unconverged solve is
  visible.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from natgrad.analysis.quality import BatchFisher, cosine_similarity, natural_gradient_cg

if TYPE_CHECKING:
    from natgrad.precond.fishleg import FishLeg


@dataclass(frozen=True)
class QQuality:
    """The measurements of one FishLeg ``Q`` (see the module docstring)."""

    movement: float
    smallest_eigenvalue: float
    largest_eigenvalue: float
    alignment: float | None = None
    alignment_residual: float | None = None


def _factor_grams(pre: FishLeg, name: str) -> tuple[Tensor, ...]:
    """``(L Lᵀ, R Rᵀ)`` of a Kronecker block, or ``(q ⊙ q,)`` of a diagonal one."""
    with torch.no_grad():
        if pre.q_structure == "diag":
            (scale,) = pre.aux_params[name]
            return (scale * scale,)
        return tuple(torch.tril(p) @ torch.tril(p).T for p in pre.aux_params[name])


def q_movement(pre: FishLeg) -> float:
    """``‖Q − s I‖_F / ‖s I‖_F`` over every layer FishLeg preconditions."""
    scale, squared, size = pre.init_scale, 0.0, 0
    for name in pre.aux_params:
        grams = _factor_grams(pre, name)
        if len(grams) == 1:
            (diagonal,) = grams
            squared += float((diagonal.double() - scale).pow(2).sum())
            size += diagonal.numel()
        else:
            left, right = (g.double() for g in grams)
            squared += float(
                left.pow(2).sum() * right.pow(2).sum()
                - 2 * scale * left.trace() * right.trace()
                + scale**2 * left.shape[0] * right.shape[0]
            )
            size += left.shape[0] * right.shape[0]
    return math.sqrt(max(squared, 0.0)) / (scale * math.sqrt(size))


def q_eigenvalue_range(pre: FishLeg) -> tuple[float, float]:
    """The smallest and largest eigenvalue of ``Q`` over every preconditioned layer."""
    smallest, largest = math.inf, -math.inf
    for name in pre.aux_params:
        grams = _factor_grams(pre, name)
        if len(grams) == 1:
            values = grams[0].reshape(-1)
            low, high = float(values.min()), float(values.max())
        else:
            left, right = (torch.linalg.eigvalsh(g.double()) for g in grams)
            low, high = float(left[0] * right[0]), float(left[-1] * right[-1])
        smallest, largest = min(smallest, low), max(largest, high)
    return smallest, largest


def _layer_parameters(pre: FishLeg, name: str) -> list[nn.Parameter]:
    module = pre.selection.layers[name]
    return [module.weight, module.bias] if pre._has_bias(name) else [module.weight]


def layer_matrices(pre: FishLeg, blocks: dict[nn.Parameter, Tensor]) -> dict[str, Tensor]:
    """Parameter-shaped blocks (e.g. gradients) as the ``(d_out, d_in [+1])`` matrices ``Q``
    acts on, one per preconditioned layer (bias as the last column)."""
    matrices = {}
    for name in pre.aux_params:
        module, adapter = pre.selection.layers[name], pre.adapters[name]
        parts = [adapter.to_matrix(module, blocks[module.weight])]
        if pre._has_bias(name):
            parts.append(blocks[module.bias].unsqueeze(1))
        matrices[name] = torch.cat(parts, dim=1)
    return matrices


def _parameter_blocks(pre: FishLeg, matrices: dict[str, Tensor]) -> dict[nn.Parameter, Tensor]:
    blocks = {}
    for name, matrix in matrices.items():
        module, adapter = pre.selection.layers[name], pre.adapters[name]
        d_weight = adapter.matrix_shape(module)[1]
        blocks[module.weight] = adapter.to_weight(module, matrix[:, :d_weight])
        if pre._has_bias(name):
            blocks[module.bias] = matrix[:, d_weight]
    return blocks


def q_alignment(
    pre: FishLeg,
    inputs: Tensor | tuple,
    direction: dict[str, Tensor],
    tolerance: float = 1e-6,
    max_iterations: int | None = None,
) -> tuple[float, float]:
    """``cos(Q u, (F + γI)^{-1} u)`` on the probe batch ``inputs``, and the relative residual
    ``‖(F + γI) x − u‖ / ‖u‖`` of the conjugate-gradient solution ``x``.

    Parameters
    ----------
    pre
        The FishLeg preconditioner.
    inputs
        Model inputs of the probe batch (a tensor or a tuple of forward arguments); the exact
        Fisher of this batch, of the loss as ``pre`` reduces it, is the ``F`` compared with.
    direction
        ``u`` per preconditioned layer, as :func:`layer_matrices` shapes it (e.g. the loss
        gradient of the probe batch, the kind of direction FishLeg's auxiliary loss uses).
    tolerance, max_iterations
        Of the conjugate-gradient solve (relative residual; default ``10 P`` iterations).
    """
    missing = set(pre.aux_params) - set(direction)
    if missing:
        raise ValueError(f"direction lacks the layers {sorted(missing)}")
    params = [p for name in pre.aux_params for p in _layer_parameters(pre, name)]
    fisher = BatchFisher(pre.model, inputs, pre.likelihood, pre.reduction, params=params)
    with torch.no_grad():
        products = {name: pre.apply_q(name, direction[name]) for name in pre.aux_params}

    def flat(matrices: dict[str, Tensor]) -> Tensor:
        blocks = _parameter_blocks(pre, matrices)
        return torch.cat([blocks[p].reshape(-1) for p in fisher.params.values()])

    target, damping = flat(direction), pre.current_damping()
    with pre.capture.paused():
        solved = natural_gradient_cg(fisher, target, damping, tolerance, max_iterations)
        residual = fisher.matvec(solved) + damping * solved - target
    return cosine_similarity(flat(products), solved), float(residual.norm() / target.norm())


def q_quality(
    pre: FishLeg,
    inputs: Tensor | tuple | None = None,
    direction: dict[str, Tensor] | None = None,
    max_iterations: int | None = None,
) -> QQuality:
    """:func:`q_movement`, :func:`q_eigenvalue_range` and, given a probe batch and a
    direction, :func:`q_alignment` (at most ``max_iterations`` conjugate-gradient steps)."""
    smallest, largest = q_eigenvalue_range(pre)
    alignment = residual = None
    if inputs is not None and direction is not None:
        alignment, residual = q_alignment(pre, inputs, direction, max_iterations=max_iterations)
    return QQuality(q_movement(pre), smallest, largest, alignment, residual)


__all__ = [
    "QQuality",
    "layer_matrices",
    "q_alignment",
    "q_eigenvalue_range",
    "q_movement",
    "q_quality",
]
