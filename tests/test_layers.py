"""natgrad.layers.MultiheadAttention: torch's attention, rebuilt from nn.Linear projections so
natgrad's neuron view covers it; same outputs as torch, exact Woodbury updates."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import natgrad
from natgrad.layers import MultiheadAttention, replace_attention
from oracle import dense_batch, expected_update, relative_error
from problems import MeanOverTokens, run_natgrad

pytestmark = pytest.mark.usefixtures("float64")


def attention_pair(batch_first: bool, kdim=None, vdim=None, bias=True):
    torch.manual_seed(0)
    reference = nn.MultiheadAttention(
        8, 2, bias=bias, kdim=kdim, vdim=vdim, batch_first=batch_first
    )
    return reference, MultiheadAttention.from_torch(reference)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("average", [True, False])
def test_outputs_and_weights_equal_torch(batch_first, average):
    reference, layer = attention_pair(batch_first)
    shape = (3, 5, 8) if batch_first else (5, 3, 8)
    query, key = torch.randn(shape), torch.randn(shape)
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, -2:] = True
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    for kwargs in (
        {},
        {"attn_mask": causal},
        {"key_padding_mask": padding},
        {
            "attn_mask": torch.randn(5, 5),
            "key_padding_mask": torch.zeros(3, 5).masked_fill(padding, float("-inf")),
        },
        {"attn_mask": torch.randn(6, 5, 5)},  # (N * heads, L, S)
    ):
        expected = reference(query, key, key, average_attn_weights=average, **kwargs)
        actual = layer(query, key, key, average_attn_weights=average, **kwargs)
        assert torch.allclose(actual[0], expected[0], atol=1e-12)
        assert torch.allclose(actual[1], expected[1], atol=1e-12)
    assert layer(query, key, key, need_weights=False)[1] is None


def test_separate_key_value_widths_and_no_bias():
    reference, layer = attention_pair(True, kdim=4, vdim=6, bias=False)
    query, key, value = torch.randn(2, 3, 8), torch.randn(2, 4, 4), torch.randn(2, 4, 6)
    assert torch.allclose(layer(query, key, value)[0], reference(query, key, value)[0], atol=1e-12)
    assert layer.q_proj.bias is None


def test_unsupported_torch_options_are_named():
    with pytest.raises(ValueError, match="add_bias_kv"):
        MultiheadAttention.from_torch(nn.MultiheadAttention(8, 2, add_bias_kv=True))
    with pytest.raises(ValueError, match="not divisible"):
        MultiheadAttention(8, 3)


def encoder_classifier() -> nn.Sequential:
    torch.manual_seed(3)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=12, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.Linear(3, 8), layer, MeanOverTokens(), nn.Linear(8, 3))


@pytest.mark.parametrize("training", [True, False])
def test_replaced_encoder_layer_computes_the_same_function(training):
    model = encoder_classifier().train(training)
    replaced = replace_attention(copy.deepcopy(model))
    assert isinstance(replaced[1].self_attn, MultiheadAttention)
    inputs = torch.randn(4, 5, 3)
    with torch.no_grad():  # in eval mode, torch would take its fused fast path here
        assert torch.allclose(replaced(inputs), model(inputs), atol=1e-12)


@pytest.mark.parametrize("structure", ["full", "layer"])
@pytest.mark.parametrize("fisher", ["empirical", "ief", "exact"])
def test_transformer_update_is_exact_in_the_neuron_view(fisher, structure):
    model = replace_attention(encoder_classifier())
    pre = natgrad.NGD(model)
    description = pre.describe()
    pre.remove()
    assert "torch.func" not in description and "q_proj" in description
    inputs, targets = torch.randn(6, 5, 3), torch.randint(0, 3, (6,))
    actual, _ = run_natgrad(
        model, inputs, targets, "categorical", "mean", fisher=fisher, structure=structure,
        damping=1e-3,
    )  # fmt: skip
    batch = dense_batch(model, inputs, targets, "categorical", "mean")
    blocks = [
        [p for p in module.parameters(recurse=False) if p.requires_grad]
        for module in model.modules()
        if any(p.requires_grad for p in module.parameters(recurse=False))
    ]
    expected = expected_update(batch, fisher, structure, 1e-3, blocks)
    assert relative_error(actual, expected) <= 1e-8


def test_torch_attention_goes_to_the_fallback():
    pre = natgrad.NGD(encoder_classifier())
    assert "torch.func per-sample rows" in pre.describe() and "in_proj_weight" in pre.describe()
    pre.remove()
