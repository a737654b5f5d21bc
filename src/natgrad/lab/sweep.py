"""Resumable sweeps through Optuna: one study per (task, method), stored in a database.

Each trial is one point of the method's grid (Optuna's ``GridSampler``), trained with every
seed; its value is the mean final training loss and its runs are kept as trial attributes.
Because the study lives in the storage (an SQLite file by default), an interrupted sweep
resumes where it stopped: finished grid points are not run again.

Under ``torchrun`` (an initialised ``torch.distributed`` group) every trial is trained by all
ranks together, as ``natgrad bench`` trains under it: rank 0 keeps the study and sends each
grid point to the other ranks, which train their shards of the global batches with it.

Parallel workers: start the same ``natgrad sweep`` command several times (in several
terminals, or ``--workers N``); each process takes the next unvisited grid point (two workers
racing for the last points may occasionally both run one; the selection then averages the
duplicate runs). Several
machines can share a sweep through a database server that all of them reach, e.g.
``--storage postgresql://user@host/natgrad`` (SQLite files on network file systems do not lock
reliably).
"""

from __future__ import annotations

import math
import multiprocessing
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch.distributed as dist

from natgrad.lab.registry import get_method
from natgrad.lab.runner import Task, get_task, grid_points, train_run


def study_name(task: Task, method: str) -> str:
    """The name of the study of one (task, method)."""
    return f"{task.name}/{method}/epochs={task.epochs}"


def run_sweep(
    task: Task,
    method: str,
    seeds: Sequence[int],
    storage: str,
    grid: dict[str, list[Any]] | None = None,
    n_trials: int | None = None,
) -> Any:
    """Evaluate (the remaining) grid points of one method; return the Optuna study.

    ``n_trials`` bounds how many grid points this call evaluates (default: all that remain).
    Under ``torch.distributed`` every rank calls it: rank 0 runs the study and returns it, the
    other ranks train the grid points rank 0 sends them and return ``None``.
    """
    import optuna

    grid = grid if grid is not None else get_method(method).grid
    data = task.load_data()
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if distributed and dist.get_rank() != 0:
        while (hyper := _broadcast_hyper(None)) is not None:
            for seed in seeds:
                train_run(task, method, hyper, seed, data)
        return None
    study = _open_study(task, method, storage, grid)
    size = len(grid_points(grid))
    taken = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING)

    def objective(trial: optuna.Trial) -> float:
        hyper = {name: trial.suggest_categorical(name, values) for name, values in grid.items()}
        if distributed:
            _broadcast_hyper(hyper)
        runs = [train_run(task, method, hyper, seed, data) for seed in seeds]
        trial.set_user_attr("runs", runs)
        finals = [run["train_loss"][-1] for run in runs]
        if any(
            run["diverged"] or not math.isfinite(f) for run, f in zip(runs, finals, strict=True)
        ):
            return math.inf
        return sum(finals) / len(finals)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    evaluated = 0
    while n_trials is None or evaluated < n_trials:
        # one trial at a time, looking again at what other workers have taken meanwhile
        visited = {
            tuple(sorted(trial.params.items()))
            for trial in study.get_trials(deepcopy=False, states=taken)
        }
        if len(visited) >= size:
            break
        study.optimize(objective, n_trials=1)
        evaluated += 1
    if distributed:
        _broadcast_hyper(None)  # the other ranks stop
    return study


def _broadcast_hyper(hyper: dict[str, Any] | None) -> dict[str, Any] | None:
    """Rank 0's next grid point (``None``: no more) on every rank."""
    message = [hyper]
    dist.broadcast_object_list(message, src=0)
    return message[0]


def _open_study(task: Task, method: str, storage: str, grid: dict[str, list[Any]]) -> Any:
    """Create (or load) the study of one (task, method) with a grid sampler."""
    import optuna

    return optuna.create_study(
        study_name=study_name(task, method),
        storage=storage,
        sampler=optuna.samplers.GridSampler(grid, seed=0),
        direction="minimize",
        load_if_exists=True,
    )


def _worker(arguments: tuple) -> None:
    task_name, epochs, method, seeds, storage, grid = arguments
    task = replace(get_task(task_name), epochs=epochs)
    run_sweep(task, method, seeds, storage, grid)


def run_parallel(
    task: Task,
    method: str,
    seeds: Sequence[int],
    storage: str,
    workers: int,
    grid: dict[str, list[Any]] | None = None,
) -> None:
    """``workers`` processes sharing one study (each takes unvisited grid points).

    The task must be one of :data:`natgrad.lab.runner.TASKS` (workers rebuild it by name).
    """
    get_task(task.name)
    # create the storage's tables and the study once, before workers race to do it
    _open_study(task, method, storage, grid if grid is not None else get_method(method).grid)
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers) as pool:
        pool.map(_worker, [(task.name, task.epochs, method, seeds, storage, grid)] * workers)


def collect_runs(task: Task, methods: Sequence[str], storage: str) -> list[dict[str, Any]]:
    """Every run stored by the studies of ``methods`` on ``task``."""
    import optuna

    runs = []
    for method in methods:
        study = optuna.load_study(study_name=study_name(task, method), storage=storage)
        for trial in study.trials:
            if trial.state == optuna.trial.TrialState.COMPLETE:
                runs.extend(trial.user_attrs["runs"])
    return runs


__all__ = ["collect_runs", "run_parallel", "run_sweep", "study_name"]
