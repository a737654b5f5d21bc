"""natgrad bench under torch.distributed: two ranks train one model on split global batches,
as one process does on the whole batches; the CLI under torchrun writes one report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from gloo import process_group, spawn_ranks
from natgrad.lab import runner
from natgrad.lab.sweep import study_name

pytestmark = pytest.mark.slow  # every test starts two processes that train

HYPER = {"sgd": {"lr": 0.1, "momentum": 0.9}, "ief": {"lr": 0.05, "damping": 0.1}}


def task() -> runner.Task:
    return replace(runner.get_task("wine-mlp"), epochs=2)  # batches of 32 and 14: even shards


def worker(rank: int, directory: str) -> None:
    torch.set_num_threads(1)
    with process_group(rank, directory):
        data = runner.load_dataset("wine")
        runs = {m: runner.train_run(task(), m, HYPER[m], 0, data) for m in HYPER}
        torch.save({m: r["train_loss"] for m, r in runs.items()}, f"{directory}/rank{rank}.pt")


def test_two_ranks_train_like_one_process_on_the_global_batches(tmp_path):
    ranks = spawn_ranks(worker, str(tmp_path))
    data = runner.load_dataset("wine")
    for method, hyper in HYPER.items():
        single = torch.tensor(runner.train_run(task(), method, hyper, 0, data)["train_loss"])
        for losses in ranks:
            assert torch.allclose(torch.tensor(losses[method]), single, rtol=1e-4), method
        assert single[-1] < single[0]


def torchrun(arguments: list[str]) -> subprocess.CompletedProcess:
    """``natgrad ...`` on 2 ranks through torchrun; fails with the ranks' error output.

    No retry: a launch was seen once to die of a signal in rank 1 with nothing reported (not
    reproduced in 30 runs since; the tests are marked ``flaky_launch``). ``--standalone`` lets
    torchrun's TCP store bind a free port itself (no fixed port two runs could share).
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc_per_node", "2", "-m", "natgrad.lab.cli", *arguments,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    if done.returncode != 0:
        pytest.fail(f"torchrun exited with {done.returncode}:\n{done.stderr[-6000:]}")
    return done


@pytest.mark.flaky_launch
def test_cli_bench_under_torchrun_writes_one_report(tmp_path):
    grid = json.dumps({"sgd": {"lr": [0.1]}})
    done = torchrun([
        "bench", "--task", "wine-mlp", "--methods", "sgd", "--epochs", "1", "--grid", grid,
        "--output", str(tmp_path),
    ])  # fmt: skip
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert len(runs) == 1 and runs[0]["train_loss"][-1] < runs[0]["train_loss"][0]
    assert done.stdout.count("| sgd |") == 1  # only rank 0 reports


@pytest.mark.flaky_launch
def test_cli_sweep_under_torchrun_trains_each_grid_point_once(tmp_path):
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'db' / 'sweep.db'}"
    done = torchrun([
        "sweep", "--task", "wine-mlp", "--methods", "sgd", "--epochs", "1",
        "--storage", storage, "--output", str(tmp_path / "out"),
    ])  # fmt: skip
    study = optuna.load_study(
        study_name=study_name(replace(task(), epochs=1), "sgd"), storage=storage
    )
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.params["lr"] for t in complete) == [1e-4, 1e-3, 1e-2, 1e-1]
    assert done.stdout.count("grid done") == 1  # only rank 0 reports
    assert "| sgd |" in (tmp_path / "out" / "summary.md").read_text()
    # the two ranks trained each grid point together: the losses of one process
    data = runner.load_dataset("wine")
    for trial in complete:
        single = runner.train_run(replace(task(), epochs=1), "sgd", trial.params, 0, data)
        stored = trial.user_attrs["runs"][0]["train_loss"]
        assert torch.allclose(torch.tensor(stored), torch.tensor(single["train_loss"]), rtol=1e-4)
