"""curvlinops as a second, independent oracle: its dense GGN and EF give natgrad's updates."""

from __future__ import annotations

import pytest
import torch
from curvlinops import EFLinearOperator, GGNLinearOperator
from torch import nn

from oracle import relative_error
from problems import MODELS, make_targets, run_natgrad

LOSSES = {
    "categorical": nn.CrossEntropyLoss,
    "gaussian": nn.MSELoss,
    "bernoulli": nn.BCEWithLogitsLoss,
}
OPERATORS = {"exact": GGNLinearOperator, "empirical": EFLinearOperator}


pytestmark = pytest.mark.usefixtures("float64")


def dense_operator(operator, model, loss_function, params, inputs, targets):
    linear_operator = operator(
        model, loss_function, params, [(inputs, targets)], check_deterministic=False
    )
    return linear_operator @ torch.eye(sum(p.numel() for p in params))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("likelihood", sorted(LOSSES))
@pytest.mark.parametrize("model_name", ["mlp", "cnn"])
@pytest.mark.parametrize("structure", ["full", "layer"])
@pytest.mark.parametrize("fisher", sorted(OPERATORS))
def test_update_matches_curvlinops(fisher, structure, model_name, likelihood, reduction):
    torch.manual_seed(10)
    model, inputs = MODELS[model_name](3)
    targets = make_targets(likelihood, inputs.shape[0], 3)
    params = [p for p in model.parameters() if p.requires_grad]
    loss_function = LOSSES[likelihood](reduction=reduction)
    curvature = dense_operator(OPERATORS[fisher], model, loss_function, params, inputs, targets)

    model.zero_grad()
    loss_function(model(inputs), targets).backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in params])
    if structure == "layer":
        sizes = [sum(p.numel() for p in m.parameters()) for m in model if list(m.parameters())]
        blocks = [torch.ones(size, size) for size in sizes]
        curvature = curvature * torch.block_diag(*blocks)
    damping = 1e-2
    expected = torch.linalg.solve(curvature + damping * torch.eye(len(gradient)), gradient)

    actual, _ = run_natgrad(
        model,
        inputs,
        targets,
        likelihood,
        reduction,
        fisher=fisher,
        structure=structure,
        damping=damping,
    )
    assert relative_error(actual, expected) <= 1e-8
