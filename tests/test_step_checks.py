"""The cheaper per-step checks of the Woodbury step give the answers of the explicit ones.

The damped solve judges its system's finiteness by one sum of each tensor, the step its
captured tensors' by one sum each, the categorical likelihood skips the softmax when every row
receives a gradient, the normalisation rows overwrite their fresh ``x̂`` in place, and a
direction written into the weight's or the bias's ``.grad`` buffer is not stored a second
time: each is checked here against the explicit computation it replaces.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.direct import norm_adapter_for
from natgrad.likelihoods import Categorical
from natgrad.linalg import damped_solve, damped_solves
from oracle import dense_batch, expected_update, flat_grad, relative_error

pytestmark = pytest.mark.usefixtures("float64")


def test_an_infinite_diagonal_entry_is_refused_though_cholesky_solves_it():
    matrix = torch.eye(3)
    matrix[1, 1] = math.inf
    rhs = torch.ones(3)
    # what the check guards against: the factorisation "succeeds" with a finite answer
    factor, info = torch.linalg.cholesky_ex(matrix + 0.1 * torch.eye(3))
    assert int(info) == 0
    assert torch.isfinite(torch.cholesky_solve(rhs.unsqueeze(1), factor)).all()
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        damped_solve(matrix, rhs, 0.1)
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        damped_solves([(torch.eye(3), rhs), (matrix, rhs)], 0.1)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_right_hand_side_is_refused(bad):
    rhs = torch.tensor([1.0, bad])
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        damped_solve(torch.eye(2), rhs, 0.1)
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        damped_solves([(torch.eye(2), torch.ones(2)), (torch.eye(2), rhs)], 0.1)


def test_large_finite_systems_are_solved():
    # entries whose float32 sum overflows are looked at one by one: finite
    matrix = torch.diag(torch.tensor([3e38, 2e38, 3e38, 1e38], dtype=torch.float32))
    rhs = torch.tensor([3e38, 1e38, -3e38, 2e38], dtype=torch.float32)
    assert not math.isfinite(float(matrix.sum()))  # float32 overflows
    solution, report = damped_solve(matrix, rhs, 1.0)
    assert report.method == "cholesky"
    expected = rhs.double() / (matrix.double().diagonal() + 1.0)
    assert relative_error(solution.double(), expected) <= 1e-6


def test_huge_finite_float64_systems_are_not_called_non_finite():
    # a float64 sum of finite entries near the largest double overflows: the entries, not the
    # sum, decide, in the single and the batched solve alike
    matrix = torch.diag(torch.tensor([1e308, 1e308], dtype=torch.float64))
    rhs = torch.tensor([1e308, 1e308], dtype=torch.float64)
    assert not math.isfinite(float(matrix.sum() + rhs.sum()))
    expected = torch.ones(2, dtype=torch.float64)
    solution, _ = damped_solve(matrix, rhs, 1e-3)
    torch.testing.assert_close(solution, expected, rtol=1e-12, atol=0)
    solutions, _ = damped_solves([(matrix, rhs), (matrix, rhs)], 1e-3)
    for batched in solutions:
        torch.testing.assert_close(batched, expected, rtol=1e-12, atol=0)


def counted_by_definition(logits: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Rows with a nonzero gradient or an exactly one-hot softmax."""
    probs = torch.softmax(logits, dim=-1)
    return torch.tensor(
        [bool((g != 0).any()) or bool(p.max() == 1) for g, p in zip(grad, probs, strict=True)]
    )


@pytest.mark.parametrize("saturated", [False, True])
@pytest.mark.parametrize("ignored", [False, True])
def test_counted_rows_match_their_definition(ignored, saturated):
    torch.manual_seed(0)
    logits = torch.randn(5, 4)
    if saturated:
        logits[3] = torch.tensor([0.0, 2000.0, 0.0, 0.0])  # certain of label 1: a zero gradient
    targets = torch.tensor([0, 1, 2, 1, 3])
    if ignored:
        targets[2] = -100
    logits.requires_grad_(True)
    F.cross_entropy(logits, targets, ignore_index=-100).backward()
    assert bool((logits.grad[3] == 0).all()) == saturated
    counted = Categorical().counted(logits, logits.grad)
    expected = counted_by_definition(logits.detach(), logits.grad)
    assert torch.equal(counted, expected)
    assert bool(expected[3]) and bool(expected[2]) != ignored
    factor = Categorical().reduction_factor(logits, "mean", counted)
    assert factor == 1 / (4 if ignored else 5)


