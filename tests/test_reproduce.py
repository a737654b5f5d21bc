"""natgrad reproduce: every claim runs in a tiny setting and reports its checks; the verdict
rule and the JSON output."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from dataclasses import replace

import pytest
import scipy.stats
import torch

from natgrad.lab import reproduce, runner
from natgrad.lab.cli import main
from natgrad.lab.reproduce import Finding, geometry, quality, summary_table, training


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


@pytest.mark.slow  # trains GD, NGD and EFGD with line searches
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
    assert "R2 least squares: iEF matrix = Fisher (Wu et al. 2024, sec. 2.2): REPRODUCED" in out
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
    """The real claim, tiny: its rows are the study's rows of every seed, written next to it."""
    finding = quality.r10_approximation_quality(
        tmp_path, seeds=(0,), dataset="wine", epochs=2, batches=2
    )
    rows = finding.numbers["rows"]
    assert [(r["checkpoint"], r["seed"]) for r in rows] == [(c, 0) for c in (0, 0, 1, 1, 2, 2)]
    assert all(r["gamma_ratio_sgd"] == 1.0 for r in rows)
    assert (tmp_path / "R10_seed0" / "rows.csv").exists()


R10_ORDERED = [(0.5, 0.8, 2.0, 1.0), (0.4, 0.9, 3.0, 2.0), (0.6, 0.7, 4.0, 3.0)]


@pytest.mark.parametrize(
    ("later", "held"),
    [
        (R10_ORDERED, [True, True]),
        ([(i, 5.0, e, b) for i, _, e, b in R10_ORDERED], [False, True]),  # F(1) above EF
        ([(i, 5.0, e, -b) for i, _, e, b in R10_ORDERED], [False, False]),  # and anti-correlated
    ],
)
def test_r10_decides_by_its_rule_on_constructed_rows(tmp_path, monkeypatch, later, held):
    """Rows (γ_iEF, γ_F(1), γ_EF relative to SGD, imbalance) after the first checkpoint; the
    first checkpoint's row is ignored by the ordering but counted by the correlation."""
    first = {"checkpoint": 0, "gamma_ratio_ief": 9.0, "gamma_ratio_mc": 0.1}
    first |= {"gamma_ratio_ef": 0.5, "imbalance": 0.5 if held[1] else 9.0}
    rows = [first] + [
        {"checkpoint": 1, "gamma_ratio_ief": i, "gamma_ratio_mc": m, "gamma_ratio_ef": e}
        | {"imbalance": b}
        for i, m, e, b in later
    ]
    monkeypatch.setattr(quality.reports, "checkpoint_report", lambda *args, **kwargs: (None, rows))
    finding = quality.r10_approximation_quality(tmp_path, seeds=(0,))
    assert list(finding.checks.values()) == held
    medians = finding.numbers["median_gamma_ratio"]
    for index, method in enumerate(("ief", "mc", "ef")):
        assert medians[method] == pytest.approx(statistics.median(r[index] for r in later))
    spearman = scipy.stats.spearmanr(
        [r["imbalance"] for r in rows], [r["gamma_ratio_ef"] for r in rows]
    )
    assert finding.numbers["spearman"] == pytest.approx(spearman.statistic)


def fake_tune(finals, step_seconds=None):
    """A stand-in for tuning.tune: per contender, runs (one per seed) whose final training loss
    is ``finals[(task name, label)]`` (or ``finals[label]``; a tuple gives one per seed) and
    whose steps take ``step_seconds[label]`` (default 1 ms), without training."""

    def tune(task, data, contenders, seeds, progress=print):
        selected = {}
        for contender in contenders:
            value = finals.get((task.name, contender.label), finals.get(contender.label))
            per_seed = value if isinstance(value, tuple) else (value,) * len(seeds)
            selected[contender.label] = [
                {
                    "method": contender.label,
                    "registry_method": contender.method,
                    "hyper": {"lr": 0.1},
                    "seed": seed,
                    "train_loss": [2.0, final],
                    "step_seconds": [(step_seconds or {}).get(contender.label, 1e-3)] * 3,
                    "diverged": not math.isfinite(final),
                    "warnings": [],
                }
                for seed, final in zip(seeds, per_seed, strict=True)
            ]
        return selected

    return tune


