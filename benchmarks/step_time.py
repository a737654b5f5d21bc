"""Step time and peak memory of every natgrad method, as ratios to a plain SGD step.

Workload: the MLP 784-1000-1000-1000-10 (ReLU, float32) on random data, batch sizes 32 and 100,
cross-entropy with mean reduction, ``torch.set_num_threads(2)``.

Each method runs in its own process (so the memory figures do not mix), and in that process
the method's step and a ``torch.optim.SGD`` (momentum 0.9) step on an identical model are timed
alternately, so the ratio compares two measurements taken under the same conditions. A step
is ``zero_grad``, forward, loss, backward (or ``pre.backward`` for the ``-fused`` variants),
``pre.step`` and ``opt.step``; the figure is the median wall-clock time (``perf_counter``).

Peak memory: before any step the process records ``ru_maxrss`` (the high-water mark of its
resident memory); it then runs the method alone for a few steps and reports the increase of
that high-water mark. The ``sgd`` process does the same for SGD, and the memory ratio divides
the two increases. For KFAC and FOOF the time of one inversion of all factors is also
reported (``inversion ms``), separately from the step time.

Run ``python benchmarks/step_time.py`` (about 10 minutes on 2 cores), or choose with
``--methods``, ``--batch-sizes`` and ``--steps``; ``--json PATH`` writes the rows.

Goals (issues 2-4): EF, iEF and F(1) (full) <= 1.3x SGD; TENGraD <= 1.3x; exact Fisher
<= 6x; KFAC T=100 <= 1.8x; FOOF T=100 <= 1.4x and cheaper than KFAC at every T; FishLeg with
auxiliary period 10 <= 2x; peak memory of every method <= 1.5x SGD's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

import natgrad

WIDTHS = (784, 1000, 1000, 1000, 10)


def make_model(seed: int = 0) -> nn.Module:
    """The benchmark MLP."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(WIDTHS)):
        layers.append(nn.Linear(fan_in, fan_out))
        if index < len(WIDTHS) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def woodbury(fisher: str, structure: str = "full") -> Callable[[nn.Module], natgrad.NGD]:
    return lambda model: natgrad.NGD(model, fisher=fisher, structure=structure, damping=1e-3)


PRECONDITIONERS: dict[str, Callable[[nn.Module], natgrad.Preconditioner]] = {
    "ef": woodbury("empirical"),
    "ief": woodbury("ief"),
    "mc": woodbury("mc"),
    "exact": woodbury("exact"),
    "tengrad": woodbury("empirical", "layer"),
    **{
        f"kfac-T{period}": (
            lambda model, period=period: natgrad.KFAC(
                model, damping=1e-3, inv_period=period, pre_inversion_steps=min(period, 10)
            )
        )
        for period in (1, 10, 100)
    },
    **{
        f"foof-T{period}": (
            lambda model, period=period: natgrad.FOOF(
                model, damping=1.0, inv_period=period, pre_inversion_steps=min(period, 10)
            )
        )
        for period in (1, 10, 100)
    },
    **{
        f"fishleg-k{period}{suffix}": (
            lambda model, period=period, target=target: natgrad.FishLeg(
                model, aux_period=period, momentum_on=target
            )
        )
        for period in (1, 10)
        for suffix, target in (("", "update"), ("-gradmom", "gradient"))
    },
}
FUSED = ("ef", "ief", "mc", "exact", "tengrad", "kfac-T100", "foof-T100", "fishleg-k10")
METHODS = ["sgd", *PRECONDITIONERS, *(f"{name}-fused" for name in FUSED)]


def make_step(
    method: str, model: nn.Module
) -> tuple[torch.optim.Optimizer, natgrad.Preconditioner | None, bool]:
    """The optimiser, the preconditioner (None for SGD) and whether to use the fused path."""
    base = method.removesuffix("-fused")
    pre = None if base == "sgd" else PRECONDITIONERS[base](model)
    momentum = 0.0 if base.startswith("fishleg") else 0.9  # FishLeg applies its own
    opt = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=momentum)
    return opt, pre, method.endswith("-fused")


def run_steps(model, opt, pre, fused, inputs, targets, count: int) -> list[float]:
    """Run ``count`` training steps; return their wall-clock times in seconds."""
    times = []
    for _ in range(count):
        start = time.perf_counter()
        opt.zero_grad()
        logits = model(inputs)
        loss = F.cross_entropy(logits, targets)
        if fused:
            pre.backward(loss)
        else:
            loss.backward()
        if pre is not None:
            pre.step(logits)
        opt.step()
        times.append(time.perf_counter() - start)
    return times


def worker(method: str, batch_size: int, steps: int) -> dict:
    """Measure one method in this process; return one row."""
    torch.set_num_threads(2)
    torch.manual_seed(1)
    inputs = torch.randn(batch_size, WIDTHS[0])
    targets = torch.randint(0, WIDTHS[-1], (batch_size,))
    model = make_model()
    opt, pre, fused = make_step(method, model)
    baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    run_steps(model, opt, pre, fused, inputs, targets, 5)
    peak_increase_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline_kib) / 1024

    reference = make_model()
    sgd_opt = torch.optim.SGD(reference.parameters(), lr=1e-4, momentum=0.9)
    run_steps(reference, sgd_opt, None, False, inputs, targets, 3)
    method_times, sgd_times = [], []
    for _ in range(steps):
        sgd_times += run_steps(reference, sgd_opt, None, False, inputs, targets, 1)
        method_times += run_steps(model, opt, pre, fused, inputs, targets, 1)
    row = {
        "batch": batch_size,
        "method": method,
        "ms": 1e3 * statistics.median(method_times),
        "sgd_ms": 1e3 * statistics.median(sgd_times),
        "peak_mib": peak_increase_mib,
    }
    row["ratio"] = row["ms"] / row["sgd_ms"]
    if isinstance(pre, natgrad.precond.kronecker.KroneckerPreconditioner):
        inversions = []
        for _ in range(3):
            start = time.perf_counter()
            pre.invert_all()
            inversions.append(time.perf_counter() - start)
        row["inversion_ms"] = 1e3 * statistics.median(inversions)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 100])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per method")
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.batch_sizes[0], args.steps)))
        return
    methods = ["sgd", *(m for m in args.methods if m != "sgd")]
    rows = []
    for batch_size in args.batch_sizes:
        for method in methods:
            command = [
                sys.executable, __file__, "--worker", method,
                "--batch-sizes", str(batch_size), "--steps", str(args.steps),
            ]  # fmt: skip
            output = subprocess.run(command, check=True, capture_output=True, text=True)
            rows.append(json.loads(output.stdout.strip().splitlines()[-1]))
            print(f"measured {method} at batch {batch_size}", file=sys.stderr)
    sgd_peak = {r["batch"]: r["peak_mib"] for r in rows if r["method"] == "sgd"}
    print(
        "| batch | method | ms/step | SGD ms/step (same run) | ratio | peak MiB increase "
        "| memory ratio | inversion ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        memory_ratio = row["peak_mib"] / max(sgd_peak[row["batch"]], 1e-9)
        inversion = f"{row['inversion_ms']:.0f}" if "inversion_ms" in row else ""
        print(
            f"| {row['batch']} | {row['method']} | {row['ms']:.1f} | {row['sgd_ms']:.1f} "
            f"| {row['ratio']:.2f} | {row['peak_mib']:.0f} | {memory_ratio:.2f} | {inversion} |"
        )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
