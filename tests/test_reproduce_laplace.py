"""R13 and ``natgrad laplace``: the calibration and OOD metrics against hand-computed values,
a tiny run, and the command line."""

from __future__ import annotations

import json

import pytest
import torch

from natgrad.lab.cli import main
from natgrad.lab.reproduce import laplace_claims


def test_ece_and_reliability_bins_by_hand():
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.45, 0.55]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 1, 0])
    result = laplace_claims.expected_calibration_error(probs, labels, bins=2)
    # bin [0.5, 1): confidences 0.9, 0.8, 0.7, 0.55 (all), correct 1, 0, 1, 0
    assert result["bin_count"] == [0.0, 4.0]
    assert abs(result["bin_confidence"][1] - 0.7375) < 1e-12
    assert abs(result["bin_accuracy"][1] - 0.5) < 1e-12
    assert abs(result["ece"] - 0.2375) < 1e-12


def test_auroc_by_hand():
    inside = torch.tensor([0.1, 0.2, 0.5])
    outside = torch.tensor([0.5, 0.9])
    # pairs (out, in): 0.5 beats 0.1, 0.2 and ties 0.5; 0.9 beats all three -> 5.5 / 6
    assert abs(laplace_claims.auroc(inside, outside) - 5.5 / 6) < 1e-12
    assert laplace_claims.auroc(outside, inside) < 0.5


def test_r13_tiny_run_reports_every_posterior(tmp_path):
    finding = laplace_claims.r13_laplace_posteriors(
        tmp_path, seeds=(0,), epochs=1, n_samples=4, hidden=4
    )
    assert len(finding.checks) == 2
    means = finding.numbers["means"]
    assert set(means) == {"map", *laplace_claims.POSTERIORS}
    for name, row in means.items():
        for predictive in ("sampled", "linearised"):
            assert 0 <= row[predictive]["accuracy"] <= 1, name
            assert 0 <= row[predictive]["ood_auroc"] <= 1, name
    assert (tmp_path / "R13_reliability.png").exists()


def test_cli_laplace_runs_the_comparison_with_its_options(tmp_path, capsys):
    """``natgrad laplace`` passes each option to the comparison: its JSON equals a direct call
    with the same settings (a swapped option would change the numbers)."""
    options = ["--seeds", "0", "--epochs", "1", "--samples", "3", "--hidden", "5"]
    assert main(["laplace", "--dataset", "digits", *options, "--output", str(tmp_path)]) == 0
    written = json.loads((tmp_path / "laplace-digits.json").read_text())
    assert written["numbers"]["dataset"] == "digits"
    assert (tmp_path / "laplace-digits_reliability.png").exists()
    assert "wrote" in capsys.readouterr().out
    direct = laplace_claims.laplace_comparison(
        tmp_path / "direct", "digits", seeds=(0,), epochs=1, n_samples=3, hidden=5
    )
    assert written["numbers"]["means"] == direct.numbers["means"]
    assert written["verdict"] == direct.verdict


def test_unknown_laplace_dataset_names_the_choices():
    with pytest.raises(ValueError, match="choose one of"):
        laplace_claims.compare_posteriors(0, dataset="cifar10")
