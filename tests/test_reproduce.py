"""natgrad reproduce: every claim runs in a tiny setting and reports its checks; the verdict
rule and the JSON output."""

from __future__ import annotations

import json
import math

import pytest
import torch

from natgrad.lab import reproduce
from natgrad.lab.cli import main
from natgrad.lab.reproduce import Finding, geometry, quality, training


def test_verdict_rule_counts_checks():
    def finding(*held):
        return Finding("R0", "s", {f"check {i}": h for i, h in enumerate(held)})

    assert finding(True, True).verdict == "reproduced"
    assert finding(True, False).verdict == "partly"
    assert finding(False, False).verdict == "not reproduced"
    with pytest.raises(ValueError, match="at least one check"):
        Finding("R0", "s", {})


def test_finding_saves_json_with_verdict_and_non_finite_numbers(tmp_path):
    finding = Finding("R0", "s", {"a": True, "b": False}, ["line"], {"loss": math.inf})
    record = json.loads(finding.save(tmp_path).read_text())
    assert record["verdict"] == "partly" and record["numbers"]["loss"] == "inf"
    assert "[x] a" in finding.report() and "[ ] b" in finding.report()


def test_r2_reproduces_exactly(tmp_path):
    finding = geometry.r2_ief_matrix_is_fisher(tmp_path, seeds=(0, 1), num=50)
    assert finding.verdict == "reproduced" and len(finding.numbers["relative_errors"]) == 2


def test_r1_and_r3_run_and_report(tmp_path):
    r1 = geometry.r1_vector_fields(tmp_path, steps=5)
    assert r1.verdict == "reproduced" and (tmp_path / "regression_fields.png").exists()
    r3 = geometry.r3_gd_ngd_efgd(tmp_path, iterations=3, datasets=("wine",))
    assert list(r3.checks) == ["wine: NGD's final loss <= GD's and EFGD's"]
    assert r3.numbers["wine"]["best"]["ngd"]["lr"] > 0
    assert any(line.startswith("wine cos(EF, NGD) along the EF path") for line in r3.lines)


def test_cli_reproduce_writes_json_and_summary(tmp_path, capsys):
    assert main(["reproduce", "R2", "--output", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "R2 least squares: iEF matrix = Fisher (000 sec. 2.2): REPRODUCED" in out
    assert json.loads((tmp_path / "R2.json").read_text())["verdict"] == "reproduced"
    assert "| R2 |" in (tmp_path / "summary.md").read_text()


def test_cli_reproduce_rejects_unknown_or_missing_claims(tmp_path):
    with pytest.raises(SystemExit, match="unknown claims"):
        main(["reproduce", "R99", "--output", str(tmp_path)])
    with pytest.raises(SystemExit, match="or pass --all"):
        main(["reproduce", "--output", str(tmp_path)])


def test_full_scale_without_data_names_the_fix(tmp_path):
    with pytest.raises(SystemExit, match="--data-dir"):
        main(["reproduce", "R5", "--full", "--output", str(tmp_path)])


def test_r10_reports_both_sub_claims(tmp_path):
    finding = quality.r10_approximation_quality(
        tmp_path, seeds=(0,), dataset="wine", epochs=2, batches=2
    )
    assert len(finding.checks) == 2 and finding.numbers["rows"]
    assert (tmp_path / "R10_seed0" / "rows.csv").exists()


@pytest.mark.filterwarnings("ignore::natgrad.NumericalWarning")  # damping 3e-9: fallbacks expected
def test_r9_reports_its_three_sub_claims(tmp_path):
    finding = training.r9_ef_damping(tmp_path, seeds=(0,), task_name="wine-mlp", epochs=1)
    assert len(finding.checks) == 3
    assert set(finding.numbers) >= {"sgd", "ef 1e-7", "ef 1e-4", "ief 1e-7", "cos_sgd_ef"}


def test_training_claims_run_tiny(tmp_path, monkeypatch):
    """R4-R6 on one epoch with one-point grids: the checks and the JSON come out."""
    grid = {"lr": [1e-2], "damping": [1.0]}
    monkeypatch.setattr(training, "CURVATURE_GRID", grid)
    monkeypatch.setattr(training, "SGD_GRID", {"lr": [1e-2], "momentum": [0.9]})
    monkeypatch.setattr(training, "DAMPINGS", [1.0])
    r4 = reproduce.run_claim(
        "R4", tmp_path, seeds=(0, 1), epochs=1, full_batch_points=100, full_batch_epochs=2
    )
    assert len(r4.checks) == 5 and len(r4.numbers["minibatch"]["kfac"]["train_loss_curves"]) == 2
    assert (tmp_path / "R4.json").exists() and r4.seconds > 0
    r5 = reproduce.run_claim("R5", tmp_path, seeds=(0,), epochs=1)
    assert "correct damping within 2x of SGD" in r5.checks
    r6 = reproduce.run_claim("R6", tmp_path, seeds=(0,), epochs=1)
    assert r6.numbers["foof"]["ms_per_step"] > 0


def test_r12_one_dataset_tiny(tmp_path):
    finding = training.r12_tengrad_vs_sgd(tmp_path, seeds=(0,), epochs=1, datasets=("wine",))
    assert len(finding.checks) == len(training.R12_HIDDEN)
    assert set(finding.numbers["wine"]) == {"[4]", "[32, 16]", "[32, 16, 16]"}


def test_run_claim_times_saves_and_runs_on_one_thread(tmp_path, monkeypatch):
    seen = []

    def claim(output, seeds, full):
        seen.append((torch.get_num_threads(), seeds, full))
        return Finding("R0", "a claim", {"held": True})

    monkeypatch.setitem(reproduce.CLAIMS, "R0", reproduce.Claim("R0", "a claim", claim))
    torch.set_num_threads(2)
    try:
        finding = reproduce.run_claim("R0", tmp_path, seeds=[4])
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(1)
    assert seen == [(1, (4,), False)] and after == 2
    assert finding.seconds > 0 and json.loads((tmp_path / "R0.json").read_text())["seconds"] > 0
    with pytest.raises(ValueError, match="unknown claim 'R99'"):
        reproduce.run_claim("R99", tmp_path)
