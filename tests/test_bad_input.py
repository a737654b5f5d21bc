"""Every bad input gets a clear error, and numerical trouble never reaches the weights."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.linalg import NumericalWarning, damped_inverse, damped_solve, damped_solves

pytestmark = pytest.mark.usefixtures("float64")


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def batch(num: int = 6):
    return torch.randn(num, 4), torch.randint(0, 3, (num,))


@pytest.mark.parametrize(
    ("module", "name"),
    [
        (nn.PReLU(5), "PReLU"),
        (nn.Conv1d(5, 5, 1), "Conv1d"),
    ],
)
def test_unsupported_trainable_module_is_named(module, name):
    model = nn.Sequential(nn.Linear(4, 5), module, nn.Linear(5, 3))
    with pytest.raises(ValueError, match=rf"'1' \({name}\).*unsupported='plain_gradient'"):
        natgrad.NGD(model, unsupported="error")


def test_grouped_convolution_is_unsupported():
    model = nn.Sequential(nn.Conv2d(2, 4, 3, groups=2), nn.Flatten(), nn.Linear(4, 3))
    with pytest.raises(ValueError, match="groups=2"):
        natgrad.EF(model, unsupported="error")
    assert "torch.func per-sample rows: 0.weight, 0.bias" in natgrad.EF(model).describe()


@pytest.mark.parametrize(
    ("module", "settings", "names"),
    [
        (lambda: nn.PReLU(5), {"unsupported": "plain_gradient"}, "1.weight"),
        (lambda: nn.LayerNorm(5), {"overrides": {"1": "plain_gradient"}}, "1.weight, 1.bias"),
    ],
)
@pytest.mark.parametrize("fused", [False, True])
def test_plain_gradient_option_leaves_other_parameters_alone(fused, module, settings, names):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), module(), nn.Linear(5, 3))
    inputs, targets = batch()
    model.zero_grad()
    F.cross_entropy(model(inputs), targets).backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    pre = natgrad.EF(model, **settings)
    assert f"plain gradient: {names}" in pre.describe()
    model.zero_grad()
    logits = model(inputs)
    loss = F.cross_entropy(logits, targets)
    pre.backward(loss) if fused else loss.backward()
    pre.step(logits)
    for name, param in model.named_parameters():
        if name.startswith("1."):
            assert torch.allclose(param.grad, plain[name], rtol=1e-12, atol=0)
        else:
            assert not torch.allclose(param.grad, plain[name])


def test_step_without_forward():
    pre = natgrad.EF(make_model())
    with pytest.raises(RuntimeError, match="found no captured forward pass"):
        pre.step(torch.zeros(6, 3))


def test_step_before_backward():
    model = make_model()
    pre = natgrad.EF(model)
    inputs, _ = batch()
    logits = model(inputs)
    with pytest.raises(RuntimeError, match="before a backward pass reached these logits"):
        pre.step(logits)


def test_logits_that_are_not_the_model_output():
    model = make_model()
    pre = natgrad.EF(model)
    inputs, targets = batch()
    logits = model(inputs)
    scaled = logits * 1
    F.cross_entropy(scaled, targets).backward()
    with pytest.raises(ValueError, match="not the tensor returned by the model's last forward"):
        pre.step(scaled)


def test_loss_from_another_forward_pass():
    model = make_model()
    pre = natgrad.EF(model)
    inputs, targets = batch()
    logits = model(inputs)
    F.cross_entropy(model(inputs), targets).backward()
    with pytest.raises(ValueError, match="not the tensor returned by the model's last forward"):
        pre.step(logits)


def test_logits_that_did_not_produce_the_loss():
    model = make_model()
    pre = natgrad.EF(model)
    inputs, targets = batch()
    logits = model(inputs)
    F.cross_entropy(logits.detach().requires_grad_(True), targets).backward()
    with pytest.raises(RuntimeError, match="before a backward pass reached these logits"):
        pre.step(logits)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"reduction": "none"}, ValueError, "unknown loss reduction 'none'"),
        ({"likelihood": "poisson"}, ValueError, "unknown likelihood 'poisson'"),
        ({"fisher": "hessian"}, ValueError, "unknown fisher='hessian'"),
        ({"structure": "kronecker"}, ValueError, "unknown structure='kronecker'"),
        ({"damping": 0.0}, ValueError, "damping must be positive"),
        ({"damping": -1e-3}, ValueError, "damping must be positive"),
        ({"damping": math.nan}, ValueError, "damping must be positive"),
        ({"damping": math.inf}, ValueError, "damping must be positive"),
        ({"damping": True}, TypeError, "damping must be a positive float"),
        ({"mc_samples": 0}, ValueError, "mc_samples must be an integer >= 1"),
        ({"mc_samples": 1.5}, ValueError, "mc_samples must be an integer >= 1"),
        ({"unsupported": "ignore"}, ValueError, "unknown unsupported='ignore'"),
        ({"overrides": {"1": "skip"}}, ValueError, "unknown override 'skip' for module '1'"),
        ({"overrides": {"2.0": "fallback"}}, ValueError, "'2.0', which is not a module"),
        ({"overrides": {"1": "fallback"}}, ValueError, "'1', which has no trainable parameter"),
    ],
)
def test_bad_settings_raise_at_construction(kwargs, error, message):
    with pytest.raises(error, match=message):
        natgrad.NGD(make_model(), **kwargs)


def test_not_a_module():
    with pytest.raises(TypeError, match=r"model must be an nn\.Module"):
        natgrad.NGD(lambda x: x)


def test_callable_damping_returning_zero_fails_at_step():
    model = make_model()
    pre = natgrad.EF(model, damping=lambda step: 0.0)
    inputs, targets = batch()
    logits = model(inputs)
    F.cross_entropy(logits, targets).backward()
    with pytest.raises(ValueError, match=r"damping\(step\) must be positive"):
        pre.step(logits)


@pytest.mark.parametrize(
    ("loss_reduction", "declared", "suggestion"), [("sum", "mean", "sum"), ("mean", "sum", "mean")]
)
def test_wrong_reduction_is_detected(loss_reduction, declared, suggestion):
    model = make_model()
    pre = natgrad.EF(model, reduction=declared)
    inputs, targets = batch()
    logits = model(inputs)
    F.cross_entropy(logits, targets, reduction=loss_reduction).backward()
    with pytest.raises(ValueError, match=f"pass reduction='{suggestion}'"):
        pre.step(logits)


def test_non_cross_entropy_loss_with_categorical_likelihood():
    model = make_model()
    pre = natgrad.EF(model)
    inputs, _ = batch()
    logits = model(inputs)
    F.mse_loss(logits, torch.randn(6, 3)).backward()
    with pytest.raises(ValueError, match="not that of a softmax cross-entropy loss"):
        pre.step(logits)


def test_logits_must_be_two_dimensional():
    model = nn.Sequential(nn.Linear(4, 3), nn.Flatten(0))
    pre = natgrad.EF(model, likelihood="gaussian")
    inputs, _ = batch()
    logits = model(inputs)
    F.mse_loss(logits, torch.zeros(18)).backward()
    with pytest.raises(ValueError, match=r"logits must have shape \(N, C\)"):
        pre.step(logits)


@pytest.mark.parametrize("fisher", ["empirical", "ief", "mc", "exact"])
def test_non_finite_gradients_never_reach_the_weights(fisher):
    model = make_model()
    pre = natgrad.NGD(model, fisher=fisher)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    before = [p.detach().clone() for p in model.parameters()]
    inputs, targets = batch()
    inputs[2, 1] = math.nan
    opt.zero_grad()
    logits = model(inputs)
    F.cross_entropy(logits, targets).backward()
    with pytest.warns(natgrad.NonFiniteWarning, match="skipped step 0"):
        pre.step(logits)
    opt.step()
    assert pre.skipped_steps == 1 and pre.steps == 0
    for param, old in zip(model.parameters(), before, strict=True):
        assert torch.isfinite(param).all()
        assert torch.equal(param, old)


def test_batch_of_one_gives_the_damped_rescaled_gradient():
    """With N = 1 the EF direction is g / (c ||g||^2 + λ), parallel to the gradient."""
    torch.manual_seed(1)
    model = make_model()
    inputs, targets = batch(1)
    model.zero_grad()
    F.cross_entropy(model(inputs), targets).backward()
    gradient = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    pre = natgrad.EF(model, damping=0.1)
    model.zero_grad()
    logits = model(inputs)
    F.cross_entropy(logits, targets).backward()
    pre.step(logits)
    update = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    expected = gradient / (gradient.pow(2).sum() + 0.1)
    assert torch.allclose(update, expected, rtol=1e-12)


def test_indefinite_system_falls_back_to_clamped_eigendecomposition():
    matrix = torch.diag(torch.tensor([1.0, -1e-3]))
    rhs = torch.tensor([1.0, 1.0])
    with pytest.warns(NumericalWarning, match="Cholesky failed"):
        solution, report = damped_solve(matrix, rhs, 1e-6)
    assert report.method == "eigh"
    assert torch.allclose(solution, torch.tensor([1 / (1 + 1e-6), 1 / 1e-6]), rtol=1e-12)


def test_overflowing_solve_increases_the_damping():
    matrix = torch.zeros(2, 2)
    rhs = torch.full((2,), 1e300)
    with pytest.warns(NumericalWarning):
        solution, report = damped_solve(matrix, rhs, 1e-10)
    assert report.method == "eigh+damping" and report.damping > 1e-10
    assert torch.isfinite(solution).all()


def test_damped_inverse_matches_explicit_inverse_and_rejects_nan():
    torch.manual_seed(2)
    factor = torch.randn(5, 3)
    matrix = factor @ factor.T
    inverse, report = damped_inverse(matrix, 0.1)
    assert report.method == "cholesky"
    assert torch.allclose(inverse, torch.linalg.inv(matrix + 0.1 * torch.eye(5)), rtol=1e-10)
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        damped_inverse(torch.full((2, 2), math.nan), 0.1)
    with pytest.raises(ValueError, match="damping must be positive"):
        damped_solve(matrix, torch.ones(5), 0.0)


@pytest.mark.parametrize(
    "make",
    [
        lambda m: natgrad.KFAC(m, fisher="mc"),
        lambda m: natgrad.KFAC(m, fisher="exact", damping_mode="correct"),
        lambda m: natgrad.FOOF(m),
        lambda m: natgrad.FishLeg(m, aux_period=1),
    ],
)
def test_non_finite_gradients_are_skipped_by_every_family(make):
    model = make_model()
    pre = make(model)
    inputs, targets = batch()
    inputs[0, 0] = math.inf
    logits = model(inputs)
    F.cross_entropy(logits, targets).backward()
    with pytest.warns(natgrad.NonFiniteWarning):
        pre.step(logits)
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_confident_float32_predictions_pass_the_cross_entropy_check(reduction):
    """float32 rounds pi_y to 1 in confident rows, so a row sums to its tiny other entries."""
    logits = torch.tensor(
        [[30.0, 0.0, 0.5], [0.0, 28.0, 1.0]], dtype=torch.float32, requires_grad=True
    )
    targets = torch.tensor([0, 1])
    F.cross_entropy(logits, targets, reduction=reduction).backward()
    row_sums = logits.grad.sum(dim=1).abs()
    assert (row_sums > 1e-3 * logits.grad.abs().max()).all()  # what a naive check rejects
    natgrad.likelihoods.Categorical().check_output_grad(logits, logits.grad, reduction)


@pytest.mark.parametrize("fisher", ["mc", "exact"])
def test_logits_whose_sum_overflows_skip_the_step(fisher):
    """Finite logits near the float maximum overflow their sum: no labels are sampled and
    the step is skipped (a diverging run once crashed here: 'received no sampled datapoints')."""
    model = make_model()
    pre = natgrad.KFAC(model, fisher=fisher)
    with torch.no_grad():
        model[-1].bias.fill_(torch.finfo(model[-1].bias.dtype).max / 2)
    inputs, targets = batch()
    logits = model(inputs)
    assert torch.isfinite(logits).all() and not torch.isfinite(logits.sum())
    F.cross_entropy(logits, targets).backward()
    with pytest.warns(natgrad.NonFiniteWarning, match="logits"):
        pre.step(logits)
    assert pre.skipped_steps == 1
    assert all(torch.equal(p.grad, torch.zeros_like(p)) for p in model.parameters())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_certain_float32_predictions_pass_the_cross_entropy_check(reduction):
    """A well-trained model's other-class probabilities can be subnormal in float32 (e^-100):
    c * pi_k then keeps a few bits, and a pooled ratio once read 1/13 for a batch of 14 and
    stopped a training run. Such entries do not vote; a wrong reduction is still caught."""
    categorical = natgrad.likelihoods.Categorical()
    targets = torch.zeros(14, dtype=torch.long)
    certain = torch.zeros(14, 3, dtype=torch.float32)
    certain[:, 0] = 100.0
    for logits in (certain, torch.cat([torch.tensor([[100.0, 95.0, 0.0]]), certain[1:]])):
        logits = logits.clone().requires_grad_(True)
        F.cross_entropy(logits, targets, reduction=reduction).backward()
        categorical.check_output_grad(logits, logits.grad, reduction)
    other = "sum" if reduction == "mean" else "mean"
    with pytest.raises(ValueError, match=f"reduction={reduction!r}"):  # the e^-5 entry votes
        categorical.check_output_grad(logits, logits.grad, other)


def test_batched_solves_equal_single_solves_and_report_the_furthest_fallback():
    """damped_solves: systems of two sizes, one of them indefinite: each solution equals
    damped_solve's, only the indefinite one falls back, and the report says so."""
    torch.manual_seed(3)
    factors = [torch.randn(3, 2), torch.randn(3, 3), torch.randn(2, 4)]
    systems = [(f @ f.T, torch.randn(f.shape[0])) for f in factors]
    systems.append((torch.diag(torch.tensor([1.0, -1e-3])), torch.tensor([1.0, 1.0])))
    with pytest.warns(NumericalWarning, match="Cholesky failed") as record:
        solutions, report = damped_solves(systems, 1e-6)
    assert len(record) == 1
    assert report.method == "eigh"
    for (matrix, rhs), solution in zip(systems[:3], solutions, strict=False):
        assert torch.allclose(solution, damped_solve(matrix, rhs, 1e-6)[0], rtol=1e-10)
    assert torch.allclose(solutions[3], torch.tensor([1 / (1 + 1e-6), 1 / 1e-6]), rtol=1e-12)
    assert damped_solves(systems[:3], 1e-6)[1].method == "cholesky"
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        damped_solves([(torch.full((2, 2), math.nan), torch.ones(2))], 0.1)
