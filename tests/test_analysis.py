"""natgrad.analysis against dense float64 computations."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import natgrad
from natgrad.analysis import (
    BatchFisher,
    compare_updates,
    cosine_similarity,
    gamma,
    gradient_norm_imbalance,
    natural_gradient_cg,
    per_sample_gradient_norms,
)
from oracle import dense_batch, relative_error
from problems import make_mlp, make_targets

pytestmark = pytest.mark.usefixtures("float64")


def problem(seed=0):
    torch.manual_seed(seed)
    model, inputs = make_mlp(3)
    targets = make_targets("categorical", inputs.shape[0], 3)
    return model, inputs, targets


def test_batch_fisher_equals_dense_fisher():
    model, inputs, targets = problem()
    expected = dense_batch(model, inputs, targets, "categorical", "mean").exact_fisher()
    assert torch.allclose(BatchFisher(model, inputs).dense(), expected, rtol=1e-10, atol=1e-13)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3))
def test_gamma_is_scale_invariant_and_minimal_for_natural_gradient(seed, scale):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        model, inputs, targets = problem()
        batch = dense_batch(model, inputs, targets, "categorical", "mean")
        fisher_matrix, gradient = batch.exact_fisher(), batch.gradient
        fisher = BatchFisher(model, inputs)
        natural = torch.linalg.pinv(fisher_matrix, hermitian=True, rtol=1e-10) @ gradient
        direction = torch.randn(gradient.shape, generator=torch.Generator().manual_seed(seed))
        value = gamma(fisher, direction, gradient)
        assert gamma(fisher, scale * direction, gradient) == pytest.approx(value, rel=1e-9)
        assert value >= gamma(fisher, natural, gradient) * (1 - 1e-9)
    finally:
        torch.set_default_dtype(previous)


def test_cosine_and_imbalance_match_dense_values():
    model, inputs, targets = problem(1)
    batch = dense_batch(model, inputs, targets, "categorical", "mean")
    norms = per_sample_gradient_norms(model, inputs, lambda z: F.cross_entropy(z, targets))
    expected = batch.loss_grads.norm(dim=1)
    assert torch.allclose(norms, expected, rtol=1e-10)
    assert gradient_norm_imbalance(norms) == pytest.approx(
        (expected.max() / expected.min()).item(), rel=1e-10
    )
    first, second = batch.loss_grads[0], batch.loss_grads[1]
    expected_cos = (first @ second / (first.norm() * second.norm())).item()
    assert cosine_similarity(first, second) == pytest.approx(expected_cos, rel=1e-12)


def test_conjugate_gradients_solve_the_damped_system():
    model, inputs, targets = problem(2)
    batch = dense_batch(model, inputs, targets, "categorical", "mean")
    damping = 1e-3
    expected = torch.linalg.solve(
        batch.exact_fisher() + damping * torch.eye(len(batch.gradient)), batch.gradient
    )
    actual = natural_gradient_cg(BatchFisher(model, inputs), batch.gradient, damping, 1e-12)
    assert relative_error(actual, expected) < 1e-8


def test_compare_updates_reports_consistent_ratios():
    model, inputs, targets = problem(3)
    record = compare_updates(
        model,
        inputs,
        lambda z: F.cross_entropy(z, targets),
        {
            "ngd": lambda m: natgrad.NGD(m, fisher="exact", damping=1e-8),
            "ef": lambda m: natgrad.EF(m, damping=1e-8),
            "ief": lambda m: natgrad.IEF(m, damping=1e-8),
        },
    )
    assert record["gamma_ratio_sgd"] == 1.0 and record["cos_sgd_sgd"] == pytest.approx(1.0)
    assert record["cos_ngd_ngd"] == pytest.approx(1.0)
    for name in ("sgd", "ef", "ief"):
        assert record["gamma_ngd"] <= record[f"gamma_{name}"] * (1 + 1e-6)
    assert record["imbalance"] >= 1.0


def test_bad_inputs_of_the_analysis():
    model, inputs, _ = problem(4)
    fisher = BatchFisher(model, inputs)
    size = fisher.size
    with pytest.raises(ValueError, match="undefined for a zero gradient"):
        gamma(fisher, torch.ones(size), torch.zeros(size))
    with pytest.raises(ValueError, match="flatten the update like the parameters"):
        gamma(fisher, torch.ones(size + 1), torch.ones(size))
    with pytest.raises(ValueError, match=f"expected a flat vector of {size} entries"):
        fisher.matvec(torch.ones(3))
    with pytest.raises(ValueError, match="cosine similarity of a zero vector"):
        cosine_similarity(torch.zeros(3), torch.ones(3))
    flat_model = nn.Sequential(nn.Linear(5, 3), nn.Flatten(0))
    with pytest.raises(ValueError, match=r"logits must have shape \(N, C\)"):
        BatchFisher(flat_model, inputs).matvec(torch.ones(18))
