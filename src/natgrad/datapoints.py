"""Datapoints of each Fisher type: which output gradients define the curvature rows.

Every Fisher type of natgrad is a sum of outer products of datapoint gradients
``g = sum_t e_t a_t^T``; the types differ only in the output-side vectors back-propagated for
each input ``x_n`` (DESIGN.md, "the neuron view"):

=============  ==============================================================  ==========
fisher         output gradient(s) per input ``x_n``                            row weight
=============  ==============================================================  ==========
``empirical``  ``d l / d z_n`` at the true label (Wu et al. 2024, eq. 17)      1
``ief``        as ``empirical``; the right-hand side is scaled by              1
               ``s_n = ||d l_n / d z_n||^2`` (Wu et al. 2024, eq. 6, 19)
``ief_matrix`` as ``empirical``, each row divided by ``sqrt(s_n)``: the iEF    1
               matrix ``J^T diag(s)^{-1} J`` (Wu et al. 2024, eq. 5, 20)
``mc``         ``d l / d z_n`` at ``M`` labels ``y ~ p(y | x_n)``              ``1 / M``
               (Wu et al. 2024, eq. 22-24)
``exact``      the columns of ``S_n``, ``S_n S_n^T = d^2 l / d z_n^2`` (the    1
               GGN form of the Fisher, Kunstner et al. 2019, eq. 26-35;
               Benzing 2022, eq. 19-20)
=============  ==============================================================  ==========

``ief`` is the iEF update of Wu et al. 2024, eq. 19, ``J^T (J J^T + λI)^{-1} s``: the minimum-norm
step that lowers each datapoint's loss in proportion to ``s_n``. ``ief_matrix`` preconditions
the gradient with the damped iEF matrix, ``(J^T diag(s)^{-1} J + λI)^{-1} ∇L``. The two agree as
``λ → 0`` when ``N <= P``; for least squares the iEF matrix is the Fisher (Wu et al. 2024, sec.
2.2), so ``ief_matrix`` then equals exact NGD at any damping, also when ``N > P``. ``ief_matrix``
rows are what Kronecker methods "with iEF" use (Wu et al. 2024, sec. 5).

The true-label rows come from the user's own backward pass; the ``mc`` and ``exact`` rows
from one extra, batched backward pass from the model output (see
:meth:`natgrad.capture.Capture.backprop_to_layers`).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from torch import Tensor

from natgrad.likelihoods import Likelihood

FisherType = Literal["exact", "mc", "empirical", "ief", "ief_matrix"]
FISHER_TYPES: tuple[FisherType, ...] = get_args(FisherType)


def check_fisher(fisher: str) -> str:
    """Return ``fisher`` if it names a Fisher type, else raise a ValueError."""
    if fisher not in FISHER_TYPES:
        raise ValueError(f"unknown fisher={fisher!r}: choose one of {FISHER_TYPES}")
    return fisher


def needs_extra_backprop(fisher: str) -> bool:
    """Whether the type's rows differ from the true-label gradients of the loss."""
    return fisher in ("mc", "exact")


def output_vectors(
    fisher: str,
    likelihood: Likelihood,
    logits: Tensor,
    mc_samples: int,
    generator: torch.Generator | None,
) -> Tensor:
    """Output gradients to back-propagate for ``mc`` or ``exact``, shape ``(K, *logits.shape)``.

    They are gradients of the per-datapoint loss ``l_n`` (no reduction factor).
    """
    if fisher == "mc":
        return likelihood.sampled_output_grads(logits, mc_samples, generator)
    if fisher == "exact":
        return likelihood.hessian_sqrt(logits)
    raise ValueError(f"fisher={fisher!r} uses the true-label gradients, not extra vectors")


def per_token(vectors: Tensor) -> Tensor:
    """Output vectors ``(K, N, T, C)`` split by token position: ``(K T, N, T, C)``, vector
    ``k T + τ`` equal to vector ``k`` at token ``τ`` and zero elsewhere, so that each
    back-propagated vector gives every sequence's row of its token ``τ`` (per-token
    datapoints, :attr:`natgrad.likelihoods.Likelihood.datapoint`)."""
    sets, num, tokens, classes = vectors.shape
    at_token = torch.eye(tokens, dtype=vectors.dtype, device=vectors.device)
    split = vectors.unsqueeze(1) * at_token.reshape(1, tokens, 1, tokens, 1)
    return split.reshape(sets * tokens, num, tokens, classes)


def row_weight(fisher: str, mc_samples: int) -> float:
    """Weight of each datapoint's outer product in the curvature matrix."""
    return 1.0 / mc_samples if fisher == "mc" else 1.0


def target_coefficients(
    fisher: str, per_sample_output_grad: Tensor, scale: float | Tensor = 1.0
) -> Tensor:
    """``b`` of the right-hand side ``J^T b`` (true-label rows, before any row scaling), times
    ``scale`` (a number, or one per datapoint).

    ``J^T 1`` is the gradient of the summed loss (``empirical``, Wu et al. 2024, eq. 17);
    ``J^T s_iEF`` is the iEF right-hand side (``ief``, Wu et al. 2024, eq. 19) with
    ``s_n = ||d l_n / d z_n||^2`` (eq. 6). For ``ief_matrix`` the rows are divided by
    ``sqrt(s_n)``, so ``b = sqrt(s)`` gives back ``J^T 1``.
    """
    if fisher == "empirical":
        num = per_sample_output_grad.shape[0]
        if not isinstance(scale, Tensor):  # one call: the scale itself, N times
            return per_sample_output_grad.new_full((num,), scale)
        coefficients = per_sample_output_grad.new_ones(num)
    elif fisher == "ief":
        coefficients = Likelihood.logits_grad_norms_sq(per_sample_output_grad)
    elif fisher == "ief_matrix":
        coefficients = Likelihood.logits_grad_norms_sq(per_sample_output_grad).sqrt_()
    else:
        raise ValueError(f"fisher={fisher!r} has no right-hand side in the span of its rows")
    # a number scales the new tensor in place; weights promote it as a product does
    return coefficients * scale if isinstance(scale, Tensor) else coefficients.mul_(scale)


def row_multipliers(fisher: str, per_sample_output_grad: Tensor) -> Tensor | None:
    """Per-datapoint factors of the true-label rows: ``1 / sqrt(s_n)`` for ``ief_matrix``.

    A datapoint with ``s_n = 0`` has a zero gradient row; its factor is set to zero.
    """
    if fisher != "ief_matrix":
        return None
    norms = Likelihood.logits_grad_norms_sq(per_sample_output_grad).sqrt()
    return torch.where(norms > 0, 1 / norms.clamp_min(torch.finfo(norms.dtype).tiny), 0.0)


__all__ = [
    "FISHER_TYPES",
    "FisherType",
    "check_fisher",
    "needs_extra_backprop",
    "output_vectors",
    "per_token",
    "row_multipliers",
    "row_weight",
    "target_coefficients",
]
