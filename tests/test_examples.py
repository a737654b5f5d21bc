"""Every script in examples/ runs as a user would run it, and its loss falls."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
SUMMARY = re.compile(r"^loss: first ([0-9.eE+-]+) last ([0-9.eE+-]+)$", flags=re.MULTILINE)


def test_the_examples_are_found():
    names = {path.name for path in EXAMPLES}
    assert {"woodbury_ngd.py", "kfac_foof.py", "fishleg.py", "measure_gamma.py",
            "cnn_batchnorm.py", "transformer.py", "huggingface.py", "laplace.py"} <= names


def test_the_summary_pattern_reads_a_summary_and_only_a_summary():
    assert SUMMARY.findall("epoch 0: loss 2\nloss: first 2.31 last 8.4e-01\n") == [
        ("2.31", "8.4e-01")
    ]
    assert SUMMARY.findall("loss: first 2.31 last nan\n") == []


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda path: path.stem)
def test_example_runs_and_its_loss_falls(script: Path):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT / "src"), *filter(None, [os.environ.get("PYTHONPATH")])]
        ),
    }
    run = subprocess.run(
        [sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=600,
    )
    assert run.returncode == 0, f"{script.name} failed:\n{run.stderr[-3000:]}"
    summaries = SUMMARY.findall(run.stdout)
    assert len(summaries) == 1, f"{script.name} printed no 'loss: first X last Y' line"
    first, last = (float(value) for value in summaries[0])
    assert last < first, f"{script.name}: loss rose from {first} to {last}"
