"""Re-run the papers' findings at CPU scale, each with its numbers, figures and a verdict.

Every claim is a function ``run(output, seeds=..., full=False, ...) -> Finding`` listed in
:data:`CLAIMS`; :func:`run_claim` times it (wall-clock and CPU seconds) and writes
``<output>/<claim>.json``. Verdicts follow the rule of :mod:`natgrad.lab.reproduce.finding`,
fixed in the code before any run: each claim is split into sub-claims decided by stated
comparisons of measured numbers, and the claim is "reproduced" (all hold), "partly" (some) or
"not reproduced" (none). ``docs/reproduction.md`` records each claim's setup, scale, numbers
and verdict.
"""

from __future__ import annotations

import inspect
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from natgrad.lab.reproduce.cost import r11_cost_scaling
from natgrad.lab.reproduce.finding import VERDICTS, Finding, MissingDataError, summary_table
from natgrad.lab.reproduce.fishleg_claims import r7_deep_linear, r8_autoencoder
from natgrad.lab.reproduce.geometry import r1_vector_fields, r2_ief_matrix_is_fisher, r3_gd_ngd_efgd
from natgrad.lab.reproduce.laplace_claims import r13_laplace_posteriors
from natgrad.lab.reproduce.quality import r10_approximation_quality
from natgrad.lab.reproduce.training import (
    r4_kfac_vs_subsampled_ng,
    r5_kfac_damping,
    r6_foof_vs_kfac,
    r9_ef_damping,
    r12_tengrad_vs_sgd,
)
from natgrad.lab.runner import torch_threads


@dataclass(frozen=True)
class Claim:
    """A reproducible claim: its identifier, what it states, and the function running it."""

    name: str
    summary: str
    run: Callable[..., Finding]


CLAIMS: dict[str, Claim] = {
    claim.name: claim
    for claim in (
        Claim("R1", "2-D least squares: NGD = iEF fields, EF's distorted", r1_vector_fields),
        Claim("R2", "least squares: the iEF matrix equals the Fisher", r2_ief_matrix_is_fisher),
        Claim("R3", "GD vs NGD vs EFGD on breast cancer, wine, Boston", r3_gd_ngd_efgd),
        Claim("R4", "KFAC beats subsampled NG and SGD", r4_kfac_vs_subsampled_ng),
        Claim("R5", "KFAC: correct damping ~ SGD, heuristic carries it", r5_kfac_damping),
        Claim("R6", "FOOF makes KFAC's progress per step, cheaper", r6_foof_vs_kfac),
        Claim("R7", "deep linear net: FishLeg reaches the noise floor first", r7_deep_linear),
        Claim("R8", "MNIST autoencoder: FishLeg, KFAC vs Adam, SGDm; reliability", r8_autoencoder),
        Claim("R9", "EF(1e-7) < SGD, EF(1e-4) ~ SGD, iEF best", r9_ef_damping),
        Claim("R10", "γ_iEF < γ_F(1) < γ_EF, imbalance ~ γ_EF/γ_SGD", r10_approximation_quality),
        Claim("R11", "time and memory vs P: exact, blockwise NGD, TENGraD, SGD", r11_cost_scaling),
        Claim("R12", "TENGraD vs SGD on small DNNs (batch 128)", r12_tengrad_vs_sgd),
        Claim("R13", "Laplace: A-only vs KFAC vs full posterior", r13_laplace_posteriors),
    )
}


def cpu_seconds() -> float:
    """CPU seconds (user and system) of this process and of its child processes that have
    ended, e.g. R11's fresh processes: unlike wall-clock time, this does not grow when other
    work shares the machine."""
    times = os.times()
    return time.process_time() + times.children_user + times.children_system


def run_claim(
    name: str,
    output: str | Path,
    seeds: Sequence[int] = (0, 1, 2),
    full: bool = False,
    data_dir: str | None = None,
    **settings: object,
) -> Finding:
    """Run claim ``name``, time it (wall-clock and process CPU seconds), and write its JSON (and
    figures) into ``output``.

    ``settings`` are passed to the claim's function (e.g. ``epochs=1`` for a smoke run);
    ``data_dir`` only to claims that read user-provided files. Claims run with one torch
    thread (:func:`natgrad.lab.runner.torch_threads`): their models are small, and
    runtimes stay predictable on a machine shared with other work.
    """
    if name not in CLAIMS:
        raise ValueError(f"unknown claim {name!r}: choose from {', '.join(CLAIMS)}")
    run = CLAIMS[name].run
    if data_dir is not None and "data_dir" in inspect.signature(run).parameters:
        settings["data_dir"] = data_dir
    start, cpu_start = time.perf_counter(), cpu_seconds()
    with torch_threads(1):
        finding = run(Path(output), seeds=tuple(seeds), full=full, **settings)
    finding.seconds = time.perf_counter() - start
    finding.cpu_seconds = cpu_seconds() - cpu_start
    finding.save(output)
    return finding


__all__ = [
    "CLAIMS",
    "VERDICTS",
    "Claim",
    "Finding",
    "MissingDataError",
    "cpu_seconds",
    "run_claim",
    "summary_table",
]
