"""Claims on small problems with exact geometry: R1, R2 and R3.

* R1 (Kunstner et al. 2019, Fig. 1, App. D.1; Wu et al. 2024, sec. 2.3): on the 2-D
  least-squares problem the NGD and iEF vector fields coincide, EF's is distorted.
* R2 (Wu et al. 2024, sec. 2.2): for least squares the iEF matrix equals the Fisher.
* R3 (Kunstner et al. 2019, Fig. 3, App. D.3): GD vs NGD vs EF-preconditioned GD with
  grid-searched step size and damping, 100 full-batch iterations from θ = 0, and the cosine
  between the EF and NGD directions along the EF path, on breast cancer, wine and Boston.

These are deterministic (no training randomness), so ``seeds`` is accepted and ignored.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import natgrad
from natgrad.analysis.compare import method_update
from natgrad.analysis.quality import cosine_similarity
from natgrad.lab import datasets, fields, reports
from natgrad.lab.datasets import MissingDataError, load_dataset
from natgrad.lab.reproduce.finding import Finding


def r1_vector_fields(
    output: Path, seeds: Sequence[int] = (0,), full: bool = False, steps: int = 50_000
) -> Finding:
    """NGD and iEF arrows coincide on the paper's regression (every cosine within 1e-10 of 1);
    EF's differ (some cosine below 0.9)."""
    lines = reports.field_report(output, steps=steps)
    x, y = datasets.regression_data()
    grid = torch.linspace(-1.0, 5.0, 15, dtype=torch.float64)
    vector_fields = fields.regression_vector_fields(x, y, grid, grid)
    ngd_ief = vector_fields.cosine("ngd", "ief")
    ngd_ef = vector_fields.cosine("ngd", "ef")
    return Finding(
        "R1",
        "2-D least squares: NGD = iEF vector fields, EF distorted (Kunstner et al. 2019, Fig. 1)",
        {
            "NGD and iEF coincide: every cosine within 1e-10 of 1": bool(
                (1 - ngd_ief).abs().max() < 1e-10
            ),
            "EF distorted: some cosine(NGD, EF) below 0.9": bool(ngd_ef.min() < 0.9),
        },
        lines,
        {
            "cos_ngd_ief_min": ngd_ief.min().item(),
            "cos_ngd_ef_min": ngd_ef.min().item(),
            "cos_ngd_ef_median": ngd_ef.median().item(),
        },
        [
            str(Path(output) / "regression_fields.png"),
            str(Path(output) / "logistic_quadratics.png"),
        ],
    )


def r2_ief_matrix_is_fisher(
    output: Path, seeds: Sequence[int] = (0,), full: bool = False, num: int = 200
) -> Finding:
    """For ``½ (z - y)^2`` the iEF matrix ``J^T diag(s)^{-1} J`` equals the Fisher (relative
    error below 1e-10 in float64), on an MLP for each seed."""
    errors = []
    for seed in seeds:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1)).double()
        inputs = torch.randn(num, 3, dtype=torch.float64)
        targets = torch.randn(num, 1, dtype=torch.float64)

        def loss_fn(logits: Tensor, targets: Tensor = targets) -> Tensor:
            return 0.5 * F.mse_loss(logits, targets)

        likelihood = natgrad.likelihoods.Gaussian(variance=1.0)
        gradients = natgrad.analysis.per_sample_gradients(model, inputs, loss_fn, likelihood)
        residuals = (model(inputs) - targets).detach()[:, 0]
        scaled = gradients / residuals.abs().unsqueeze(1)  # s_n = (z_n - y_n)^2
        ief = scaled.T @ scaled / num
        fisher = natgrad.analysis.BatchFisher(model, inputs, likelihood).dense()
        errors.append(((ief - fisher).norm() / fisher.norm()).item())
    return Finding(
        "R2",
        "least squares: iEF matrix = Fisher (Wu et al. 2024, sec. 2.2)",
        {"||iEF - F|| / ||F|| < 1e-10 for every seed": max(errors) < 1e-10},
        [
            f"||iEF - F|| / ||F|| = {max(errors):.2e} (worst of {len(errors)} MLPs 3-16-1, {num} "
            "datapoints each)"
        ],
        {"relative_errors": errors},
    )


R3_PROBLEMS = {
    "breast_cancer": ("bernoulli", 1),
    "wine": ("categorical", 3),
    "boston": ("gaussian", 1),
}


def _r3_model(inputs: int, outputs: int) -> nn.Module:
    model = nn.Linear(inputs, outputs).double()
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    return model


def _r3_loss(likelihood: str, logits: Tensor, targets: Tensor) -> Tensor:
    if likelihood == "categorical":
        return F.cross_entropy(logits, targets)
    if likelihood == "bernoulli":
        return F.binary_cross_entropy_with_logits(logits, targets.reshape(logits.shape))
    return 0.5 * F.mse_loss(logits, targets.reshape(logits.shape))


