"""R11 (Shrestha 2023, Fig. 5): the dense reference steps equal natgrad's Woodbury ones, the claim
runs and reports, and the slope / scaling rule decides on hand-made numbers."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from figures import line_data
from natgrad.analysis.compare import method_update
from natgrad.lab.reproduce import cost, summary_table
from oracle import relative_error

TOLERANCE = 1e-9


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize("structure", ["full", "layer"])
def test_dense_direction_equals_natgrad_ngd_on_a_tiny_mlp(structure):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    inputs, targets = torch.randn(16, 5), torch.randint(0, 3, (16,))
    dense = cost.dense_ngd_direction(model, inputs, targets, 1e-3, structure)
    woodbury = method_update(
        model,
        inputs,
        lambda logits: F.cross_entropy(logits, targets),
        lambda m: natgrad.NGD(m, fisher="empirical", structure=structure, damping=1e-3),
    )
    assert relative_error(dense, woodbury) < TOLERANCE


@pytest.mark.usefixtures("float64")
@pytest.mark.parametrize(
    ("dense", "woodbury"), [("exact_dense", "ngd_woodbury"), ("blockwise_dense", "tengrad")]
)
def test_timed_dense_steps_apply_natgrads_update(dense, woodbury):
    """The steps R11 times: one step of each on the same batch moves the weights alike."""
    batch = cost.random_batches(32, seed=0)()
    batch = (batch[0].double(), batch[1])
    changes = []
    for method in (dense, woodbury):
        model = cost.cost_mlp(depth=2, seed=0)
        before = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        cost.make_step(method, model)(batch)
        after = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        changes.append(after - before)
    assert changes[0].abs().max() > 0
    assert relative_error(changes[0], changes[1]) < TOLERANCE


def test_blocks_follow_the_layers():
    model = cost.cost_mlp(depth=2, seed=0)
    full, layer = cost._blocks(model, "full"), cost._blocks(model, "layer")
    assert full == [slice(0, cost.num_params(2))] and cost.num_params(2) == 1050
    assert [(b.start, b.stop) for b in layer] == [(0, 420), (420, 840), (840, 1050)]


def test_slope_and_scaling_rule_on_hand_made_numbers():
    sizes = [10.0, 100.0, 1000.0]
    assert cost.loglog_slope(sizes, [3 * s**2 for s in sizes]) == pytest.approx(2.0)
    assert cost.loglog_slope(sizes, [5.0, 5.0, 5.0]) == pytest.approx(0.0)
    assert math.isnan(cost.loglog_slope(sizes, [1.0, 0.0, 2.0]))  # log of 0
    assert math.isnan(cost.loglog_slope([10.0], [1.0]))  # one point: no slope
    with pytest.raises(ValueError, match="sizes but"):
        cost.loglog_slope(sizes, [1.0, 2.0])
    assert cost.scales_like(1.4, 1.0) and cost.scales_like(0.5, 1.0)
    assert not cost.scales_like(1.6, 1.0) and not cost.scales_like(2.0, 1.0)
    assert not cost.scales_like(math.nan, 1.0)


def test_curvature_bytes_follow_the_formulas():
    n, p = 128, cost.num_params(1)  # 20-20-10: layers of (20 + 1) 20 and (20 + 1) 10 params
    assert cost.curvature_bytes("exact_dense", 1, n) == 4 * (p * p + n * p)
    assert cost.curvature_bytes("blockwise_dense", 1, n) == 4 * (420**2 + 210**2 + n * p)
    assert cost.curvature_bytes("tengrad", 1, n) == 8 * 2 * n * n + 4 * n * (40 + 30)
    assert cost.curvature_bytes("ngd_woodbury", 1, n) == 8 * n * n + 4 * n * (40 + 30)
    assert cost.curvature_bytes("sgd", 1, n) == 0


# Constructed costs: c * P^k per method (time in seconds, peak in MiB), so every log-log slope
# is the exponent k and every comparison of the five checks is known in advance.
HOLDS = {
    "time": {"sgd": 1, "tengrad": 1, "ngd_woodbury": 1, "blockwise_dense": 2, "exact_dense": 3},
    "peak": {"sgd": 1, "tengrad": 0.5, "ngd_woodbury": 1, "blockwise_dense": 1, "exact_dense": 2},
    "scale": dict.fromkeys(cost.METHODS, 1e-9),
}
# TENGraD costs like exact NGD (time P^3, ten times the scale): checks 1, 3 and 5 fail
SOME = {
    **HOLDS,
    "time": {**HOLDS["time"], "tengrad": 3},
    "scale": {**HOLDS["scale"], "tengrad": 1e-8},
}
# ... and blockwise twice exact's cost with exact linear in P, TENGraD's memory P^3: none holds
NONE = {
    "time": {"sgd": 0, "tengrad": 3, "ngd_woodbury": 1, "blockwise_dense": 1, "exact_dense": 1},
    "peak": {"sgd": 1, "tengrad": 3, "ngd_woodbury": 1, "blockwise_dense": 1, "exact_dense": 1},
    "scale": {**HOLDS["scale"], "tengrad": 1e-8, "blockwise_dense": 2e-9},
}
DEPTHS = (1, 2, 4, 8)  # P = 630, 1050, 1890, 3570; exact NGD skipped at 3570 > 2000


def constructed_r11(tmp_path, monkeypatch, costs, seeds=(0, 1)):
    """R11 with its timing and memory measurements replaced by ``costs``; seed s multiplies
    the time by 1 + s (the median over seeds 0 and 1: 1.5)."""

    def time_depth(depth, seed, batch_size, steps, methods):
        p = cost.num_params(depth)
        return {m: (1 + seed) * costs["scale"][m] * p ** costs["time"][m] for m in methods}

    def fresh_processes(worker, jobs):
        return [
            1e3 * costs["scale"][m] * cost.num_params(d) ** costs["peak"][m] for m, d, *_ in jobs
        ]

    monkeypatch.setattr(cost, "_time_depth", time_depth)
    monkeypatch.setattr(cost, "in_fresh_processes", fresh_processes)
    return cost.r11_cost_scaling(
        tmp_path, seeds=seeds, depths=DEPTHS, batch_size=16, steps=1, dense_max_params=2000
    )


@pytest.mark.parametrize(
    ("costs", "held", "verdict"),
    [
        (HOLDS, [True] * 5, "reproduced"),
        (SOME, [False, True, False, True, False], "partly"),
        (NONE, [False] * 5, "not reproduced"),
    ],
)
def test_r11_checks_and_verdict_on_constructed_costs(
    tmp_path, monkeypatch, saved_figures, costs, held, verdict
):
    finding = constructed_r11(tmp_path, monkeypatch, costs)
    assert list(finding.checks.values()) == held and finding.verdict == verdict
    assert "at depth 4" in list(finding.checks)[3]  # the largest depth exact NGD was run at
    slopes = finding.numbers["slopes"]
    for method in cost.METHODS:
        assert slopes["time_measured_depths"][method] == pytest.approx(costs["time"][method])
        assert slopes["peak_common_depths"][method] == pytest.approx(costs["peak"][method])
    rows = {(r["method"], r["depth"]): r for r in finding.numbers["rows"]}
    assert rows[("exact_dense", 8)]["ms"] is None and "2000" in rows[("exact_dense", 8)]["skipped"]
    p = cost.num_params(4)
    expected_ms = 1.5 * 1e3 * costs["scale"]["tengrad"] * p ** costs["time"]["tengrad"]
    assert rows[("tengrad", 4)]["ms"] == pytest.approx(expected_ms)
    sgd_ms = 1.5 * 1e3 * costs["scale"]["sgd"] * p ** costs["time"]["sgd"]
    assert rows[("tengrad", 4)]["ratio_to_sgd"] == pytest.approx(expected_ms / sgd_ms)
    record = json.loads((finding.save(tmp_path)).read_text())
    assert record["verdict"] == verdict
    assert f"| R11 | {finding.statement} | {verdict} | {sum(held)}/5 |" in summary_table([finding])

    # the figure shows these rows: per panel and method, P against the value (positive ones)
    (figure,) = saved_figures
    for axis, key in zip(figure.axes, ("ms", "peak_mib", "curvature_bytes"), strict=True):
        shown = line_data(axis)
        for method, label in cost.METHODS.items():
            points = [
                (r["params"], r[key])
                for r in finding.numbers["rows"]
                if r["method"] == method and r[key] is not None and r[key] > 0
            ]
            if not points:
                assert label not in shown
                continue
            xs, ys = shown[label]
            assert xs == [x for x, _ in points] and ys == pytest.approx([y for _, y in points])
    assert line_data(figure.axes[0])["exact NGD (dense)"][0] == [630, 1050, 1890]
    assert "SGD" not in line_data(figure.axes[2])  # SGD holds no curvature: 0 bytes


@pytest.mark.slow
def test_r11_smoke_run_measures_skips_and_saves(tmp_path):
    """The real measurements, tiny: every measured row has a positive time and a peak."""
    finding = cost.r11_cost_scaling(
        tmp_path, seeds=(0,), depths=(1, 2), batch_size=16, steps=1, dense_max_params=700
    )
    assert finding.claim == "R11" and len(finding.checks) == 5
    rows = finding.numbers["rows"]
    assert len(rows) == 2 * len(cost.METHODS)
    skipped = [r for r in rows if r["skipped"]]
    assert [(r["method"], r["depth"]) for r in skipped] == [("exact_dense", 2)]
    assert "dense_max_params = 700" in skipped[0]["skipped"] and skipped[0]["ms"] is None
    measured = [r for r in rows if not r["skipped"]]
    assert all(r["ms"] > 0 and r["peak_mib"] >= 0 for r in measured)
    assert all(r["ratio_to_sgd"] == 1.0 for r in measured if r["method"] == "sgd")
    record = json.loads(finding.save(tmp_path).read_text())
    assert record["verdict"] == finding.verdict
    assert record["numbers"]["settings"]["dense_max_params"] == 700
    assert finding.figures == [str(tmp_path / "R11.png")] and (tmp_path / "R11.png").exists()
    assert "exact NGD (dense)" in finding.report()