@pytest.mark.parametrize(
    ("finals", "cosines", "held", "verdict"),
    [
        (
            {"sgd": 0.5, "ef 1e-7": 0.9, "ef 1e-4": 0.55, "ief 1e-7": 0.3},
            (0.2, 0.97),
            3,
            "reproduced",
        ),
        ({"sgd": 0.5, "ef 1e-7": 0.9, "ef 1e-4": 0.55, "ief 1e-7": 0.6}, (0.2, 0.97), 2, "partly"),
        ({"sgd": 0.5, "ef 1e-7": 0.4, "ef 1e-4": 0.55, "ief 1e-7": 0.6}, (0.2, 0.97), 1, "partly"),
        (
            {"sgd": 0.5, "ef 1e-7": 0.4, "ef 1e-4": 0.55, "ief 1e-7": math.inf},
            (0.99, 0.97),  # EF(1e-4) close to SGD, but not closer than EF(1e-7)
            0,
            "not reproduced",
        ),
    ],
)
def test_r9_decides_by_its_rule_on_constructed_runs(
    tmp_path, monkeypatch, finals, cosines, held, verdict
):
    """EF(1e-7) worse than SGD; mean cos(EF(1e-4), SGD) >= 0.95 and above EF(1e-7)'s; iEF best."""
    monkeypatch.setattr(training.tuning, "tune", fake_tune(finals))
    monkeypatch.setattr(training.tuning, "plot", lambda selected, path: [])
    monkeypatch.setattr(
        training,
        "compare_updates",
        lambda *args, **kwargs: {"cos_sgd_ef7": cosines[0], "cos_sgd_ef4": cosines[1]},
    )
    finding = training.r9_ef_damping(tmp_path, seeds=(0, 1), task_name="wine-mlp", epochs=1)
    assert sum(finding.checks.values()) == held and finding.verdict == verdict
    for label, final in finals.items():
        assert finding.numbers[label]["final_train_loss_mean"] == final
    assert finding.numbers["cos_sgd_ef"] == {
        "ef 1e-7": [cosines[0]] * 2,
        "ef 1e-4": [cosines[1]] * 2,
    }


@pytest.mark.parametrize(
    ("ief", "tie"),
    [
        ((0.45, 0.55), True),  # 0.1 below SGD's mean, within SGD's range 0.2: a tie
        ((0.15, 0.25), False),  # 0.4 below: a win, no tie
        ((0.95, 1.05), False),  # 0.4 above SGD's mean, beyond the spread 0.2: a loss, no tie
    ],
)
def test_r9_records_ief_best_as_a_tie_when_it_ties_sgd(tmp_path, monkeypatch, ief, tie):
    finals = {"sgd": (0.5, 0.7), "ef 1e-7": (0.9, 0.9), "ef 1e-4": (0.9, 0.9), "ief 1e-7": ief}
    monkeypatch.setattr(training.tuning, "tune", fake_tune(finals))
    monkeypatch.setattr(training.tuning, "plot", lambda selected, path: [])
    monkeypatch.setattr(
        training,
        "compare_updates",
        lambda *args, **kwargs: {"cos_sgd_ef7": 0.5, "cos_sgd_ef4": 0.97},
    )
    finding = training.r9_ef_damping(tmp_path, seeds=(0, 1), task_name="wine-mlp", epochs=1)
    assert finding.checks["iEF(1e-7) best"] == (not tie and ief[0] < 0.5)
    assert ("iEF(1e-7) best" in finding.ties) == tie
    assert ("[ ] iEF(1e-7) best (tie within seeds' spread)" in finding.report()) == tie


@pytest.mark.filterwarnings("ignore::natgrad.NumericalWarning")  # damping 3e-9: fallbacks expected
def test_r9_stores_the_runs_it_tuned(tmp_path):
    """The real claim, tiny: the SGD losses it stores are those of training the selected
    configuration again (runner.train_run), and its cosines are cosines."""
    finding = training.r9_ef_damping(tmp_path, seeds=(0,), task_name="wine-mlp", epochs=1)
    task = replace(runner.get_task("wine-mlp"), epochs=1)
    sgd = finding.numbers["sgd"]
    again = runner.train_run(task, "sgd", sgd["hyper"], 0, runner.load_dataset("wine"))
    assert sgd["train_loss_curves"] == [again["train_loss"]]
    assert all(-1 <= c <= 1 for values in finding.numbers["cos_sgd_ef"].values() for c in values)


