"""R13 (Benzing 2022 App. G): Kronecker-factored Laplace posteriors against the full one.

App. G conjectures that Kronecker-factored posteriors, like KFAC in optimisation, need not owe
their quality to resembling the curvature: keeping only the input factor ``A A^T`` (the second
factor replaced by a multiple of the identity, "A only") should do "equally well or better",
and the Kronecker-factored posterior may *outperform* the exact full Laplace posterior.

Setup (CPU scale, :func:`laplace_comparison`): a classification set standardised with its
training split (``digits`` by default for R13; ``mnist1d`` and the 784-pixel ``mnist5k`` through
``natgrad laplace``), an MLP ``d_in-hidden-10`` (tanh) trained to a MAP by Adam (weight decay
``1e-4``, ``epochs`` epochs of batches of 64), then, in float64, ``natgrad.Laplace`` over the
whole training set in the structures ``full``, ``kron`` with correct damping, heuristic damping
and ``a_only``, and ``diag``, all from one Fisher type: the exact Fisher (GGN, ``C`` rows per
datapoint) where the full posterior's ``min(R, P) x P`` numbers stay below ``Laplace``'s
``max_entries`` (digits, MNIST-1D), else the Fisher sampled with one label per datapoint
(``mnist5k``: ``R = D`` rows, so the full posterior keeps its Woodbury form of Benzing 2022
App. C). Each posterior gets its prior precision from the Laplace marginal likelihood (one
scalar). Each posterior is evaluated by its sampled-weights predictive (``n_samples`` networks:
App. G argues about the likelihood of sampled weights) and by the linearised (GLM, probit)
predictive, on the test split and on an OOD set (the test inputs with their features shuffled by
one fixed permutation): held-out NLL, accuracy, expected calibration error (15 equal-width
confidence bins), OOD detection AUROC of the predictive entropy, and a reliability diagram
(seed ``seeds[0]``).

Checks (fixed before any run), on the sampled-weights NLL averaged over the seeds:

* "A only" does equally well or better than KFAC with correct damping (NLL within 1%);
* the best Kronecker-factored posterior has a lower NLL than the full Laplace posterior.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

import natgrad
from natgrad.lab.datasets import load_dataset
from natgrad.lab.models import mlp
from natgrad.lab.plotting import pyplot
from natgrad.lab.reproduce.finding import Finding

POSTERIORS: dict[str, dict[str, str]] = {
    "full": {"structure": "full"},
    "kron-correct": {"structure": "kron", "kron_damping": "correct"},
    "kron-heuristic": {"structure": "kron", "kron_damping": "heuristic"},
    "a-only": {"structure": "kron", "kron_damping": "a_only"},
    "diag": {"structure": "diag"},
}
PREDICTIVES = ("sampled", "linearised")
BINS = 15
FisherChoice = Literal["exact", "mc"]
DATASET_FISHER: dict[str, FisherChoice] = {"digits": "exact", "mnist1d": "exact", "mnist5k": "mc"}
"""The Fisher type of each data set's posteriors (module docstring)."""


def expected_calibration_error(probs: Tensor, labels: Tensor, bins: int = BINS) -> dict:
    """ECE over equal-width confidence bins, with each bin's confidence, accuracy and count
    (the reliability diagram)."""
    confidence, predicted = probs.max(dim=1)
    correct = (predicted == labels).to(probs.dtype)
    index = (confidence * bins).long().clamp(max=bins - 1)
    counts = torch.bincount(index, minlength=bins).to(probs.dtype)
    mean_confidence = torch.zeros(bins, dtype=probs.dtype).index_add_(0, index, confidence)
    accuracy = torch.zeros(bins, dtype=probs.dtype).index_add_(0, index, correct)
    filled = counts > 0
    mean_confidence[filled] /= counts[filled]
    accuracy[filled] /= counts[filled]
    ece = ((counts / counts.sum()) * (mean_confidence - accuracy).abs()).sum().item()
    return {
        "ece": ece,
        "bin_confidence": mean_confidence.tolist(),
        "bin_accuracy": accuracy.tolist(),
        "bin_count": counts.tolist(),
    }


