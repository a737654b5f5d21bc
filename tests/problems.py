"""Small test problems shared by the test modules: models, targets, losses, one natgrad step."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from oracle import flat_grad


class MeanOverTokens(nn.Module):
    def forward(self, x):
        return x.mean(dim=1)


def make_mlp(outputs: int) -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(
        nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4, bias=False), nn.Tanh(), nn.Linear(4, outputs)
    )
    return model, torch.randn(7, 5)


def make_cnn(outputs: int) -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(
        nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 2, kernel_size=2, dilation=2, bias=False),
        nn.Flatten(),
        nn.Linear(2, outputs),
    )
    return model, torch.randn(5, 2, 6, 6)


def make_sequence(outputs: int) -> tuple[nn.Module, torch.Tensor]:
    model = nn.Sequential(
        nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), MeanOverTokens(), nn.Linear(3, outputs)
    )
    return model, torch.randn(6, 3, 4)


MODELS = {"mlp": make_mlp, "cnn": make_cnn, "sequence": make_sequence}


def make_targets(likelihood: str, num: int, outputs: int) -> torch.Tensor:
    if likelihood == "categorical":
        return torch.randint(0, outputs, (num,))
    if likelihood == "gaussian":
        return torch.randn(num, outputs)
    return torch.bernoulli(torch.full((num, outputs), 0.5))


def torch_loss(likelihood: str, logits, targets, reduction: str):
    if likelihood == "categorical":
        return F.cross_entropy(logits, targets, reduction=reduction)
    if likelihood == "gaussian":
        return F.mse_loss(logits, targets, reduction=reduction)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction=reduction)


def run_natgrad(
    model, inputs, targets, likelihood, reduction, fused=False, preconditioner=natgrad.NGD, **kwargs
):
    pre = preconditioner(model, likelihood=likelihood, reduction=reduction, **kwargs)
    model.zero_grad()
    logits = model(inputs)
    loss = torch_loss(likelihood, logits, targets, reduction)
    if fused:
        pre.backward(loss)
    else:
        loss.backward()
    pre.step(logits)
    pre.remove()
    return flat_grad([p for p in model.parameters() if p.requires_grad]), logits.detach()


class TiedHead(nn.Module):
    """An embedding whose weight is also the output layer's (weight tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(3, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.head.weight = self.embed.weight

    def forward(self, tokens):
        return self.head(torch.tanh(self.mix(self.embed(tokens).mean(dim=1))))
