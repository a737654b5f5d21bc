"""The analyses behind ``natgrad field`` and ``natgrad analyze``: figures, tables, summaries."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from natgrad.lab import datasets, fields, models, study
from natgrad.lab.datasets import Dataset, load_dataset


def field_report(output: str | Path, steps: int = 50_000, grid: int = 15) -> list[str]:
    """Kunstner et al. 2019, Fig. 1-2: regression vector fields and trajectories, logistic
    quadratics.

    Writes ``regression_fields.png`` and ``logistic_quadratics.png`` into ``output`` and
    returns the printed summary lines (NGD vs iEF agreement, EF distortion, trajectory ends).
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    x, y = datasets.regression_data()
    theta = torch.linspace(-1.0, 5.0, grid, dtype=torch.float64)
    vector_fields = fields.regression_vector_fields(x, y, theta, theta)
    agreement = vector_fields.cosine("ngd", "ief")
    distortion = vector_fields.cosine("ngd", "ef")
    lines = [
        f"NGD vs iEF arrows on {agreement.numel()} grid points: cosine min "
        f"{agreement.min().item():.15f}, max |1 - cos| {(1 - agreement).abs().max().item():.2e}",
        f"NGD vs EF arrows: cosine median {distortion.median().item():.3f}, "
        f"min {distortion.min().item():.3f}",
    ]
    trajectories = {
        method: [
            fields.regression_trajectory(method, start, x, y, steps=steps)
            for start in fields.REGRESSION_STARTS
        ]
        for method in ("gd", "ngd", "ef")
    }
    for method, paths in trajectories.items():
        ends = ", ".join(f"({p[-1, 0]:.2f}, {p[-1, 1]:.2f})" for p in paths)
        lines.append(f"{method} trajectories end at {ends} after {steps} steps")
    fields.plot_regression_fields(
        vector_fields, x, y, trajectories, str(output / "regression_fields.png")
    )
    quadratics = {}
    for name in datasets.LOGISTIC_DATASETS:
        quadratics[name] = fields.logistic_quadratic_models(*datasets.logistic_data(name))
        fisher, empirical = quadratics[name].fisher, quadratics[name].empirical_fisher
        gap = ((fisher - empirical).norm() / fisher.norm()).item()
        lines.append(f"logistic {name}: ||F - EF|| / ||F|| = {gap:.3f} at the minimum")
    fields.plot_quadratic_models(quadratics, str(output / "logistic_quadratics.png"))
    return lines


def checkpoint_report(
    output: str | Path,
    dataset: str | Dataset = "digits",
    epochs: int = 8,
    batches: int = 4,
    batch_size: int = 32,
    hidden: tuple[int, ...] = (128, 128),
    seed: int = 0,
) -> tuple[list[str], list[dict[str, float]]]:
    """Wu et al. 2024, Fig. 2-4 at CPU scale: train an MLP with SGD, study every epoch's checkpoint.

    ``dataset`` is a name for :func:`~natgrad.lab.datasets.load_dataset` or a loaded dataset.
    Writes ``rows.csv`` and ``study.png`` into ``output``; returns the printed summary and the
    study's records.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    data = dataset if isinstance(dataset, Dataset) else load_dataset(dataset)
    if data.task != "classification":
        raise ValueError(f"the checkpoint study needs a classification set, {data.name} is not")
    inputs = data.train_inputs.reshape(len(data.train_inputs), -1)
    train = list(zip(inputs.split(batch_size), data.train_targets.split(batch_size), strict=True))
    model = models.mlp(inputs.shape[1], data.num_outputs, hidden)
    checkpoints = study.train_with_checkpoints(model, train, F.cross_entropy, epochs, lr=0.05)
    model.double()
    checkpoints = [{k: v.double() for k, v in state.items()} for state in checkpoints]
    evaluation = [(x.double(), y) for x, y in train[-batches:]]
    rows = study.checkpoint_study(model, checkpoints, evaluation, F.cross_entropy)
    study.write_rows(rows, output / "rows.csv")
    study.plot_study(rows, output / "study.png")
    methods = [k.removeprefix("gamma_ratio_") for k in rows[0] if k.startswith("gamma_ratio_")]
    lines = [
        "median γ_method / γ_SGD per checkpoint (below 1: closer to NGD than SGD)",
        "checkpoint " + " ".join(f"{m:>8s}" for m in methods),
    ]
    for index in range(len(checkpoints)):
        chosen = [r for r in rows if r["checkpoint"] == index]
        medians = [
            torch.tensor([r[f"gamma_ratio_{m}"] for r in chosen]).median().item() for m in methods
        ]
        lines.append(f"{index:10d} " + " ".join(f"{v:8.3f}" for v in medians))
    correlation = study.rank_correlation(
        [r["imbalance"] for r in rows], [r["gamma_ratio_ef"] for r in rows]
    )
    lines.append(
        f"Spearman correlation of imbalance and γ_EF/γ_SGD over {len(rows)} batches: "
        f"{correlation:.3f}"
    )
    return lines, rows


__all__ = ["checkpoint_report", "field_report"]
