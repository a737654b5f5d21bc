"""The Woodbury solve reads each layer's loss rows with the reduction factor still in them.

``LayerBatch`` keeps the output-gradient rows as the loss's backward pass gave them (times the
reduction factor ``c``) and the solve folds ``1 / c`` into its Gram, right-hand side and
``J^T u`` coefficients instead of copying the rows (:meth:`natgrad.precond.blocks.LayerBatch
.loss_rows`). Checked against dense float64 oracles (``tests/oracle.py``) where ``c`` is not
one (mean reduction) and changes from step to step (the batch size changes, so does the
mean's ``1 / N``), on both paths, and in the parameter-space solve used when the datapoints
outnumber the parameters.
"""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from oracle import dense_batch, expected_update, flat_grad, relative_error

pytestmark = pytest.mark.usefixtures("float64")

TOLERANCE = 1e-8
DAMPING = 1e-2
BATCH_SIZES = (5, 3, 5)  # a change of batch size, and a step after it back to the first


def conv_model() -> nn.Module:
    """Conv (with bias) -> BatchNorm2d (eval, random statistics) -> Tanh -> Conv (no bias) ->
    Linear: neuron-view rows with ``c`` carried beside the BatchNorm's direct rows."""
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.Conv2d(3, 2, 2, stride=2, bias=False),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    with torch.no_grad():
        model[1].running_mean.copy_(torch.randn(3))
        model[1].running_var.copy_(torch.rand(3) + 0.5)
        model[1].weight.copy_(torch.randn(3))
        model[1].bias.copy_(torch.randn(3))
    return model.eval()


def module_blocks(model: nn.Module) -> list[list[nn.Parameter]]:
    """One block per module (natgrad's ``structure="layer"``)."""
    return [
        list(m.parameters(recurse=False))
        for m in model.modules()
        if any(True for _ in m.parameters(recurse=False))
    ]


def natgrad_step(pre: natgrad.NGD, model: nn.Module, inputs, targets, fused: bool):
    model.zero_grad(set_to_none=True)
    logits = model(inputs)
    loss = F.cross_entropy(logits, targets)
    if fused:
        pre.backward(loss)
    else:
        loss.backward()
    pre.step(logits)
    return flat_grad(list(model.parameters())).clone()


@pytest.mark.parametrize("structure", ["full", "layer"])
@pytest.mark.parametrize("fisher", ["empirical", "ief", "ief_matrix", "exact"])
def test_steps_with_changing_batch_sizes_match_the_dense_oracle(fisher, structure):
    """One preconditioner over batches of 5, 3 and 5 datapoints (``c`` = 1/5, 1/3, 1/5), fused
    and standard path: every step's update is the oracle's, and the paths agree."""
    torch.manual_seed(0)
    model = conv_model()
    batches = [(torch.randn(n, 2, 4, 4), torch.randint(0, 3, (n,))) for n in BATCH_SIZES]
    updates = {}
    for fused in (False, True):
        pre = natgrad.NGD(model, fisher=fisher, structure=structure, damping=DAMPING)
        updates[fused] = [natgrad_step(pre, model, x, y, fused) for x, y in batches]
        pre.remove()
    for (inputs, targets), standard, fused in zip(
        batches, updates[False], updates[True], strict=True
    ):
        batch = dense_batch(model, inputs, targets, "categorical", "mean")
        expected = expected_update(batch, fisher, structure, DAMPING, module_blocks(model))
        assert relative_error(standard, expected) <= TOLERANCE
        assert relative_error(fused, standard) <= 1e-12


@pytest.mark.parametrize("fisher", ["empirical", "ief", "exact"])
def test_parameter_space_solve_divides_the_reduction_factor_out(fisher):
    """24 datapoints, 20 parameters: the solve runs in parameter space on the materialised
    datapoint gradients, which must be those of ``l_n`` (``c`` = 1/24 divided out)."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 1, 2), nn.Tanh(), nn.Flatten(), nn.Linear(4, 3))
    inputs, targets = torch.randn(24, 1, 3, 3), torch.randint(0, 3, (24,))
    assert sum(p.numel() for p in model.parameters()) < inputs.shape[0]
    pre = natgrad.NGD(model, fisher=fisher, damping=DAMPING)
    actual = natgrad_step(pre, model, inputs, targets, fused=False)
    batch = dense_batch(model, inputs, targets, "categorical", "mean")
    expected = expected_update(batch, fisher, "full", DAMPING, module_blocks(model))
    assert relative_error(actual, expected) <= TOLERANCE


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_the_solve_runs_after_the_captured_layer_outputs_are_freed(fisher, fused, monkeypatch):
    """Once the blocks are built, the step lets go of what no block reads (here the
    BatchNorm's output, which nothing else holds: Tanh keeps its own output), so the solve's
    tensors can reuse that memory; the update is still the oracle's."""
    torch.manual_seed(0)
    model = conv_model()
    pre = natgrad.NGD(model, fisher=fisher, damping=DAMPING)
    outputs: list[weakref.ref] = []
    model[1].register_forward_hook(lambda module, args, out: outputs.append(weakref.ref(out)))
    alive_in_solve = []
    solve = pre._precondition

    def spy(*args):
        alive_in_solve.append(outputs[-1]() is not None)
        solve(*args)

    monkeypatch.setattr(pre, "_precondition", spy)
    inputs, targets = torch.randn(5, 2, 4, 4), torch.randint(0, 3, (5,))
    update = natgrad_step(pre, model, inputs, targets, fused)
    pre.remove()
    assert alive_in_solve == [False]
    batch = dense_batch(model, inputs, targets, "categorical", "mean")
    expected = expected_update(batch, fisher, "full", DAMPING, module_blocks(model))
    assert relative_error(update, expected) <= TOLERANCE
