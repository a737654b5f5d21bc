"""Resumable Optuna sweeps on a small task."""

from __future__ import annotations

from dataclasses import replace

import pytest

from natgrad.lab import runner
from natgrad.lab.cli import main

optuna = pytest.importorskip("optuna")

GRID = {"lr": [0.01, 0.1], "momentum": [0.9]}


def completed(storage, task, method):
    from natgrad.lab.sweep import study_name

    study = optuna.load_study(study_name=study_name(task, method), storage=storage)
    return [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]


@pytest.mark.slow  # trains six runs
def test_sweep_resumes_where_it_stopped(tmp_path):
    from natgrad.lab.sweep import collect_runs, run_sweep

    storage = f"sqlite:///{tmp_path / 'sweep.db'}"
    task = replace(runner.get_task("wine-mlp"), epochs=1)
    run_sweep(task, "sgd", [0, 1], storage, GRID, n_trials=1)  # "interrupted" after one point
    assert len(completed(storage, task, "sgd")) == 1
    run_sweep(task, "sgd", [0, 1], storage, GRID)
    trials = completed(storage, task, "sgd")
    assert sorted(t.params["lr"] for t in trials) == [0.01, 0.1]
    run_sweep(task, "sgd", [0, 1], storage, GRID)  # nothing left to run
    assert len(completed(storage, task, "sgd")) == 2
    runs = collect_runs(task, ["sgd"], storage)
    assert len(runs) == 4 and {r["seed"] for r in runs} == {0, 1}
    best = runner.best_runs(runs)["sgd"]
    value = min(t.value for t in trials)
    assert sum(r["train_loss"][-1] for r in best) / 2 == pytest.approx(value)


@pytest.mark.slow  # two spawned workers import torch and train
def test_cli_sweep_with_two_workers(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'db' / 'sweep.db'}"
    status = main([
        "sweep", "--task", "wine-mlp", "--methods", "sgd", "--epochs", "1",
        "--storage", storage, "--workers", "2", "--output", str(tmp_path / "out"),
    ])  # fmt: skip
    assert status == 0
    task = replace(runner.get_task("wine-mlp"), epochs=1)
    trials = completed(storage, task, "sgd")
    # The whole default lr grid. How many trials there are depends on timing: two workers
    # asking for a point at the same moment may both get the same one (sweep.py documents
    # it), at most once each (2 workers). What does not depend on timing: training is
    # deterministic, so a repeated point has the same value, and the summary is the best
    # point's mean whatever was repeated.
    by_lr = {}
    for trial in trials:
        by_lr.setdefault(trial.params["lr"], []).append(trial.value)
    assert sorted(by_lr) == [1e-4, 1e-3, 1e-2, 1e-1]
    assert all(len(values) <= 2 and len(set(values)) == 1 for values in by_lr.values())
    best_lr = min(by_lr, key=lambda lr: by_lr[lr][0])
    best = next(t for t in trials if t.params["lr"] == best_lr)
    row = f"| sgd | {best.params} | {best.value:.4g} |"
    assert row in (tmp_path / "out" / "summary.md").read_text()


def test_cli_sweep_refuses_workers_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    with pytest.raises(SystemExit, match="drop --workers"):
        main([
            "sweep", "--task", "wine-mlp", "--methods", "sgd", "--workers", "2",
            "--storage", f"sqlite:///{tmp_path / 'sweep.db'}", "--output", str(tmp_path),
        ])  # fmt: skip
