"""The README's example runs as written and trains."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs_and_loss_decreases():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "the README has no python example"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(blocks[0], str(README), "exec"), {})
    losses = [float(v) for v in re.findall(r"epoch \d+: loss ([0-9.]+)", printed.getvalue())]
    assert len(losses) == 5
    assert losses[-1] < losses[0]


def test_readme_laplace_example_runs_and_the_evidence_rises():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    example = [block for block in blocks if "natgrad.Laplace(" in block]
    assert len(example) == 1, "the README has no Laplace example"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(example[0], str(README), "exec"), {})
    evidences = [
        float(v) for v in re.findall(r"log evidence(?: at tau=1:)? (-?[0-9.]+)", printed.getvalue())
    ]
    assert len(evidences) == 2 and evidences[1] >= evidences[0]
    nlls = dict(re.findall(r"(\w+): held-out NLL ([0-9.]+)", printed.getvalue()))
    assert set(nlls) == {"mc", "linearised", "MAP"}
