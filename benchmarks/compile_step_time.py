"""Step time of natgrad on a ``torch.compile``d model against the same model run eagerly.

Every captured layer call splits the compiled graph (natgrad's tensor hook on the layer output
writes Python state; see :mod:`natgrad.capture`), so compiling gains less with natgrad than
without it. This script measures how much: an MLP 784-512-512-10 (ReLU, float32, batch 128,
random data), SGD and EF (fused path) steps, each eager and compiled, timed alternately in one
process after warm-up (the compilation itself is not timed). SGD and EF run in separate
processes: ``torch.compile`` shares compiled code between models of one class and does not
check hooks, so a hook-free SGD model compiled in the EF process would hand its code to the
EF model (see :func:`natgrad.capture.compiled_hint`).

    python benchmarks/compile_step_time.py [--backend inductor] [--threads 1] [--steps 50]

Prints the median ms per step of each and the ratios compiled / eager; checks nothing.
"""

from __future__ import annotations

import argparse
import ast
import copy
import os
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import natgrad


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    )


def stepper(model: nn.Module, precondition: bool):
    """One training step of ``model`` (EF, fused, if ``precondition``; plain SGD otherwise)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    pre = natgrad.EF(model, damping=1e-3) if precondition else None

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        opt.zero_grad()
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        if pre is None:
            loss.backward()
        else:
            pre.backward(loss)
            pre.step(logits)
        opt.step()

    return step


def measure(method: str, args: argparse.Namespace) -> dict[str, float]:
    """Median ms per step of ``method`` eager and compiled, alternating in this process."""
    torch.set_num_threads(args.threads)
    base = make_model()
    precondition = method == "ef"
    variants = {
        f"{method} eager": stepper(copy.deepcopy(base), precondition),
        f"{method} compiled": stepper(
            torch.compile(copy.deepcopy(base), backend=args.backend), precondition
        ),
    }
    generator = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(128, 784, generator=g), torch.randint(0, 10, (128,), generator=g))
        for g in [generator] * 8
    ]
    for step in variants.values():  # warm-up, compilation included
        for index in range(args.warmup):
            step(*batches[index % len(batches)])
    times: dict[str, list[float]] = {name: [] for name in variants}
    for index in range(args.steps):  # alternate, so both variants see the same conditions
        for name, step in variants.items():
            start = time.perf_counter()
            step(*batches[index % len(batches)])
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--method", choices=["sgd", "ef"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method is not None:  # a worker: one method, both variants
        print(repr(measure(args.method, args)))
        return
    median: dict[str, float] = {}
    for method in ("sgd", "ef"):
        worker = subprocess.run(
            [sys.executable, __file__, *sys.argv[1:], "--method", method],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        median.update(ast.literal_eval(worker.stdout.strip().splitlines()[-1]))
    print(f"backend {args.backend}, torch threads {args.threads}, {args.steps} timed steps, "
          f"load average {os.getloadavg()[0]:.2f}")  # fmt: skip
    for name, value in median.items():
        print(f"{name:13s} {value:7.2f} ms/step")
    for name in ("sgd", "ef"):
        ratio = median[f"{name} compiled"] / median[f"{name} eager"]
        print(f"{name}: compiled / eager {ratio:.2f}")
    print(f"ef / sgd (separate processes): eager {median['ef eager'] / median['sgd eager']:.2f}, "
          f"compiled {median['ef compiled'] / median['sgd compiled']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