@pytest.mark.parametrize(
    ("finals", "held"),
    [
        ({"sgd": 1.0, "kfac heuristic": 0.3, "kfac correct": 1.5}, [True, True, True]),
        ({"sgd": 1.0, "kfac heuristic": 0.3, "kfac correct": 2.5}, [True, True, False]),
        ({"sgd": 1.0, "kfac heuristic": 0.3, "kfac correct": 0.4}, [True, True, False]),
        ({"sgd": 1.0, "kfac heuristic": 5.0, "kfac correct": 3.0}, [False, False, False]),
        ({"sgd": 1.0, "kfac heuristic": math.nan, "kfac correct": 1.0}, [False, False, True]),
        # heuristic 0.1 below correct on the mean, but within correct's spread 0.2: a tie
        (
            {"sgd": 1.0, "kfac heuristic": (0.3, 0.3), "kfac correct": (0.3, 0.5)},
            [False, True, False],
        ),
    ],
)
def test_r5_decides_by_its_rule_on_constructed_runs(tmp_path, monkeypatch, finals, held):
    """Heuristic below correct damping and below SGD by more than the seeds' spread; correct
    damping within 2x of SGD (either way); a diverged run (NaN) never wins a comparison; a tie
    fails and is named."""
    monkeypatch.setattr(training, "mlp_problem", lambda *args: (runner.get_task("wine-mlp"), None))
    monkeypatch.setattr(training.tuning, "tune", fake_tune(finals))
    monkeypatch.setattr(training.tuning, "plot", lambda selected, path: [])
    finding = training.r5_kfac_damping(tmp_path, seeds=(0, 1))
    assert list(finding.checks.values()) == held
    verdict = {3: "reproduced", 0: "not reproduced"}.get(sum(held), "partly")
    assert finding.verdict == verdict
    tie = isinstance(finals["kfac heuristic"], tuple)
    assert finding.ties == (["heuristic damping < correct damping"] if tie else [])
    line = next(x for x in finding.lines if x.startswith("heuristic damping < correct damping:"))
    assert ("tie within seeds' spread" in line) == tie


FULL_BATCH = "wine-mlp-100-full-batch"  # the task name R4 gives its full-batch runs


@pytest.mark.parametrize(
    ("kfac", "kfac_m0", "full_batch_ng", "held"),
    [
        (0.1, 0.2, 0.3, [True, True, True, True, True]),
        (0.1, 0.6, 0.3, [True, True, True, False, True]),  # m = 0 between SGD and NG
        (0.1, 0.2, 0.9, [True, True, True, True, False]),  # full-batch NG behind SGD
        (0.8, 0.8, math.inf, [False, False, False, False, False]),
    ],
)
def test_r4_decides_by_its_rule_on_constructed_runs(
    tmp_path, monkeypatch, kfac, kfac_m0, full_batch_ng, held
):
    """KFAC and subsampled KFAC below subsampled NG (0.7) and SGD (0.5); full-batch NG below
    full-batch SGD (0.4)."""
    finals = {"sgd": 0.5, "kfac": kfac, "kfac m=0": kfac_m0, "ng (mc, batch)": 0.7}
    finals |= {(FULL_BATCH, "sgd"): 0.4, "ng (mc, full batch)": full_batch_ng}
    monkeypatch.setattr(training, "mlp_problem", lambda *args: (runner.get_task("wine-mlp"), None))
    monkeypatch.setattr(training, "subset", lambda data, size: data)
    monkeypatch.setattr(training.tuning, "tune", fake_tune(finals))
    monkeypatch.setattr(training.tuning, "plot", lambda selected, path: [])
    finding = training.r4_kfac_vs_subsampled_ng(tmp_path, seeds=(0, 1), full_batch_points=100)
    assert list(finding.checks.values()) == held
    assert finding.numbers["full_batch"]["sgd"]["final_train_loss_mean"] == 0.4
    assert finding.numbers["minibatch"]["sgd"]["final_train_loss_mean"] == 0.5


@pytest.mark.parametrize(
    ("finals", "seconds", "held"),
    [
        ({"kfac": 0.5, "foof": 0.5}, {"kfac": 2e-3, "foof": 1e-3}, [True, True]),
        ({"kfac": 0.5, "foof": 0.6}, {"kfac": 2e-3, "foof": 1e-3}, [False, True]),
        ({"kfac": 0.5, "foof": math.nan}, {"kfac": 1e-3, "foof": 1e-3}, [False, False]),
    ],
)
def test_r6_decides_by_its_rule_on_constructed_runs(tmp_path, monkeypatch, finals, seconds, held):
    """FOOF's final loss at most KFAC's (a diverged FOOF fails) and its median step time below."""
    monkeypatch.setattr(training, "mlp_problem", lambda *args: (runner.get_task("wine-mlp"), None))
    monkeypatch.setattr(training.tuning, "tune", fake_tune(finals))
    monkeypatch.setattr(training.tuning, "plot", lambda selected, path: [])
    monkeypatch.setattr(
        training,
        "step_time_at_t1",
        lambda task, data, selected: {label: 1e3 * seconds[label] for label in selected},
    )
    finding = training.r6_foof_vs_kfac(tmp_path, seeds=(0,))
    assert list(finding.checks.values()) == held
    assert finding.numbers["ms_per_step_t1"]["foof"] == pytest.approx(1e3 * seconds["foof"])


