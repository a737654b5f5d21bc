"""What a bench run records beyond its losses: FishLeg's Q quality."""

from __future__ import annotations

import math
from dataclasses import replace

from natgrad.lab import runner
from natgrad.lab.reproduce import tuning


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
