"""Benchmark models: shapes, structure, and that every preconditioner accepts them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import natgrad
from natgrad.lab import models
from oracle import dense_batch, expected_update, relative_error


def test_mlp_widths_activation_and_bias():
    model = models.mlp(40, 10, hidden=(32, 16), activation="tanh", bias=False)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(40, 32), (32, 16), (16, 10)]
    assert all(m.bias is None for m in linears)
    assert sum(isinstance(m, torch.nn.Tanh) for m in model) == 2
    assert model(torch.randn(3, 40)).shape == (3, 10)
    assert models.mlp(16, 2, hidden=(4,))(torch.randn(5, 4, 4)).shape == (5, 2)


def test_autoencoder_scales_hinton_widths():
    model = models.autoencoder(64, width_scale=0.1)
    widths = [m.out_features for m in model if isinstance(m, torch.nn.Linear)]
    assert widths == [100, 50, 25, 3, 25, 50, 100, 64]
    assert model(torch.randn(2, 64)).shape == (2, 64)


def test_autoencoder_with_a_linear_code_layer_is_goldfarbs():
    """ReLU after every hidden layer but the 30-unit code layer, logits out (Goldfarb et al.
    2020's MNIST autoencoder, the one the mnist5k-autoencoder task trains)."""
    model = models.autoencoder(784, activation="relu", linear_code=True)
    layers = list(model)[1:]  # after Flatten: (Linear, activation) pairs, a Linear last
    linears = [m for m in layers if isinstance(m, torch.nn.Linear)]
    widths = [(m.in_features, m.out_features) for m in linears]
    assert widths[3] == (250, 30) and widths[-1] == (1000, 784)
    after = [type(layers[layers.index(m) + 1]) for m in linears[:-1]]
    assert after == [torch.nn.ReLU] * 3 + [torch.nn.Identity] + [torch.nn.ReLU] * 3
    assert isinstance(layers[-1], torch.nn.Linear)
    plain = models.autoencoder(64, width_scale=0.1)
    assert sum(isinstance(m, torch.nn.Tanh) for m in plain) == 7  # no linear code by default


def test_deep_linear_initialisation():
    model = models.deep_linear(width=20, depth=20, seed=0)
    assert len(model) == 20 and all(layer.bias is None for layer in model)
    weights = torch.cat([layer.weight.reshape(-1) for layer in model])
    assert weights.var().item() == pytest.approx(1 / 20, rel=0.05)
    assert torch.equal(models.deep_linear(seed=0)[3].weight, model[3].weight)


def test_small_cnn_output():
    model = models.small_cnn(channels=1, classes=10, image_size=7, width=4)
    assert model(torch.randn(2, 1, 7, 7)).shape == (2, 10)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize(
    "make",
    [
        lambda: (models.mlp(8, 3, hidden=(6, 5)), torch.randn(4, 8)),
        lambda: (models.autoencoder(8, width_scale=0.01), torch.randn(4, 8)),
        lambda: (models.small_cnn(1, 3, 6, width=2), torch.randn(4, 1, 6, 6)),
    ],
)
def test_preconditioners_give_the_oracle_update_on_every_model(make):
    """iEF against the dense float64 oracle; KFAC against curvlinops' KFAC inverse (heuristic
    damping); FOOF as ∇W (A + λI)^{-1} with curvlinops' input covariance A."""
    from curvlinops import KFACInverseLinearOperator, KFACLinearOperator

    torch.manual_seed(0)
    model, inputs = make()
    params = list(model.parameters())
    targets = torch.randint(0, model(inputs).shape[1], (inputs.shape[0],))
    damping = 0.1

    def update(pre):
        model.zero_grad()
        logits = model(inputs)
        F.cross_entropy(logits, targets).backward()
        gradient = [p.grad.clone() for p in params]
        pre.step(logits)
        pre.remove()
        return gradient, [p.grad.clone() for p in params]

    _, ief = update(natgrad.IEF(model, damping=damping))
    batch = dense_batch(model, inputs, targets, "categorical", "mean")
    expected = expected_update(batch, "ief", "full", damping, blocks=None)
    assert relative_error(torch.cat([u.reshape(-1) for u in ief]), expected) <= 1e-8

    kfac = KFACLinearOperator(
        model,
        torch.nn.CrossEntropyLoss(),
        params,
        [(inputs, targets)],
        fisher_type="empirical",
        separate_weight_and_bias=False,
        check_deterministic=False,
    )
    kfac.compute_kronecker_factors()
    inverse = KFACInverseLinearOperator(kfac, damping=damping, use_heuristic_damping=True)
    gradient, actual = update(natgrad.KFAC(model, fisher="empirical", damping=damping, ema_decay=0))
    for a, e in zip(actual, inverse @ gradient, strict=True):
        assert relative_error(a, e) <= 1e-8

    gradient, actual = update(natgrad.FOOF(model, damping=damping, ema_decay=0))
    grads = dict(zip(params, gradient, strict=True))
    updates = dict(zip(params, actual, strict=True))
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            continue
        input_cov = kfac._input_covariances[name]
        inverse = torch.linalg.inv(input_cov + damping * torch.eye(len(input_cov)))
        assert (
            relative_error(weight_matrix(module, updates), weight_matrix(module, grads) @ inverse)
            <= 1e-8
        )


def weight_matrix(module, values):
    """``[W | b]`` of a layer (a convolution's kernel flattened) from ``parameter -> tensor``."""
    matrix = values[module.weight].reshape(module.weight.shape[0], -1)
    if module.bias is None:
        return matrix
    return torch.cat([matrix, values[module.bias][:, None]], dim=1)


def test_bad_model_settings():
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        models.mlp(4, 2, activation="gelu")
    with pytest.raises(ValueError, match="every width must be >= 1"):
        models.mlp(4, 2, hidden=(0,))
    with pytest.raises(ValueError, match="width_scale must be positive"):
        models.autoencoder(4, width_scale=0)
