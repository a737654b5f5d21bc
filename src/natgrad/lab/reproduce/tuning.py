"""Tuned training runs for the claims that compare optimisers.

Every compared configuration gets its hyper-parameters by grid search on the first seed
(lowest final training loss, as in every seed paper; a step size or damping that is best at
the edge of its grid is pushed a decade further, up to twice, as Benzing 2022, App. D.2 does), then
the selected configuration is trained with every seed; claims compare the mean final training
loss over seeds. Searching on one seed instead of all keeps each claim within minutes on two
cores; the spread over seeds of the selected configuration is reported next to every mean.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from natgrad.lab.datasets import Dataset
from natgrad.lab.reproduce.finding import Finding
from natgrad.lab.runner import (
    Task,
    final_train_loss,
    grid_points,
    mean_final,
    plot_curves,
    train_run,
)

EXTENSIONS = 2


@dataclass
class Contender:
    """One curve of a comparison: a registry method and the grid to tune it over."""

    label: str
    method: str
    grid: dict[str, list[Any]]


def tune(
    task: Task,
    data: Dataset,
    contenders: Sequence[Contender],
    seeds: Sequence[int],
    progress: Callable[[str], None] = print,
) -> dict[str, list[dict[str, Any]]]:
    """Per contender label, the runs (one per seed) of its best configuration."""
    if not seeds:
        raise ValueError("at least one seed is needed")
    selected: dict[str, list[dict[str, Any]]] = {}
    for contender in contenders:
        search = [
            train_run(task, contender.method, hyper, seeds[0], data)
            for hyper in grid_points(contender.grid)
        ]
        best = min(search, key=final_train_loss)
        for key in ("lr", "damping"):
            values = contender.grid.get(key, [])
            best = extend_at_boundary(task, data, contender.method, seeds[0], best, key, values)
        runs = [best] + [
            train_run(task, contender.method, best["hyper"], seed, data) for seed in seeds[1:]
        ]
        for run in runs:  # plots and tables name curves by label
            run["registry_method"], run["method"] = run["method"], contender.label
        selected[contender.label] = runs
        progress(f"  {task.name} {contender.label}: {describe(runs)}")
    return selected


def extend_at_boundary(
    task: Task,
    data: Dataset,
    method: str,
    seed: int,
    best: dict[str, Any],
    key: str,
    values: Sequence[float],
    adjust: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Benzing 2022, App. D.2: "we extended grids if the performance at a boundary of the grid was
    optimal". While ``best``'s ``key`` sits at the end of ``values`` (a grid of several
    values), try one decade further, at most :data:`EXTENSIONS` times; ``adjust`` updates
    hyper-parameters tied to ``key`` (e.g. FishLeg's ``init_scale`` to its step size)."""
    if len(values) < 2 or best["hyper"][key] not in (min(values), max(values)):
        return best
    factor = 10.0 if best["hyper"][key] == max(values) else 0.1
    for _ in range(EXTENSIONS):
        hyper = {**best["hyper"], key: best["hyper"][key] * factor}
        run = train_run(task, method, adjust(hyper) if adjust else hyper, seed, data)
        if not final_train_loss(run) < final_train_loss(best):
            break
        best = run
    return best


def ms_per_step(runs: list[dict[str, Any]]) -> float:
    """Median step time over every step of every run, in milliseconds."""
    return 1e3 * statistics.median(t for run in runs for t in run["step_seconds"])


def describe(runs: list[dict[str, Any]]) -> str:
    """``final train loss mean (min-max over n seeds) with {hyper}, x ms/step``."""
    finals = [final_train_loss(run) for run in runs]
    return (
        f"final train loss {mean_final(runs):.4g} ({min(finals):.4g}-{max(finals):.4g} over "
        f"{len(runs)} seeds) with {runs[0]['hyper']}, {ms_per_step(runs):.2f} ms/step"
    )


def numbers(selected: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """JSON-ready numbers of tuned runs: per label its hyper-parameters and losses."""
    return {
        label: {
            "method": runs[0]["registry_method"],
            "hyper": runs[0]["hyper"],
            "final_train_loss_mean": mean_final(runs),
            "final_train_loss_per_seed": [final_train_loss(run) for run in runs],
            "train_loss_curves": [run["train_loss"] for run in runs],
            "ms_per_step": ms_per_step(runs),
            "diverged_seeds": sum(run["diverged"] for run in runs),
            "numerical_warnings": [run["warnings"] for run in runs],
            **(
                {"q_quality_per_seed": [run["q_quality"] for run in runs]}
                if "q_quality" in runs[0]
                else {}
            ),
        }
        for label, runs in selected.items()
    }


def lines(selected: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One printed line per contender."""
    return [f"{label}: {describe(runs)}" for label, runs in selected.items()]


def plot(selected: dict[str, list[dict[str, Any]]], path: Path) -> list[str]:
    """Loss curves (per epoch and per second, band over seeds); the figure's path, or none
    when matplotlib is missing."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        plot_curves(selected, path)
    except ImportError:
        return []
    return [str(path)]


def finding(
    claim: str,
    statement: str,
    checks: dict[str, bool],
    selected: dict[str, list[dict[str, Any]]],
    output: Path,
    extra_lines: Sequence[str] = (),
    extra_numbers: dict[str, Any] | None = None,
) -> Finding:
    """The finding of a comparison of tuned runs: a line and the numbers of each contender,
    and their loss curves in ``<output>/<claim>.png``."""
    return Finding(
        claim,
        statement,
        checks,
        [*lines(selected), *extra_lines],
        {**numbers(selected), **(extra_numbers or {})},
        plot(selected, Path(output) / f"{claim}.png"),
    )


def less(a: float, b: float) -> bool:
    """``a < b`` for final losses, false when ``a`` is not finite."""
    return math.isfinite(a) and a < b


__all__ = [
    "Contender",
    "describe",
    "extend_at_boundary",
    "finding",
    "less",
    "lines",
    "mean_final",
    "ms_per_step",
    "numbers",
    "plot",
    "tune",
]