def auroc(in_scores: Tensor, out_scores: Tensor) -> float:
    """Area under the ROC curve of telling OOD (higher score) from in-distribution inputs:
    the Mann-Whitney probability ``P(out > in) + ½ P(out = in)``."""
    greater = (out_scores.unsqueeze(1) > in_scores.unsqueeze(0)).double().mean()
    ties = (out_scores.unsqueeze(1) == in_scores.unsqueeze(0)).double().mean()
    return (greater + 0.5 * ties).item()


def entropy(probs: Tensor) -> Tensor:
    return -(probs * probs.clamp_min(1e-300).log()).sum(dim=1)


def evaluate(probs: Tensor, labels: Tensor, ood_probs: Tensor) -> dict:
    """Held-out NLL, accuracy, ECE with its reliability bins, and OOD AUROC of the entropy."""
    return {
        "nll": F.nll_loss(probs.clamp_min(1e-300).log(), labels).item(),
        "accuracy": (probs.argmax(dim=1) == labels).double().mean().item(),
        **expected_calibration_error(probs, labels),
        "ood_auroc": auroc(entropy(probs), entropy(ood_probs)),
    }


def compare_posteriors(
    seed: int,
    epochs: int = 40,
    n_samples: int = 100,
    hidden: int = 32,
    dataset: str = "digits",
) -> dict[str, dict]:
    """Train the MAP of one seed and evaluate the MAP and every posterior (module docstring)."""
    if dataset not in DATASET_FISHER:
        raise ValueError(f"unknown dataset {dataset!r}: choose one of {list(DATASET_FISHER)}")
    data = load_dataset(dataset, seed=seed)
    torch.manual_seed(seed)
    model = mlp(data.train_inputs.shape[1], 10, hidden=(hidden,), activation="tanh")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=1e-4)
    for _ in range(epochs):
        order = torch.randperm(len(data.train_inputs))
        for batch in order.split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(data.train_inputs[batch]), data.train_targets[batch]).backward()
            optimizer.step()
    model = model.double()
    train_x, test_x = data.train_inputs.double(), data.test_inputs.double()
    permutation = torch.randperm(test_x.shape[1], generator=torch.Generator().manual_seed(seed))
    ood_x = test_x[:, permutation]
    loader = list(zip(train_x.split(128), data.train_targets.split(128), strict=True))
    with torch.no_grad():
        results = {
            "map": {
                name: evaluate(
                    model(test_x).softmax(dim=1), data.test_targets, model(ood_x).softmax(dim=1)
                )
                for name in PREDICTIVES
            }
        }
    for name, options in POSTERIORS.items():
        la = natgrad.Laplace(model, fisher=DATASET_FISHER[dataset], seed=seed, **options)
        la.fit(loader)
        tau = la.optimize_prior_precision()[0].item()
        results[name] = {"prior_precision": tau}
        for predictive in PREDICTIVES:
            method = "mc" if predictive == "sampled" else "linearised"
            probs, ood = (
                la.predictive(inputs, n_samples=n_samples, method=method)
                for inputs in (test_x, ood_x)
            )
            results[name][predictive] = evaluate(probs, data.test_targets, ood)
    return results


