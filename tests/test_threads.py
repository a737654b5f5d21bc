"""The lab's thread policy: each run chooses, uses, records and then restores its thread count."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from torch import nn

from natgrad.lab import runner
from natgrad.lab.cli import main


def test_default_threads_one_below_a_million_parameters():
    with runner.torch_threads(2):
        assert runner.default_threads(nn.Linear(998, 1000)) == 1  # 0.999 M parameters
        assert runner.default_threads(nn.Linear(1000, 1000)) == 2  # 1.001 M: torch's count


@pytest.mark.parametrize("threads", [None, 2])
def test_a_run_uses_records_and_restores_its_thread_count(monkeypatch, threads):
    seen = []
    fit = runner._fit

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return fit(*args, **kwargs)

    monkeypatch.setattr(runner, "_fit", spy)
    task = replace(runner.get_task("wine-mlp"), epochs=1)
    data = task.load_data()
    with runner.torch_threads(3):
        run = runner.train_run(task, "sgd", {"lr": 0.1, "momentum": 0.0}, 0, data, threads)
        assert torch.get_num_threads() == 3
    expected = 1 if threads is None else threads  # wine-mlp is tiny
    assert seen == [expected] and run["threads"] == expected


def test_cli_bench_threads(tmp_path):
    grid = json.dumps({"sgd": {"lr": [0.1], "momentum": [0.0]}})
    arguments = ["bench", "--task", "wine-mlp", "--methods", "sgd", "--epochs", "1", "--grid",
                 grid, "--output", str(tmp_path)]  # fmt: skip
    assert main([*arguments, "--threads", "2"]) == 0
    assert [run["threads"] for run in json.loads((tmp_path / "runs.json").read_text())] == [2]
    with pytest.raises(SystemExit, match="--threads must be >= 1"):
        main([*arguments, "--threads", "0"])
