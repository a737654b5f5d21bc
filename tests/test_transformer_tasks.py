"""The transformer tasks of natgrad bench (Wu et al. 2024, Table 2 at CPU scale): from scratch,
prompt tuning and LoRA, each trained by SGD, AdamW, EF and iEF on a slice of MNIST-1D."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

import natgrad
from natgrad.lab import runner, transformer


@pytest.fixture(autouse=True)
def untrained_body(monkeypatch):
    """A body 'pre-trained' for 0 epochs keeps the smoke tests fast."""
    monkeypatch.setattr(transformer, "PRETRAIN_EPOCHS", 0)


def data_slice():
    data = runner.load_dataset("mnist1d")
    return replace(data, train_inputs=data.train_inputs[:64], train_targets=data.train_targets[:64])


@pytest.mark.slow  # trains each method on each transformer task
@pytest.mark.parametrize(
    ("task", "groups"),
    [
        ("mnist1d-transformer", ["blocks.0.self_attn.q_proj (Linear)", "LayerNorm"]),
        ("mnist1d-prompt", ["neuron view: none", "torch.func per-sample rows: prompt"]),
        ("mnist1d-lora", ["q_proj.down (Linear)", "v_proj.up (Linear)", "head (Linear)"]),
    ],
)
def test_each_method_trains_each_transformer_task(task, groups):
    task = replace(runner.get_task(task), epochs=2, batch_size=32)
    data = data_slice()
    pre = natgrad.IEF(task.build_model(data))
    assert all(group in pre.describe() for group in groups)
    pre.remove()
    for method, hyper in [
        ("sgd", {"lr": 0.05, "momentum": 0.9}),
        ("adamw", {"lr": 1e-3}),
        ("ef", {"lr": 1e-3, "damping": 1e-3}),
        ("ief", {"lr": 1e-2, "damping": 1e-3}),
    ]:
        run = runner.train_run(task, method, hyper, 0, data)
        assert not run["diverged"] and all(math.isfinite(x) for x in run["train_loss"])
        assert run["train_loss"][-1] < run["train_loss"][0], (task.name, method)


def test_lora_starts_as_the_body_and_freezes_it():
    model = transformer.lora_model(rank=4)
    body = transformer.pretrained_body(0)
    inputs = torch.randn(3, 40)
    assert torch.allclose(model(inputs), body(inputs))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert all(".down." in n or ".up." in n or n.startswith("head.") for n in trainable)
    assert any(".down." in n for n in trainable)


def test_prompt_tuning_trains_only_the_prompt():
    model = transformer.prompt_tuning_model(prompt_tokens=3)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["prompt"]
    assert model(torch.randn(2, 40)).shape == (2, 10)
