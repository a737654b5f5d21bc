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
import torch.distributed as dist
import torch.multiprocessing as mp

from natgrad.lab import runner
from natgrad.lab.sweep import study_name

HYPER = {"sgd": {"lr": 0.1, "momentum": 0.9}, "ief": {"lr": 0.05, "damping": 0.1}}


def task() -> runner.Task:
    return replace(runner.get_task("wine-mlp"), epochs=2)  # batches of 32 and 14: even shards


def worker(rank: int, directory: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{directory}/store", rank=rank, world_size=2
    )
    try:
        data = runner.load_dataset("wine")
        runs = {m: runner.train_run(task(), m, HYPER[m], 0, data) for m in HYPER}
        torch.save({m: r["train_loss"] for m, r in runs.items()}, f"{directory}/rank{rank}.pt")
    finally:
        dist.barrier()
        dist.destroy_process_group()


def test_two_ranks_train_like_one_process_on_the_global_batches(tmp_path):
    mp.spawn(worker, args=(str(tmp_path),), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    data = runner.load_dataset("wine")
    for method, hyper in HYPER.items():
        single = torch.tensor(runner.train_run(task(), method, hyper, 0, data)["train_loss"])
        for losses in ranks:
            assert torch.allclose(torch.tensor(losses[method]), single, rtol=1e-4), method
        assert single[-1] < single[0]


def torchrun(make_arguments, tmp_path):
    """``natgrad ...`` on 2 ranks through torchrun; the completed process and its directory.

    A launch was seen once to die of a signal in rank 1 with nothing reported (not reproduced
    in 30 runs since); a failed run is repeated once, in a fresh directory, and the test fails
    with both runs' error output if the second fails too.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    errors = []
    for attempt in (1, 2):
        directory = tmp_path / f"attempt{attempt}"
        directory.mkdir()
        command = [
            sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node", "2", "-m", "natgrad.lab.cli", *make_arguments(directory),
        ]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        if done.returncode == 0:
            return done, directory
        errors.append(done.stderr[-6000:])
    pytest.fail("torchrun failed twice:\n" + "\n---\n".join(errors))


def test_cli_bench_under_torchrun_writes_one_report(tmp_path):
    grid = json.dumps({"sgd": {"lr": [0.1]}})
    done, directory = torchrun(
        lambda d: [
            "bench", "--task", "wine-mlp", "--methods", "sgd", "--epochs", "1", "--grid", grid,
            "--output", str(d),
        ],
        tmp_path,
    )  # fmt: skip
    runs = json.loads((directory / "runs.json").read_text())
    assert len(runs) == 1 and runs[0]["train_loss"][-1] < runs[0]["train_loss"][0]
    assert done.stdout.count("| sgd |") == 1  # only rank 0 reports


def test_cli_sweep_under_torchrun_trains_each_grid_point_once(tmp_path):
    optuna = pytest.importorskip("optuna")
    done, directory = torchrun(
        lambda d: [
            "sweep", "--task", "wine-mlp", "--methods", "sgd", "--epochs", "1",
            "--storage", f"sqlite:///{d / 'db' / 'sweep.db'}", "--output", str(d / "out"),
        ],
        tmp_path,
    )  # fmt: skip
    storage = f"sqlite:///{directory / 'db' / 'sweep.db'}"
    study = optuna.load_study(
        study_name=study_name(replace(task(), epochs=1), "sgd"), storage=storage
    )
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.params["lr"] for t in complete) == [1e-4, 1e-3, 1e-2, 1e-1]
    assert done.stdout.count("grid done") == 1  # only rank 0 reports
    assert "| sgd |" in (directory / "out" / "summary.md").read_text()
    # the two ranks trained each grid point together: the losses of one process
    data = runner.load_dataset("wine")
    for trial in complete:
        single = runner.train_run(replace(task(), epochs=1), "sgd", trial.params, 0, data)
        stored = trial.user_attrs["runs"][0]["train_loss"]
        assert torch.allclose(torch.tensor(stored), torch.tensor(single["train_loss"]), rtol=1e-4)
