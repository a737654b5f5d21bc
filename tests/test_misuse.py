"""Misuse that real training loops run into gets the right diagnosis (issue 15).

A deleted preconditioner takes its hooks with it, a second live one on the same model is
refused, and calling ``step()`` twice, after a forward pass without gradients or on the meta
device, a Bernoulli loss that is not the declared one and a Gaussian target broadcast to
``N x N`` pairs each get a message saying what happened.
"""

from __future__ import annotations

import copy
import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from oracle import flat_grad

pytestmark = pytest.mark.usefixtures("float64")

METHODS = {
    "ngd-exact": lambda model: natgrad.NGD(model, fisher="exact"),
    "ngd-mc": lambda model: natgrad.NGD(model, fisher="mc", mc_samples=2),
    "ef": natgrad.EF,
    "ief": natgrad.IEF,
    "tengrad": natgrad.TENGraD,
    "kfac": natgrad.KFAC,
    "foof": natgrad.FOOF,
    "fishleg": lambda model: natgrad.FishLeg(model, aux_period=1),
}


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3))


def batch(num: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(num, 4), torch.randint(0, 3, (num,))


def hook_count(model: nn.Module) -> int:
    """Every module hook of the model and its submodules."""
    return sum(
        len(module._forward_hooks)
        + len(module._forward_pre_hooks)
        + len(module._backward_hooks)
        + len(module._backward_pre_hooks)
        for module in model.modules()
    )


def train_step(model, pre, inputs, targets) -> torch.Tensor:
    model.zero_grad()
    logits = model(inputs)
    F.cross_entropy(logits, targets).backward()
    pre.step(logits)
    return logits


@pytest.mark.parametrize("method", sorted(METHODS))
def test_garbage_collected_preconditioner_leaves_no_hook(method):
    torch.manual_seed(0)
    model = make_model()
    pre = METHODS[method](model)
    assert hook_count(model) > 0
    train_step(model, pre, *batch())
    del pre
    gc.collect()
    assert hook_count(model) == 0


def test_preconditioner_after_a_deleted_one_gives_a_fresh_update():
    """Exact NGD, deleted, then EF on the same model (a notebook cell re-run with another
    method): EF's update is that of EF on a fresh copy, not one seeing NGD's extra passes."""
    torch.manual_seed(1)
    model = make_model()
    inputs, targets = batch()
    pre = natgrad.NGD(model, fisher="exact")
    train_step(model, pre, inputs, targets)
    del pre
    gc.collect()
    twin = copy.deepcopy(model)
    train_step(model, natgrad.EF(model), inputs, targets)
    train_step(twin, natgrad.EF(twin), inputs, targets)
    assert torch.equal(flat_grad(list(model.parameters())), flat_grad(list(twin.parameters())))


def test_second_live_preconditioner_names_the_first_and_remove():
    model = make_model()
    pre = natgrad.NGD(model, fisher="exact")
    with pytest.raises(RuntimeError, match=r"already has a live natgrad preconditioner, NGD\("):
        natgrad.EF(model)
    with pytest.raises(RuntimeError, match=r"fisher=exact.*Call remove\(\) on the existing NGD"):
        natgrad.KFAC(model)
    with pytest.raises(RuntimeError, match="already has a live natgrad preconditioner"):
        natgrad.EF(model[3])  # a layer the first one captures
    pre.remove()
    assert hook_count(model) == 0
    natgrad.EF(model)  # now accepted


def test_step_twice_says_so():
    model = make_model()
    pre = natgrad.EF(model)
    logits = train_step(model, pre, *batch())
    with pytest.raises(RuntimeError, match=r"step\(\) was already called for these logits"):
        pre.step(logits)


def test_forward_without_gradients_for_logging_is_ignored():
    torch.manual_seed(2)
    model = make_model()
    twin = copy.deepcopy(model)
    inputs, targets = batch()
    train_step(twin, natgrad.IEF(twin), inputs, targets)
    expected = flat_grad(list(twin.parameters()))
    pre = natgrad.IEF(model)
    logits = model(inputs)
    F.cross_entropy(logits, targets).backward()
    with torch.no_grad():
        logged = model(torch.randn(3, 4))  # e.g. a validation batch for logging
    with pytest.raises(ValueError, match=r"were computed without gradients .*torch\.no_grad"):
        pre.step(logged)
    pre.step(logits)
    assert torch.equal(flat_grad(list(model.parameters())), expected)


def test_meta_device_is_named():
    with pytest.raises(ValueError, match=r"on the meta device .*'0\.weight'.*to_empty"):
        natgrad.EF(make_model().to("meta"))
    model = make_model()
    pre = natgrad.EF(model)
    model.to("meta")
    logits = model(torch.randn(6, 4, device="meta"))
    F.cross_entropy(logits, torch.zeros(6, dtype=torch.long, device="meta")).backward()
    with pytest.raises(ValueError, match="on the meta device"):
        pre.step(logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bernoulli_loss_as_declared_passes(reduction, dtype):
    torch.manual_seed(3)
    model = nn.Linear(4, 3).to(dtype)
    pre = natgrad.EF(model, likelihood="bernoulli", reduction=reduction)
    inputs = torch.randn(6, 4, dtype=dtype)
    for targets in [torch.rand(6, 3, dtype=dtype), torch.randint(0, 2, (6, 3)).to(dtype)]:
        model.zero_grad()
        logits = model(inputs * 10)  # confident outputs: implied targets near 0 and 1
        F.binary_cross_entropy_with_logits(logits, targets, reduction=reduction).backward()
        pre.step(logits)


@pytest.mark.parametrize(
    ("loss", "message"),
    [
        (
            lambda z, y: F.binary_cross_entropy_with_logits(z, y, reduction="sum"),
            r"reduction='mean': the targets it implies.*outside \[0, 1\].*reduction='sum'",
        ),
        (
            lambda z, y: F.binary_cross_entropy_with_logits(z, y, pos_weight=torch.full((3,), 4.0)),
            "without pos_weight",
        ),
        (lambda z, y: F.mse_loss(z, y), "not that of F.binary_cross_entropy_with_logits"),
    ],
)
def test_bernoulli_implied_targets_outside_unit_interval_are_refused(loss, message):
    torch.manual_seed(4)
    model = nn.Linear(4, 3)
    pre = natgrad.EF(model, likelihood="bernoulli")
    logits = model(torch.randn(6, 4))
    loss(logits, torch.ones(6, 3)).backward()
    with pytest.raises(ValueError, match=message):
        pre.step(logits)


def test_gaussian_target_broadcast_to_all_pairs_is_refused_in_the_fused_path():
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))
    pre = natgrad.EF(model, likelihood="gaussian")
    inputs, targets = torch.randn(6, 4), torch.randn(6)
    logits = model(inputs)
    with pytest.warns(UserWarning, match="target size"):  # torch's own warning
        loss = F.mse_loss(logits, targets)
    with pytest.raises(ValueError, match=r"broadcasts the logits of shape \(6, 1\).*view_as"):
        pre.backward(loss)
    logits = model(inputs)
    pre.backward(F.mse_loss(logits, targets.view_as(logits)))
    pre.step(logits)
