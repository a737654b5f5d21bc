"""The benchmark registry, runner and CLI on a small task."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from figures import line_data
from natgrad.lab import registry, runner
from natgrad.lab.cli import main


def test_grid_points_and_registry():
    points = runner.grid_points({"lr": [0.1, 0.01], "damping": [1.0]})
    assert points == [{"damping": 1.0, "lr": 0.1}, {"damping": 1.0, "lr": 0.01}]
    assert {"sgd", "adam", "kfac", "foof", "ef", "ief", "ngd", "fishleg"} <= set(registry.REGISTRY)
    with pytest.raises(ValueError, match="unknown method 'lbfgs'"):
        registry.get_method("lbfgs")
    with pytest.raises(ValueError, match="already registered"):
        registry.register(registry.Method("sgd", registry.REGISTRY["sgd"].build))
    with pytest.raises(ValueError, match="unknown task 'imagenet'"):
        runner.get_task("imagenet")


def test_best_runs_selects_lowest_mean_final_loss_and_skips_divergence():
    def run(method, lr, seed, final, diverged=False):
        return {
            "method": method,
            "hyper": {"lr": lr},
            "seed": seed,
            "diverged": diverged,
            "train_loss": [2.0, final],
            "seconds": [0, 1],
            "test_loss": final,
        }

    runs = [
        run("sgd", 0.1, 0, 0.5), run("sgd", 0.1, 1, 0.7),
        run("sgd", 0.01, 0, 0.55), run("sgd", 0.01, 1, 0.56),
        run("sgd", 1.0, 0, float("nan"), diverged=True),
    ]  # fmt: skip
    best = runner.best_runs(runs)
    assert best["sgd"][0]["hyper"] == {"lr": 0.01}
    assert "| sgd | {'lr': 0.01} | 0.555 |" in runner.summary_table(best)
    # ordered by the mean printed, even when methods ran different numbers of seeds
    best["adam"] = [run("adam", 0.1, 0, 0.6)]
    table = runner.summary_table(best)
    assert table.index("| sgd |") < table.index("| adam |")


def test_cli_bench_writes_runs_summary_and_curves(tmp_path, capsys, saved_figures):
    grid = {"sgd": {"lr": [0.1], "momentum": [0.9]}, "ief": {"lr": [0.1], "damping": [0.1]}}
    status = main([
        "bench", "--task", "wine-mlp", "--methods", "sgd", "ief", "--epochs", "2",
        "--seeds", "0", "1", "--grid", json.dumps(grid), "--output", str(tmp_path),
    ])  # fmt: skip
    assert status == 0
    runs = json.loads((tmp_path / "runs.json").read_text())
    assert len(runs) == 4 and all(len(r["train_loss"]) == 3 for r in runs)
    assert all(r["train_loss"][-1] < r["train_loss"][0] for r in runs)
    summary = (tmp_path / "summary.md").read_text()
    assert "| sgd |" in summary and "| ief |" in summary
    assert (tmp_path / "curves.png").exists()
    (figure,) = saved_figures  # per method the mean over seeds, by epoch and by seconds
    by_epoch, by_seconds = line_data(figure.axes[0]), line_data(figure.axes[1])
    for method in ("sgd", "ief"):
        group = [r for r in runs if r["method"] == method]
        mean = [sum(values) / 2 for values in zip(*(r["train_loss"] for r in group), strict=True)]
        seconds = [sum(values) / 2 for values in zip(*(r["seconds"] for r in group), strict=True)]
        assert by_epoch[method] == ([0.0, 1.0, 2.0], pytest.approx(mean, rel=1e-6))
        assert by_seconds[method] == (
            pytest.approx(seconds, rel=1e-6),
            pytest.approx(mean, rel=1e-6),
        )
    assert "final train loss" in capsys.readouterr().out
    rows = (tmp_path / "runs.csv").read_text().splitlines()
    assert rows[0] == "task,method,hyper,seed,epoch,train_loss,seconds,diverged"
    assert len(rows) == 1 + 4 * 3  # 4 runs x (initial loss + 2 epochs)


def test_cli_rejects_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        main(["bench", "--task", "nope"])
    with pytest.raises(SystemExit, match="--grid is not valid JSON"):
        main(["bench", "--task", "wine-mlp", "--grid", "{", "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match="--epochs must be >= 1"):
        main(["bench", "--task", "wine-mlp", "--epochs", "0", "--output", str(tmp_path)])


def test_cli_field_and_analyze(tmp_path, capsys):
    assert main(["field", "--output", str(tmp_path / "f"), "--steps", "5", "--grid", "3"]) == 0
    out = capsys.readouterr().out
    assert "NGD vs iEF arrows on 9 grid points: cosine min 1.0000000000" in out
    assert (tmp_path / "f" / "regression_fields.png").exists()
    assert (tmp_path / "f" / "logistic_quadratics.png").exists()
    status = main([
        "analyze", "--dataset", "wine", "--epochs", "1", "--batches", "1",
        "--output", str(tmp_path / "a"),
    ])  # fmt: skip
    assert status == 0
    assert "Spearman correlation" in capsys.readouterr().out
    assert (tmp_path / "a" / "rows.csv").exists() and (tmp_path / "a" / "study.png").exists()


@pytest.mark.parametrize(
    "name",
    [
        "digits-autoencoder",
        "digits-cnn",
        "deep-linear-small",
        "least-squares-2d",
        "logistic-misspecified-b",
    ],
)
def test_every_kind_of_task_trains_with_a_preconditioner(name):
    from dataclasses import replace

    task = replace(runner.get_task(name), epochs=2)
    data = runner.load_dataset(task.dataset)
    run = runner.train_run(task, "ief", {"lr": 0.01, "damping": 0.1}, 0, data)
    assert not run["diverged"] and len(run["train_loss"]) == 3
    assert run["train_loss"][-1] < run["train_loss"][0]
    assert len(run["step_loss"]) == len(run["step_seconds"]) > 0


def test_synthetic_datasets_follow_the_seeds():
    from natgrad.lab.datasets import load_dataset

    deep = load_dataset("deep_linear")
    assert deep.train_inputs.shape == (4000, 20) and deep.test_inputs.shape == (1000, 20)
    assert load_dataset("deep_linear_small").train_inputs.shape == (40, 20)
    logistic = load_dataset("logistic_correct")
    assert logistic.task == "binary" and set(logistic.train_targets.unique().tolist()) == {0, 1}
    squares = load_dataset("least_squares_2d")
    assert squares.train_inputs.min() > 0  # lognormal inputs


def test_a_diverging_run_is_marked_and_the_sweep_continues():
    task = replace(runner.get_task("wine-mlp"), epochs=3)
    lines = []
    grids = {
        "sgd": {"lr": [1e8, 0.01]},
        "kfac": {"lr": [1e4], "damping": [1e-8], "damping_mode": ["correct"]},
    }
    runs = runner.sweep(task, ["sgd", "kfac"], [0], grids, progress=lines.append)
    assert [r["diverged"] for r in runs[:2]] == [True, False] and len(runs) == 3
    assert runner.best_runs(runs)["sgd"][0]["hyper"] == {"lr": 0.01}
    # the KFAC run's numerical trouble is counted per run, not printed once per step
    assert runs[2]["warnings"]["NonFiniteWarning"] >= 1 and runs[2]["diverged"]
    assert len(lines) == 3
