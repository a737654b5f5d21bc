"""Convolutions without unfolded patches: weight gradients from the layer inputs.

A convolution's rows ``A`` are its unfolded patches (``C_in k_h k_w`` numbers per output
position); natgrad computes its per-datapoint and summed weight gradients from the inputs by the
convolution's own weight-gradient kernel instead, and forms the patches only where the rows
themselves are needed (KFAC/FOOF factor folds, the pairwise Gram).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.adapters import Conv2dAdapter
from natgrad.likelihoods import get_likelihood
from natgrad.precond.inverses import KroneckerInverse
from oracle import dense_batch, expected_update, relative_error
from problems import make_targets, run_natgrad

pytestmark = pytest.mark.usefixtures("float64")

CONVOLUTIONS = [
    dict(kernel_size=3, stride=2, padding=1, dilation=2),
    dict(kernel_size=(2, 3), stride=(1, 2), padding=(1, 0)),
    dict(kernel_size=3, padding=2, dilation=(2, 1), groups=2),
]


@pytest.mark.parametrize("conv", CONVOLUTIONS)
def test_weight_grads_from_inputs_equal_torch_func_per_datapoint_grads(conv):
    """Per-datapoint weight gradients of a convolution called twice (images of two sizes, the
    weight shared over both calls' positions) for K = 2 sets of output gradients, against
    explicit per-datapoint gradients by torch.func; and their sum over one set."""
    torch.manual_seed(0)
    module = nn.Conv2d(4, 6, bias=False, **conv)
    adapter = Conv2dAdapter()
    inputs = [torch.randn(3, 4, 7, 8), torch.randn(3, 4, 6, 5)]
    output_grads = [torch.randn(2, *module(x).shape) for x in inputs]  # (K, N, C_out, H', W')
    for x, grads in zip(inputs, output_grads, strict=True):
        assert grads.shape[-2:] == adapter.output_size(module, x)
    rows = torch.cat([adapter.output_rows(module, g, lead=1) for g in output_grads], dim=2)

    def datapoint_loss(weight, images, grads):
        outputs = [
            F.conv2d(
                image[None], weight, None, module.stride, module.padding, module.dilation,
                module.groups,
            )[0]
            for image in images
        ]  # fmt: skip
        return sum((g * out).sum() for g, out in zip(grads, outputs, strict=True))

    weight_grad = torch.func.grad(datapoint_loss)
    explicit = torch.stack(
        [
            weight_grad(module.weight, [x[n] for x in inputs], [g[k, n] for g in output_grads])
            for k in range(2)
            for n in range(3)
        ]
    ).reshape(2, 3, 6, -1)
    actual = adapter.datapoint_weight_grads(module, inputs, rows)
    assert actual.shape == explicit.shape
    assert relative_error(actual, explicit) <= 1e-12
    summed = adapter.weight_grad(module, inputs, rows[0])
    assert relative_error(summed, explicit[0].sum(dim=0)) <= 1e-12


def forbid_patches(monkeypatch):
    """Make any unfolding of a convolution's patches fail the test."""

    def refuse(self, module, layer_input):
        raise AssertionError("the convolution's patches were formed")

    monkeypatch.setattr(Conv2dAdapter, "input_rows", refuse)


def make_convnet(outputs: int) -> tuple[nn.Module, torch.Tensor]:
    """Two convolutions whose datapoint gradients are cheaper formed than compared pairwise
    (36 and 9 positions; the second convolution without bias), then a linear layer."""
    model = nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 2, kernel_size=3, stride=2, padding=1, bias=False),
        nn.Flatten(),
        nn.Linear(18, outputs),
    )
    return model, torch.randn(5, 2, 6, 6)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("structure", ["full", "layer"])
@pytest.mark.parametrize("fisher", ["empirical", "ief", "ief_matrix", "mc", "exact"])
def test_woodbury_updates_on_convolutions_form_no_patches(monkeypatch, fisher, structure, fused):
    """Every Woodbury update of a CNN equals the dense oracle with the convolutions' patches
    never formed (datapoint gradients, the Gram and J^T u all come from the inputs)."""
    torch.manual_seed(2)
    model, inputs = make_convnet(3)
    targets = make_targets("categorical", inputs.shape[0], 3)
    damping, samples, seed = 1e-2, 3, 7
    with monkeypatch.context() as patched:
        forbid_patches(patched)
        actual, logits = run_natgrad(
            model, inputs, targets, "categorical", "mean", fused=fused, fisher=fisher,
            structure=structure, damping=damping, mc_samples=samples, seed=seed,
        )  # fmt: skip
    vectors = None
    if fisher == "mc":
        generator = torch.Generator().manual_seed(seed)
        vectors = get_likelihood("categorical").sampled_output_grads(logits, samples, generator)
    batch = dense_batch(model, inputs, targets, "categorical", "mean")
    blocks = [list(m.parameters()) for m in model if len(list(m.parameters())) > 0]
    expected = expected_update(batch, fisher, structure, damping, blocks, vectors)
    assert relative_error(actual, expected) <= 1e-8


def test_kfac_steps_that_fold_no_factor_form_no_patches(monkeypatch):
    """With ``factor_period=2`` the step that folds nothing applies the inverses to the
    gradient computed from the convolutions' inputs, forming no patches: equal to the dense
    ``(Σ_G + λ_E I)^{-1} ∇W (Σ_A + λ_A I)^{-1}`` of autograd's gradient."""
    torch.manual_seed(4)
    model, inputs = make_convnet(3)
    pre = natgrad.KFAC(model, damping=0.1, factor_period=2, inv_period=2)
    for step in range(2):
        model.zero_grad()
        logits = model(inputs if step == 0 else torch.randn_like(inputs))
        F.cross_entropy(logits, make_targets("categorical", inputs.shape[0], 3)).backward()
        gradients = {name: [p.grad.clone() for p in module.parameters()]
                     for name, module in pre.selection.layers.items()}  # fmt: skip
        with monkeypatch.context() as patched:
            if step == 1:
                forbid_patches(patched)
            pre.step(logits)
    for name, module in pre.selection.layers.items():
        inverse = pre.inverses[name]
        assert isinstance(inverse, KroneckerInverse)
        weight, *bias = gradients[name]
        matrix = torch.cat([weight.reshape(weight.shape[0], -1), *(b[:, None] for b in bias)], 1)
        expected = inverse.grad @ matrix @ inverse.input
        d_in = weight[0].numel()
        actual = module.weight.grad.reshape(weight.shape[0], -1)
        assert relative_error(actual, expected[:, :d_in]) <= 1e-10
        if bias:
            assert relative_error(module.bias.grad, expected[:, d_in]) <= 1e-10
