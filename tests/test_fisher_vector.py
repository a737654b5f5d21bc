"""Fisher-vector products through torch.func against the dense float64 Fisher."""

from __future__ import annotations

import pytest
import torch

from natgrad.fisher_vector import fisher_vector_product, flatten
from natgrad.likelihoods import get_likelihood
from oracle import dense_batch, relative_error
from problems import MODELS, make_targets

pytestmark = pytest.mark.usefixtures("float64")


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("likelihood", ["categorical", "gaussian", "bernoulli"])
@pytest.mark.parametrize("model_name", sorted(MODELS))
def test_fisher_vector_product_matches_dense_fisher(model_name, likelihood, reduction):
    torch.manual_seed(0)
    model, inputs = MODELS[model_name](3)
    targets = make_targets(likelihood, inputs.shape[0], 3)
    params = dict(model.named_parameters())
    vector = [torch.randn_like(p) for p in params.values()]
    product = fisher_vector_product(
        model, (inputs,), params, vector, get_likelihood(likelihood), reduction
    )
    fisher = dense_batch(model, inputs, targets, likelihood, reduction).exact_fisher()
    expected = fisher @ flatten(vector)
    assert relative_error(flatten(product), expected) <= 1e-10


def test_vector_shape_mismatch_is_reported():
    model, inputs = MODELS["mlp"](3)
    params = dict(model.named_parameters())
    vector = [torch.zeros(1) for _ in params]
    with pytest.raises(ValueError, match=r"vector block for '0\.weight' has shape"):
        fisher_vector_product(
            model, (inputs,), params, vector, get_likelihood("categorical"), "mean"
        )
