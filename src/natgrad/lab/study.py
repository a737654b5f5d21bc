"""Checkpoint study: approximation quality of several methods along a training run.

Wu et al. 2024 (sec. 6-8, Figures 2-4) evaluates, at checkpoints taken during training and on a few
batches each, the updates of SGD, EF, iEF, the sampled Fisher F(1) and others against the
exact natural gradient: the ratios ``γ_m / γ_SGD`` (below 1: closer to NGD than SGD is),
cosines with NGD and with SGD, and the gradient-norm imbalance of the batch. This module runs
that study for any model, any batches and any set of methods, writes a tidy table and draws
the two figures: ratios against training progress, and imbalance against ``γ_EF / γ_SGD``.

Every preconditioner is built fresh for each batch, so methods with running statistics (KFAC,
FOOF) are evaluated in their subsampled form (one batch of curvature).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

import natgrad
from natgrad.analysis.compare import MethodFactory, compare_updates
from natgrad.lab.plotting import pyplot

LossFunction = Callable[[Tensor, Tensor], Tensor]


def default_methods(damping: float = 1e-7) -> dict[str, MethodFactory]:
    """SGD (implicit), EF, iEF, F(1), KFAC, FOOF and exact NGD, as in Wu et al. 2024's
    comparisons."""
    return {
        "ngd": lambda m: natgrad.NGD(m, fisher="exact", damping=damping),
        "ef": lambda m: natgrad.EF(m, damping=damping),
        "ief": lambda m: natgrad.IEF(m, damping=damping),
        "mc": lambda m: natgrad.NGD(m, fisher="mc", damping=damping),
        "kfac": lambda m: natgrad.KFAC(m, ema_decay=0.0, damping=1e-3, inv_period=1),
        "foof": lambda m: natgrad.FOOF(m, ema_decay=0.0, damping=1.0, inv_period=1),
    }


def train_with_checkpoints(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    loss_fn: LossFunction,
    epochs: int,
    lr: float = 0.1,
    momentum: float = 0.9,
) -> list[dict[str, Tensor]]:
    """Train with SGD and return the model's state at the start and after every epoch."""
    optimiser = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    checkpoints = [_copy_state(model)]
    batches = list(batches)
    for _ in range(epochs):
        for inputs, targets in batches:
            optimiser.zero_grad()
            loss_fn(model(inputs), targets).backward()
            optimiser.step()
        checkpoints.append(_copy_state(model))
    return checkpoints


def checkpoint_study(
    model: nn.Module,
    checkpoints: Sequence[dict[str, Tensor]],
    batches: Sequence[tuple[Tensor, Tensor]],
    loss_fn: LossFunction,
    methods: dict[str, MethodFactory] | None = None,
    likelihood: str = "categorical",
    reduction: str = "mean",
    reference: str = "ngd",
) -> list[dict[str, float]]:
    """One record per (checkpoint, batch): see :func:`natgrad.analysis.compare_updates`.

    ``progress`` runs from 0 (first checkpoint) to 1 (last). The model is left at the last
    checkpoint.
    """
    if not checkpoints:
        raise ValueError("checkpoint_study needs at least one checkpoint")
    methods = default_methods() if methods is None else methods
    rows = []
    for index, state in enumerate(checkpoints):
        model.load_state_dict(state)
        for batch_index, (inputs, targets) in enumerate(batches):
            record = compare_updates(
                model,
                inputs,
                lambda logits, targets=targets: loss_fn(logits, targets),
                methods,
                likelihood,
                reduction,
                reference,
            )
            progress = index / max(len(checkpoints) - 1, 1)
            rows.append({"checkpoint": index, "progress": progress, "batch": batch_index, **record})
    return rows


def write_rows(rows: list[dict[str, float]], path: str | Path) -> None:
    """Write the records as CSV or JSON, by the file's suffix."""
    path = Path(path)
    if path.suffix == ".json":
        path.write_text(json.dumps(rows, indent=1))
        return
    if path.suffix != ".csv":
        raise ValueError(f"write_rows writes .csv or .json files, got {path.name!r}")
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot_study(rows: list[dict[str, float]], path: str | Path) -> None:
    """Two panels shaped like Wu et al. 2024, Figures 2-4.

    Left: median over batches of ``γ_m / γ_SGD`` against training progress, one line per
    method (log scale). Right: batch imbalance against ``γ_EF / γ_SGD`` (log-log), if EF was
    measured.
    """
    plt = pyplot()

    methods = [k.removeprefix("gamma_ratio_") for k in rows[0] if k.startswith("gamma_ratio_")]
    progress = sorted({row["progress"] for row in rows})
    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in methods:
        if method == "sgd":
            continue
        medians = [
            torch.tensor([r[f"gamma_ratio_{method}"] for r in rows if r["progress"] == p])
            .median()
            .item()
            for p in progress
        ]
        axes[0].plot(progress, medians, marker="o", label=method)
    axes[0].axhline(1.0, color="grey", linestyle="--", linewidth=1)
    axes[0].set(
        yscale="log", xlabel="training progress", ylabel="γ_method / γ_SGD (median over batches)"
    )
    axes[0].legend()
    if "gamma_ratio_ef" in rows[0]:
        finite = [r for r in rows if math.isfinite(r["imbalance"])]
        axes[1].scatter(
            [r["imbalance"] for r in finite], [r["gamma_ratio_ef"] for r in finite], s=12
        )
        axes[1].set(
            xscale="log", yscale="log", xlabel="gradient-norm imbalance", ylabel="γ_EF / γ_SGD"
        )
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def rank_correlation(first: Sequence[float], second: Sequence[float]) -> float:
    """Spearman's rank correlation (ties broken by order), e.g. imbalance vs ``γ_EF/γ_SGD``."""
    if len(first) != len(second) or len(first) < 2:
        raise ValueError("rank correlation needs two sequences of one length >= 2")
    ranks = [torch.tensor(values).argsort().argsort().double() for values in (first, second)]
    centred = [r - r.mean() for r in ranks]
    return ((centred[0] * centred[1]).sum() / (centred[0].norm() * centred[1].norm())).item()


def _copy_state(model: nn.Module) -> dict[str, Tensor]:
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


__all__ = [
    "checkpoint_study",
    "default_methods",
    "plot_study",
    "rank_correlation",
    "train_with_checkpoints",
    "write_rows",
]
