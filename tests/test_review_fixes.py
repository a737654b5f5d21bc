"""Where features meet: regressions found by reviewing the merged change, each with the case
that failed before its fix."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.fisher_vector import fisher_vector_product
from natgrad.likelihoods import Categorical
from oracle import relative_error
from problems import TiedHead


def test_counted_tokens_do_not_depend_on_the_logits_precision():
    """A confident position outside the loss (label -100) has a softmax that rounds to one in
    bfloat16; counting it would change the mean's count. The count is taken in float32."""
    torch.manual_seed(0)
    logits = torch.randn(4, 8, 5)
    logits[:, :3, 0] += 8.0  # p > 0.998: one in bfloat16, not in float32
    labels = torch.randint(0, 5, (4, 8))
    labels[:, :3] = -100
    leaf = logits.clone().requires_grad_(True)
    F.cross_entropy(leaf.reshape(-1, 5), labels.reshape(-1)).backward()
    likelihood = Categorical()
    in_float32 = likelihood.counted(logits, leaf.grad)
    in_bfloat16 = likelihood.counted(logits.bfloat16(), leaf.grad.bfloat16())
    assert int(in_float32.sum()) == 4 * 5
    assert torch.equal(in_bfloat16, in_float32)


class TupleModel(nn.Module):
    """Returns ``(logits, features)``, as models with auxiliary outputs do."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        features = torch.tanh(self.body(x))
        return self.head(features), features


def test_fisher_vector_products_find_the_logits_in_a_tuple(float64):
    """Inside torch.func no tensor requires a gradient; the logits are still found."""
    torch.manual_seed(1)
    model, inputs = TupleModel(), torch.randn(5, 3)
    params = dict(model.named_parameters())
    vector = [torch.randn_like(p) for p in params.values()]
    likelihood = Categorical()
    actual = fisher_vector_product(model, (inputs,), params, vector, likelihood, "mean")

    class LogitsOnly(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)[0]

    wrapped = LogitsOnly(model)
    expected = fisher_vector_product(
        wrapped, (inputs,), dict(wrapped.named_parameters()), vector, likelihood, "mean"
    )
    for a, e in zip(actual, expected, strict=True):
        assert relative_error(a, e) <= 1e-12
    pre = natgrad.FishLeg(model, aux_period=1)  # its auxiliary step runs the same product
    logits, _ = model(inputs)
    F.cross_entropy(logits, torch.randint(0, 2, (5,))).backward()
    pre.step(logits)
    assert pre.aux_losses


@pytest.mark.parametrize("overridden", ["embed", "head"])
def test_overriding_one_half_of_a_tied_weight_is_refused(overridden):
    """Each half would write a direction built from its own use of the shared weight."""
    with pytest.raises(ValueError, match="share one weight"):
        natgrad.EF(TiedHead(), overrides={overridden: "plain_gradient"})
    both = natgrad.EF(TiedHead(), overrides={"embed": "plain_gradient", "head": "plain_gradient"})
    assert "embed.weight" in both.selection.plain


def test_a_grad_scaler_with_per_token_datapoints_is_refused():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5))
    pre = natgrad.EF(model, likelihood=Categorical(datapoint="token"))
    scaler = torch.amp.GradScaler("cpu", init_scale=8.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    logits = model(torch.randn(2, 6, 3))
    scaler.scale(F.cross_entropy(logits.reshape(-1, 5), torch.randint(0, 5, (12,)))).backward()
    with pytest.raises(NotImplementedError, match="datapoint='sequence'"):
        pre.step(logits, grad_scaler=scaler)
    del opt


class LearnedQueryPooling(nn.Module):
    """Attention pooling with one learned query of shape (1, d), broadcast over the batch by
    the model's own arithmetic."""

    def __init__(self) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(1, 4))
        self.q = nn.Linear(4, 4)
        self.k = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):  # x: (N, T, 4)
        scores = (self.k(x) @ self.q(self.query).T).squeeze(-1)  # (N, T)
        pooled = (scores.softmax(dim=1).unsqueeze(-1) * x).sum(dim=1)
        return self.head(pooled)


def test_a_learned_batch_of_one_is_not_expanded(float64):
    """Only inputs that need no gradient (position ids) are expanded to the batch: a learned
    query's output keeps its shape, so the model computes what it computes without natgrad."""
    torch.manual_seed(3)
    model, inputs = LearnedQueryPooling(), torch.randn(5, 6, 4)
    expected = model(inputs)
    pre = natgrad.EF(model, overrides={"q": "fallback"})
    logits = model(inputs)
    assert torch.equal(logits, expected)
    F.cross_entropy(logits, torch.randint(0, 3, (5,))).backward()
    pre.step(logits)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_a_model_output_passed_to_step_is_answered_with_its_logits():
    class Output(dict):
        def __getattr__(self, name):
            return self[name]

    model = nn.Sequential(nn.Linear(3, 2))
    pre = natgrad.EF(model)
    logits = model(torch.randn(4, 3))
    F.cross_entropy(logits, torch.randint(0, 2, (4,))).backward()
    with pytest.raises(TypeError, match=r"got Output \(pass its \.logits\)"):
        pre.step(Output(logits=logits))