def test_r6_counts_a_tie_as_at_least_kfacs_progress(tmp_path, monkeypatch):
    """FOOF's mean 0.1 above KFAC's, within the seeds' spread 0.4: the check holds, as a tie."""
    finals = {"kfac": (0.3, 0.5), "foof": (0.2, 0.8)}
    monkeypatch.setattr(training, "mlp_problem", lambda *args: (runner.get_task("wine-mlp"), None))
    monkeypatch.setattr(training.tuning, "tune", fake_tune(finals))
    monkeypatch.setattr(training.tuning, "plot", lambda selected, path: [])
    monkeypatch.setattr(
        training, "step_time_at_t1", lambda task, data, selected: {"kfac": 2.0, "foof": 1.0}
    )
    finding = training.r6_foof_vs_kfac(tmp_path, seeds=(0, 1))
    assert finding.checks == {
        "FOOF's final loss <= KFAC's": True,
        "FOOF's step time < KFAC's (T = 1)": True,
    }
    assert finding.ties == ["FOOF's final loss <= KFAC's"]


@pytest.mark.slow  # tunes and trains R4-R6
def test_training_claims_run_tiny(tmp_path, monkeypatch):
    """R4-R6 on one epoch with one-point grids: the checks and the JSON come out."""
    grid = {"lr": [1e-2], "damping": [1.0]}
    monkeypatch.setattr(training, "CURVATURE_GRID", grid)
    monkeypatch.setattr(training, "FULL_BATCH_GRID", grid)
    monkeypatch.setattr(training, "KRONECKER_GRID", {**grid, "inv_period": [1]})
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
    assert r6.numbers["ms_per_step_t1"]["foof"] > 0


def test_r12_one_check_per_cell_on_constructed_runs(tmp_path, monkeypatch):
    """The paper's winners on wine are SGD, SGD, TENGraD; constructed runs in which TENGraD wins
    every cell hold the third check only."""
    finals = {"sgd": 0.5, "tengrad": 0.2}
    monkeypatch.setattr(training.tuning, "tune", fake_tune(finals))
    finding = training.r12_tengrad_vs_sgd(tmp_path, seeds=(0,), epochs=1, datasets=("wine",))
    assert list(finding.checks.values()) == [False, False, True] and finding.verdict == "partly"
    assert [line.split(":")[0] for line in finding.lines[:3]] == [
        "wine [4]",
        "wine [32, 16]",
        "wine [32, 16, 16]",
    ]
    assert all(
        f"SGD {math.log(0.5):.3f}, TENGraD {math.log(0.2):.3f}" in x for x in finding.lines[:3]
    )
    assert [finding.numbers["comparisons"][name]["outcome"] for name in finding.checks] == [
        "loss",
        "loss",
        "win",
    ]
    assert finding.ties == []
    for hidden in ("[4]", "[32, 16]", "[32, 16, 16]"):
        cell = finding.numbers["wine"][hidden]
        assert {k: v["final_train_loss_mean"] for k, v in cell.items()} == finals


def test_r12_a_difference_within_the_seeds_spread_is_a_tie(tmp_path, monkeypatch):
    """TENGraD's mean (0.2) is below SGD's (0.5) by less than its seeds' spread (0.38): every
    cell is a tie, so neither the paper's SGD cells nor its TENGraD cell hold, and all three are
    recorded as ties."""
    monkeypatch.setattr(
        training.tuning, "tune", fake_tune({"sgd": (0.5, 0.5), "tengrad": (0.01, 0.39)})
    )
    finding = training.r12_tengrad_vs_sgd(tmp_path, seeds=(0, 1), epochs=1, datasets=("wine",))
    assert list(finding.checks.values()) == [False, False, False]
    assert finding.ties == list(finding.checks)
    assert sum("tie within seeds' spread" in line for line in finding.lines) == 3