def explicit_norm_rows(module: nn.Module, x: torch.Tensor, grads: torch.Tensor) -> torch.Tensor:
    """``sum_t e ⊙ x̂`` and ``sum_t e`` per datapoint, ``x̂`` from the module's definition."""
    if isinstance(module, nn.BatchNorm2d):
        if module.training:
            mean = x.mean(dim=(0, 2, 3), keepdim=True)
            variance = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
        else:
            mean = module.running_mean.view(1, -1, 1, 1)
            variance = module.running_var.view(1, -1, 1, 1)
        normalised = (x - mean) / torch.sqrt(variance + module.eps)
        return torch.cat([(grads * normalised).sum(dim=(3, 4)), grads.sum(dim=(3, 4))], dim=-1)
    if isinstance(module, nn.GroupNorm):
        grouped = x.reshape(x.shape[0], module.num_groups, -1)
        mean = grouped.mean(dim=2, keepdim=True)
        variance = grouped.var(dim=2, unbiased=False, keepdim=True)
        normalised = ((grouped - mean) / torch.sqrt(variance + module.eps)).reshape(x.shape)
        return torch.cat([(grads * normalised).sum(dim=(3, 4)), grads.sum(dim=(3, 4))], dim=-1)
    mean = x.mean(dim=-1, keepdim=True)
    variance = x.var(dim=-1, unbiased=False, keepdim=True)
    normalised = (x - mean) / torch.sqrt(variance + module.eps)
    return torch.cat([(grads * normalised).sum(dim=2), grads.sum(dim=2)], dim=-1)


@pytest.mark.parametrize("sets", [1, 2])
@pytest.mark.parametrize("kind", ["batch_train", "batch_eval", "group", "layer"])
def test_norm_rows_match_their_definition_and_leave_the_input_alone(kind, sets):
    torch.manual_seed(1)
    if kind == "layer":
        module, x = nn.LayerNorm(6), torch.randn(4, 3, 6)
    else:
        module = nn.GroupNorm(2, 4) if kind == "group" else nn.BatchNorm2d(4)
        x = torch.randn(4, 4, 3, 3)
    if kind == "batch_eval":
        module.running_mean.uniform_(-1, 1)
        module.running_var.uniform_(0.5, 2)
        module.eval()
    grads = torch.randn(sets, *x.shape)
    kept_input, kept_grads = x.clone(), grads.clone()
    rows = norm_adapter_for(module).per_sample_rows(module, x, grads)
    assert relative_error(rows, explicit_norm_rows(module, x, grads)) <= 1e-12
    assert torch.equal(x, kept_input) and torch.equal(grads, kept_grads)


def test_a_norm_adapter_without_fresh_normalised_values_keeps_its_input():
    class Identity(type(norm_adapter_for(nn.LayerNorm(3)))):
        fresh_normalised = False

        def normalised(self, module, layer_input):
            return layer_input  # a view of the captured input: must not be overwritten

    x, grads = torch.randn(2, 5, 3), torch.randn(1, 2, 5, 3)
    kept = x.clone()
    rows = Identity().per_sample_rows(nn.LayerNorm(3), x, grads)
    assert torch.equal(x, kept)
    expected = torch.cat([(grads * x).sum(dim=2), grads.sum(dim=2)], dim=-1)
    assert relative_error(rows, expected) <= 1e-12


