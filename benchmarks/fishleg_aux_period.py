"""FishLeg's auxiliary period: how well ``Q`` learns, the loss reached and the cost per step.

Purpose
-------
Decide FishLeg's default ``aux_period`` by measurement. For each period ``k`` (default
1, 2, 5, 10), on each workload, train the same number of steps with the same seed and record:

* the final training loss (whole training set);
* ``Q``'s quality at the end (:func:`natgrad.lab.runner.fishleg_record`): how far it moved from
  ``Q₀`` and the cosine of ``Q u`` with ``(F + γI)⁻¹ u`` on a probe batch (``u`` the probe
  batch's gradient, ``F`` its exact Fisher, solved by conjugate gradients);
* the cost of a step relative to SGD with momentum: FishLeg's step and an SGD step on a copy of
  the model are timed alternately in one process (one torch thread), mean over the steps (a
  median would pick the steps without an auxiliary step when ``k > 2``).

Workloads (natgrad's bench tasks, :mod:`natgrad.lab.runner`):

* ``deep-linear``: R7's deep linear network (20 x 20, 4000 samples, batch 40), FishLeg
  ``η = 0.04``, ``α = 1e-3`` (Garcia et al. 2023, Fig. 1), damping 1e-4 (so that the
  conjugate-gradient solve of the alignment converges), ``Q₀ = 0.75 I`` (as R7 selects);
* ``mnist5k-autoencoder``: R8's MNIST autoencoder (batch 100), FishLeg ``η = 0.07``,
  ``α = 1e-4`` and damping ``0.3 / 784`` (Table 1, MNIST), ``Q₀ = (3 / 0.07) I`` (R8's SGDm
  learning rate over ``η``), momentum on ``Q g``,
  plus ``α = 1e-3``.

Run ``python benchmarks/fishleg_aux_period.py`` (about 6 minutes on an idle core); ``--periods``,
``--steps`` (training steps per run, default 1000 deep-linear / 200 autoencoder),
``--timed`` (interleaved steps timed per period, default 40), ``--json PATH``. A benchmark, not a
test: it prints a table and checks nothing. The machine's load average is printed before and
after: on a shared machine the ratios are noisy, the losses and alignments are not.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import time
from dataclasses import replace
from typing import Any

import torch

from natgrad.lab.registry import get_method
from natgrad.lab.reproduce.fishleg_claims import MNIST_PIXELS, mean_loss_damping
from natgrad.lab.runner import get_task, train_run

WORKLOADS: dict[str, tuple[int, list[dict[str, Any]]]] = {
    "deep-linear": (
        1000,
        [{"lr": 0.04, "aux_lr": 1e-3, "damping": 1e-4, "init_scale": 0.75}],
    ),
    "mnist5k-autoencoder": (
        200,
        [
            {
                "lr": 0.07,
                "aux_lr": aux_lr,
                "damping": mean_loss_damping(0.3, MNIST_PIXELS),
                "init_scale": 3.0 / 0.07,
                "momentum_on": "update",
            }
            for aux_lr in (1e-4, 1e-3)
        ],
    ),
}


def step_ratio(task_name: str, hyper: dict[str, Any], timed: int) -> tuple[float, float]:
    """Mean ms of a FishLeg step and of an SGD-with-momentum step, timed alternately."""
    task = get_task(task_name)
    data = task.load_data()
    torch.manual_seed(0)
    model = task.build_model(data)
    reference = copy.deepcopy(model)
    optimiser, pre = get_method("fishleg").build(model, task.likelihood, "mean", **hyper)
    sgd = torch.optim.SGD(reference.parameters(), lr=1e-4, momentum=0.9)
    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"fishleg": [], "sgd": []}
    for index in range(timed + 3):
        batch = torch.randint(len(data.train_inputs), (task.batch_size,), generator=generator)
        inputs = data.train_inputs[batch]
        targets = task.targets(inputs, data.train_targets[batch])
        for name, net, opt in (("sgd", reference, sgd), ("fishleg", model, optimiser)):
            start = time.perf_counter()
            opt.zero_grad()
            logits = net(inputs)
            task.loss(logits, targets).backward()
            if name == "fishleg":
                pre.step(logits)
            opt.step()
            if index >= 3:  # warm-up
                times[name].append(time.perf_counter() - start)
    pre.remove()
    return 1e3 * statistics.fmean(times["fishleg"]), 1e3 * statistics.fmean(times["sgd"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--periods", type=int, nargs="+", default=[1, 2, 5, 10])
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--timed", type=int, default=40)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"load average before: {os.getloadavg()}")
    print(
        "| workload | α | k | final train loss | Q moved | cos(Q u, (F+γI)^-1 u) | "
        "FishLeg ms | SGDm ms | ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in args.workloads:
        default_steps, configurations = WORKLOADS[name]
        task = get_task(name)
        data = task.load_data()
        steps = args.steps or default_steps
        per_epoch = len(data.train_inputs) // task.batch_size
        task = replace(task, epochs=max(1, round(steps / per_epoch)))
        for hyper in configurations:
            for period in args.periods:
                configured = {**hyper, "aux_period": period}
                run = train_run(task, "fishleg", configured, 0, data, threads=1)
                fishleg_ms, sgd_ms = step_ratio(name, configured, args.timed)
                quality = run["q_quality"] or {}
                row = {
                    "workload": name,
                    "hyper": configured,
                    "steps": len(run["step_loss"]),
                    "final_train_loss": run["train_loss"][-1],
                    "q_quality": quality,
                    "fishleg_ms": fishleg_ms,
                    "sgd_ms": sgd_ms,
                }
                rows.append(row)
                print(
                    f"| {name} ({row['steps']} steps) | {hyper['aux_lr']:g} | {period} | "
                    f"{row['final_train_loss']:.4g} | {quality.get('movement', float('nan')):.3g} "
                    f"| {quality.get('alignment', float('nan')):.3f} | {fishleg_ms:.1f} | "
                    f"{sgd_ms:.1f} | {fishleg_ms / sgd_ms:.1f} |",
                    flush=True,
                )
    print(f"load average after: {os.getloadavg()}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
