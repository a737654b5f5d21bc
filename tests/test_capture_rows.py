"""Capture: the neuron-view rows rebuild autograd's weight gradients exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.linalg import jtu

pytestmark = pytest.mark.usefixtures("float64")


def rows_gradient(pre, name):
    """sum_{n,t} e a^T (+ bias) from the captured rows, with the loss scale as captured."""
    module = pre.selection.layers[name]
    adapter = pre.adapters[name]
    calls = pre.capture.calls[name]
    inputs = torch.cat([adapter.input_rows(module, c.layer_input) for c in calls], dim=1)
    grads = torch.cat([adapter.output_rows(module, c.output_grad, lead=0) for c in calls], dim=1)
    ones = torch.ones(1, inputs.shape[0])
    return jtu(inputs, grads.unsqueeze(0), ones, adapter.has_bias(module))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "conv",
    [
        dict(kernel_size=3, stride=2, padding=1, dilation=2),
        dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0)),
    ],
)
def test_conv2d_rows_rebuild_the_weight_gradient(conv, bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, bias=bias, **conv), nn.Tanh(), nn.Flatten())
    inputs = torch.randn(4, 2, 7, 7)
    with torch.no_grad():
        width = model(inputs).shape[1]
    model.append(nn.Linear(width, 3))
    pre = natgrad.EF(model)
    logits = model(inputs)
    F.cross_entropy(logits, torch.randint(0, 3, (4,))).backward()
    weight, bias_grad = rows_gradient(pre, "0")
    assert torch.allclose(weight, model[0].weight.grad.reshape(3, -1), rtol=1e-12, atol=1e-14)
    if bias:
        assert torch.allclose(bias_grad, model[0].bias.grad, rtol=1e-12, atol=1e-14)
    patches = pre.adapters["0"].input_rows(model[0], inputs)
    manual = F.unfold(
        inputs, conv["kernel_size"], conv.get("dilation", 1), conv["padding"], conv["stride"]
    )
    assert torch.equal(patches, manual.transpose(1, 2))


def test_sequence_input_and_weight_tying_are_weight_sharing():
    torch.manual_seed(1)
    shared = nn.Linear(4, 4)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.shared = shared
            self.head = nn.Linear(4, 3)

        def forward(self, x):
            hidden = torch.tanh(self.shared(x))  # (N, T, 4): shared over T
            hidden = torch.tanh(self.shared(hidden))  # second call of the same layer
            return self.head(hidden.mean(dim=1))

    model = Tied()
    pre = natgrad.EF(model)
    logits = model(torch.randn(5, 3, 4))
    F.cross_entropy(logits, torch.randint(0, 3, (5,))).backward()
    assert len(pre.capture.calls["shared"]) == 2
    weight, bias = rows_gradient(pre, "shared")
    assert torch.allclose(weight, shared.weight.grad, rtol=1e-12, atol=1e-14)
    assert torch.allclose(bias, shared.bias.grad, rtol=1e-12, atol=1e-14)


def test_remove_leaves_no_hooks_and_no_grad_forward_records_nothing():
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    pre = natgrad.KFAC(model)
    with torch.no_grad():
        model(torch.randn(2, 4))
    assert all(not calls for calls in pre.capture.calls.values())
    pre.remove()
    for module in model.modules():
        assert not module._forward_hooks and not module._forward_pre_hooks


@pytest.mark.parametrize("fisher", ["empirical", "exact"])
def test_recorded_tensors_are_freed_after_each_step(fisher):
    """No reference cycle through autograd hooks: a step's activations die with the step."""
    import gc
    import weakref

    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    pre = natgrad.NGD(model, fisher=fisher)
    outputs = []
    model[0].register_forward_hook(lambda m, a, out: outputs.append(weakref.ref(out)))
    for _ in range(3):
        logits = model(torch.randn(6, 4))
        F.cross_entropy(logits, torch.randint(0, 3, (6,))).backward()
        pre.step(logits)
        outputs.append(weakref.ref(logits))
        del logits
    gc.collect()
    assert all(ref() is None for ref in outputs)