@pytest.mark.parametrize("fused", [False, True])
def test_directions_written_in_place_are_the_weights_grad(fused):
    """The weight's ``.grad`` keeps its tensor (the direction is written into it) and the
    bias gets the bias direction, on both paths (float64 dense oracle in test_woodbury)."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    inputs, targets = torch.randn(6, 5), torch.randint(0, 3, (6,))
    pre = natgrad.EF(model, damping=0.1)
    for _ in range(2):
        model.zero_grad(set_to_none=False)
        before = [layer.weight.grad for layer in (model[0], model[2])]
        logits = model(inputs)
        loss = F.cross_entropy(logits, targets)
        pre.backward(loss) if fused else loss.backward()
        plain = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        pre.step(logits)
        after = [layer.weight.grad for layer in (model[0], model[2])]
        if before[0] is not None:  # set_to_none=False: the same tensors are overwritten
            assert all(a is b for a, b in zip(after, before, strict=True))
        assert all(p.grad is not None for p in model.parameters())
        if not fused:  # the plain gradient was replaced by the direction, bias included
            params = list(model.parameters())
            assert all(not torch.equal(p.grad, g) for p, g in zip(params, plain, strict=True))


def finite_by_definition(tensors: list[torch.Tensor]) -> bool:
    """Every entry finite, and every tensor's sum too (its overflow counts as non-finite, as in
    the hook that skips sampling labels from such logits)."""
    entries = all(bool(torch.isfinite(t).all()) for t in tensors)
    return entries and all(bool(torch.isfinite(t.sum())) for t in tensors)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf, None])
@pytest.mark.parametrize("where", ["first", "last", "overflow"])
def test_the_finiteness_check_gives_the_entrywise_answer(dtype, bad, where):
    """One sum per tensor, read one at a time, against the entries and the tensors' sums."""
    torch.manual_seed(3)
    tensors = [
        torch.randn(6, 4), torch.randn(1000, dtype=dtype), torch.randn(3, 7, dtype=dtype).T,
        torch.empty(0), torch.randint(0, 5, (4, 2)), torch.randn(33, 5, dtype=torch.float64),
    ]  # fmt: skip
    if where == "overflow":  # finite entries whose sum overflows: not finite
        tensors[2][2, 1] = tensors[2][0, 0] = torch.finfo(dtype).max
    if bad is not None:
        spoilt = tensors[{"first": 0, "last": -1, "overflow": 1}[where]]
        spoilt[tuple(size // 2 for size in spoilt.shape)] = bad
    expected = finite_by_definition(tensors)
    assert natgrad.Preconditioner._all_finite(tensors, []) == expected
    assert expected == (bad is None and where != "overflow")


class WithIdleHead(nn.Module):
    """An MLP whose auxiliary head runs in the forward pass but is not part of the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
        self.idle = nn.Linear(5, 2)

    def forward(self, x):
        self.idle(x)
        return self.body(x)


@pytest.mark.parametrize("fisher", ["empirical", "ief"])
def test_fused_step_leaves_a_layer_outside_the_loss_alone(fisher):
    """Its ``.grad`` stays ``None``, as ``loss.backward()`` leaves it (the fused backward once
    gave it an uninitialised buffer), and every other direction is the standard path's."""
    torch.manual_seed(4)
    inputs, targets = torch.randn(6, 5), torch.randint(0, 3, (6,))
    grads = []
    for fused in (False, True):
        torch.manual_seed(5)
        model = WithIdleHead()
        pre = natgrad.NGD(model, fisher=fisher, damping=0.1)
        for _ in range(2):
            model.zero_grad()
            logits = model(inputs)
            loss = F.cross_entropy(logits, targets)
            pre.backward(loss) if fused else loss.backward()
            pre.step(logits)
            assert model.idle.weight.grad is None and model.idle.bias.grad is None
        grads.append(torch.cat([p.grad.reshape(-1) for p in model.body.parameters()]))
    assert relative_error(grads[1], grads[0]) <= 1e-12


@pytest.mark.parametrize("fisher", ["empirical", "ief"])
@pytest.mark.parametrize("set_to_none", [True, False])
def test_directions_in_reused_buffers_match_the_dense_oracle(fisher, set_to_none):
    """Over several fused steps the weight and bias directions are written into the same
    ``.grad`` buffers (reused by ``pre.backward``, or kept by ``zero_grad(set_to_none=False)``);
    each step's direction is the dense solve's at the current weights."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    pre = natgrad.NGD(model, fisher=fisher, damping=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    buffers = None
    for step in range(3):
        inputs, targets = torch.randn(6, 5), torch.randint(0, 3, (6,))
        batch = dense_batch(model, inputs, targets, "categorical", "mean")
        expected = expected_update(batch, fisher, "full", 0.1, None)
        model.zero_grad(set_to_none=set_to_none)
        logits = model(inputs)
        pre.backward(F.cross_entropy(logits, targets))
        pre.step(logits)
        assert relative_error(flat_grad(list(model.parameters())), expected) <= 1e-8
        if step > 0:  # the same tensors hold each step's direction
            assert all(p.grad is b for p, b in zip(model.parameters(), buffers, strict=True))
        buffers = [p.grad for p in model.parameters()]
        opt.step()
