"""Likelihoods: Hessian square roots, reduction factors and label sampling, checked densely."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from natgrad.likelihoods import Bernoulli, Categorical, Gaussian, Likelihood
from oracle import per_sample_loss

pytestmark = pytest.mark.usefixtures("float64")

CASES = [
    ("categorical", Categorical(), 0.5),
    ("gaussian", Gaussian(), 0.5),
    ("gaussian", Gaussian(variance=1.0), 1.0),
    ("bernoulli", Bernoulli(), 0.5),
]
IDS = ["categorical", "gaussian-0.5", "gaussian-1", "bernoulli"]


def targets_for(name, num, dim):
    if name == "categorical":
        return torch.randint(0, dim, (num,))
    if name == "gaussian":
        return torch.randn(num, dim)
    return torch.bernoulli(torch.full((num, dim), 0.3))


@pytest.mark.parametrize(("name", "likelihood", "variance"), CASES, ids=IDS)
def test_hessian_square_root_and_product(name, likelihood, variance):
    torch.manual_seed(0)
    logits = torch.randn(4, 3)
    targets = targets_for(name, 4, 3)
    columns = likelihood.hessian_sqrt(logits)
    vectors = torch.randn(4, 3)
    products = likelihood.hessian_vector_product(logits, vectors)
    for n in range(4):
        hessian = torch.autograd.functional.hessian(
            lambda z, n=n: per_sample_loss(name, z, targets[n], variance), logits[n]
        )
        root = columns[:, n, :].T
        assert torch.allclose(root @ root.T, hessian, rtol=1e-10, atol=1e-12)
        assert torch.allclose(products[n], hessian @ vectors[n], rtol=1e-10, atol=1e-12)
    # each likelihood's own product (diagonal forms for Gaussian and Bernoulli) is the generic
    # S (S^T v) of its square root
    generic = Likelihood.hessian_vector_product(likelihood, logits, vectors)
    assert torch.allclose(products, generic, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize(
    ("likelihood", "loss"),
    [
        (Categorical(), lambda z, y, r: F.cross_entropy(z, y, reduction=r)),
        (Gaussian(), lambda z, y, r: F.mse_loss(z, y, reduction=r)),
        (Bernoulli(), lambda z, y, r: F.binary_cross_entropy_with_logits(z, y, reduction=r)),
    ],
)
def test_reduction_factor_matches_torch(likelihood, loss):
    torch.manual_seed(1)
    logits = torch.randn(5, 3)
    targets = targets_for(likelihood.name, 5, 3)
    ratio = (loss(logits, targets, "mean") / loss(logits, targets, "sum")).item()
    assert likelihood.reduction_factor(logits, "mean") == pytest.approx(ratio, rel=1e-12)
    assert likelihood.reduction_factor(logits, "sum") == 1.0


@pytest.mark.parametrize(("name", "likelihood", "variance"), CASES, ids=IDS)
def test_sampled_gradients_average_to_the_hessian(name, likelihood, variance):
    """E_y[∇l ∇l^T] at y ~ p(y|z) is the output Hessian (Fisher identity, Kunstner et al. 2019,
    App. A.2)."""
    torch.manual_seed(2)
    logits = torch.randn(2, 3)
    samples = likelihood.sampled_output_grads(logits, 40000, torch.Generator().manual_seed(3))
    outer = torch.einsum("mnc,mnd->ncd", samples, samples) / samples.shape[0]
    columns = likelihood.hessian_sqrt(logits)
    hessian = torch.einsum("knc,knd->ncd", columns, columns)
    scale = hessian.abs().max()
    assert (outer - hessian).abs().max() < 0.05 * scale
    first = likelihood.sampled_output_grads(logits, 5, torch.Generator().manual_seed(7))
    again = likelihood.sampled_output_grads(logits, 5, torch.Generator().manual_seed(7))
    assert torch.equal(again, first)


def test_sampled_categorical_gradients_are_cross_entropy_gradients():
    torch.manual_seed(4)
    logits = torch.randn(3, 4)
    samples = Categorical().sampled_output_grads(logits, 7, torch.Generator().manual_seed(0))
    probs = torch.softmax(logits, dim=1)
    onehot = probs.unsqueeze(0) - samples  # must be one-hot labels
    assert torch.allclose(onehot.sum(dim=2), torch.ones(7, 3))
    assert torch.all((onehot.abs() < 1e-12) | ((onehot - 1).abs() < 1e-12))


def test_logits_gradient_norms():
    grads = torch.tensor([[3.0, 4.0], [0.0, 1.0]])
    assert torch.equal(Categorical.logits_grad_norms_sq(grads), torch.tensor([25.0, 1.0]))


def test_gaussian_variance_must_be_positive():
    with pytest.raises(ValueError, match="variance must be positive"):
        Gaussian(variance=0.0)


@pytest.mark.parametrize("classes", [1, 2, 3, 10])
def test_categorical_root_has_one_column_fewer_than_classes(classes):
    """The softmax Hessian has rank C - 1: its square root has C - 1 columns (one zero column
    for C = 1), and S S^T equals the autograd Hessian of the cross-entropy also for confident,
    saturated, tied and underflowing rows."""
    torch.manual_seed(5)
    logits = torch.randn(6, classes) * 3
    logits[1] = 0.0  # ties: every class equally likely
    logits[2, 0] = 800.0  # saturated: softmax exactly one-hot, the Hessian zero
    logits[3, -1] = 40.0  # one class holds all but ~e^-40 of the mass
    logits[4] = torch.linspace(-750.0, 0.0, classes)  # probabilities underflowing to zero
    columns = Categorical().hessian_sqrt(logits)
    assert columns.shape == (max(classes - 1, 1), 6, classes)
    targets = torch.zeros(6, dtype=torch.long)
    for n in range(6):
        hessian = torch.autograd.functional.hessian(
            lambda z, n=n: per_sample_loss("categorical", z, targets[n], 1.0), logits[n]
        )
        root = columns[:, n, :].T
        assert torch.allclose(root @ root.T, hessian, rtol=1e-10, atol=1e-14)
    assert torch.all(columns[:, 2] == 0)


def test_token_level_categorical_root_is_block_diagonal_over_tokens():
    """Token-level logits (N, T, C): T (C - 1) columns per sequence, column (t, k) at token t
    only, whose outer products sum to the Hessian of the sequence's summed token losses."""
    torch.manual_seed(6)
    num, tokens, classes = 2, 3, 4
    logits = torch.randn(num, tokens, classes)
    columns = Categorical().hessian_sqrt(logits)
    assert columns.shape == (tokens * (classes - 1), num, tokens, classes)
    targets = torch.randint(0, classes, (num, tokens))
    for n in range(num):
        hessian = torch.autograd.functional.hessian(
            lambda z, n=n: F.cross_entropy(z, targets[n], reduction="sum"), logits[n]
        ).reshape(tokens * classes, tokens * classes)
        root = columns[:, n].reshape(columns.shape[0], -1).T
        assert torch.allclose(root @ root.T, hessian, rtol=1e-10, atol=1e-14)
        for t in range(tokens):  # column (t, k) is zero at every other token
            others = [s for s in range(tokens) if s != t]
            block = columns[t * (classes - 1) : (t + 1) * (classes - 1), n][:, others]
            assert torch.all(block == 0)
