"""Where an exact-Fisher step's time goes, per phase, at one and at two torch threads.

Purpose
-------
Explain why the exact Fisher's ratio to SGD differs between one thread and two (issue 18).
Every aten operation of a training step (the MLP and data of ``benchmarks/step_time.py``,
``--method`` ``exact-fused`` or ``sgd``, batch 100) is timed by the CPU time of each thread of
the process: the calling thread's ``time.thread_time_ns`` and every other thread's
``/proc/self/task/*/schedstat`` (Linux only), read before and after the operation. With
``OMP_WAIT_POLICY=PASSIVE`` idle OpenMP threads sleep instead of spinning, so the busiest
thread's CPU time of an operation is the time it takes on an idle machine with that many cores
(whatever else runs on the machine), and the sum over threads is the work done. Each operation
keeps its smallest time over ``--steps`` steps; operations are grouped into phases by the
natgrad function (or the line of the training step) that ran them. Python between operations is
not counted (the same at any number of threads).

Run ``OMP_WAIT_POLICY=PASSIVE python benchmarks/exact_step_threads.py --threads 1`` (and
``--threads 2``, ``--method sgd``). It prints one JSON line: per phase ``[busiest thread ms,
all threads ms]``. A benchmark, not a test: it checks nothing.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import threading
import time
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import step_time

PHASES = (
    ("backprop_to_layers", "Hessian-root rows back-propagated"),
    ("upper_addmm_", "layer Grams E E^T (upper blocks)"),
    ("_scaled_curvature", "Grams: input products, sum, mirror, scale"),
    ("damped_solve", "solve"),
    ("write", "direction E_u^T A and E_u"),
    ("gram_times", "right-hand side J J_loss^T w"),
)
LINES = (
    ("model(inputs)", "forward"),
    ("pre.backward", "backward to the layer outputs (fused)"),
    ("loss.backward", "backward (autograd)"),
    ("opt.step", "optimiser step"),
)


def phase(stack: list[traceback.FrameSummary]) -> str:
    """The phase of the operation called from ``stack``."""
    names = {frame.name for frame in stack}
    for function, label in PHASES:
        if function in names:
            return label
    line = next((f.line or "" for f in stack if f.name == "run_steps"), "")
    return next((label for text, label in LINES if text in line), "other (checks, captures)")


def other_threads_ns(own: str) -> dict[str, int]:
    """CPU nanoseconds of every thread of the process but ``own``."""
    times = {}
    for tid in os.listdir("/proc/self/task"):
        if tid != own:
            try:
                with open(f"/proc/self/task/{tid}/schedstat") as file:
                    times[tid] = int(file.read().split()[0])
            except OSError:  # the thread ended
                continue
    return times


class ThreadTimes(TorchDispatchMode):
    """Records ``(phase, busiest thread s, all threads s)`` of every operation."""

    def __init__(self) -> None:
        super().__init__()
        self.own = str(threading.get_native_id())
        self.records: list[tuple[str, float, float]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        before = other_threads_ns(self.own)
        start = time.thread_time_ns()
        result = func(*args, **(kwargs or {}))
        own = time.thread_time_ns() - start
        after = other_threads_ns(self.own)
        spent = [own] + [after[t] - before.get(t, 0) for t in after]
        self.records.append((phase(traceback.extract_stack()[:-1]), max(spent), sum(spent)))
        return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--method", default="exact-fused")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--train-steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = step_time.make_model(0)
    draw = step_time.random_batches(args.batch_size)
    opt, pre, fused = step_time.make_step(args.method, model)
    step_time.run_steps(model, opt, pre, fused, draw, args.train_steps)
    steps = []
    for _ in range(args.steps):
        with ThreadTimes() as times:
            step_time.run_steps(model, opt, pre, fused, draw, 1)
        steps.append(times.records)
    if len({len(records) for records in steps}) != 1:
        raise RuntimeError("the steps ran different operations; cannot match them")
    phases: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    for calls in zip(*steps, strict=True):
        name, busiest, total = min(calls, key=lambda call: call[1])
        phases[name][0] += busiest / 1e6
        phases[name][1] += total / 1e6
    rows = {name: [round(b, 2), round(t, 2)] for name, (b, t) in phases.items()}
    rows["total"] = [round(sum(v[0] for v in rows.values()), 2),
                     round(sum(v[1] for v in rows.values()), 2)]  # fmt: skip
    print(json.dumps({
        "method": args.method, "threads": args.threads, "batch": args.batch_size,
        "operations_per_step": len(steps[0]), "load_average": os.getloadavg()[0], "ms": rows,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
