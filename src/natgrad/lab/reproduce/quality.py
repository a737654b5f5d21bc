"""R10 (Wu et al. 2024, sec. 6-8, Fig. 3-4): approximation quality along training.

Along an SGD run (batch 32, the batch of Wu et al. 2024) of an MLP 784-128-128-10 on
``mnist5k`` (4,000 real MNIST images; Wu et al. 2024 study T5 / prompt tuning on GLUE; the width
is small so that the exact Fisher of a batch and per-sample quantities stay cheap), every
epoch's checkpoint is studied on a few batches: the gamma
indicator of each approximate natural gradient relative to SGD's (:mod:`natgrad.analysis`),
and the gradient-norm imbalance of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from natgrad.lab import reports, study
from natgrad.lab.datasets import Dataset, load_dataset
from natgrad.lab.reproduce.finding import Finding
from natgrad.lab.reproduce.training import shuffled


def r10_approximation_quality(
    output: Path,
    seeds: Sequence[int] = (0, 1, 2),
    full: bool = False,
    dataset: str | None = None,
    epochs: int = 8,
    batches: int = 4,
    hidden: tuple[int, ...] = (128, 128),
) -> Finding:
    """After the first checkpoint, the median (over batches and seeds) of γ/γ_SGD orders
    iEF < F(1) < EF; the imbalance of a batch correlates with its γ_EF/γ_SGD (Spearman above
    0.5 over every studied batch). ``dataset`` names a dataset to study instead of
    ``mnist5k``."""
    # mnist5k's file is sorted by digit: the SGD run and the studied batches take a fixed
    # random order, so batches mix classes
    data: str | Dataset = shuffled(load_dataset("mnist5k")) if dataset is None else dataset
    name = "mnist5k (standardised over all pixels)" if dataset is None else dataset
    rows, figures = [], []
    for seed in seeds:
        directory = Path(output) / f"R10_seed{seed}"
        _, seed_rows = reports.checkpoint_report(
            directory, data, epochs, batches, hidden=hidden, seed=seed
        )
        rows += [{**row, "seed": seed} for row in seed_rows]
        figures.append(str(directory / "study.png"))
    later = [row for row in rows if row["checkpoint"] >= 1]

    def median(method: str) -> float:
        return torch.tensor([row[f"gamma_ratio_{method}"] for row in later]).median().item()

    medians = {method: median(method) for method in ("ief", "mc", "ef")}
    per_batch = sum(
        row["gamma_ratio_ief"] < row["gamma_ratio_mc"] < row["gamma_ratio_ef"] for row in later
    ) / len(later)
    correlation = study.rank_correlation(
        [row["imbalance"] for row in rows], [row["gamma_ratio_ef"] for row in rows]
    )
    lines = [
        f"{name}, MLP {'-'.join(map(str, ('in', *hidden, 'out')))}, {epochs} epochs of SGD "
        f"(batch 32), {batches} batches per checkpoint, seeds {list(seeds)}",
        f"after the first checkpoint, median γ/γ_SGD: iEF {medians['ief']:.3f}, "
        f"F(1) {medians['mc']:.3f}, EF {medians['ef']:.3f} (ordering holds in {per_batch:.0%} "
        "of the batches)",
        f"imbalance vs γ_EF/γ_SGD: Spearman {correlation:.3f} over {len(rows)} batches",
    ]
    return Finding(
        "R10",
        "γ_iEF < γ_F(1) < γ_EF; imbalance correlates with γ_EF/γ_SGD (Wu et al. 2024, Fig. 3-4)",
        {
            "median γ/γ_SGD: iEF < F(1) < EF": medians["ief"] < medians["mc"] < medians["ef"],
            "Spearman(imbalance, γ_EF/γ_SGD) > 0.5": correlation > 0.5,
        },
        lines,
        {
            "median_gamma_ratio": medians,
            "ordering_fraction": per_batch,
            "spearman": correlation,
            "rows": rows,
        },
        figures,
    )


__all__ = ["r10_approximation_quality"]
