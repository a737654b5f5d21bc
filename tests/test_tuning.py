"""Tuning as Benzing 2022, App. D.2 does (natgrad.lab.reproduce.tuning): 1·10^i / 3·10^i grids,
joint boundary extension in step size and damping, and ties within the seeds' spread; on
constructed losses whose answers are known."""

import json
import math

import pytest

from natgrad.lab.reproduce import finding as finding_module
from natgrad.lab.reproduce import tuning
from natgrad.lab.runner import Task


def test_one_three_grid_lists_one_and_three_times_each_decade():
    assert tuning.one_three_grid(-3, -1) == [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
    with pytest.raises(ValueError, match="lowest exponent"):
        tuning.one_three_grid(0, -1)


@pytest.mark.parametrize(
    ("values", "upward", "expected"),
    [
        ([1e-3, 3e-3, 1e-2], True, 3e-2),
        ([1e-3, 3e-3, 1e-2, 3e-2], True, 1e-1),
        ([1e-3, 3e-3, 1e-2], False, 3e-4),
        ([3e-3, 1e-2], False, 1e-3),
        ([1e-4, 1e-2, 1.0, 100.0], True, 1e4),  # powers of ten: the grid's own ratio
        ([1e-4, 1e-2, 1.0, 100.0], False, 1e-6),
        ([1e-3, 1e-2], True, 1e-1),
        ([2.0, 4.0], True, 8.0),
    ],
)
def test_next_value_continues_the_grid(values, upward, expected):
    assert tuning.next_value(values, upward) == pytest.approx(expected, rel=1e-12)


def test_next_value_needs_two_positive_values():
    with pytest.raises(ValueError, match="at least two positive values"):
        tuning.next_value([1e-2], True)


def fake_run(hyper, seed, final, step=1e-3):
    return {
        "method": "m",
        "registry_method": "m",
        "hyper": hyper,
        "seed": seed,
        "train_loss": [10.0, final],
        "step_seconds": [step],
        "diverged": not math.isfinite(final),
        "warnings": {},
    }


def bowl(lr_optimum, damping_optimum):
    """A stand-in trainer whose final loss is a bowl in (log10 lr, log10 damping), recording
    every configuration it trains."""
    calls = []

    def train_run(task, method, hyper, seed, data):
        calls.append((hyper["lr"], hyper["damping"], seed))
        final = (math.log10(hyper["lr"] / lr_optimum)) ** 2 + (
            math.log10(hyper["damping"] / damping_optimum) / 2
        ) ** 2
        return fake_run(hyper, seed, final)

    return train_run, calls


@pytest.fixture
def data():
    import torch

    from natgrad.lab.datasets import Dataset

    inputs = torch.arange(6.0).reshape(3, 2)
    return Dataset("toy", inputs, torch.zeros(3), inputs, torch.zeros(3), "regression")


TASK = Task("toy", "toy", lambda d: None)
GRID = {"lr": [1e-3, 3e-3, 1e-2], "damping": [1e-2, 1.0, 100.0]}


def test_search_without_a_boundary_optimum_keeps_the_grid(monkeypatch, data):
    train_run, calls = bowl(3e-3, 1.0)
    monkeypatch.setattr(tuning, "train_run", train_run)
    best, searched = tuning.search(TASK, data, "m", GRID, seed=0)
    assert best["hyper"] == {"lr": 3e-3, "damping": 1.0}
    assert searched == GRID and len(calls) == 9


def test_search_extends_step_size_and_damping_jointly(monkeypatch, data):
    """Optimum at lr 1e-1, damping 1e4: two rounds extend lr by 3e-2 then 1e-1, damping by 1e4
    then 1e6, each new value crossed with every value of the other axis."""
    train_run, calls = bowl(1e-1, 1e4)
    monkeypatch.setattr(tuning, "train_run", train_run)
    best, searched = tuning.search(TASK, data, "m", GRID, seed=0)
    assert best["hyper"] == pytest.approx({"lr": 1e-1, "damping": 1e4})
    assert searched["lr"] == pytest.approx([1e-3, 3e-3, 1e-2, 3e-2, 1e-1])
    assert searched["damping"] == pytest.approx([1e-2, 1.0, 100.0, 1e4, 1e6])
    assert len(calls) == len(set(calls)) == 25  # the full 5 x 5 cross, each point once


def test_search_extends_only_the_axis_at_its_edge(monkeypatch, data):
    train_run, calls = bowl(3e-3, 1e-4)
    monkeypatch.setattr(tuning, "train_run", train_run)
    best, searched = tuning.search(TASK, data, "m", GRID, seed=0)
    assert best["hyper"] == pytest.approx({"lr": 3e-3, "damping": 1e-4})
    assert searched["lr"] == GRID["lr"]
    # round 1 adds 1e-4 (best there, still an edge), round 2 adds 1e-6 (worse)
    assert searched["damping"] == pytest.approx([1e-6, 1e-4, 1e-2, 1.0, 100.0])
    assert len(calls) == 15


def test_search_stops_after_the_extension_limit(monkeypatch, data):
    train_run, _ = bowl(10.0, 1.0)
    monkeypatch.setattr(tuning, "train_run", train_run)
    best, searched = tuning.search(TASK, data, "m", GRID, seed=0)
    assert len(searched["lr"]) == len(GRID["lr"]) + tuning.EXTENSIONS
    assert best["hyper"]["lr"] == pytest.approx(1e-1)  # 3e-2, then 1e-1, then no more


def test_tune_trains_the_selected_configuration_with_every_seed(monkeypatch, data):
    train_run, calls = bowl(3e-3, 1.0)
    monkeypatch.setattr(tuning, "train_run", train_run)
    selected = tuning.tune(
        TASK, data, [tuning.Contender("x", "m", GRID)], seeds=(0, 1, 2), progress=lambda s: None
    )
    assert [run["seed"] for run in selected["x"]] == [0, 1, 2]
    assert all(run["hyper"] == {"lr": 3e-3, "damping": 1.0} for run in selected["x"])
    assert [c[2] for c in calls].count(0) == 9 and len(calls) == 11


def test_cached_run_trains_each_configuration_once(monkeypatch, data):
    train_run, calls = bowl(1.0, 1.0)
    monkeypatch.setattr(tuning, "train_run", train_run)
    first = tuning.cached_run(TASK, "m", {"lr": 0.5, "damping": 2.0}, 0, data)
    first["method"] = "relabelled"  # a copy: the cache keeps the original
    again = tuning.cached_run(TASK, "m", {"damping": 2.0, "lr": 0.5}, 0, data)
    tuning.cached_run(TASK, "m", {"lr": 0.5, "damping": 2.0}, 1, data)
    assert len(calls) == 2 and again["method"] == "m"


def selected_with(finals_by_label):
    return {
        label: [fake_run({"lr": 0.1}, seed, final) for seed, final in enumerate(finals)]
        for label, finals in finals_by_label.items()
    }


@pytest.mark.parametrize(
    ("a", "b", "outcome"),
    [
        ([1.0, 1.2, 1.1], [1.4, 1.5, 1.6], "win"),  # 0.4 apart, spread 0.2
        ([1.0, 1.2, 1.1], [1.2, 1.25, 1.3], "tie"),  # 0.15 apart, spread 0.2
        ([1.2, 1.25, 1.3], [1.0, 1.2, 1.1], "tie"),
        ([1.4, 1.5, 1.6], [1.0, 1.2, 1.1], "loss"),
        ([1.0, 1.0, 1.0], [1.01, 1.01, 1.01], "win"),  # no spread: any difference decides
        ([1.0, 1.1, 1.0], [math.inf, 0.5, 0.5], "win"),  # b diverged on a seed
        ([math.inf, 0.1, 0.1], [1.0, 1.1, 1.0], "loss"),
        ([math.inf, 0.1, 0.1], [math.inf, 1.1, 1.0], "both diverged"),
        ([2.3e33, 0.1, 0.1], [1.0, 1.1, 1.0], "loss"),  # a finite blow-up above the start (10)
        ([9.0, 9.5, 9.9], [1.0, 1.1, 1.0], "loss"),  # below the start: a slow run, not diverged
    ],
)
def test_compare_decides_by_the_seeds_spread(a, b, outcome):
    comparison = tuning.compare(selected_with({"a": a, "b": b}), "a", "b")
    assert comparison.outcome == outcome
    assert comparison.held == (outcome == "win")
    no_loss = tuning.compare(selected_with({"a": a, "b": b}), "a", "b", needs="no loss")
    assert no_loss.held == (outcome in ("win", "tie"))
    if outcome == "tie":
        assert "tie within seeds' spread" in comparison.text()
    if outcome == "both diverged":
        assert comparison.text().endswith("both diverged")


def test_compare_spread_is_the_larger_range():
    comparison = tuning.compare(selected_with({"a": [1.0, 1.3], "b": [2.0, 2.1]}), "a", "b")
    assert comparison.spread == pytest.approx(0.3)
    assert comparison.mean_a == pytest.approx(1.15) and comparison.mean_b == pytest.approx(2.05)


@pytest.mark.parametrize(
    ("rivals", "outcome"),
    [
        ({"b": [1.4, 1.5, 1.6], "c": [2.0, 2.0, 2.0]}, "win"),
        ({"b": [1.4, 1.5, 1.6], "c": [1.2, 1.25, 1.3]}, "tie"),  # c within the spread
        ({"b": [1.2, 1.25, 1.3], "c": [0.5, 0.5, 0.5]}, "loss"),  # a loss outweighs a tie
        ({"b": [math.inf] * 3, "c": [2.0, 2.0, 2.0]}, "win"),  # b diverged
    ],
)
def test_joint_outcome_of_beating_every_rival(rivals, outcome):
    selected = selected_with({"a": [1.0, 1.2, 1.1], **rivals})
    comparisons = [tuning.compare(selected, "a", rival) for rival in rivals]
    assert tuning.joint_outcome(comparisons) == outcome
    diverged = selected_with({"a": [math.inf] * 3, "b": [math.inf] * 3, "c": [2.0] * 3})
    both = [tuning.compare(diverged, "a", "b")]
    assert both[0].outcome == "both diverged" and tuning.joint_outcome(both) == "loss"
    with pytest.raises(ValueError, match="at least one comparison"):
        tuning.joint_outcome([])


def test_finding_fails_a_tie_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "plot", lambda selected, path: [])
    selected = selected_with({"a": [1.0, 1.2, 1.1], "b": [1.4, 1.5, 1.6], "c": [1.2, 1.25, 1.3]})
    checks = {
        "a beats b": tuning.compare(selected, "a", "b"),
        "a beats c": tuning.compare(selected, "a", "c"),
        "a finite": True,
    }
    result = tuning.finding("RX", "statement", checks, selected, tmp_path)
    assert result.checks == {"a beats b": True, "a beats c": False, "a finite": True}
    assert result.verdict == "partly" and result.ties == ["a beats c"]
    assert any(line.startswith("a beats c:") and "tie within seeds' spread" in line
               for line in result.lines)  # fmt: skip
    assert "[ ] a beats c (tie within seeds' spread)" in result.report()
    saved = json.loads(result.save(tmp_path).read_text())
    assert saved["ties"] == ["a beats c"]
    assert saved["numbers"]["comparisons"]["a beats c"]["outcome"] == "tie"
    assert saved["numbers"]["comparisons"]["a beats b"]["outcome"] == "win"


def test_finding_rejects_ties_that_name_no_check():
    with pytest.raises(ValueError, match="name no check"):
        finding_module.Finding("RX", "s", {"a": False}, ties=["b"])


def test_a_no_loss_check_holds_on_a_tie_and_names_it(tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "plot", lambda selected, path: [])
    selected = selected_with({"a": [1.2, 1.25, 1.3], "b": [1.0, 1.2, 1.1], "c": [0.1, 0.1, 0.1]})
    tie = tuning.compare(selected, "a", "b", needs="no loss")
    assert tie.outcome == "tie" and tie.held
    loss = tuning.compare(selected, "a", "c", needs="no loss")
    assert loss.outcome == "loss" and not loss.held
    result = tuning.finding("RX", "s", {"a ~ b": tie, "a ~ c": loss}, selected, tmp_path)
    assert result.checks == {"a ~ b": True, "a ~ c": False} and result.ties == ["a ~ b"]
    assert "[x] a ~ b (tie within seeds' spread)" in result.report()
