"""Claims of Garcia et al. 2023 (FishLeg): R7, the deep linear network (Fig. 1), and R8, the
MNIST autoencoder (Fig. 2).

Every compared method is tuned as in :mod:`natgrad.lab.reproduce.tuning` (grid search on the first
seed by final training loss, a boundary optimum extends the grid, then every seed). FishLeg
follows Garcia et al. 2023's Algorithm 1: an auxiliary step every iteration (``aux_period=1``),
its Fisher-vector product on a separate random batch (line 5, "a mini-batch different from the
one used to obtain g"; the runner's ``aux_batch``), momentum ``β = 0.9`` inside FishLeg (the
outer SGD has none) and the initialisation ``Q₀ = η_SGDm / η · I`` (sec. 4.4), with ``η_SGDm``
the learning rate selected for SGD with momentum on the same task, so FishLeg is tuned after
it. FishLeg's first step ``η Q₀ g = η_SGDm g`` is then that of natgrad's SGD with momentum
(PyTorch's heavy-ball form; natgrad's FishLeg starts its average at ``ḡ = g``); later
heavy-ball steps grow towards ``η_SGDm g / (1 - β)``, FishLeg's do not.

Every FishLeg run records how far ``Q`` moved from ``Q₀`` and how well it inverts the damped
Fisher on a probe batch (:func:`natgrad.lab.runner.fishleg_record`), printed per claim, so a
``Q`` that never learned is visible. :func:`natgrad.lab.reproduce.run_claim` runs the claims,
like every claim, with one torch thread.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from natgrad.lab.datasets import Dataset, deep_linear_teacher
from natgrad.lab.reproduce import tuning
from natgrad.lab.reproduce.finding import Finding
from natgrad.lab.reproduce.training import subset
from natgrad.lab.reproduce.tuning import Contender, compare, mean_final
from natgrad.lab.runner import Task, final_train_loss, get_task

FLOOR_FACTOR = 10.0
MNIST_PIXELS = 784


def mean_loss_damping(summed_damping: float, outputs: int) -> float:
    """The damping of natgrad's mean loss equivalent to ``summed_damping`` of a loss summed
    over ``outputs`` (e.g. the 784 pixels of a Bernoulli autoencoder) and averaged over the batch.

    torch's mean divides the summed loss by ``outputs`` too, so the Fisher and the gradient
    both shrink by ``1/outputs``: ``(F/D + γ/D · I)⁻¹ (g/D) = (F + γI)⁻¹ g``. With damping
    ``γ / D`` every (approximate) natural-gradient step, and FishLeg's ``η Q g``, is the
    summed loss's with damping ``γ``, at the same learning rate ``η``.
    """
    if outputs < 1:
        raise ValueError(f"outputs must be a positive count, got {outputs}")
    return summed_damping / outputs


R7_GRIDS: dict[str, dict[str, list[Any]]] = {
    "sgdm": {"lr": [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], "momentum": [0.9]},
    "adam": {"lr": [2e-5, 2e-4, 2e-3, 2e-2]},
    "fishleg": {"lr": [0.04], "damping": [1e-6], "aux_lr": [1e-3, 1e-2]},
}
R7_FISHLEG = {"aux_period": [1], "aux_batch": [40], "momentum_on": ["gradient"]}
"""R7's FishLeg as Algorithm 1 and the authors' deep-linear script run it: an auxiliary step
every iteration on a separate batch of 40, momentum on the gradient."""
R8_GRIDS: dict[str, dict[str, list[Any]]] = {
    "sgdm": {"lr": [0.3, 1.0, 3.0, 10.0], "momentum": [0.9]},
    "adam": {"lr": [1e-4, 3e-4, 1e-3, 3e-3]},
    "kfac": {"lr": [1e-2, 1e-1], "damping": [1e-4, 1e-2], "inv_period": [20]},
    "fishleg": {
        "lr": [0.07],
        "damping": [mean_loss_damping(0.3, MNIST_PIXELS)],
        "aux_lr": [1e-4, 1e-3, 5e-3],
    },
}
R8_FISHLEG = {"aux_period": [1], "aux_batch": [10], "momentum_on": ["update"]}
"""R8's FishLeg (see :func:`r8_autoencoder`): an auxiliary step every iteration on a separate
batch of 10, momentum on ``Q g``."""


def tune_fishleg(
    task: Task,
    data: Dataset,
    grid: Mapping[str, list[Any]],
    sgdm_lr: float,
    seeds: Sequence[int],
) -> list[dict[str, Any]]:
    """FishLeg's runs (one per seed) of its best configuration, labelled ``"fishleg"``.

    Each learning rate ``η`` of ``grid["lr"]`` is searched over the rest of the grid with
    ``init_scale = sgdm_lr / η`` (Garcia et al. 2023, sec. 4.4, see the module docstring) on the
    first seed, a boundary damping extending as in :func:`natgrad.lab.reproduce.tuning.tune`; a best
    ``η`` at the end of its grid is pushed a decade further likewise (``init_scale`` following
    it). The configuration with the lowest final training loss is then trained with the other
    seeds.
    """

    per_lr = tuning.tune(
        task,
        data,
        [
            Contender(
                f"fishleg lr={lr:g}",
                "fishleg",
                {**grid, "lr": [lr], "init_scale": [sgdm_lr / lr]},
            )
            for lr in grid["lr"]
        ],
        seeds[:1],
    )
    best = min((runs[0] for runs in per_lr.values()), key=final_train_loss)
    best = tuning.extend_at_boundary(
        task, data, "fishleg", seeds[0], best, "lr", grid["lr"],
        adjust=lambda hyper: {**hyper, "init_scale": sgdm_lr / hyper["lr"]},
    )  # fmt: skip
    return _with_other_seeds(task, data, best, seeds)


def _with_other_seeds(
    task: Task, data: Dataset, best: dict[str, Any], seeds: Sequence[int]
) -> list[dict[str, Any]]:
    best["registry_method"], best["method"] = "fishleg", "fishleg"
    if len(seeds) == 1:
        return [best]
    fixed = {key: [value] for key, value in best["hyper"].items()}
    rest = tuning.tune(task, data, [Contender("fishleg", "fishleg", fixed)], seeds[1:])
    return [best, *rest["fishleg"]]


def q_lines(runs: Sequence[dict[str, Any]], prefix: str = "") -> list[str]:
    """FishLeg's ``Q`` after training, per seed: how far it moved (``‖Q − Q₀‖/‖Q₀‖``), its
    eigenvalue range and the cosine of ``Q u`` with ``(F + γI)⁻¹ u`` on the probe batch."""
    lines = []
    for run in runs:
        quality = run.get("q_quality")
        if quality is None:
            lines.append(f"{prefix}fishleg seed {run['seed']}: Q not measured (non-finite)")
            continue
        alignment = quality["alignment"]
        lines.append(
            f"{prefix}fishleg seed {run['seed']}: Q moved {quality['movement']:.3g} from Q0, "
            f"eigenvalues {quality['smallest_eigenvalue']:.3g}-{quality['largest_eigenvalue']:.3g}"
            + (
                f", cos(Q u, (F+γI)^-1 u) {alignment:.3f} (CG residual "
                f"{quality['alignment_residual']:.1e})"
                if alignment is not None
                else ""
            )
        )
    return lines


def noise_floor(data: Dataset) -> tuple[float, float]:
    """The mean squared error of the noise-free teacher on the training and test splits of a
    ``deep_linear`` dataset (Garcia et al. 2023, Fig. 1's gray line is the test one): the realised
    ``noise²`` (``0.001² = 1e-6`` in expectation) under ``F.mse_loss``, the task's loss.

    The teacher is regenerated by :func:`~natgrad.lab.datasets.deep_linear_teacher` with the
    same seed and no noise (the random draws are the same), and its inputs and noisy outputs
    are checked to be the dataset's.
    """
    inputs, targets, test_inputs, test_targets = deep_linear_teacher(len(data.train_inputs))
    _, clean, _, test_clean = deep_linear_teacher(len(data.train_inputs), noise=0.0)
    for array, tensor in (
        (inputs, data.train_inputs),
        (targets, data.train_targets),
        (test_inputs, data.test_inputs),
        (test_targets, data.test_targets),
    ):
        if not np.array_equal(array.astype(np.float32), tensor.numpy()):
            raise RuntimeError(f"{data.name} is not deep_linear_teacher's default draw")
    return float(np.mean((targets - clean) ** 2)), float(np.mean((test_targets - test_clean) ** 2))


def epochs_to_floor(
    curves: Sequence[Sequence[float]], floor: float, factor: float = FLOOR_FACTOR
) -> float:
    """The first epoch at which the mean over seeds of the training loss is at most
    ``factor * floor``; ``inf`` if it never is. A run that diverged stopped early: its loss
    counts as ``inf`` from then on."""
    length = max(len(curve) for curve in curves)
    padded = [list(curve) + [math.inf] * (length - len(curve)) for curve in curves]
    for epoch in range(length):
        if statistics.fmean(curve[epoch] for curve in padded) <= factor * floor:
            return float(epoch)
    return math.inf


def r7_deep_linear(
    output: Path,
    seeds: Sequence[int] = (0, 1, 2),
    full: bool = False,
    epochs: int | None = None,
    small_epochs: int | None = None,
    grids: Mapping[str, Mapping[str, list[Any]]] | None = None,
) -> Finding:
    """Garcia et al. 2023, Fig. 1: on a deep linear network (20 layers of 20, teacher noise std
    0.001, batch 40), "FishLeg very rapidly drove the training loss to the minimum set by the noise
    (σ0), a minimum which was attained by neither manually-tuned SGD-m nor Adam", with 4000
    training samples (task ``deep-linear``) and with 40 (``deep-linear-small``).

    Rule, fixed before any run. The noise floor is the training loss of the noise-free teacher
    (:func:`noise_floor`, ≈ 1e-6 since the loss is ``F.mse_loss``, the mean over outputs). A
    method reaches the floor at the first epoch at which its training loss, averaged over
    seeds, is at most 10 times the floor (:func:`epochs_to_floor`; never: ``inf``). A factor
    10 is one decade on the paper's log-scale figure, whose curves start some 6.5 decades above
    the floor; a factor near 1 would instead test overfitting, since the least-squares fit of
    the training set lies below the floor (by ``1 - 20/N`` for a linear fit: half of it with
    40 samples). Checks, per regime: FishLeg reaches the floor in fewer epochs than SGDm, and
    than Adam (a method that never reaches it loses; none reaching it fails the check). Final
    training losses are reported beside, not checked.

    Scale: 20 epochs of 4000 samples (2000 steps, instead of the task's 5 epochs) and 2000
    epochs of 40 samples (2000 full-batch steps); ``full=True`` runs 50 and 5000. Grids
    (:data:`R7_GRIDS`): SGD with momentum 0.9 over half decades; Adam over decades around the
    paper's 2e-4 (Adam is invariant to the loss scale); FishLeg at the paper's own parameters
    (Fig. 1: ``η = 0.04``, ``β = 0.9``), ``α`` the paper's 1e-3 and 1e-2 (within its Table 2
    range), damping 1e-6 (the authors' deep-linear script uses none; natgrad needs ``γ > 0``).
    FishLeg as Algorithm 1 and that script (:data:`R7_FISHLEG`): an auxiliary step every
    iteration, on a separate random batch of 40. A FishLeg grid over ``η`` and damping as well
    is beyond the CPU budget (a FishLeg step of this 20-layer network costs some 20 SGD steps).
    The paper's Gaussian likelihood with variance ``σ0²`` scales its loss by a constant relative
    to ``F.mse_loss``, so its SGD learning rate does not transfer; FishLeg's ``η`` roughly does,
    up to the damping, as ``Q`` learns the inverse of the loss's own Fisher. ``grids`` replaces
    grids by label (``"sgdm"``, ``"adam"``, ``"fishleg"``).
    """
    epochs = epochs if epochs is not None else (50 if full else 20)
    small_epochs = small_epochs if small_epochs is not None else (5000 if full else 2000)
    grids = {**R7_GRIDS, **(grids or {})}
    checks, lines, numbers, figures = {}, [], {}, []
    for task_name, regime_epochs in (
        ("deep-linear", epochs),
        ("deep-linear-small", small_epochs),
    ):
        task = replace(get_task(task_name), epochs=regime_epochs)
        data = task.load_data()
        regime = f"{len(data.train_inputs)} samples"
        floor, test_floor = noise_floor(data)
        selected = tuning.tune(
            task,
            data,
            [
                Contender("sgdm", "sgd", dict(grids["sgdm"])),
                Contender("adam", "adam", dict(grids["adam"])),
            ],
            seeds,
        )
        selected["fishleg"] = tune_fishleg(
            task,
            data,
            {**R7_FISHLEG, **grids["fishleg"]},
            selected["sgdm"][0]["hyper"]["lr"],
            seeds,
        )
        reach = {
            label: epochs_to_floor([run["train_loss"] for run in runs], floor)
            for label, runs in selected.items()
        }
        final = {label: mean_final(runs) for label, runs in selected.items()}
        test = {
            label: statistics.fmean(run["test_loss"] for run in runs)
            for label, runs in selected.items()
        }
        for rival, name in (("sgdm", "SGDm"), ("adam", "Adam")):
            check = f"{regime}: FishLeg reaches 10x the noise floor in fewer epochs than {name}"
            checks[check] = reach["fishleg"] < reach[rival]
        lines += [
            f"{regime}: noise floor (teacher's MSE) train {floor:.3g}, test {test_floor:.3g}; "
            f"reached at <= {FLOOR_FACTOR * floor:.3g} (mean over seeds)",
            *(f"{regime} {line}" for line in tuning.lines(selected)),
            f"{regime}: epochs to reach the floor (of {regime_epochs}): "
            + ", ".join(f"{label} {value:g}" for label, value in reach.items()),
            f"{regime}: final train loss / floor: "
            + ", ".join(f"{label} {value / floor:.3g}" for label, value in final.items()),
            f"{regime}: final test loss / test floor: "
            + ", ".join(f"{label} {value / test_floor:.3g}" for label, value in test.items()),
            *q_lines(selected["fishleg"], f"{regime}: "),
        ]
        numbers[regime] = {
            "noise_floor_train": floor,
            "noise_floor_test": test_floor,
            "floor_factor": FLOOR_FACTOR,
            "epochs": regime_epochs,
            "epochs_to_floor": reach,
            "final_test_loss_mean": test,
            "runs": tuning.numbers(selected),
        }
        figures += tuning.plot(selected, Path(output) / f"R7_{len(data.train_inputs)}.png")
    return Finding(
        "R7",
        "deep linear net: FishLeg reaches the noise floor before SGDm and Adam "
        "(Garcia et al. 2023, Fig. 1)",
        checks,
        lines,
        numbers,
        figures,
    )


def converged_fraction(runs: Sequence[dict[str, Any]]) -> float:
    """The fraction of runs whose final training loss is finite (Garcia et al. 2023, Fig. 2, middle:
    runs "where the loss did not run out to 'nan'")."""
    return statistics.fmean(math.isfinite(final_train_loss(run)) for run in runs)


def final_spread(runs: Sequence[dict[str, Any]]) -> float:
    """The standard deviation over seeds (population, ``ddof = 0``) of the final training
    loss; ``inf`` if any run diverged."""
    finals = [final_train_loss(run) for run in runs]
    return statistics.pstdev(finals) if all(map(math.isfinite, finals)) else math.inf


def r8_autoencoder(
    output: Path,
    seeds: Sequence[int] = (0, 1, 2),
    full: bool = False,
    epochs: int | None = None,
    grids: Mapping[str, Mapping[str, list[Any]]] | None = None,
    train_size: int | None = None,
) -> Finding:
    """Garcia et al. 2023, Fig. 2: on autoencoders, FishLeg trains about as well as KFAC (both beat
    the first-order methods) and converges more reliably: it "did not fail a single of the 10
    runs" and "displayed a lower variance in training loss across runs".

    Task ``mnist5k-autoencoder``: the paper's MNIST autoencoder (Goldfarb et al. 2020's
    784-1000-500-250-30-250-500-1000-784, ReLU, linear code layer, Bernoulli likelihood on the
    pixels, batch 100) on the 4000 training images of ``mnist5k`` instead of MNIST's 60,000.
    Checks, fixed before any run, on the tuned configurations:

    * FishLeg's mean final training loss over seeds < Adam's, and < SGDm's, by more than the
      seeds' spread (:func:`natgrad.lab.reproduce.tuning.compare`: a smaller difference is a
      tie, which fails the check and is listed in ``Finding.ties``);
    * KFAC's < Adam's, and < SGDm's, likewise;
    * FishLeg converged on every seed (final training loss finite, :func:`converged_fraction`);
    * FishLeg's standard deviation over seeds of the final training loss
      (:func:`final_spread`, ``inf`` with a diverged seed) is finite and at most the median of
      the other three methods' (the paper's Fig. 2 bottom averages it over epochs; we take the
      end).

    Loss convention: the paper sums the binary cross-entropy over the 784 pixels (and averages
    over the batch); natgrad's task loss is torch's mean over pixels too, 1/784 of it. Its
    dampings therefore carry over as ``γ / 784`` (:func:`mean_loss_damping`), its FishLeg
    ``η`` unchanged, its SGD learning rates times 784 (Adam is invariant). Scale: 5 epochs
    (200 steps; ``full=True``: 25), the paper trains for hundreds of epochs of 600 steps.
    Grids (:data:`R8_GRIDS`): SGD with momentum 0.9 and Adam over half decades; KFAC
    (heuristic damping, momentum 0.9, inverses every 20 steps as in the paper's Fig. 3) over
    decades; FishLeg at the paper's MNIST-100 step size and damping (Table 1: ``η = 0.07``,
    ``γ = 0.3``, i.e. 0.3/784 here) with ``α`` over 1e-4 (Table 1), 1e-3 and 5e-3 (the top of
    Table 2's range; its bottom, 1e-5, can barely move ``Q`` in 200 steps): a FishLeg grid
    over ``η`` and ``γ`` as well is beyond the CPU budget (a FishLeg step costs some ten SGD
    steps here). FishLeg
    as Algorithm 1: an auxiliary step every iteration, its Fisher-vector product on a separate
    random batch of 10 (the size the authors' MNIST script draws); momentum on ``Q g``, which
    the paper used for its wall-clock runs and found not to change training ("did not affect
    training and test errors noticeably", sec. 4.4), because momentum on ``g`` costs four
    products of 1000 x 1000 matrices per layer and step on a CPU. ``grids`` replaces grids by
    label (``"sgdm"``, ``"adam"``, ``"kfac"``, ``"fishleg"``); ``train_size`` trains on a fixed
    random subset of that many training images (:func:`~natgrad.lab.reproduce.training.subset`:
    the file is sorted by digit, so its first rows would be zeros only).
    """
    epochs = epochs if epochs is not None else (25 if full else 5)
    task = replace(get_task("mnist5k-autoencoder"), epochs=epochs)
    grids = {**R8_GRIDS, **(grids or {})}
    data = task.load_data()
    if train_size is not None:
        data = subset(data, train_size)
    first = tuning.tune(
        task,
        data,
        [
            Contender("sgdm", "sgd", dict(grids["sgdm"])),
            Contender("adam", "adam", dict(grids["adam"])),
            Contender("kfac", "kfac", dict(grids["kfac"])),
        ],
        seeds,
    )
    fishleg = tune_fishleg(
        task,
        data,
        {**R8_FISHLEG, **grids["fishleg"]},
        first["sgdm"][0]["hyper"]["lr"],
        seeds,
    )
    selected = {"fishleg": fishleg, **first}
    final = {label: mean_final(runs) for label, runs in selected.items()}
    converged = {label: converged_fraction(runs) for label, runs in selected.items()}
    spread = {label: final_spread(runs) for label, runs in selected.items()}
    others = statistics.median(value for label, value in spread.items() if label != "fishleg")
    checks = {
        "FishLeg's mean final train loss < Adam's": compare(selected, "fishleg", "adam"),
        "FishLeg's mean final train loss < SGDm's": compare(selected, "fishleg", "sgdm"),
        "KFAC's mean final train loss < Adam's": compare(selected, "kfac", "adam"),
        "KFAC's mean final train loss < SGDm's": compare(selected, "kfac", "sgdm"),
        "FishLeg converged on every seed": converged["fishleg"] == 1.0,
        "FishLeg's std of final train loss <= the median of the others'": math.isfinite(
            spread["fishleg"]
        )
        and spread["fishleg"] <= others,
    }
    return tuning.finding(
        "R8",
        "MNIST autoencoder: FishLeg and KFAC beat Adam and SGDm, FishLeg more reliably "
        "(Garcia et al. 2023, Fig. 2)",
        checks,
        selected,
        output,
        [
            *(
                f"{label}: converged on {converged[label]:.0%} of {len(seeds)} seeds, std of the "
                f"final train loss {spread[label]:.3g}"
                for label in selected
            ),
            f"median std of the others: {others:.3g}",
            "summed over the 784 pixels (the paper's loss), mean final train loss: "
            + ", ".join(f"{label} {MNIST_PIXELS * value:.4g}" for label, value in final.items()),
            *q_lines(fishleg),
        ],
        {
            "converged_fraction": converged,
            "final_train_loss_std": spread,
            "loss_convention": "mean over pixels; the paper's summed loss is 784 times it",
        },
    )


__all__ = [
    "FLOOR_FACTOR",
    "MNIST_PIXELS",
    "R7_FISHLEG",
    "R7_GRIDS",
    "R8_FISHLEG",
    "R8_GRIDS",
    "converged_fraction",
    "epochs_to_floor",
    "final_spread",
    "mean_loss_damping",
    "noise_floor",
    "q_lines",
    "r7_deep_linear",
    "r8_autoencoder",
    "tune_fishleg",
]
