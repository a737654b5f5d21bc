"""Benchmark models: shapes, structure, and that every preconditioner accepts them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import natgrad
from natgrad.lab import models


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


def test_deep_linear_initialisation():
    model = models.deep_linear(width=20, depth=20, seed=0)
    assert len(model) == 20 and all(layer.bias is None for layer in model)
    weights = torch.cat([layer.weight.reshape(-1) for layer in model])
    assert weights.var().item() == pytest.approx(1 / 20, rel=0.05)
    assert torch.equal(models.deep_linear(seed=0)[3].weight, model[3].weight)


def test_small_cnn_output():
    model = models.small_cnn(channels=1, classes=10, image_size=7, width=4)
    assert model(torch.randn(2, 1, 7, 7)).shape == (2, 10)


@pytest.mark.parametrize(
    "make",
    [
        lambda: (models.mlp(8, 3, hidden=(6, 5)), torch.randn(4, 8)),
        lambda: (models.autoencoder(8, width_scale=0.01), torch.randn(4, 8)),
        lambda: (models.small_cnn(1, 3, 6, width=2), torch.randn(4, 1, 6, 6)),
    ],
)
def test_preconditioners_accept_every_model(make):
    model, inputs = make()
    for build in (natgrad.IEF, lambda m: natgrad.KFAC(m, fisher="empirical"), natgrad.FOOF):
        pre = build(model)  # one live preconditioner per model at a time
        logits = model(inputs)
        targets = torch.randint(0, logits.shape[1], (inputs.shape[0],))
        F.cross_entropy(logits, targets).backward()
        pre.step(logits)
        pre.remove()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_bad_model_settings():
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        models.mlp(4, 2, activation="gelu")
    with pytest.raises(ValueError, match="every width must be >= 1"):
        models.mlp(4, 2, hidden=(0,))
    with pytest.raises(ValueError, match="width_scale must be positive"):
        models.autoencoder(4, width_scale=0)
