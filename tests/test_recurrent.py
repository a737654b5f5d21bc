"""natgrad.layers.LSTM / GRU / RNN: torch's recurrent layers rebuilt from nn.Linear cells.

Same outputs and gradients as torch; exact Woodbury updates against the dense oracle; KFAC
factors of a linear layer called at every time step equal the explicit sums over the steps;
torch's own recurrent modules are refused at construction with an error naming the fix.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.utils.rnn import pack_padded_sequence

import natgrad
from natgrad.fisher_vector import fisher_vector_product, flatten
from natgrad.layers import GRU, LSTM, RNN, MultiheadAttention, replace
from natgrad.likelihoods import get_likelihood
from oracle import dense_batch, expected_update, flat_grad, relative_error
from problems import run_natgrad

TORCH_CLASSES = {
    "lstm": (nn.LSTM, {}),
    "gru": (nn.GRU, {}),
    "rnn_tanh": (nn.RNN, {}),
    "rnn_relu": (nn.RNN, {"nonlinearity": "relu"}),
}
DROP_INS = {"lstm": LSTM, "gru": GRU, "rnn_tanh": RNN, "rnn_relu": RNN}


def torch_rnn(kind: str, **kwargs) -> nn.RNNBase:
    cls, extra = TORCH_CLASSES[kind]
    return cls(**extra, **kwargs)


def initial_state(kind: str, shape: tuple[int, ...], dtype: torch.dtype):
    if kind == "lstm":
        return torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    return torch.randn(shape, dtype=dtype)


def flat_result(result) -> torch.Tensor:
    """``(output, h_n)`` or ``(output, (h_n, c_n))`` as one vector."""
    output, state = result
    states = state if isinstance(state, tuple) else (state,)
    return torch.cat([output.reshape(-1), *(s.reshape(-1) for s in states)])


@pytest.mark.parametrize("dtype, tolerance", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("kind", list(TORCH_CLASSES))
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("num_layers, bidirectional", [(1, False), (2, True), (2, False)])
def test_outputs_equal_torch(kind, batch_first, num_layers, bidirectional, dtype, tolerance):
    torch.manual_seed(0)
    reference = torch_rnn(
        kind, input_size=3, hidden_size=4, num_layers=num_layers, batch_first=batch_first,
        bidirectional=bidirectional, dtype=dtype,
    )  # fmt: skip
    layer = replace(reference)
    assert type(layer) is DROP_INS[kind]
    inputs = torch.randn((5, 7, 3) if batch_first else (7, 5, 3), dtype=dtype)
    state = initial_state(kind, (num_layers * (2 if bidirectional else 1), 5, 4), dtype)
    for args in ((inputs,), (inputs, state)):
        expected, actual = flat_result(reference(*args)), flat_result(layer(*args))
        assert actual.dtype == dtype
        assert (actual - expected).abs().max() <= tolerance
    # unbatched input (T, d_in), as torch accepts it
    single = inputs[0] if batch_first else inputs[:, 0]
    assert (flat_result(layer(single)) - flat_result(reference(single))).abs().max() <= tolerance


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("kind", list(TORCH_CLASSES))
def test_gradients_equal_torch(kind):
    torch.manual_seed(1)
    reference = torch_rnn(kind, input_size=3, hidden_size=4, num_layers=2, bidirectional=True)
    layer = replace(copy.deepcopy(reference))
    inputs = torch.randn(6, 2, 3)
    state = initial_state(kind, (4, 2, 4), torch.float64)
    weights = torch.randn(6, 2, 8)
    for module in (reference, layer):
        output, _ = module(inputs, state)
        (output * weights).sum().backward()
    for key, cell in layer.cells.items():
        for part in ("ih", "hh"):
            linear = getattr(cell, part)
            expected_weight = getattr(reference, f"weight_{part}_{key}").grad
            expected_bias = getattr(reference, f"bias_{part}_{key}").grad
            assert torch.allclose(linear.weight.grad, expected_weight, rtol=0, atol=1e-12)
            assert torch.allclose(linear.bias.grad, expected_bias, rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_dropout_draws_torchs_masks(kind, bidirectional):
    torch.manual_seed(2)
    reference = torch_rnn(
        kind, input_size=3, hidden_size=4, num_layers=3, dropout=0.4, bidirectional=bidirectional
    )
    layer = replace(copy.deepcopy(reference))
    inputs = torch.randn(5, 6, 3)
    torch.manual_seed(9)
    expected = flat_result(reference(inputs))
    torch.manual_seed(9)
    actual = flat_result(layer(inputs))
    assert (actual - expected).abs().max() <= 1e-6
    torch.manual_seed(10)  # other masks, other result: dropout is active
    assert (flat_result(layer(inputs)) - expected).abs().max() > 1e-2
    layer.eval(), reference.eval()
    assert (flat_result(layer(inputs)) - flat_result(reference(inputs))).abs().max() <= 1e-6


def test_unsupported_inputs_and_options_are_named():
    layer = LSTM(3, 4, batch_first=True)
    packed = pack_padded_sequence(torch.randn(2, 5, 3), [5, 3], batch_first=True)
    with pytest.raises(TypeError, match="does not take a PackedSequence: pass the padded batch"):
        layer(packed)
    with pytest.raises(ValueError, match=r"proj_size=2 \(LSTM projections\) is not supported"):
        replace(nn.LSTM(3, 4, proj_size=2))
    with pytest.raises(ValueError, match=r"proj_size=1 \(LSTM projections\) is not supported"):
        LSTM(3, 4, proj_size=1)
    with pytest.raises(
        ValueError, match=r"initial state of shape \(2, 2, 4\), expected \(1, 2, 4\)"
    ):
        layer(torch.randn(2, 5, 3), (torch.zeros(2, 2, 4), torch.zeros(2, 2, 4)))
    with pytest.raises(ValueError, match="input has 2 features, the layer expects 3"):
        layer(torch.randn(2, 5, 2))
    with pytest.raises(ValueError, match="unknown nonlinearity 'gelu'"):
        RNN(3, 4, nonlinearity="gelu")


class RecurrentClassifier(nn.Module):
    """A recurrent layer over the sequence, the head on the mean of its outputs."""

    def __init__(self, kind: str, **kwargs) -> None:
        super().__init__()
        self.rnn = torch_rnn(kind, input_size=3, batch_first=True, **kwargs)
        width = kwargs["hidden_size"] * (2 if kwargs.get("bidirectional") else 1)
        self.head = nn.Linear(width, 3)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        output, _ = self.rnn(inputs)
        return self.head(output.mean(dim=1))


def test_torch_recurrent_layer_is_refused_with_the_fix_named():
    model = RecurrentClassifier("gru", hidden_size=4)
    with pytest.raises(ValueError) as error:
        natgrad.NGD(model)
    message = str(error.value)
    assert "'rnn' (GRU)" in message
    assert "natgrad.layers.replace(model)" in message
    assert "overrides={'rnn': 'plain_gradient'}" in message
    for kwargs in ({"unsupported": "error"}, {"overrides": {"rnn": "fallback"}}):
        with pytest.raises(ValueError, match=r"natgrad\.layers\.replace\(model\)"):
            natgrad.KFAC(model, **kwargs)
    for kwargs in ({"overrides": {"rnn": "plain_gradient"}}, {"unsupported": "plain_gradient"}):
        pre = natgrad.NGD(model, **kwargs)
        assert "plain gradient: rnn.weight_ih_l0, rnn.weight_hh_l0" in pre.describe()
        pre.remove()


def mixed_model() -> nn.Sequential:
    torch.manual_seed(3)
    encoder = nn.TransformerEncoderLayer(6, 2, dim_feedforward=8, dropout=0.0, batch_first=True)
    return nn.Sequential(
        nn.Linear(3, 6),
        encoder,
        nn.ModuleDict(
            {
                "attention": nn.MultiheadAttention(6, 3, batch_first=True),
                "lstm": nn.LSTM(6, 4, batch_first=True),
                "gru": nn.GRU(4, 4, num_layers=2, batch_first=True, bidirectional=True),
                "rnn": nn.RNN(8, 2, batch_first=True, nonlinearity="relu"),
            }
        ),
    )


def run_mixed(model: nn.Sequential, inputs: torch.Tensor) -> torch.Tensor:
    hidden = model[1](model[0](inputs))
    parts = model[2]
    hidden = parts["attention"](hidden, hidden, hidden)[0]
    hidden = parts["gru"](parts["lstm"](hidden)[0])[0]
    return parts["rnn"](hidden)[0]


@pytest.mark.usefixtures("float64")
def test_replace_swaps_every_drop_in_in_place():
    model = mixed_model()
    model[2]["lstm"].weight_hh_l0.requires_grad_(False)
    original = copy.deepcopy(model)
    replaced = replace(model)
    assert replaced is model
    parts = model[2]
    assert isinstance(model[1].self_attn, MultiheadAttention)
    assert isinstance(parts["attention"], MultiheadAttention)
    assert type(parts["lstm"]) is LSTM and type(parts["gru"]) is GRU
    assert type(parts["rnn"]) is RNN and parts["rnn"].nonlinearity == "relu"
    assert not parts["lstm"].cells["l0"].hh.weight.requires_grad
    assert parts["lstm"].cells["l0"].ih.weight.requires_grad
    assert not any(isinstance(m, (nn.RNNBase, nn.MultiheadAttention)) for m in model.modules())
    inputs = torch.randn(2, 5, 3)
    with torch.no_grad():
        assert torch.allclose(run_mixed(model, inputs), run_mixed(original, inputs), atol=1e-12)
    assert replace(nn.LSTM(2, 3)).__class__ is LSTM  # a bare module: its drop-in is returned


def classifier(kind: str) -> nn.Module:
    torch.manual_seed(4)
    bidirectional = kind == "lstm"
    return replace(
        RecurrentClassifier(
            kind, hidden_size=3, num_layers=2 if bidirectional else 1, bidirectional=bidirectional
        )
    )


def module_blocks(model: nn.Module) -> list[list[nn.Parameter]]:
    return [
        [p for p in module.parameters(recurse=False) if p.requires_grad]
        for module in model.modules()
        if any(p.requires_grad for p in module.parameters(recurse=False))
    ]


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_oracle_per_sample_gradients_agree_with_torch_func(kind):
    """The dense oracle's per-sample gradients (one backward pass per datapoint) equal those of
    torch.func (vmap over grad) on the drop-in: two independent routes."""
    model = classifier(kind)
    inputs, targets = torch.randn(5, 4, 3), torch.randint(0, 3, (5,))
    batch = dense_batch(model, inputs, targets, "categorical", "mean")
    params = {name: p.detach() for name, p in model.named_parameters()}

    def loss(values, x, y):
        logits = functional_call(model, values, (x.unsqueeze(0),))
        return F.cross_entropy(logits, y.unsqueeze(0), reduction="sum")

    rows = vmap(grad(loss), in_dims=(None, 0, 0))(params, inputs, targets)
    per_sample = torch.cat([rows[name].reshape(5, -1) for name in params], dim=1)
    assert torch.allclose(per_sample, batch.loss_grads, rtol=0, atol=1e-12)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("structure", ["full", "layer"])
@pytest.mark.parametrize("fisher", ["empirical", "ief", "exact"])
@pytest.mark.parametrize("kind", ["lstm", "gru", "rnn_tanh"])
def test_woodbury_update_is_exact(kind, fisher, structure, fused):
    model = classifier(kind)
    pre = natgrad.NGD(model)
    description = pre.describe()
    pre.remove()
    assert "torch.func" not in description and "rnn.cells.l0.hh (Linear)" in description
    inputs, targets = torch.randn(6, 4, 3), torch.randint(0, 3, (6,))
    actual, _ = run_natgrad(
        model, inputs, targets, "categorical", "mean", fused=fused, fisher=fisher,
        structure=structure, damping=1e-3,
    )  # fmt: skip
    batch = dense_batch(model, inputs, targets, "categorical", "mean")
    expected = expected_update(batch, fisher, structure, 1e-3, module_blocks(model))
    assert relative_error(actual, expected) <= 1e-8


def explicit_kronecker_factors(model, linear, inputs, targets):
    """``Σ_A`` and empirical ``Σ_G`` of a linear layer over all its calls and tokens, from its
    own hooks and one backward pass per datapoint (the "expand" convention)."""
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = linear.register_forward_hook(lambda m, args, out: calls.append((args[0], out)))
    try:
        with torch.no_grad():
            model(inputs)
        rows = torch.cat([a.reshape(-1, a.shape[-1]) for a, _ in calls])
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1)], dim=1)
        input_cov = rows.T @ rows / rows.shape[0]
        grad_cov = torch.zeros(linear.out_features, linear.out_features)
        for n in range(inputs.shape[0]):
            calls.clear()
            loss = F.cross_entropy(model(inputs[n : n + 1]), targets[n : n + 1], reduction="sum")
            for e in torch.autograd.grad(loss, [out for _, out in calls]):
                e = e.reshape(-1, e.shape[-1])
                grad_cov += e.T @ e / inputs.shape[0]  # mean loss: c = 1/N
    finally:
        handle.remove()
    return input_cov, grad_cov, len(calls)


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_kfac_factors_sum_over_time_steps(kind):
    model = classifier(kind)
    inputs, targets = torch.randn(6, 4, 3), torch.randint(0, 3, (6,))
    damping = 1e-2
    pre = natgrad.KFAC(
        model, fisher="empirical", damping=damping, damping_mode="correct", ema_decay=0.0
    )
    model.zero_grad()
    logits = model(inputs)
    F.cross_entropy(logits, targets).backward()
    cell = model.rnn.cells["l0"]
    plain = {
        part: torch.cat([m.weight.grad, m.bias.grad.unsqueeze(1)], dim=1)
        for part, m in (("ih", cell.ih), ("hh", cell.hh))
    }
    pre.step(logits)
    pre.remove()
    for part, linear in (("ih", cell.ih), ("hh", cell.hh)):
        input_cov, grad_cov, num_calls = explicit_kronecker_factors(model, linear, inputs, targets)
        assert num_calls == (1 if part == "ih" else 4)  # ih on the sequence, hh at each step
        natgrad_input, natgrad_grad = pre.normalised_factors(f"rnn.cells.l0.{part}")
        assert relative_error(natgrad_input, input_cov) <= 1e-10
        assert relative_error(natgrad_grad, grad_cov) <= 1e-10
        curvature = torch.kron(grad_cov, input_cov)  # row-major vec of [W | b]
        eye = torch.eye(curvature.shape[0])
        expected = torch.linalg.solve(curvature + damping * eye, plain[part].reshape(-1))
        actual = torch.cat([linear.weight.grad, linear.bias.grad.unsqueeze(1)], dim=1)
        assert relative_error(actual.reshape(-1), expected) <= 1e-8


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_fisher_vector_product_of_fishleg_is_exact(kind):
    """FishLeg's auxiliary loss needs exact Fisher-vector products: through torch.func on the
    drop-in they equal the dense Fisher times the vector."""
    model = classifier(kind)
    inputs, targets = torch.randn(5, 4, 3), torch.randint(0, 3, (5,))
    params = dict(model.named_parameters())
    vector = [torch.randn_like(p) for p in params.values()]
    product = fisher_vector_product(
        model, (inputs,), params, vector, get_likelihood("categorical"), "mean"
    )
    batch = dense_batch(model, inputs, targets, "categorical", "mean")
    expected = batch.exact_fisher() @ flatten(vector)
    assert relative_error(flatten(product), expected) <= 1e-10


@pytest.mark.usefixtures("float64")
def test_fishleg_preconditions_every_cell():
    """FishLeg's first update is its ``Q`` applied to each layer's gradient, for every cell."""
    model = classifier("gru")
    pre = natgrad.FishLeg(model, momentum=0.0)
    model.zero_grad()
    logits = model(torch.randn(5, 4, 3))
    F.cross_entropy(logits, torch.randint(0, 3, (5,))).backward()
    layers = pre.selection.layers
    assert set(layers) == {"rnn.cells.l0.ih", "rnn.cells.l0.hh", "head"}
    plain = {
        name: torch.cat([m.weight.grad, m.bias.grad.unsqueeze(1)], dim=1)
        for name, m in layers.items()
    }
    pre.step(logits)
    for name, module in layers.items():
        actual = torch.cat([module.weight.grad, module.bias.grad.unsqueeze(1)], dim=1)
        expected = pre.dense_q(name) @ plain[name].reshape(-1)
        assert relative_error(actual.reshape(-1), expected) <= 1e-10
    pre.remove()
    assert torch.isfinite(flat_grad(list(model.parameters()))).all()


@pytest.mark.usefixtures("float64")
def test_replace_reaches_the_decoder_layers_attentions():
    torch.manual_seed(5)
    decoder = nn.TransformerDecoderLayer(6, 2, dim_feedforward=8, dropout=0.0, batch_first=True)
    replaced = replace(copy.deepcopy(decoder))
    assert isinstance(replaced.self_attn, MultiheadAttention)
    assert isinstance(replaced.multihead_attn, MultiheadAttention)
    target, memory = torch.randn(2, 5, 6), torch.randn(2, 4, 6)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    expected = decoder(target, memory, tgt_mask=causal, tgt_is_causal=True)
    actual = replaced(target, memory, tgt_mask=causal, tgt_is_causal=True)
    assert torch.allclose(actual, expected, atol=1e-12)
