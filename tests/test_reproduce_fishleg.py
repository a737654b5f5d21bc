"""Garcia et al. 2023's claims R7 (deep linear network) and R8 (autoencoder): the floor rule, the
reliability measures, and tiny runs of both claims."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.lab.datasets import load_dataset
from natgrad.lab.reproduce import Finding, fishleg_claims, training
from natgrad.lab.reproduce.fishleg_claims import (
    FLOOR_FACTOR,
    converged_fraction,
    epochs_to_floor,
    final_spread,
    mean_loss_damping,
    noise_floor,
    r7_deep_linear,
    r8_autoencoder,
    tune_fishleg,
)
from natgrad.lab.runner import get_task
from oracle import dense_batch, flat_grad, relative_error

TINY_R7 = {
    "sgdm": {"lr": [1e-2], "momentum": [0.9]},
    "adam": {"lr": [1e-3]},
    "fishleg": {"lr": [0.04], "damping": [1e-3], "aux_lr": [1e-3]},
}
TINY_R8 = {
    "sgdm": {"lr": [1e-2], "momentum": [0.9]},
    "adam": {"lr": [1e-3]},
    "kfac": {"lr": [1e-2], "damping": [1e-1]},
    "fishleg": {"lr": [0.07], "damping": [0.3 / 784], "aux_lr": [1e-3]},
}


def test_epochs_to_floor_is_the_first_epoch_within_the_factor_of_the_mean_curve():
    floor = 1e-6
    assert FLOOR_FACTOR == 10.0
    assert epochs_to_floor([[1.0, 1e-4, 5e-6, 1e-6]], floor) == 2.0
    assert epochs_to_floor([[20.0, 1.25]], 0.125) == 1.0  # exactly 10x counts
    assert epochs_to_floor([[20.0, 1.26]], 0.125) == math.inf
    assert epochs_to_floor([[1.0, 1.1e-5, 1e-7]], floor) == 2.0
    # the mean over seeds decides: one seed at the floor is not enough
    assert epochs_to_floor([[1.0, 1e-6, 1e-6], [1.0, 1e-3, 1e-6]], floor) == 2.0
    assert epochs_to_floor([[1.0, 1e-3, 1e-4]], floor) == math.inf
    # a diverged seed stops early and counts as inf afterwards
    assert epochs_to_floor([[1.0, 1e-6, 1e-6], [1.0, math.nan]], floor) == math.inf
    assert epochs_to_floor([[1.0, 1e-3, 1e-6], [1.0, 1e-6]], floor) == math.inf
    assert epochs_to_floor([[1.0, 5e-5]], floor, factor=100.0) == 1.0


def test_reliability_counts_diverged_seeds_and_spreads_finite_finals():
    def run(final, diverged=False):
        return {"train_loss": [1.0, final], "diverged": diverged}

    finite = [run(1.0), run(2.0), run(3.0)]
    assert converged_fraction(finite) == 1.0
    assert final_spread(finite) == pytest.approx(math.sqrt(2 / 3))
    broken = [run(1.0), run(math.nan, diverged=True), run(3.0)]
    assert converged_fraction(broken) == pytest.approx(2 / 3)
    assert final_spread(broken) == math.inf
    assert final_spread([run(0.5)]) == 0.0


def test_noise_floor_is_the_teachers_mse_and_guards_the_draw():
    data = load_dataset("deep_linear_small")
    train, test = noise_floor(data)
    # 800 (train) and 20000 (test) squared N(0, 0.001^2) draws: mean 1e-6, relative std 5%, 1%
    assert 0.8e-6 < train < 1.2e-6 and 0.95e-6 < test < 1.05e-6
    with pytest.raises(RuntimeError, match="not deep_linear_teacher's default draw"):
        noise_floor(replace(data, train_targets=data.train_targets + 1e-3))


def test_tune_fishleg_ties_q0_to_each_lr_and_extends_a_boundary_lr(monkeypatch):
    calls = []

    def fake_train_run(task, method, hyper, seed, data):
        """Final loss |log10(lr / 0.05)|: the best lr is 0.05, beyond the grid's top."""
        calls.append((method, dict(hyper), seed))
        final = abs(math.log10(hyper["lr"] / 0.05))
        return {
            "method": method,
            "hyper": hyper,
            "seed": seed,
            "train_loss": [9.0, final],
            "diverged": False,
        }

    monkeypatch.setattr("natgrad.lab.reproduce.tuning.train_run", fake_train_run)
    monkeypatch.setattr("natgrad.lab.reproduce.tuning.describe", lambda runs: "")
    grid = {"lr": [1e-4, 1e-3], "damping": [1e-3]}
    runs = tune_fishleg(get_task("deep-linear-small"), None, grid, 0.02, seeds=(0, 1, 2))
    assert all(hyper["init_scale"] == pytest.approx(0.02 / hyper["lr"]) for _, hyper, _ in calls)
    # seed 0: the grid, then 1e-2 and 1e-1 (better, better: two extensions at most)
    assert [hyper["lr"] for _, hyper, seed in calls if seed == 0] == pytest.approx(
        [1e-4, 1e-3, 1e-2, 1e-1]
    )
    assert [run["seed"] for run in runs] == [0, 1, 2]
    assert all(run["method"] == run["registry_method"] == "fishleg" for run in runs)
    assert all(run["hyper"]["lr"] == pytest.approx(0.1) for run in runs)


