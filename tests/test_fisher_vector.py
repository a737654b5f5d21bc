"""Fisher-vector products through torch.func against the dense float64 Fisher."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from natgrad.fisher_vector import fisher_vector_product, flatten
from natgrad.likelihoods import get_likelihood
from oracle import batch_fisher, dense_batch, relative_error
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


def test_fisher_vector_product_of_train_mode_batchnorm_leaves_its_statistics():
    """BatchNorm in train mode: the product is that of the train-mode function (batch
    statistics) and no buffer changes (torch.func refused the in-place update before)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3))
    inputs = torch.randn(6, 4)
    with torch.no_grad():
        model[1].running_mean.normal_()
        model[1].running_var.uniform_(0.5, 2.0)
    before = {name: buffer.clone() for name, buffer in model.named_buffers()}
    params = {name: p for name, p in model.named_parameters() if not name.startswith("1.")}
    vector = [torch.randn_like(p) for p in params.values()]
    product = fisher_vector_product(
        model, (inputs,), params, vector, get_likelihood("categorical"), "mean"
    )
    expected = batch_fisher(model, inputs, list(params), "mean") @ flatten(vector)
    assert ((flatten(product) - expected).norm() / expected.norm()).item() <= 1e-10
    for name, buffer in model.named_buffers():
        assert torch.equal(buffer, before[name]), name
    eval_product = fisher_vector_product(
        model.eval(), (inputs,), params, vector, get_likelihood("categorical"), "mean"
    )
    assert not torch.allclose(flatten(eval_product), expected)  # train mode was used above
