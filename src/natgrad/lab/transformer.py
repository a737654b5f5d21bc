"""A tiny transformer on MNIST-1D, trained from scratch, by prompt tuning and with LoRA.

Wu et al. 2024 (sec. 6-7, Table 2) compares SGD, AdamW, EF and iEF where natural-gradient methods
matter today: prompt tuning (trainable prompt vectors in front of a frozen model) and LoRA
adapters inside a frozen transformer. These models mirror that comparison at CPU scale: each
MNIST-1D signal (40 values) is a sequence of 40 tokens.

* :class:`TinyTransformer`: token and position embeddings, ``nn.TransformerEncoderLayer``
  blocks whose attention is :class:`natgrad.layers.MultiheadAttention` (four ``nn.Linear``
  projections, so natgrad sees every weight in the neuron view), mean pooling, a linear head;
  optional trainable prompt vectors (a free ``nn.Parameter``, which natgrad handles through its
  torch.func fallback).
* :class:`LoRALinear`: ``W x + (α/r) B A x`` with ``W`` frozen and ``A``, ``B`` two bias-free
  ``nn.Linear`` layers, so the adapters are in the neuron view too (weight shared over tokens).
* :func:`prompt_tuning_model` and :func:`lora_model` start from a body pre-trained on the task
  by AdamW for a few epochs (cached per process), freeze it, and leave trainable only the
  prompt, or the LoRA adapters and the head.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from natgrad.lab.datasets import load_dataset
from natgrad.layers import replace_attention

PRETRAIN_EPOCHS = 3


class TinyTransformer(nn.Module):
    """Sequence classifier on ``(N, L)`` real-valued inputs (one token per value).

    Parameters
    ----------
    length, classes
        Sequence length and number of classes.
    width, heads, depth, feedforward
        Transformer sizes.
    prompt_tokens
        Trainable prompt vectors prepended to every sequence (0: none).
    """

    def __init__(
        self,
        length: int = 40,
        classes: int = 10,
        width: int = 32,
        heads: int = 4,
        depth: int = 2,
        feedforward: int = 64,
        prompt_tokens: int = 0,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(1, width)
        self.positions = nn.Embedding(length, width)
        self.prompt = (
            nn.Parameter(0.02 * torch.randn(prompt_tokens, width)) if prompt_tokens else None
        )
        blocks = [
            nn.TransformerEncoderLayer(width, heads, feedforward, dropout=0.0, batch_first=True)
            for _ in range(depth)
        ]
        self.blocks = replace_attention(nn.Sequential(*blocks))
        self.head = nn.Linear(width, classes)

    def forward(self, inputs: Tensor) -> Tensor:
        batch, length = inputs.shape
        positions = torch.arange(length, device=inputs.device).expand(batch, length)
        tokens = self.embed(inputs.unsqueeze(-1)) + self.positions(positions)
        if self.prompt is not None:
            tokens = torch.cat([self.prompt.expand(batch, -1, -1), tokens], dim=1)
        return self.head(self.blocks(tokens).mean(dim=1))


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update ``(α/r) B A``, ``B`` zero at
    the start (so the model starts as the base model)."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        self.base = base.requires_grad_(False)
        self.down = nn.Linear(base.in_features, rank, bias=False)
        self.up = nn.Linear(rank, base.out_features, bias=False)
        nn.init.zeros_(self.up.weight)
        self.scale = alpha / rank

    def forward(self, inputs: Tensor) -> Tensor:
        return self.base(inputs) + self.scale * self.up(self.down(inputs))


@functools.lru_cache(maxsize=4)
def pretrained_body(epochs: int, seed: int = 0) -> TinyTransformer:
    """A :class:`TinyTransformer` trained on MNIST-1D by AdamW (lr 1e-3, batch 100), cached."""
    data = load_dataset("mnist1d")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = TinyTransformer(data.train_inputs.shape[1], data.num_outputs)
        optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
        for _ in range(epochs):
            for batch in torch.randperm(len(data.train_inputs)).split(100):
                optimiser.zero_grad()
                loss = F.cross_entropy(model(data.train_inputs[batch]), data.train_targets[batch])
                loss.backward()
                optimiser.step()
    return model


def prompt_tuning_model(prompt_tokens: int = 4) -> TinyTransformer:
    """The pre-trained body, frozen, with ``prompt_tokens`` trainable prompt vectors."""
    body = pretrained_body(PRETRAIN_EPOCHS)
    model = TinyTransformer(body.positions.num_embeddings, body.head.out_features,
                            prompt_tokens=prompt_tokens)  # fmt: skip
    model.load_state_dict(body.state_dict(), strict=False)
    for name, param in model.named_parameters():
        param.requires_grad_(name == "prompt")
    return model


def lora_model(rank: int = 8) -> TinyTransformer:
    """The pre-trained body, frozen, with LoRA adapters of ``rank`` on every attention query
    and value projection; the adapters and the head train."""
    model = copy.deepcopy(pretrained_body(PRETRAIN_EPOCHS))
    model.requires_grad_(False)
    for block in model.blocks:
        attention = block.self_attn
        attention.q_proj = LoRALinear(attention.q_proj, rank)
        attention.v_proj = LoRALinear(attention.v_proj, rank)
    model.head.requires_grad_(True)
    return model


__all__ = [
    "LoRALinear",
    "TinyTransformer",
    "lora_model",
    "pretrained_body",
    "prompt_tuning_model",
]
