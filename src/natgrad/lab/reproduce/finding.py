"""One claim's outcome: its sub-claims, the numbers they were decided from, and a verdict.

The verdict rule is fixed before any run: a claim is split into sub-claims ("checks"), each
decided by a comparison of measured numbers written in the claim's code; the claim is
``reproduced`` when every check holds, ``partly`` when some do, ``not reproduced`` when none
does. A check comparing two tuned configurations may end in a tie (a difference within the seeds'
spread, :mod:`natgrad.lab.reproduce.tuning`): a check needing a win fails on it; such checks are
listed in ``ties`` and marked in the report, so a tie never reads as a loss or a win.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from natgrad.lab.datasets import MissingDataError

VERDICTS = ("reproduced", "partly", "not reproduced")


@dataclass
class Finding:
    """What one claim measured and whether it held.

    Attributes
    ----------
    claim
        The claim's identifier, e.g. ``"R5"``.
    statement
        The paper's statement, in one line, with its figure.
    checks
        Sub-claim -> whether it held.
    lines
        Human-readable measurements, printed under the verdict.
    numbers
        Everything measured, JSON-serialisable (written to ``<claim>.json``).
    figures
        Paths of the figures written.
    seconds
        Wall-clock runtime of the claim.
    cpu_seconds
        CPU time of the claim's process and its ended child processes over the same span
        (:func:`natgrad.lab.reproduce.cpu_seconds`): on a machine shared with other work the
        wall-clock time inflates, this much less. Runs shared
        with an earlier claim of the same process (:func:`natgrad.lab.reproduce.tuning.cached_run`)
        count for the claim that trained them.
    ties
        The checks whose comparison was a tie within the seeds' spread.
    """

    claim: str
    statement: str
    checks: dict[str, bool]
    lines: list[str] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    ties: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.checks:
            raise ValueError(f"{self.claim}: a finding needs at least one check")
        unknown = [tie for tie in self.ties if tie not in self.checks]
        if unknown:
            raise ValueError(f"{self.claim}: ties {unknown} name no check")

    @property
    def verdict(self) -> str:
        """``reproduced`` (every check held), ``partly`` (some) or ``not reproduced`` (none)."""
        held = sum(bool(value) for value in self.checks.values())
        if held == len(self.checks):
            return "reproduced"
        return "partly" if held else "not reproduced"

    def report(self) -> str:
        """The finding as printed text: verdict, measurements, then each check."""
        lines = [
            f"{self.claim} {self.statement}: {self.verdict.upper()} "
            f"({self.seconds:.0f} s wall, {self.cpu_seconds:.0f} s CPU)"
        ]
        lines += [f"  {line}" for line in self.lines]
        lines += [
            f"  [{'x' if held else ' '}] {check}"
            + (" (tie within seeds' spread)" if check in self.ties else "")
            for check, held in self.checks.items()
        ]
        lines += [f"  figure: {figure}" for figure in self.figures]
        return "\n".join(lines)

    def save(self, directory: str | Path) -> Path:
        """Write ``<claim>.json`` (verdict included) into ``directory``; return its path."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.claim}.json"
        record = {**asdict(self), "verdict": self.verdict}
        path.write_text(json.dumps(_jsonable(record), indent=1))
        return path


def _jsonable(value: Any) -> Any:
    """Non-finite floats as strings (JSON has no NaN), containers recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def summary_table(findings: list[Finding]) -> str:
    """A markdown table of verdicts, one row per claim, with its wall-clock and CPU seconds and
    their totals."""
    rows = [
        "| claim | statement | verdict | checks held | wall seconds | CPU seconds |",
        "|---|---|---|---|---|---|",
    ]
    for finding in findings:
        held = sum(finding.checks.values())
        rows.append(
            f"| {finding.claim} | {finding.statement} | {finding.verdict} | "
            f"{held}/{len(finding.checks)} | {finding.seconds:.0f} | {finding.cpu_seconds:.0f} |"
        )
    wall = sum(finding.seconds for finding in findings)
    cpu = sum(finding.cpu_seconds for finding in findings)
    rows.append(f"| total | | | | {wall:.0f} | {cpu:.0f} |")
    return "\n".join(rows)


__all__ = ["VERDICTS", "Finding", "MissingDataError", "summary_table"]
