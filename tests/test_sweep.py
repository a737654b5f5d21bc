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


def test_cli_sweep_with_two_workers(tmp_path, capsys):
    storage = f"sqlite:///{tmp_path / 'db' / 'sweep.db'}"
    status = main([
        "sweep", "--task", "wine-mlp", "--methods", "sgd", "--epochs", "1",
        "--storage", storage, "--workers", "2", "--output", str(tmp_path / "out"),
    ])  # fmt: skip
    assert status == 0
    task = replace(runner.get_task("wine-mlp"), epochs=1)
    trials = completed(storage, task, "sgd")
    # the whole default lr grid; racing workers may each repeat at most one point at the end
    assert {t.params["lr"] for t in trials} == {1e-4, 1e-3, 1e-2, 1e-1}
    assert 4 <= len(trials) <= 4 + 2
    assert "| sgd |" in (tmp_path / "out" / "summary.md").read_text()


def test_cli_sweep_refuses_workers_under_torchrun(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it
    with pytest.raises(SystemExit, match="drop --workers"):
        main([
            "sweep", "--task", "wine-mlp", "--methods", "sgd", "--workers", "2",
            "--storage", f"sqlite:///{tmp_path / 'sweep.db'}", "--output", str(tmp_path),
        ])  # fmt: skip
