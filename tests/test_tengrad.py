"""TENGraD (block-diagonal NGD; Shrestha 2023, eq. 39-43, after Soori et al. 2021) against the
dense formula ``Δ = (blockdiag_l(c Σ_n g_n g_n^T) + λ I)^{-1} ∇L`` in float64, on both of its
solve paths: the ``N x N`` Woodbury system of a layer with more parameters than datapoints, and
the ``P x P`` system of a layer with fewer (R12's batches of 128 on layers of 15-71
parameters take the latter). test_woodbury.py's problems have 5-7 datapoints on layers of 9 or
more parameters, so its TENGraD cases never reach the ``P x P`` path."""

from __future__ import annotations

import pytest
import torch
from curvlinops import EFLinearOperator
from torch import nn

import natgrad
from oracle import dense_batch, expected_update, flat_grad, relative_error
from problems import make_targets, run_natgrad

# layer sizes 15 and 12: N = 5 takes Woodbury in both layers, 13 Woodbury in the first and
# P x P in the second, 40 P x P in both
DATAPOINTS = [5, 13, 40]
TOLERANCE = 1e-8

pytestmark = pytest.mark.usefixtures("float64")


def _problem(num: int, likelihood: str) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(num)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3))
    return model, torch.randn(num, 4), make_targets(likelihood, num, 3)


def _tengrad_update(model, inputs, targets, likelihood, reduction, damping, fused=False):
    return run_natgrad(
        model, inputs, targets, likelihood, reduction, fused=fused,
        preconditioner=natgrad.TENGraD, damping=damping,
    )[0]  # fmt: skip


def _blocks(model: nn.Module) -> list[list[nn.Parameter]]:
    return [list(m.parameters()) for m in model if list(m.parameters())]


@pytest.mark.parametrize("damping", [1e-3, 1e-1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
@pytest.mark.parametrize("num", DATAPOINTS)
def test_tengrad_matches_dense_block_diagonal_ef(num, likelihood, reduction, damping):
    model, inputs, targets = _problem(num, likelihood)
    actual = _tengrad_update(model, inputs, targets, likelihood, reduction, damping)
    batch = dense_batch(model, inputs, targets, likelihood, reduction)
    expected = expected_update(batch, "empirical", "layer", damping, _blocks(model))
    assert relative_error(actual, expected) <= TOLERANCE


@pytest.mark.parametrize("num", DATAPOINTS)
def test_tengrad_matches_curvlinops_block_diagonal_ef(num):
    """A second oracle: curvlinops' empirical Fisher (mean reduction, categorical), restricted
    to the layers' diagonal blocks."""
    model, inputs, targets = _problem(num, "categorical")
    params = list(model.parameters())
    loss_function = nn.CrossEntropyLoss()
    operator = EFLinearOperator(
        model, loss_function, params, [(inputs, targets)], check_deterministic=False
    )
    size = sum(p.numel() for p in params)
    mask = torch.block_diag(*(torch.ones(n, n) for n in (15, 12)))
    curvature = (operator @ torch.eye(size)) * mask
    model.zero_grad()
    loss_function(model(inputs), targets).backward()
    gradient = flat_grad(params)
    damping = 1e-3
    expected = torch.linalg.solve(curvature + damping * torch.eye(size), gradient)
    actual = _tengrad_update(model, inputs, targets, "categorical", "mean", damping)
    assert relative_error(actual, expected) <= TOLERANCE


@pytest.mark.parametrize("likelihood", ["categorical", "gaussian"])
@pytest.mark.parametrize("num", DATAPOINTS)
def test_tengrad_fused_backward_equals_standard_path(num, likelihood):
    model, inputs, targets = _problem(num, likelihood)
    updates = [
        _tengrad_update(model, inputs, targets, likelihood, "mean", 1e-3, fused=fused)
        for fused in (False, True)
    ]
    assert torch.equal(updates[0], updates[1])