def test_verdict_summary_table_and_report_on_constructed_findings():
    findings = [
        Finding("R1", "all hold", {"a": True, "b": True}, seconds=3.4, cpu_seconds=1.2),
        Finding(
            "R2", "one of three", {"a": True, "b": False, "c": False}, seconds=12.6, cpu_seconds=5.1
        ),
        Finding("R3", "none", {"a": False}),
    ]
    assert [f.verdict for f in findings] == ["reproduced", "partly", "not reproduced"]
    assert summary_table(findings).splitlines()[2:] == [
        "| R1 | all hold | reproduced | 2/2 | 3 | 1 |",
        "| R2 | one of three | partly | 1/3 | 13 | 5 |",
        "| R3 | none | not reproduced | 0/1 | 0 | 0 |",
        "| total | | | | 16 | 6 |",
    ]
    assert findings[1].report().splitlines() == [
        "R2 one of three: PARTLY (13 s wall, 5 s CPU)",
        "  [x] a",
        "  [ ] b",
        "  [ ] c",
    ]


def test_run_claim_times_saves_and_runs_on_one_thread(tmp_path, monkeypatch):
    seen = []

    def claim(output, seeds, full):
        seen.append((torch.get_num_threads(), seeds, full))
        return Finding("R0", "a claim", {"held": True})

    monkeypatch.setitem(reproduce.CLAIMS, "R0", reproduce.Claim("R0", "a claim", claim))
    cpu_clock = iter([10.0, 13.5])  # the claim's CPU time: 3.5 s, whatever the wall clock
    monkeypatch.setattr(reproduce, "cpu_seconds", lambda: next(cpu_clock))
    torch.set_num_threads(2)
    try:
        finding = reproduce.run_claim("R0", tmp_path, seeds=[4])
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(1)
    assert seen == [(1, (4,), False)] and after == 2
    record = json.loads((tmp_path / "R0.json").read_text())
    assert finding.seconds > 0 and record["seconds"] == finding.seconds
    assert finding.cpu_seconds == 3.5 and record["cpu_seconds"] == 3.5
    assert "s wall, 4 s CPU)" in finding.report()
    with pytest.raises(ValueError, match="unknown claim 'R99'"):
        reproduce.run_claim("R99", tmp_path)


def test_cpu_seconds_include_ended_child_processes():
    """R11 measures in fresh processes: their CPU time counts for the claim."""
    before = reproduce.cpu_seconds()
    own = reproduce.time.process_time()
    child = subprocess.run(
        [sys.executable, "-c", "import time; sum(range(10**7)); print(time.process_time())"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    spent_in_child = float(child.stdout)
    assert spent_in_child > 0
    # what the parent spent meanwhile is at most its own process time's increase
    parent = reproduce.time.process_time() - own
    assert reproduce.cpu_seconds() - before >= parent + 0.5 * spent_in_child


@pytest.mark.parametrize("name", ["mnist5k"])
def test_images_are_standardised_over_all_pixels(name):
    """Benzing 2022, App. D.4: one mean and one standard deviation over every training pixel,
    applied to both splits (per-pixel statistics would differ per column)."""
    raw = runner.load_dataset(name, standardize=False)
    data = runner.load_dataset(name)
    mean, std = raw.train_inputs.double().mean(), raw.train_inputs.double().std()
    assert data.train_inputs.double().mean().item() == pytest.approx(0.0, abs=1e-5)
    assert data.train_inputs.double().std().item() == pytest.approx(1.0, rel=1e-5)
    for split in ("train_inputs", "test_inputs"):
        expected = (getattr(raw, split).double() - mean) / std
        assert torch.allclose(getattr(data, split).double(), expected, atol=1e-5)
    assert torch.equal(data.train_targets, raw.train_targets)


def test_subsets_of_the_class_sorted_images_mix_classes():
    """mnist5k's file is sorted by digit; R4's full-batch subset and R9's probe batch must not be
    the first rows (400 zeros and 100 ones among the first 500)."""
    data = runner.load_dataset("mnist5k")
    assert torch.equal(data.train_targets[:500].unique(), torch.tensor([0, 1]))  # the trap
    subset = training.subset(data, 500)
    assert torch.bincount(subset.train_targets, minlength=10).min() >= 30
    assert torch.equal(training.subset(data, 500).train_inputs, subset.train_inputs)
    again = training.shuffled(data)
    assert sorted(again.train_targets.tolist()) == sorted(data.train_targets.tolist())
    first = (again.train_inputs[0] == data.train_inputs).all(dim=1).nonzero().flatten()
    assert data.train_targets[first].tolist() == [again.train_targets[0].item()]