def _r3_run(
    method: str, likelihood: str, inputs: Tensor, targets: Tensor, outputs: int,
    lr: float, damping: float, iterations: int, track_cosine: bool = False,
) -> tuple[list[float], list[float]]:  # fmt: skip
    model = _r3_model(inputs.shape[1], outputs)
    natgrad_likelihood = (
        natgrad.likelihoods.Gaussian(variance=1.0) if likelihood == "gaussian" else likelihood
    )

    def make(fisher: str | None, lam: float):
        if fisher is None:
            return lambda m: None
        return lambda m: natgrad.NGD(m, likelihood=natgrad_likelihood, fisher=fisher, damping=lam)

    fisher = {"gd": None, "ngd": "exact", "ef": "empirical"}[method]
    losses, cosines = [], []
    for _ in range(iterations + 1):
        loss_fn = lambda z: _r3_loss(likelihood, z, targets)  # noqa: E731
        with torch.no_grad():
            losses.append(loss_fn(model(inputs)).item())
        if len(losses) > iterations or not math.isfinite(losses[-1]):
            break
        direction = method_update(model, inputs, loss_fn, make(fisher, damping))
        if track_cosine:
            natural = method_update(model, inputs, loss_fn, make("exact", 1e-10))
            empirical = method_update(model, inputs, loss_fn, make("empirical", 1e-10))
            cosines.append(cosine_similarity(natural, empirical))
        with torch.no_grad():
            offset = 0
            for param in model.parameters():
                param -= lr * direction[offset : offset + param.numel()].reshape(param.shape)
                offset += param.numel()
    return losses, cosines


def r3_gd_ngd_efgd(
    output: Path,
    seeds: Sequence[int] = (0,),
    full: bool = False,
    iterations: int = 100,
    datasets: Sequence[str] = tuple(R3_PROBLEMS),
) -> Finding:
    """Per dataset: grid-searched GD, NGD and EFGD from θ = 0; NGD's final loss is the lowest
    (ties allowed). The cosine of EF and NGD along the EF path is reported. A dataset whose
    package is missing (Boston needs mlxtend) is reported as skipped, not as a check."""
    step_sizes = [10.0**k for k in range(-4, 4)]
    dampings = [10.0**k for k in range(-8, 1, 2)]
    checks, lines, numbers = {}, [], {}
    for dataset in datasets:
        try:
            result = _r3_dataset(dataset, iterations, step_sizes, dampings)
        except MissingDataError as error:
            lines.append(f"{dataset}: skipped ({error})")
            continue
        numbers[dataset] = result
        best = result["best"]
        for method in ("gd", "ngd", "ef"):
            damping = "" if method == "gd" else f", damping {best[method]['damping']:g}"
            lines.append(
                f"{dataset} {method}: final loss {best[method]['loss']:.4g} "
                f"(step size {best[method]['lr']:g}{damping})"
            )
        cos = result["cosines"]
        lines.append(
            f"{dataset} cos(EF, NGD) along the EF path: median {cos['median']:.3f}, "
            f"min {cos['min']:.3f}, last {cos['last']:.3f}"
        )
        ngd = best["ngd"]["loss"]
        checks[f"{dataset}: NGD's final loss <= GD's and EFGD's"] = ngd <= min(
            best["gd"]["loss"], best["ef"]["loss"]
        )
    lines.append(
        f"grids: step sizes {step_sizes[0]:g}..{step_sizes[-1]:g}, dampings "
        f"{dampings[0]:g}..{dampings[-1]:g} (log-spaced), {iterations} iterations"
    )
    return Finding(
        "R3", f"GD vs NGD vs EFGD, {iterations} full-batch steps (Kunstner et al. 2019, Fig. 3)",
        checks, lines, numbers,
    )  # fmt: skip


def _r3_dataset(
    dataset: str, iterations: int, step_sizes: list[float], dampings: list[float]
) -> dict:
    likelihood, outputs = R3_PROBLEMS[dataset]
    data = load_dataset(dataset, test_fraction=0.0)
    inputs = data.train_inputs.double()
    targets = data.train_targets if likelihood == "categorical" else data.train_targets.double()
    best = {}
    for method in ("gd", "ngd", "ef"):
        candidates = itertools.product(step_sizes, dampings if method != "gd" else [1.0])
        results = []
        for lr, damping in candidates:
            losses, _ = _r3_run(
                method, likelihood, inputs, targets, outputs, lr, damping, iterations
            )
            final = losses[-1] if len(losses) == iterations + 1 else math.inf
            results.append((final if math.isfinite(final) else math.inf, lr, damping))
        loss, lr, damping = min(results)
        best[method] = {"loss": loss, "lr": lr, "damping": damping}
    lr, damping = best["ef"]["lr"], best["ef"]["damping"]
    _, cosines = _r3_run("ef", likelihood, inputs, targets, outputs, lr, damping, iterations, True)
    cos = torch.tensor(cosines)
    return {
        "best": best,
        "cosines": {
            "median": cos.median().item(),
            "min": cos.min().item(),
            "last": cos[-1].item(),
            "along_ef_path": cosines,
        },
    }


__all__ = ["R3_PROBLEMS", "r1_vector_fields", "r2_ief_matrix_is_fisher", "r3_gd_ngd_efgd"]
