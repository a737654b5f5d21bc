"""CPU seconds of one training run of each contender of ``natgrad reproduce`` R4-R8.

Purpose
-------
Budget ``natgrad reproduce --all``: a claim that compares tuned optimisers costs (runs searched
on the first seed + runs of the other seeds) x (CPU seconds of one run). This script measures
the second factor: one full run per contender, at the claims' own settings (R4-R6: Benzing
2022's MLP on ``mnist5k``, 120 steps, inversions every 10 steps; R4's full-batch natural
gradient on 500 images for 50 steps; R7: the deep linear network; R8: the MNIST autoencoder,
200 steps), with the hyper-parameters the claims selected before, one torch thread, seed 0.
Each run's CPU time is ``time.process_time`` around :func:`natgrad.lab.runner.train_run` (the
run's evaluations and, for FishLeg, its ``Q`` record included): unlike wall-clock time it
hardly grows when other jobs share the machine.

Run ``python benchmarks/reproduce_run_cost.py [--claims R4 R8] [--r7-steps 200]`` (about 5 CPU
minutes for all). R7's FishLeg runs take 2000 steps in the claim; ``--r7-steps`` measures fewer
and scales linearly. A benchmark, not a test: it prints a table and checks nothing.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

from natgrad.lab.reproduce.fishleg_claims import R7_FISHLEG, R8_FISHLEG, mean_loss_damping
from natgrad.lab.reproduce.training import INV_PERIOD, mlp_problem, subset
from natgrad.lab.runner import get_task, torch_threads, train_run


def cases(claims: list[str], r7_steps: int) -> list[tuple[str, object, object, str, dict, float]]:
    """(name, task, data, method, hyper, scale to the claim's run length) per contender."""
    selected = []
    if {"R4", "R5", "R6"} & set(claims):
        task, data = mlp_problem()
        kronecker = {"lr": 0.1, "damping": 1.0, "inv_period": INV_PERIOD}
        for method in ("sgd", "kfac", "kfac-subsampled", "kfac-correct", "foof", "mc"):
            hyper = {"lr": 0.1, "momentum": 0.9} if method == "sgd" else dict(kronecker)
            if method == "mc":
                hyper.pop("inv_period")
            selected.append((f"R4-R6 {method}", task, data, method, hyper, 1.0))
        full = replace(task, name="full-batch", batch_size=500, epochs=50)
        selected.append(
            ("R4 full-batch mc", full, subset(data, 500), "mc", {"lr": 0.01, "damping": 0.01}, 1.0)
        )
    if "R7" in claims:
        task = replace(get_task("deep-linear"), epochs=1)
        data = subset(task.load_data(), 40 * r7_steps)
        scale = 2000 / r7_steps
        fishleg = {key: values[0] for key, values in R7_FISHLEG.items()}
        fishleg |= {"lr": 0.04, "damping": 1e-6, "aux_lr": 1e-2, "init_scale": 0.03 / 0.04}
        selected += [
            ("R7 sgdm", task, data, "sgd", {"lr": 0.03, "momentum": 0.9}, scale),
            ("R7 adam", task, data, "adam", {"lr": 2e-3}, scale),
            ("R7 fishleg", task, data, "fishleg", fishleg, scale),
        ]
    if "R8" in claims:
        task = replace(get_task("mnist5k-autoencoder"), epochs=5)
        data = task.load_data()
        fishleg = {key: values[0] for key, values in R8_FISHLEG.items()}
        fishleg |= {
            "lr": 0.07,
            "damping": mean_loss_damping(0.3, 784),
            "aux_lr": 5e-3,
            "init_scale": 3.0 / 0.07,
        }
        selected += [
            ("R8 sgdm", task, data, "sgd", {"lr": 3.0, "momentum": 0.9}, 1.0),
            ("R8 adam", task, data, "adam", {"lr": 3e-3}, 1.0),
            ("R8 kfac", task, data, "kfac", {"lr": 1e-2, "damping": 1e-2, "inv_period": 20}, 1.0),
            ("R8 fishleg", task, data, "fishleg", fishleg, 1.0),
        ]
    return selected


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--claims", nargs="+", default=["R4", "R7", "R8"])
    parser.add_argument("--r7-steps", type=int, default=200)
    args = parser.parse_args()
    print(f"load average {os.getloadavg()[0]:.1f}; one torch thread")
    print("| contender | CPU s per claim-length run | wall s (measured) |")
    print("|---|---|---|")
    with torch_threads(1):
        for name, task, data, method, hyper, scale in cases(args.claims, args.r7_steps):
            cpu, wall = time.process_time(), time.perf_counter()
            train_run(task, method, hyper, 0, data)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            print(f"| {name} | {scale * cpu:.1f} | {wall:.1f} |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
