"""FishLeg's Q measurements (movement, eigenvalues, alignment) against dense float64 matrices."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.analysis import fishleg_quality
from oracle import dense_batch

pytestmark = pytest.mark.usefixtures("float64")


def trained_fishleg(q_structure: str, steps: int = 30):
    """A tiny MLP and a FishLeg whose Q took an auxiliary step at every training step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    pre = natgrad.FishLeg(
        model, damping=0.1, aux_lr=0.05, aux_period=1, init_scale=0.5, q_structure=q_structure
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    inputs, targets = torch.randn(16, 3), torch.randint(0, 3, (16,))
    for _ in range(steps):
        opt.zero_grad()
        logits = model(inputs)
        F.cross_entropy(logits, targets).backward()
        pre.step(logits)
        opt.step()
    return model, pre, inputs, targets


def dense_q(pre) -> torch.Tensor:
    """Block-diagonal Q in row-major ``[W | b]`` order, built from the auxiliary parameters."""
    blocks = []
    for pair in pre.aux_params.values():
        if pre.q_structure == "diag":
            blocks.append(torch.diag(pair[0].detach().pow(2).reshape(-1)))
        else:
            left, right = (torch.tril(p.detach()) for p in pair)
            blocks.append(torch.kron(left @ left.T, right @ right.T))
    return torch.block_diag(*blocks)


def to_model_order(model: nn.Module) -> torch.Tensor:
    """Indices taking a row-major ``[W | b]``-ordered vector to ``model.parameters()`` order."""
    positions, offset = [], 0
    for module in (m for m in model if isinstance(m, nn.Linear)):
        d_out, d_in = module.weight.shape
        weight = [offset + row * (d_in + 1) + col for row in range(d_out) for col in range(d_in)]
        bias = [offset + row * (d_in + 1) + d_in for row in range(d_out)]
        positions += weight + bias
        offset += d_out * (d_in + 1)
    return torch.tensor(positions)


@pytest.mark.parametrize("q_structure", ["kron", "diag"])
def test_movement_and_eigenvalues_equal_the_dense_q(q_structure):
    _, pre, _, _ = trained_fishleg(q_structure)
    q = dense_q(pre)
    identity = pre.init_scale * torch.eye(len(q))
    expected = torch.linalg.norm(q - identity) / torch.linalg.norm(identity)
    assert expected > 0.05  # Q learned: the measurement is not looking at Q_0
    assert fishleg_quality.q_movement(pre) == pytest.approx(float(expected), rel=1e-10)
    eigenvalues = torch.linalg.eigvalsh(q)
    low, high = fishleg_quality.q_eigenvalue_range(pre)
    assert low == pytest.approx(float(eigenvalues[0]), rel=1e-10)
    assert high == pytest.approx(float(eigenvalues[-1]), rel=1e-10)


def test_an_untrained_q_has_not_moved():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    pre = natgrad.FishLeg(model, init_scale=0.3)
    assert fishleg_quality.q_movement(pre) == pytest.approx(0.0, abs=1e-12)
    assert fishleg_quality.q_eigenvalue_range(pre) == pytest.approx((0.3, 0.3), rel=1e-12)


@pytest.mark.parametrize("q_structure", ["kron", "diag"])
def test_alignment_equals_the_dense_cosine(q_structure):
    model, pre, inputs, targets = trained_fishleg(q_structure)
    batch = dense_batch(model, inputs, targets, "categorical", "mean")
    gradient = batch.gradient  # model order
    order = to_model_order(model)
    direction_rows = torch.empty_like(gradient)
    direction_rows[order] = gradient  # row-major [W | b] order
    q_u = torch.empty_like(gradient)
    q_u[...] = (dense_q(pre) @ direction_rows)[order]
    solved = torch.linalg.solve(batch.exact_fisher() + 0.1 * torch.eye(len(gradient)), gradient)
    expected = torch.dot(q_u, solved) / (q_u.norm() * solved.norm())

    sizes = [p.numel() for p in model.parameters()]
    parts = gradient.split(sizes)
    blocks = {p: g.reshape(p.shape) for p, g in zip(model.parameters(), parts, strict=True)}
    direction = fishleg_quality.layer_matrices(pre, blocks)
    alignment, residual = fishleg_quality.q_alignment(pre, inputs, direction, tolerance=1e-12)
    assert alignment == pytest.approx(float(expected), abs=1e-8) and residual < 1e-10
    assert abs(alignment) < 1 - 1e-3  # a case where Q is not exactly the damped inverse


def test_alignment_is_one_when_q_is_the_damped_inverse_on_a_linear_gaussian_model():
    """With one bias-free Linear layer and the loss ½ Σ_n |W x_n - y_n|², a Kronecker Q can
    equal (F + γI)^{-1} exactly, and then the alignment must be 1."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(3, 2, bias=False))
    inputs = torch.randn(20, 3)
    likelihood = natgrad.likelihoods.Gaussian(variance=1.0)
    pre = natgrad.FishLeg(model, likelihood=likelihood, damping=0.2, reduction="sum")
    # in the row-major order of W: F = I_2 ⊗ XᵀX, so (F + γI)^{-1} = I_2 ⊗ (XᵀX + γI)^{-1},
    # which is (L Lᵀ) ⊗ (R Rᵀ) with L = I and R the Cholesky factor of (XᵀX + γI)^{-1}
    inverse = torch.linalg.inv(inputs.T @ inputs + 0.2 * torch.eye(3))
    (name,) = pre.aux_params
    with torch.no_grad():
        pre.aux_params[name][0].copy_(torch.eye(2))
        pre.aux_params[name][1].copy_(torch.linalg.cholesky(inverse))
    direction = {name: torch.randn(2, 3)}
    alignment, _ = fishleg_quality.q_alignment(pre, inputs, direction, tolerance=1e-12)
    assert alignment == pytest.approx(1.0, abs=1e-10)
    quality = fishleg_quality.q_quality(pre, inputs, direction, max_iterations=1)
    assert quality.alignment_residual > 1e-3  # one CG step does not solve it, and says so


def test_alignment_names_missing_layers():
    _, pre, inputs, _ = trained_fishleg("kron", steps=1)
    with pytest.raises(ValueError, match="direction lacks the layers"):
        fishleg_quality.q_alignment(pre, inputs, {})