@pytest.mark.usefixtures("float64")
def test_mean_loss_damping_gives_the_summed_loss_natural_gradient():
    """Exact NGD on natgrad's mean Bernoulli loss with damping ``γ / D`` is the dense damped
    natural gradient of the paper's loss (summed over the ``D`` outputs, mean over the batch)
    with damping ``γ``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5))
    inputs, targets = torch.randn(6, 3), torch.rand(6, 5)
    gamma, size = 0.3, len(inputs)
    dense = dense_batch(model, inputs, targets, "bernoulli", "sum")  # sum over n and pixels
    fisher, gradient = dense.exact_fisher() / size, dense.gradient / size
    expected = torch.linalg.solve(fisher + gamma * torch.eye(len(gradient)), gradient)
    pre = natgrad.NGD(
        model, fisher="exact", likelihood="bernoulli", damping=mean_loss_damping(gamma, 5)
    )
    model.zero_grad()
    logits = model(inputs)
    F.binary_cross_entropy_with_logits(logits, targets).backward()
    pre.step(logits)
    assert relative_error(flat_grad(dense.params), expected) < 1e-10
    with pytest.raises(ValueError, match="positive count"):
        mean_loss_damping(0.3, 0)


@pytest.mark.slow  # tunes and trains
def test_r7_runs_tiny_and_decides_by_its_rule(tmp_path):
    finding = r7_deep_linear(tmp_path, seeds=(0, 1), epochs=1, small_epochs=3, grids=TINY_R7)
    assert isinstance(finding, Finding) and finding.claim == "R7"
    assert "Garcia et al. 2023, Fig. 1" in finding.statement
    assert list(finding.checks) == [
        f"{n} samples: FishLeg reaches 10x the noise floor in fewer epochs than {rival}"
        for n in (4000, 40)
        for rival in ("SGDm", "Adam")
    ]
    for regime in ("4000 samples", "40 samples"):
        numbers = finding.numbers[regime]
        runs = numbers["runs"]
        assert set(runs) == {"sgdm", "adam", "fishleg"}
        # Q0 = eta_SGDm / eta, from the selected SGDm learning rate
        assert runs["fishleg"]["hyper"]["init_scale"] == pytest.approx(1e-2 / 0.04)
        # Algorithm 1: an auxiliary step every iteration, on a separate batch
        assert runs["fishleg"]["hyper"]["aux_period"] == 1
        assert runs["fishleg"]["hyper"]["aux_batch"] == 40
        assert len(runs["fishleg"]["q_quality_per_seed"]) == 2
        assert len(runs["fishleg"]["final_train_loss_per_seed"]) == 2
        for label, run in runs.items():
            reach = epochs_to_floor(run["train_loss_curves"], numbers["noise_floor_train"])
            assert numbers["epochs_to_floor"][label] == reach
        for rival, name in (("sgdm", "SGDm"), ("adam", "Adam")):
            check = f"{regime}: FishLeg reaches 10x the noise floor in fewer epochs than {name}"
            expected = numbers["epochs_to_floor"]["fishleg"] < numbers["epochs_to_floor"][rival]
            assert finding.checks[check] == expected
    record = json.loads(finding.save(tmp_path).read_text())
    assert record["verdict"] == finding.verdict and record["claim"] == "R7"
    assert record["numbers"]["40 samples"]["epochs"] == 3
    assert sum("fishleg seed" in line and "cos(Q u" in line for line in finding.lines) == 4


def constructed_runs(label, finals):
    return [
        {
            "method": label,
            "registry_method": label,
            "hyper": {"lr": 0.1},
            "seed": seed,
            "train_loss": [2.0, final],
            "step_seconds": [1e-3],
            "diverged": not math.isfinite(final),
            "warnings": {},
        }
        for seed, final in enumerate(finals)
    ]


@pytest.mark.parametrize(
    ("fishleg", "held", "tie"),
    [
        ((0.10, 0.12), True, False),  # 0.09 below Adam's mean 0.2, spread 0.02: a win
        ((0.18, 0.20), False, True),  # 0.01 below, within the range 0.02: a tie
        ((0.25, 0.27), False, False),  # above: a loss
    ],
)
def test_r8_decides_fishleg_vs_adam_with_the_seeds_spread_on_a_shuffled_subset(
    tmp_path, monkeypatch, fishleg, held, tie
):
    """R8's "<" checks are wins by more than the seeds' spread (a tie fails and is listed in
    ties), and ``train_size`` takes a fixed random subset of the digit-sorted images."""
    finals = {"sgdm": (0.5, 0.5), "adam": (0.19, 0.21), "kfac": (0.3, 0.3)}
    seen = []

    def fake_tune(task, data, contenders, seeds, progress=print):
        seen.append(data)
        return {c.label: constructed_runs(c.label, finals[c.label]) for c in contenders}

    monkeypatch.setattr(fishleg_claims.tuning, "tune", fake_tune)
    monkeypatch.setattr(fishleg_claims.tuning, "plot", lambda selected, path: [])
    monkeypatch.setattr(
        fishleg_claims, "tune_fishleg", lambda *args: constructed_runs("fishleg", fishleg)
    )
    finding = r8_autoencoder(tmp_path, seeds=(0, 1), train_size=200)
    check = "FishLeg's mean final train loss < Adam's"
    assert finding.checks[check] == held and (check in finding.ties) == tie
    assert finding.checks["FishLeg's mean final train loss < SGDm's"]
    assert not finding.checks["KFAC's mean final train loss < Adam's"]
    data = seen[0]
    assert len(data.train_inputs) == 200 and torch.bincount(data.train_targets).min() >= 10
    expected = training.subset(get_task("mnist5k-autoencoder").load_data(), 200)
    assert torch.equal(data.train_inputs, expected.train_inputs)


@pytest.mark.slow  # tunes and trains
def test_r8_runs_tiny_and_decides_by_its_rule(tmp_path):
    finding = r8_autoencoder(tmp_path, seeds=(0, 1), epochs=1, grids=TINY_R8, train_size=200)
    assert finding.claim == "R8" and "Garcia et al. 2023, Fig. 2" in finding.statement
    assert list(finding.checks) == [
        "FishLeg's mean final train loss < Adam's",
        "FishLeg's mean final train loss < SGDm's",
        "KFAC's mean final train loss < Adam's",
        "KFAC's mean final train loss < SGDm's",
        "FishLeg converged on every seed",
        "FishLeg's std of final train loss <= the median of the others'",
    ]
    numbers = finding.numbers
    assert set(numbers["converged_fraction"]) == {"fishleg", "kfac", "adam", "sgdm"}
    mean = {label: numbers[label]["final_train_loss_mean"] for label in ("fishleg", "adam")}
    assert finding.checks["FishLeg's mean final train loss < Adam's"] == (
        mean["fishleg"] < mean["adam"]
    )
    spread = numbers["final_train_loss_std"]
    others = sorted(spread[label] for label in ("kfac", "adam", "sgdm"))[1]
    assert finding.checks["FishLeg's std of final train loss <= the median of the others'"] == (
        spread["fishleg"] <= others
    )
    hyper = numbers["fishleg"]["hyper"]
    assert hyper["init_scale"] == pytest.approx(1e-2 / 0.07)
    assert (hyper["aux_period"], hyper["aux_batch"], hyper["momentum_on"]) == (1, 10, "update")
    assert len(numbers["fishleg"]["q_quality_per_seed"]) == 2
    assert sum("cos(Q u" in line for line in finding.lines) == 2
    record = json.loads(finding.save(tmp_path).read_text())
    assert record["verdict"] == finding.verdict and (tmp_path / "R8.json").exists()
    quality = record["numbers"]["fishleg"]["q_quality_per_seed"][0]
    assert quality["movement"] > 0 and -1 <= quality["alignment"] <= 1
