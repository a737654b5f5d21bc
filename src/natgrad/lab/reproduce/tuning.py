"""Tuned training runs for the claims that compare optimisers, and how they are compared.

Tuning follows Benzing 2022, App. D.2:

* **Grids.** Step sizes take the values ``1·10^i`` and ``3·10^i`` (:func:`one_three_grid`);
  dampings a grid of powers of ten (the paper's ``10^-6, 10^-4, ..., 10^6``).
* **Search.** Every compared configuration is searched over its grid on the first seed (lowest
  final training loss, as in every seed paper); the selected configuration is then trained with
  every seed, and claims compare the mean final training loss over seeds. Searching on one seed
  keeps each claim within minutes; the spread over seeds of the selected configuration is
  reported next to every mean.
* **Boundary extension, jointly in step size and damping** ("we extended grids if the
  performance at a boundary of the grid was optimal"). While the best point sits at the edge of
  the ``lr`` axis or of the ``damping`` axis (an axis of at least two values), that axis gets the
  grid's next value beyond the edge (:func:`next_value`: ``3e-2`` after ``1e-2``, ``1e-1`` after
  ``3e-2``; for other grids the ratio of its two outermost values) and the new values are
  crossed with every value of the other axes and searched; at most :data:`EXTENSIONS` rounds.

**Ties.** A comparison "a beats b" of two tuned configurations (:func:`compare`) holds only
if the difference of their seed-means exceeds the *seeds' spread* of the comparison, defined as
the larger of the two ranges (max - min over seeds of the final training loss) of a and b.
A smaller difference is a tie: a check that needs a win fails on it, one that needs "no loss"
(e.g. "FOOF at least as good as KFAC") holds, and either way the claim's lines, report and JSON
say "tie within seeds' spread" (:class:`Comparison`, ``Finding.ties``). With one seed the
spread is zero and any difference decides. A diverged configuration (non-finite loss) never
wins and loses to any finite one.

Runs are deterministic given task, method, hyper-parameters, seed and data, so tuned runs are
memoised per process (:func:`cached_run`): claims sharing contenders (R4, R5 and R6 all tune SGD
and KFAC on the same task) train each configuration once.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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
EXTENDED_AXES = ("lr", "damping")
TIE = "tie within seeds' spread"


@dataclass
class Contender:
    """One curve of a comparison: a registry method and the grid to tune it over."""

    label: str
    method: str
    grid: dict[str, list[Any]]


def one_three_grid(low: int, high: int) -> list[float]:
    """``1·10^i`` and ``3·10^i`` for ``low <= i <= high`` (Benzing 2022, App. D.2), ascending."""
    if low > high:
        raise ValueError(f"the lowest exponent must not exceed the highest, got {low} > {high}")
    return [float(f"{mantissa}e{i}") for i in range(low, high + 1) for mantissa in (1, 3)]


def _is_power_of_ten(value: float) -> bool:
    return math.isclose(value, 10.0 ** round(math.log10(value)), rel_tol=1e-9)


def _is_one_three(value: float) -> bool:
    exponent = math.floor(math.log10(value))
    return any(math.isclose(value, m * 10.0**exponent, rel_tol=1e-9) for m in (1, 3))


def next_value(values: Sequence[float], upward: bool) -> float:
    """The grid's next value beyond its largest (``upward``) or smallest value: the next of
    ``1·10^i, 3·10^i`` when every value has that form and some is a ``3·10^i``, else one more
    step of the ratio between the two outermost values on that side (``10^4`` after
    ``10^-2, 10^0, 10^2``)."""
    ordered = sorted(values)
    if len(ordered) < 2 or ordered[0] <= 0:
        raise ValueError(f"a grid to extend needs at least two positive values, got {values}")
    edge, inner = (ordered[-1], ordered[-2]) if upward else (ordered[0], ordered[1])
    if all(_is_one_three(value) for value in ordered) and not all(map(_is_power_of_ten, ordered)):
        exponent = math.floor(math.log10(edge))
        is_one = math.isclose(edge, 10.0**exponent, rel_tol=1e-9)
        if upward:
            return float(f"{1 if not is_one else 3}e{exponent + (0 if is_one else 1)}")
        return float(f"{3 if is_one else 1}e{exponent - (1 if is_one else 0)}")
    return edge * (edge / inner)


_RUNS: dict[tuple[Any, ...], dict[str, Any]] = {}


def cached_run(
    task: Task, method: str, hyper: dict[str, Any], seed: int, data: Dataset
) -> dict[str, Any]:
    """:func:`~natgrad.lab.runner.train_run`, memoised per process on everything that decides
    the run (task settings, method, hyper-parameters, seed, the training data's name, size and
    sum); a copy, so callers may relabel it."""
    key = (
        train_run,  # a stand-in trainer (tests) never shares runs with the real one
        task.name, task.dataset, task.epochs, task.batch_size, task.likelihood, task.reconstruct,
        method, json.dumps(hyper, sort_keys=True), seed,
        _data_key(data),
    )  # fmt: skip
    if key not in _RUNS:
        _RUNS[key] = train_run(task, method, hyper, seed, data)
    return dict(_RUNS[key])


def _data_key(data: Dataset) -> tuple[Any, ...]:
    if not isinstance(data, Dataset):  # a stand-in (tests): by identity
        return (id(data),)
    return data.name, len(data.train_inputs), float(data.train_inputs.double().sum())


def search(
    task: Task,
    data: Dataset,
    method: str,
    grid: dict[str, list[Any]],
    seed: int,
    extend: Sequence[str] = EXTENDED_AXES,
) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """The best run (lowest final training loss) over ``grid`` on ``seed``, extending the axes
    ``extend`` jointly while the best sits at one of their edges (see the module docstring);
    also the grid finally searched."""
    grid = {key: list(values) for key, values in grid.items()}
    runs = {}

    def run_all() -> dict[str, Any]:
        for hyper in grid_points(grid):
            key = json.dumps(hyper, sort_keys=True)
            if key not in runs:
                runs[key] = cached_run(task, method, hyper, seed, data)
        return min(runs.values(), key=final_train_loss)

    best = run_all()
    for _ in range(EXTENSIONS):
        grew = False
        for axis in extend:
            values = grid.get(axis, [])
            if len(values) < 2 or not math.isfinite(final_train_loss(best)):
                continue
            if best["hyper"][axis] in (min(values), max(values)):
                upward = best["hyper"][axis] == max(values)
                values.append(next_value(values, upward))
                values.sort()
                grew = True
        if not grew:
            break
        best = run_all()
    return best, grid


def tune(
    task: Task,
    data: Dataset,
    contenders: Sequence[Contender],
    seeds: Sequence[int],
    progress: Callable[[str], None] = print,
) -> dict[str, list[dict[str, Any]]]:
    """Per contender label, the runs (one per seed) of its best configuration; each run
    records the grid finally searched (``searched_grid``)."""
    if not seeds:
        raise ValueError("at least one seed is needed")
    selected: dict[str, list[dict[str, Any]]] = {}
    for contender in contenders:
        best, searched = search(task, data, contender.method, contender.grid, seeds[0])
        runs = [dict(best)] + [
            cached_run(task, contender.method, best["hyper"], seed, data) for seed in seeds[1:]
        ]
        for run in runs:  # plots and tables name curves by label
            run["registry_method"], run["method"] = run["method"], contender.label
            run["searched_grid"] = searched
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
    """Extend one axis only, the others fixed at ``best``'s: while ``best``'s ``key`` sits at
    the end of ``values`` (a grid of several values), try the grid's next value beyond it
    (:func:`next_value`), at most :data:`EXTENSIONS` times; ``adjust`` updates
    hyper-parameters tied to ``key`` (e.g. FishLeg's ``init_scale`` to its step size)."""
    if len(values) < 2 or best["hyper"][key] not in (min(values), max(values)):
        return best
    upward = best["hyper"][key] == max(values)
    grid = list(values)
    for _ in range(EXTENSIONS):
        grid.append(next_value(grid, upward))
        hyper = {**best["hyper"], key: grid[-1]}
        run = cached_run(task, method, adjust(hyper) if adjust else hyper, seed, data)
        if not final_train_loss(run) < final_train_loss(best):
            break
        best = run
    return best


@dataclass(frozen=True)
class Comparison:
    """Whether configuration ``a`` beats ``b``: the difference of their mean final training
    losses against the seeds' spread (the larger of their max - min ranges over seeds)."""

    a: str
    b: str
    mean_a: float
    mean_b: float
    spread: float
    needs: Literal["win", "no loss"] = "win"

    @property
    def outcome(self) -> Literal["win", "tie", "loss", "both diverged"]:
        """``win`` if ``a``'s mean is lower by more than the spread, ``loss`` if higher by more,
        else ``tie``; a diverged (infinite) mean never wins and loses to a finite one, and two
        diverged means are ``both diverged``, which no check accepts."""
        if not math.isfinite(self.mean_a):
            return "both diverged" if not math.isfinite(self.mean_b) else "loss"
        if not math.isfinite(self.mean_b):
            return "win"
        difference = self.mean_b - self.mean_a
        if abs(difference) <= self.spread:
            return "tie"
        return "win" if difference > 0 else "loss"

    @property
    def held(self) -> bool:
        """Whether the check holds: ``a`` beats ``b`` (``needs="win"``: a tie fails) or is not
        beaten by it (``needs="no loss"``: a tie holds)."""
        return self.outcome == "win" if self.needs == "win" else self.outcome in ("win", "tie")

    def text(self) -> str:
        """E.g. ``a 0.12 vs b 0.15 (spread 0.05): tie within seeds' spread``."""
        verdict = {
            "win": f"{self.a} wins",
            "loss": f"{self.b} wins",
            "tie": TIE,
            "both diverged": "both diverged",
        }[self.outcome]
        return (
            f"{self.a} {self.mean_a:.4g} vs {self.b} {self.mean_b:.4g} "
            f"(seeds' spread {self.spread:.3g}): {verdict}"
        )

    def record(self) -> dict[str, Any]:
        """JSON-ready: both means, the spread and the outcome."""
        return {
            "a": self.a,
            "b": self.b,
            "mean_a": self.mean_a,
            "mean_b": self.mean_b,
            "spread": self.spread,
            "outcome": self.outcome,
            "needs": self.needs,
        }


def settled_loss(run: dict[str, Any]) -> float:
    """A run's final training loss for comparisons: ``inf`` if it diverged, including a finite
    blow-up (a final loss above the one it started from, e.g. 1e33), which would otherwise
    enter the means and the spread as a number and make every comparison a tie."""
    final = final_train_loss(run)
    return math.inf if final > run["train_loss"][0] else final


def spread(runs: list[dict[str, Any]]) -> float:
    """Range (max - min) of the final training loss over seeds; ``inf`` if any diverged."""
    finals = [settled_loss(run) for run in runs]
    return max(finals) - min(finals) if all(map(math.isfinite, finals)) else math.inf


def compare(
    selected: dict[str, list[dict[str, Any]]],
    a: str,
    b: str,
    needs: Literal["win", "no loss"] = "win",
) -> Comparison:
    """Whether contender ``a`` beats (or, ``needs="no loss"``, is not beaten by) contender ``b``
    of ``selected`` (see :class:`Comparison`); a diverged seed (:func:`settled_loss`) makes a
    mean infinite, so its spread does not enter."""
    mean_a, mean_b = (statistics.fmean(map(settled_loss, selected[x])) for x in (a, b))
    finite = [spread(selected[label]) for label in (a, b)]
    finite = [value for value in finite if math.isfinite(value)]
    return Comparison(a, b, mean_a, mean_b, max(finite, default=0.0), needs)


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
            "final_train_loss_range": spread(runs),
            "train_loss_curves": [run["train_loss"] for run in runs],
            "ms_per_step": ms_per_step(runs),
            "diverged_seeds": sum(run["diverged"] for run in runs),
            "numerical_warnings": [run["warnings"] for run in runs],
            **({"searched_grid": runs[0]["searched_grid"]} if "searched_grid" in runs[0] else {}),
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


def decide(checks: dict[str, bool | Comparison]) -> tuple[dict[str, bool], list[str], dict]:
    """Checks as booleans (a :class:`Comparison` holds on a win only), one line per comparison,
    the checks that are ties, and every comparison's record."""
    held = {name: c.held if isinstance(c, Comparison) else bool(c) for name, c in checks.items()}
    compared = {name: c for name, c in checks.items() if isinstance(c, Comparison)}
    return (
        held,
        [f"{name}: {c.text()}" for name, c in compared.items()],
        {name: c.record() for name, c in compared.items()},
    )


def finding(
    claim: str,
    statement: str,
    checks: dict[str, bool | Comparison],
    selected: dict[str, list[dict[str, Any]]],
    output: Path,
    extra_lines: Sequence[str] = (),
    extra_numbers: dict[str, Any] | None = None,
    ties: Sequence[str] = (),
) -> Finding:
    """The finding of a comparison of tuned runs: a line and the numbers of each contender,
    each comparison's outcome (a tie within the seeds' spread named as such), and their loss
    curves in ``<output>/<claim>.png``. ``ties`` names further checks, decided from several
    comparisons (:func:`joint_outcome`), that were ties."""
    held, compared_lines, records = decide(checks)
    return Finding(
        claim,
        statement,
        held,
        [*lines(selected), *compared_lines, *extra_lines],
        {**numbers(selected), **({"comparisons": records} if records else {}),
         **(extra_numbers or {})},
        plot(selected, Path(output) / f"{claim}.png"),
        ties=[name for name, record in records.items() if record["outcome"] == "tie"]
        + list(ties),
    )  # fmt: skip


def joint_outcome(comparisons: Sequence[Comparison]) -> Literal["win", "tie", "loss"]:
    """The outcome of "``a`` beats every rival" from its comparisons with each: ``win`` if
    every one is a win, ``loss`` if any is a loss or ``both diverged``, else ``tie`` (no loss,
    some tie within the seeds' spread)."""
    if not comparisons:
        raise ValueError("a joint outcome needs at least one comparison")
    outcomes = {comparison.outcome for comparison in comparisons}
    if outcomes & {"loss", "both diverged"}:
        return "loss"
    return "tie" if "tie" in outcomes else "win"


__all__ = [
    "EXTENSIONS",
    "TIE",
    "Comparison",
    "Contender",
    "cached_run",
    "compare",
    "decide",
    "describe",
    "extend_at_boundary",
    "finding",
    "joint_outcome",
    "lines",
    "mean_final",
    "ms_per_step",
    "next_value",
    "numbers",
    "one_three_grid",
    "plot",
    "search",
    "spread",
    "tune",
]
