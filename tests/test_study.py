"""The checkpoint study: records, files and plots on a tiny model."""

from __future__ import annotations

import csv
import json
import statistics

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from figures import line_data
from natgrad.lab import study

pytestmark = pytest.mark.usefixtures("float64")


@pytest.fixture(scope="module")
def rows():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        inputs, targets = torch.randn(40, 6), torch.randint(0, 3, (40,))
        batches = list(zip(inputs.split(10), targets.split(10), strict=True))
        checkpoints = study.train_with_checkpoints(model, batches, F.cross_entropy, epochs=2)
        methods = {
            "ngd": lambda m: natgrad.NGD(m, fisher="exact", damping=1e-9),
            "ef": lambda m: natgrad.EF(m, damping=1e-9),
            "ief": lambda m: natgrad.IEF(m, damping=1e-9),
            "kfac": lambda m: natgrad.KFAC(m, ema_decay=0.0),
        }
        return study.checkpoint_study(model, checkpoints, batches[:2], F.cross_entropy, methods)
    finally:
        torch.set_default_dtype(previous)


def test_one_record_per_checkpoint_and_batch(rows):
    assert len(rows) == 3 * 2
    assert [r["progress"] for r in rows] == [0.0, 0.0, 0.5, 0.5, 1.0, 1.0]
    for row in rows:
        assert row["gamma_ratio_sgd"] == 1.0
        for method in ("sgd", "ef", "ief", "kfac"):
            assert row["gamma_ngd"] <= row[f"gamma_{method}"] * (1 + 1e-6)
        assert row["imbalance"] >= 1.0


def test_tables_round_trip(rows, tmp_path):
    study.write_rows(rows, tmp_path / "rows.json")
    assert json.loads((tmp_path / "rows.json").read_text()) == rows
    study.write_rows(rows, tmp_path / "rows.csv")
    with (tmp_path / "rows.csv").open() as handle:
        table = list(csv.DictReader(handle))
    assert float(table[3]["gamma_ratio_ef"]) == pytest.approx(rows[3]["gamma_ratio_ef"])
    with pytest.raises(ValueError, match=r"writes \.csv or \.json"):
        study.write_rows(rows, tmp_path / "rows.txt")


def test_plot_shows_the_median_ratios_and_the_imbalance(rows, tmp_path, saved_figures):
    """Left: per method but SGD, the median over batches of γ_m / γ_SGD at each checkpoint
    (the lower median of an even count: torch.median's); right: imbalance vs γ_EF / γ_SGD."""
    study.plot_study(rows, tmp_path / "study.png")
    assert (tmp_path / "study.png").exists()
    (figure,) = saved_figures
    curves = line_data(figure.axes[0])
    assert set(curves) == {"ngd", "ef", "ief", "kfac"}
    for method, (progress, medians) in curves.items():
        assert progress == [0.0, 0.5, 1.0]
        expected = [
            statistics.median_low(r[f"gamma_ratio_{method}"] for r in rows if r["progress"] == p)
            for p in progress
        ]
        assert medians == pytest.approx(expected, rel=1e-12)
    points = figure.axes[1].collections[0].get_offsets()
    assert [tuple(p) for p in points] == [(r["imbalance"], r["gamma_ratio_ef"]) for r in rows]


def test_rank_correlation():
    assert study.rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert study.rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="two sequences of one length"):
        study.rank_correlation([1], [2])