def reliability_figure(results: dict[str, dict], path: Path) -> None:
    plt = pyplot()
    figure, axes = plt.subplots(1, len(PREDICTIVES), figsize=(10, 4.5), sharey=True)
    for axis, predictive in zip(axes, PREDICTIVES, strict=True):
        axis.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        for name, result in results.items():
            bins = result[predictive]
            filled = [i for i, count in enumerate(bins["bin_count"]) if count > 0]
            axis.plot(
                [bins["bin_confidence"][i] for i in filled],
                [bins["bin_accuracy"][i] for i in filled],
                marker="o",
                markersize=3,
                label=f"{name} (ECE {bins['ece']:.3f})",
            )
        axis.set_title(f"{predictive} predictive")
        axis.set_xlabel("confidence")
        axis.legend(fontsize=7)
    axes[0].set_ylabel("accuracy")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def laplace_comparison(
    output: Path,
    dataset: str = "digits",
    seeds: Sequence[int] = (0, 1, 2),
    epochs: int = 40,
    n_samples: int = 100,
    hidden: int = 32,
    claim: str = "R13",
) -> Finding:
    """Compare the MAP and every posterior on ``dataset`` over ``seeds``, with App. G's two
    checks (module docstring); the reliability diagram is ``<output>/<claim>_reliability.png``.
    """
    per_seed = {
        seed: compare_posteriors(seed, epochs, n_samples, hidden, dataset) for seed in seeds
    }
    names = ["map", *POSTERIORS]

    def mean(name: str, predictive: str, metric: str) -> float:
        return sum(per_seed[s][name][predictive][metric] for s in seeds) / len(seeds)

    table = {
        name: {
            predictive: {
                metric: mean(name, predictive, metric)
                for metric in ("nll", "accuracy", "ece", "ood_auroc")
            }
            for predictive in PREDICTIVES
        }
        for name in names
    }
    fisher = {"exact": "exact-Fisher", "mc": "sampled-Fisher (1 label per datapoint)"}
    inputs = load_dataset(dataset).train_inputs.shape[1]
    lines = [
        f"{dataset}, MLP {inputs}-{hidden}-10 tanh, Adam {epochs} epochs; "
        f"{fisher[DATASET_FISHER[dataset]]} Laplace, prior precision by marginal likelihood; "
        f"{n_samples} samples; seeds {list(seeds)} (means)",
        "| posterior | predictive | NLL | accuracy | ECE | OOD AUROC |",
        "|---|---|---|---|---|---|",
    ]
    for name in names:
        for predictive in PREDICTIVES:
            row = table[name][predictive]
            lines.append(
                f"| {name} | {predictive} | {row['nll']:.4f} | {row['accuracy']:.4f} | "
                f"{row['ece']:.4f} | {row['ood_auroc']:.4f} |"
            )
    lines.append(
        "sampled NLL per seed: "
        + ", ".join(
            f"{name} {[round(per_seed[s][name]['sampled']['nll'], 4) for s in seeds]}"
            for name in names
        )
    )
    priors = {name: [per_seed[s][name]["prior_precision"] for s in seeds] for name in POSTERIORS}
    lines.append(
        "prior precisions: "
        + ", ".join(f"{name} {[round(v, 3) for v in values]}" for name, values in priors.items())
    )
    figure = Path(output) / f"{claim}_reliability.png"
    figure.parent.mkdir(parents=True, exist_ok=True)
    reliability_figure(per_seed[seeds[0]], figure)
    sampled = {name: table[name]["sampled"]["nll"] for name in names}
    best_kron = min(sampled[name] for name in ("kron-correct", "kron-heuristic", "a-only"))
    return Finding(
        claim,
        f"Laplace on {dataset}: A-only >= KFAC, Kronecker beats full (Benzing 2022, App. G)",
        {
            "A-only's sampled NLL within 1% of (or below) KFAC-correct's": sampled["a-only"]
            <= 1.01 * sampled["kron-correct"],
            "best Kronecker sampled NLL < full Laplace's": best_kron < sampled["full"],
        },
        lines,
        {"dataset": dataset, "means": table, "per_seed": {str(s): per_seed[s] for s in seeds}},
        [str(figure)],
    )


def r13_laplace_posteriors(
    output: Path,
    seeds: Sequence[int] = (0, 1, 2),
    full: bool = False,
    epochs: int = 40,
    n_samples: int = 100,
    hidden: int = 32,
) -> Finding:
    """Benzing 2022 App. G's two hypotheses on Laplace posteriors, on digits (module docstring)."""
    return laplace_comparison(output, "digits", seeds, epochs, n_samples, hidden)


__all__ = [
    "DATASET_FISHER",
    "POSTERIORS",
    "auroc",
    "compare_posteriors",
    "expected_calibration_error",
    "laplace_comparison",
    "r13_laplace_posteriors",
]
