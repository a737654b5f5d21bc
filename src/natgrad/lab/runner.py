"""Tasks and the benchmark runner: tasks x methods x hyper-parameter grids x seeds.

As in every seed, each method is run over its grid with each seed, and the configuration with
the lowest final training loss (mean over seeds) is selected; runs record the training loss of
every epoch on the whole training set, and the wall-clock time.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from natgrad.analysis import q_quality
from natgrad.analysis.fishleg_quality import layer_matrices
from natgrad.lab import models, transformer
from natgrad.lab.datasets import Dataset, load_dataset
from natgrad.lab.plotting import pyplot
from natgrad.lab.registry import get_method
from natgrad.linalg import NumericalWarning
from natgrad.precond import FishLeg
from natgrad.precond.base import NonFiniteWarning


@dataclass
class Task:
    """A dataset, a model and a loss: what one benchmark trains."""

    name: str
    dataset: str
    build_model: Callable[[Dataset], nn.Module]
    likelihood: str = "categorical"
    batch_size: int = 100
    epochs: int = 5
    reconstruct: bool = False  # autoencoders: the targets are the inputs
    standardize: bool = True  # standardise inputs (and regression targets), see load_dataset

    def load_data(self) -> Dataset:
        """The task's dataset, standardised as the task asks."""
        return load_dataset(self.dataset, standardize=self.standardize)

    def loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The mean loss matching :attr:`likelihood`."""
        if self.likelihood == "categorical":
            return F.cross_entropy(logits, targets)
        if self.likelihood == "bernoulli":
            return F.binary_cross_entropy_with_logits(logits, targets.reshape(logits.shape))
        return F.mse_loss(logits, targets.reshape(logits.shape))

    def targets(self, inputs: Tensor, labels: Tensor) -> Tensor:
        """What the model is trained to output for a batch."""
        return inputs.reshape(len(inputs), -1) if self.reconstruct else labels


TASKS: dict[str, Task] = {
    task.name: task
    for task in (
        Task("mnist1d-mlp", "mnist1d", lambda d: models.mlp(40, 10, (256, 256, 256))),
        Task("digits-mlp", "digits", lambda d: models.mlp(64, 10, (128, 128, 128)), epochs=10),
        # Benzing 2022's MLP (App. D) on 5,000 real MNIST images
        Task("mnist5k-mlp", "mnist5k", lambda d: models.mlp(784, 10, (1000, 1000, 1000))),
        # the classic MNIST autoencoder 784-1000-500-250-30 (mirrored) as Goldfarb et al. 2020
        # and Garcia et al. 2023 train it: ReLU, a linear code layer, a Bernoulli likelihood on
        # pixels in [0, 1]; natgrad's mean loss averages over pixels too, so a damping γ of
        # papers that sum over the 784 pixels is γ / 784 here
        Task(
            "mnist5k-autoencoder",
            "mnist5k",
            lambda d: models.autoencoder(784, activation="relu", linear_code=True),
            likelihood="bernoulli",
            reconstruct=True,
            standardize=False,
        ),
        Task(
            "digits-cnn",
            "digits",
            lambda d: nn.Sequential(nn.Unflatten(1, (1, 8, 8)), models.small_cnn(1, 10, 8)),
            epochs=5,
        ),
        # Wu et al. 2024, Table 2 at CPU scale: from scratch, prompt tuning, LoRA (lab.transformer)
        Task("mnist1d-transformer", "mnist1d", lambda d: transformer.TinyTransformer()),
        Task("mnist1d-prompt", "mnist1d", lambda d: transformer.prompt_tuning_model()),
        Task("mnist1d-lora", "mnist1d", lambda d: transformer.lora_model()),
        Task("wine-mlp", "wine", lambda d: models.mlp(13, 3, (32,)), batch_size=32, epochs=20),
        Task(
            "diabetes-mlp",
            "diabetes",
            lambda d: models.mlp(10, 1, (32, 32)),
            likelihood="gaussian",
            batch_size=32,
            epochs=20,
        ),
        Task(
            "digits-autoencoder",
            "digits",
            lambda d: models.autoencoder(64, width_scale=0.25),
            likelihood="gaussian",
            epochs=10,
            reconstruct=True,
        ),
        Task(
            "deep-linear",
            "deep_linear",
            lambda d: models.deep_linear(20, 20),
            likelihood="gaussian",
            batch_size=40,
            epochs=5,
        ),
        Task(
            "deep-linear-small",
            "deep_linear_small",
            lambda d: models.deep_linear(20, 20),
            likelihood="gaussian",
            batch_size=40,
            epochs=200,
        ),
        Task(
            "least-squares-2d",
            "least_squares_2d",
            lambda d: nn.Linear(1, 1),
            likelihood="gaussian",
            batch_size=1000,
            epochs=100,
        ),
        *(
            Task(
                f"logistic-{variant}",
                f"logistic_{variant.replace('-', '_')}",
                lambda d: nn.Linear(2, 1, bias=False),
                likelihood="bernoulli",
                batch_size=1000,
                epochs=100,
            )
            for variant in ("correct", "misspecified-a", "misspecified-b")
        ),
    )
}


def get_task(name: str) -> Task:
    """The task ``name``, or a ValueError listing the choices."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}: choose one of {sorted(TASKS)}")
    return TASKS[name]


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of a grid, as keyword dictionaries."""
    names = sorted(grid)
    return [
        dict(zip(names, values, strict=True))
        for values in itertools.product(*(grid[n] for n in names))
    ]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _average_gradients(model: nn.Module) -> None:
    """Average ``.grad`` over the ranks, as DistributedDataParallel does for first-order
    methods (the global objective is the mean of the ranks' shard losses)."""
    for param in model.parameters():
        if param.grad is not None:
            dist.all_reduce(param.grad)
            param.grad /= dist.get_world_size()


def full_loss(model: nn.Module, task: Task, inputs: Tensor, labels: Tensor) -> float:
    """The task's loss on a whole split, without gradients."""
    with torch.no_grad():
        return task.loss(model(inputs), task.targets(inputs, labels)).item()


SMALL_MODEL_PARAMETERS = 1_000_000


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with ``count`` torch threads, then restore the previous count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def default_threads(model: nn.Module) -> int:
    """One thread for a model below :data:`SMALL_MODEL_PARAMETERS` parameters, torch's current
    count otherwise.

    A small model's matrix products are too small to share between threads, and on a machine
    whose cores are busy with other work every parallel region waits for a descheduled thread:
    a tiny-model run took up to 50x longer with two threads than with one there.
    """
    parameters = sum(p.numel() for p in model.parameters())
    return 1 if parameters < SMALL_MODEL_PARAMETERS else torch.get_num_threads()


def train_run(
    task: Task,
    method: str,
    hyper: dict[str, Any],
    seed: int,
    data: Dataset,
    threads: int | None = None,
) -> dict[str, Any]:
    """Train one configuration, with ``threads`` torch threads (default
    :func:`default_threads` of the task's model), recorded in the run as ``threads``.

    Under ``torch.distributed`` (e.g. ``torchrun``) each global batch is split across the
    ranks (rank ``r`` takes every ``R``-th datapoint), natgrad's preconditioners run in their
    distributed mode and first-order methods average their gradients, so the ranks train one
    model on the global batches; step losses are those of the rank's shard.

    Returns the training loss on the whole training set before training and after every
    epoch (``train_loss``), the cumulative optimisation time at those points (``seconds``),
    every step's mini-batch loss and time (``step_loss``, ``step_seconds``), the final test
    loss, whether the run diverged (a non-finite loss ends it) and how many of natgrad's
    numerical warnings (solver fallbacks, skipped steps) it raised, by category
    (``warnings``); those are counted rather than printed, one per step.

    FishLeg takes one more hyper-parameter, ``aux_batch`` (:data:`AUX_BATCH`): a number
    ``k`` of datapoints; every step then draws ``k`` training datapoints at random (without
    replacement, from a stream of its own seeded by ``seed``) and FishLeg's auxiliary step
    evaluates its Fisher-vector product on them instead of on the training batch, as Garcia et
    al. 2023's Algorithm 1 (line 5) specifies. Without it the training batch serves both.
    """
    if threads is not None and threads < 1:
        raise ValueError(f"threads must be a positive count, got {threads}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", NumericalWarning)
        warnings.simplefilter("always", NonFiniteWarning)
        run = _train(task, method, hyper, seed, data, threads)
    counts: dict[str, int] = {}
    for warning in caught:
        if issubclass(warning.category, NumericalWarning | NonFiniteWarning):
            counts[warning.category.__name__] = counts.get(warning.category.__name__, 0) + 1
        else:
            warnings.warn_explicit(
                warning.message, warning.category, warning.filename, warning.lineno
            )
    return {**run, "warnings": counts}


def _train(
    task: Task, method: str, hyper: dict[str, Any], seed: int, data: Dataset, threads: int | None
) -> dict[str, Any]:
    torch.manual_seed(seed)
    model = task.build_model(data)
    threads = default_threads(model) if threads is None else threads
    with torch_threads(threads):
        run = _fit(task, model, method, hyper, seed, data)
    return {**run, "threads": threads}


AUX_BATCH = "aux_batch"
"""FishLeg's hyper-parameter naming the size of a separate auxiliary batch (:func:`train_run`)."""
AUX_SEED_OFFSET = 1_000_003
"""Offset of the auxiliary batches' random stream from the run's seed."""


def _fit(
    task: Task, model: nn.Module, method: str, hyper: dict[str, Any], seed: int, data: Dataset
) -> dict[str, Any]:
    aux_batch = hyper.get(AUX_BATCH)
    if aux_batch is not None and not (isinstance(aux_batch, int) and aux_batch >= 1):
        raise ValueError(f"{AUX_BATCH} must be a positive number of datapoints, got {aux_batch!r}")
    built = {key: value for key, value in hyper.items() if key != AUX_BATCH}
    optimiser, pre = get_method(method).build(model, task.likelihood, "mean", **built)
    if aux_batch is not None and not isinstance(pre, FishLeg):
        if pre is not None:
            pre.remove()
        raise ValueError(
            f"{AUX_BATCH}={aux_batch}: a separate auxiliary batch is for FishLeg's auxiliary "
            f"step; {method!r} has none (drop {AUX_BATCH})"
        )
    generator = torch.Generator().manual_seed(seed)
    # the auxiliary batches come from their own stream: the training batches stay those of a
    # run without them
    aux_generator = torch.Generator().manual_seed(seed + AUX_SEED_OFFSET)
    losses = [full_loss(model, task, data.train_inputs, data.train_targets)]
    seconds, elapsed = [0.0], 0.0
    step_losses, step_seconds = [], []
    diverged = False
    for _ in range(task.epochs):
        order = torch.randperm(len(data.train_inputs), generator=generator)
        for batch in order.split(task.batch_size):
            if len(batch) < 2 * _world_size():
                continue
            batch = batch[_rank() :: _world_size()]  # this rank's shard of the global batch
            start = time.perf_counter()
            optimiser.zero_grad()
            inputs = data.train_inputs[batch]
            logits = model(inputs)
            loss = task.loss(logits, task.targets(inputs, data.train_targets[batch]))
            loss.backward()
            if aux_batch is not None:
                # Garcia et al. 2023, Algorithm 1, line 5: the Fisher-vector product of the
                # auxiliary step on "a mini-batch different from the one used to obtain g"
                drawn = torch.randperm(len(data.train_inputs), generator=aux_generator)
                aux = drawn[:aux_batch][_rank() :: _world_size()]
                pre.step(logits, aux_args=(data.train_inputs[aux],))
            elif pre is not None:
                pre.step(logits)  # natgrad communicates itself (natgrad.distributed)
            elif _world_size() > 1:
                _average_gradients(model)
            optimiser.step()
            step_seconds.append(time.perf_counter() - start)
            elapsed += step_seconds[-1]
            step_losses.append(loss.item())
        losses.append(full_loss(model, task, data.train_inputs, data.train_targets))
        seconds.append(elapsed)
        if not math.isfinite(losses[-1]):
            diverged = True
            break
    test_loss = full_loss(model, task, data.test_inputs, data.test_targets)
    # after the test loss: the probe's forward passes may update normalisation statistics
    quality = fishleg_record(pre, model, task, data) if isinstance(pre, FishLeg) else {}
    if pre is not None:
        pre.remove()
    return {
        **quality,
        "task": task.name,
        "method": method,
        "hyper": hyper,
        "seed": seed,
        "train_loss": losses,
        "seconds": seconds,
        "step_loss": step_losses,
        "step_seconds": step_seconds,
        "test_loss": test_loss,
        "diverged": diverged,
    }


FISHLEG_PROBE_CG_ITERATIONS = 500


def fishleg_record(pre: FishLeg, model: nn.Module, task: Task, data: Dataset) -> dict[str, Any]:
    """How far a FishLeg run's ``Q`` moved and how well it inverts the damped Fisher
    (:func:`natgrad.analysis.q_quality`): on a probe batch (the first ``batch_size`` training
    datapoints), along that batch's loss gradient, with at most
    :data:`FISHLEG_PROBE_CG_ITERATIONS` conjugate-gradient steps (the residual is recorded)."""
    inputs = data.train_inputs[: task.batch_size]
    targets = task.targets(inputs, data.train_targets[: task.batch_size])
    params = [p for p in model.parameters() if p.requires_grad]
    with pre.capture.paused():
        loss = task.loss(model(inputs), targets)
        gradients = dict(zip(params, torch.autograd.grad(loss, params), strict=True))
    if not all(bool(torch.isfinite(g).all()) for g in gradients.values()):
        return {"q_quality": None}
    direction = layer_matrices(pre, gradients)
    quality = q_quality(pre, inputs, direction, FISHLEG_PROBE_CG_ITERATIONS)
    return {"q_quality": dataclasses.asdict(quality)}


def sweep(
    task: Task,
    methods: Iterable[str],
    seeds: Iterable[int],
    grids: dict[str, dict[str, list[Any]]] | None = None,
    data: Dataset | None = None,
    progress: Callable[[str], None] | None = None,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Every method x grid point x seed on one task, each with ``threads`` torch threads
    (default: :func:`default_threads`).

    A line per finished run goes to ``progress``; by default, under a tqdm progress bar over
    all runs (on standard error).
    """
    data = task.load_data() if data is None else data
    jobs = [
        (method, hyper, seed)
        for method in methods
        for hyper in grid_points((grids or {}).get(method, get_method(method).grid))
        for seed in seeds
    ]
    bar = tqdm(jobs, desc=task.name, unit="run", disable=progress is not None)
    report = progress if progress is not None else tqdm.write
    runs = []
    for method, hyper, seed in bar:
        run = train_run(task, method, hyper, seed, data, threads)
        runs.append(run)
        fallbacks = ", ".join(f"{n} {c}x" for n, c in run["warnings"].items())
        report(
            f"{task.name} {method} {hyper} seed {seed}: final train loss "
            f"{run['train_loss'][-1]:.4g} in {run['seconds'][-1]:.1f} s, "
            f"{run['threads']} thread{'s' if run['threads'] > 1 else ''}"
            + (f" ({fallbacks})" if fallbacks else "")
        )
    return runs


def best_runs(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Per method, the runs (all seeds) of the configuration with the lowest mean final loss."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for run in runs:
        groups.setdefault((run["method"], json.dumps(run["hyper"], sort_keys=True)), []).append(run)
    best: dict[str, list[dict[str, Any]]] = {}
    for (method, _), group in groups.items():
        if method not in best or mean_final(group) < mean_final(best[method]):
            best[method] = group
    return best


def final_train_loss(run: dict[str, Any]) -> float:
    """A run's last training loss; ``inf`` if it diverged or is not finite."""
    final = run["train_loss"][-1]
    return final if math.isfinite(final) and not run["diverged"] else math.inf


def write_csv(runs: list[dict[str, Any]], path: str | Path) -> None:
    """One row per run and epoch: task, method, hyper-parameters (JSON), seed, epoch, training
    loss and cumulative optimisation seconds, and whether the run diverged."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["task", "method", "hyper", "seed", "epoch", "train_loss", "seconds", "diverged"]
        )
        for run in runs:
            hyper = json.dumps(run["hyper"], sort_keys=True)
            for epoch, (loss, seconds) in enumerate(
                zip(run["train_loss"], run["seconds"], strict=True)
            ):
                writer.writerow(
                    [run["task"], run["method"], hyper, run["seed"], epoch, loss, seconds,
                     run["diverged"]]
                )  # fmt: skip


def mean_final(runs: list[dict[str, Any]]) -> float:
    """Mean final training loss over runs (seeds): ``inf`` if any diverged."""
    return sum(final_train_loss(run) for run in runs) / len(runs)


def summary_table(best: dict[str, list[dict[str, Any]]]) -> str:
    """A markdown table of the selected configurations, best first."""
    lines = [
        "| method | hyper-parameters | final train loss (mean over seeds) | test loss | seconds |",
        "|---|---|---|---|---|",
    ]
    ordered = sorted(best.items(), key=lambda item: mean_final(item[1]))
    for method, group in ordered:
        mean = mean_final(group)
        test = sum(r["test_loss"] for r in group) / len(group)
        seconds = sum(r["seconds"][-1] for r in group) / len(group)
        lines.append(
            f"| {method} | {group[0]['hyper']} | {mean:.4g} | {test:.4g} | {seconds:.1f} |"
        )
    return "\n".join(lines)


def plot_curves(best: dict[str, list[dict[str, Any]]], path: str | Path) -> None:
    """Training loss per epoch and per second, one line per method, band over seeds."""
    plt = pyplot()

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for method, group in best.items():
        length = min(len(r["train_loss"]) for r in group)
        losses = torch.tensor([r["train_loss"][:length] for r in group])
        seconds = torch.tensor([r["seconds"][:length] for r in group]).mean(0)
        mean, low, high = losses.mean(0), losses.min(0).values, losses.max(0).values
        for axis, x in ((axes[0], torch.arange(length)), (axes[1], seconds)):
            (line,) = axis.plot(x, mean, label=method)
            axis.fill_between(x, low, high, color=line.get_color(), alpha=0.2)
    axes[0].set(xlabel="epoch", ylabel="training loss", yscale="log")
    axes[1].set(xlabel="seconds", ylabel="training loss", yscale="log")
    axes[0].legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


__all__ = [
    "TASKS",
    "Task",
    "best_runs",
    "final_train_loss",
    "get_task",
    "grid_points",
    "mean_final",
    "plot_curves",
    "summary_table",
    "sweep",
    "train_run",
    "write_csv",
]
