"""What a bench run records beyond its losses: FishLeg's Q quality."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from natgrad.lab import runner
from natgrad.lab.reproduce import tuning
from natgrad.precond import FishLeg


def test_a_fishleg_run_records_how_its_q_moved_and_aligns():
    task = replace(runner.get_task("wine-mlp"), epochs=2)
    data = task.load_data()
    learning = {"lr": 0.05, "aux_lr": 0.05, "init_scale": 1.0, "aux_period": 1}
    run = runner.train_run(task, "fishleg", learning, 0, data)
    quality = run["q_quality"]
    assert quality["movement"] > 0.01  # an auxiliary step every step moved Q
    assert -1 <= quality["alignment"] <= 1 and quality["alignment_residual"] < 1e-3
    assert 0 < quality["smallest_eigenvalue"] <= quality["largest_eigenvalue"]
    frozen = runner.train_run(task, "fishleg", {**learning, "aux_lr": 1e-12}, 0, data)
    assert frozen["q_quality"]["movement"] < 1e-6  # the record tells a Q that never learned
    assert "q_quality" not in runner.train_run(task, "sgd", {"lr": 0.1}, 0, data)
    numbers = tuning.numbers({"fishleg": [{**run, "registry_method": "fishleg"}]})
    assert numbers["fishleg"]["q_quality_per_seed"] == [quality]
    assert all(math.isfinite(v) for v in quality.values())


def test_aux_batch_gives_fishleg_a_separate_random_batch_and_keeps_the_training_batches(
    monkeypatch,
):
    task = replace(runner.get_task("wine-mlp"), epochs=1)
    data = task.load_data()
    seen = []
    step = FishLeg.step

    def spy(self, logits, aux_args=None, grad_scaler=None):
        seen.append((self.capture.model_args[0].clone(), aux_args))
        return step(self, logits, aux_args, grad_scaler)

    monkeypatch.setattr(FishLeg, "step", spy)
    hyper = {"lr": 0.05, "aux_lr": 0.01, "aux_period": 1}
    plain = runner.train_run(task, "fishleg", hyper, 0, data)
    batches = [inputs for inputs, aux in seen]
    assert all(aux is None for _, aux in seen)
    seen.clear()
    separate = runner.train_run(task, "fishleg", {**hyper, "aux_batch": 5}, 0, data)
    assert separate["hyper"]["aux_batch"] == 5
    assert len(seen) == len(batches)
    rows = {tuple(row.tolist()) for row in data.train_inputs}
    for (inputs, (aux,)), training in zip(seen, batches, strict=True):
        assert torch.equal(inputs, training)  # the training batches are unchanged
        assert aux.shape == (5, data.train_inputs.shape[1])
        assert {tuple(row.tolist()) for row in aux} <= rows  # training datapoints...
        assert len({tuple(row.tolist()) for row in aux}) == 5  # ...without repeats
    assert sum(not torch.equal(aux, inputs[:5]) for inputs, (aux,) in seen) == len(seen)
    assert separate["train_loss"] != plain["train_loss"]  # another Fisher, another Q
    with pytest.raises(ValueError, match="aux_batch=4: a separate auxiliary batch is for FishLeg"):
        runner.train_run(task, "kfac", {"lr": 0.1, "aux_batch": 4}, 0, data)
    with pytest.raises(ValueError, match="aux_batch must be a positive number of datapoints"):
        runner.train_run(task, "fishleg", {**hyper, "aux_batch": 0}, 0, data)
