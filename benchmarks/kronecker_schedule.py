"""Quality and cost of KFAC's and FOOF's amortisation schedules: what default to ship.

Purpose
-------
Measure, for ``natgrad.KFAC`` and ``natgrad.FOOF`` at their default damping (KFAC ``1e-3``,
heuristic; FOOF ``1``) and EMA decay (``0.95``), how the schedule ``(factor_period k,
inv_period T, pre_inversion_steps S)`` trades training quality against step cost (issue 18),
on two lab tasks (:mod:`natgrad.lab.runner`):

* ``mnist5k-mlp``: Benzing 2022's MLP 784-1000-1000-1000-10 on 4,000 MNIST images, batch 100;
* ``digits-cnn``: two 3x3 convolutions and a linear read-out on the 8x8 digits, batch 100.

Schedules (``--schedules``, written ``k/T/S`` with ``-`` for ``S=None``): ``1/1/-`` (invert
every step), ``1/10/-``, ``1/20/-``, ``1/50/-``, ``1/100/-`` (factors every step),
``1/100/10`` (factors only in the 10 steps before each inversion, Benzing 2022, Algorithm 1)
and ``10/100/-`` (factors every 10 steps, as kfac-pytorch's ResNet examples).

Quality: each (task, method, schedule) trains ``--steps`` steps (mini-batches drawn by epoch
from a seeded permutation, SGD with momentum 0.9 on the preconditioned gradient), the learning
rate tuned on seed 0 over ``1·10^i, 3·10^i`` (KFAC from ``3e-4 .. 3e-3``, FOOF from
``1e-2 .. 1e-1``; a grid is extended by one value while its best is at a boundary, up to
``--extensions`` times (2); Benzing 2022, App. D.2), then the best learning rate is rerun with
the other seeds (``--seeds``, default 3 in all). The figure of merit is the training loss on the
whole training set after the last step (mean and spread over the seeds; a diverged run counts as
``inf``, and a run is stopped as diverged once that loss exceeds twice its initial value); the
curve is recorded every ``--eval-every`` steps, and the table also shows the mean loss at the
first of them (early progress).

Cost: every training step of the method is timed with ``time.thread_time`` (CPU time of the
thread, 1 torch thread: insensitive to other jobs on the machine, unlike wall-clock time), and
is interleaved with a plain SGD step on a separate copy of the model on the same batch, timed
the same way. The cost ratio is the sum of the method's step times over the sum of SGD's,
over all steps but the first (the mean cost, inversions at their share).

Run ``python benchmarks/kronecker_schedule.py`` (about an hour on one core; ``--tasks``,
``--methods``, ``--schedules``, ``--steps`` (300), ``--seeds`` (3), ``--eval-every`` (25),
``--json PATH``). Several processes with disjoint ``--methods`` or ``--tasks`` can run side by
side and their JSON files be merged with ``--table FILE [FILE ...]``, which only prints the
table. The script is a benchmark, not a test: it prints the table and checks nothing.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from typing import Any

import torch
from torch import nn

import natgrad
from natgrad.lab.datasets import Dataset
from natgrad.lab.runner import Task, full_loss, get_task

Row = dict[str, Any]
SCHEDULES = ["1/1/-", "1/10/-", "1/20/-", "1/50/-", "1/100/-", "1/100/10", "10/100/-"]
LR_GRIDS = {"kfac": [3e-4, 1e-3, 3e-3], "foof": [1e-2, 3e-2, 1e-1]}
TASKS = ["mnist5k-mlp", "digits-cnn"]
DIVERGED = 2.0  # a run whose training loss exceeds this multiple of the initial one is stopped
SGD_LR = 1e-2  # the timing copy's learning rate: it only has to train like a model in training


def parse_schedule(text: str) -> dict[str, Any]:
    """``"k/T/S"`` (``S`` may be ``-``) as the KFAC/FOOF keyword arguments."""
    k, t, s = text.split("/")
    return {
        "factor_period": int(k),
        "inv_period": int(t),
        "pre_inversion_steps": None if s == "-" else int(s),
    }


def build(method: str, model: nn.Module, schedule: dict[str, Any]) -> natgrad.Preconditioner:
    """The method at its default damping with ``schedule``."""
    make = {"kfac": natgrad.KFAC, "foof": natgrad.FOOF}[method]
    return make(model, **schedule)


def batches(data: Dataset, batch_size: int, seed: int, count: int) -> list[torch.Tensor]:
    """``count`` index batches, epoch by epoch from seeded permutations (full batches only)."""
    generator = torch.Generator().manual_seed(seed)
    out: list[torch.Tensor] = []
    while len(out) < count:
        order = torch.randperm(len(data.train_inputs), generator=generator)
        out.extend(b for b in order.split(batch_size) if len(b) == batch_size)
    return out[:count]


def train(
    task: Task, data: Dataset, method: str, schedule_text: str, lr: float, seed: int, args
) -> Row:
    """One run (module docstring): the loss curve and the per-step CPU times of the method and
    of the interleaved SGD step."""
    torch.manual_seed(seed)
    model = task.build_model(data)
    reference = copy.deepcopy(model)
    pre = build(method, model, parse_schedule(schedule_text))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sgd = torch.optim.SGD(reference.parameters(), lr=SGD_LR, momentum=0.9)
    curve = [(0, full_loss(model, task, data.train_inputs, data.train_targets))]
    method_seconds, sgd_seconds = [], []
    diverged = False
    for step, index in enumerate(batches(data, task.batch_size, seed, args.steps), start=1):
        inputs = data.train_inputs[index]
        targets = task.targets(inputs, data.train_targets[index])
        start = time.thread_time()
        opt.zero_grad()
        logits = model(inputs)
        loss = task.loss(logits, targets)
        loss.backward()
        pre.step(logits)
        opt.step()
        method_seconds.append(time.thread_time() - start)
        start = time.thread_time()
        sgd.zero_grad()
        task.loss(reference(inputs), targets).backward()
        sgd.step()
        sgd_seconds.append(time.thread_time() - start)
        if step % args.eval_every == 0 or step == args.steps:
            value = full_loss(model, task, data.train_inputs, data.train_targets)
            curve.append((step, value))
            if not math.isfinite(value) or value > DIVERGED * curve[0][1]:
                diverged = True
                break
    pre.remove()
    final = curve[-1][1] if not diverged else math.inf
    return {
        "task": task.name,
        "method": method,
        "schedule": schedule_text,
        "lr": lr,
        "seed": seed,
        "final_loss": final,
        "diverged": diverged,
        "curve": curve,
        "cost_ratio": sum(method_seconds[1:]) / max(sum(sgd_seconds[1:]), 1e-12),
        "method_ms": 1e3 * statistics.fmean(method_seconds[1:]),
        "sgd_ms": 1e3 * statistics.fmean(sgd_seconds[1:]),
    }


def tune(task: Task, data: Dataset, method: str, schedule: str, args) -> list[Row]:
    """Seed-0 runs over the learning-rate grid, extended at a best boundary (docstring)."""
    grid = list(LR_GRIDS[method])
    runs = {lr: train(task, data, method, schedule, lr, 0, args) for lr in grid}
    for _ in range(args.extensions):
        best = min(runs, key=lambda lr: runs[lr]["final_loss"])
        ordered = sorted(runs)
        if best not in (ordered[0], ordered[-1]):
            break
        ones = f"{best:.0e}".startswith("1")  # 1·10^i: neighbours 3·10^(i-1) and 3·10^i
        candidate = (
            best / (10 / 3 if ones else 3) if best == ordered[0] else best * (3 if ones else 10 / 3)
        )
        candidate = float(f"{candidate:.0e}")
        runs[candidate] = train(task, data, method, schedule, candidate, 0, args)
    return list(runs.values())


def measure(args: argparse.Namespace) -> list[Row]:
    """Every (task, method, schedule): tuning runs, then the other seeds at the best rate."""
    torch.set_num_threads(1)
    rows: list[Row] = []
    for task_name in args.tasks:
        task = get_task(task_name)
        data = task.load_data()
        for method in args.methods:
            for schedule in args.schedules:
                tuning = tune(task, data, method, schedule, args)
                best = min(tuning, key=lambda row: row["final_loss"])
                rows.extend({**row, "tuning": True} for row in tuning)
                for seed in range(1, args.seeds):
                    rows.append(
                        {**train(task, data, method, schedule, best["lr"], seed, args),
                         "tuning": False}
                    )  # fmt: skip
                print(summary_line(selected(rows, task_name, method, schedule)), flush=True)
                if args.json:
                    with open(args.json, "w") as handle:
                        json.dump(rows, handle)
    return rows


def selected(rows: list[Row], task: str, method: str, schedule: str) -> list[Row]:
    """The runs of the selected learning rate (the best seed-0 run and its other seeds)."""
    mine = [r for r in rows if (r["task"], r["method"], r["schedule"]) == (task, method, schedule)]
    best = min((r for r in mine if r["seed"] == 0), key=lambda r: r["final_loss"])
    return [r for r in mine if r["lr"] == best["lr"]]


def summary_line(runs: list[Row]) -> str:
    """One table row: final losses over seeds, cost ratio to SGD."""
    first = runs[0]
    finals = [r["final_loss"] for r in runs]
    mean = statistics.fmean(finals)
    spread = f"{min(finals):.4f}-{max(finals):.4f}"
    early = statistics.fmean(r["curve"][1][1] if len(r["curve"]) > 1 else math.inf for r in runs)
    early_step = first["curve"][1][0] if len(first["curve"]) > 1 else 0
    cost = statistics.median(r["cost_ratio"] for r in runs)
    ms = statistics.median(r["method_ms"] for r in runs)
    sgd_ms = statistics.median(r["sgd_ms"] for r in runs)
    return (
        f"| {first['task']} | {first['method']} | {first['schedule']} | {first['lr']:g} | "
        f"{early:.4f} (step {early_step}) | {mean:.4f} | {spread} | {len(runs)} | {ms:.1f} | "
        f"{sgd_ms:.1f} | {cost:.2f} |"
    )


HEADER = (
    "| task | method | k/T/S | lr | early train loss (mean) | final train loss (mean) | "
    "min-max over seeds | seeds | CPU ms/step | SGD CPU ms/step | cost / SGD |\n"
    + "|---" * 11
    + "|"
)


def table(rows: list[Row]) -> str:
    """The summary table of every measured (task, method, schedule)."""
    keys = list(dict.fromkeys((r["task"], r["method"], r["schedule"]) for r in rows))
    return "\n".join([HEADER, *(summary_line(selected(rows, *key)) for key in keys)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", default=TASKS, choices=TASKS)
    parser.add_argument("--methods", nargs="+", default=["kfac", "foof"], choices=["kfac", "foof"])
    parser.add_argument("--schedules", nargs="+", default=SCHEDULES)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--extensions", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--table", nargs="+", default=None, help="merge JSON files, print")
    args = parser.parse_args()
    if args.table:
        rows = [row for path in args.table for row in json.load(open(path))]
    else:
        print(HEADER, flush=True)
        rows = measure(args)
        print(f"\n{args.steps} steps, 1 torch thread, time.thread_time\n")
    print(table(rows))


if __name__ == "__main__":
    main()
