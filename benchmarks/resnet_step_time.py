"""Step time and peak memory of natgrad methods on a small ResNet, as ratios to a plain SGD step.

Purpose
-------
Check natgrad's cost goals where users train convolutional networks (issue 18): a small ResNet
on 3x32x32 inputs (a 3x3 stem to 16 channels, then three stages of one basic block each with
16, 32 and 64 channels, the second and third halving the resolution; BatchNorm in train mode,
ReLU, global average pooling and a linear layer to 10 classes; built from ``nn.Conv2d``,
``nn.BatchNorm2d``, ``nn.ReLU`` and ``nn.Linear``), random inputs ``x ~ randn`` and labels
uniform in ``0..9`` (a fresh batch every step, drawn outside the timed region), batch 64,
cross-entropy with mean reduction.

Run ``python benchmarks/resnet_step_time.py`` (a few minutes on one core). Options:
``--methods`` (default: all), ``--threads`` (torch threads, default 1), ``--clock`` (``wall``
or ``thread``, as in ``benchmarks/step_time.py``), ``--batch-size``
(64), ``--train-steps K`` (default 300: each method first trains the weights ``K`` steps at
``--lr`` so that the weights, and the preconditioner's state, are those of a model in training,
not of one at initialisation), ``--lr`` (default 1e-3), ``--steps`` (timed steps, default 40),
``--busy N`` (run ``N`` busy-looping processes while measuring, to see the cost of a core
shared with another job), ``--reference`` (``own-process`` or ``same-process``: where the SGD
reference runs, see "Time and memory"), ``--keep-heap`` (see "Page faults") and ``--json
PATH``. The script is a
benchmark, not a test: it prints the table and checks nothing.

Methods
-------
``sgd`` (the reference); ``ef``, ``ief`` and ``exact`` (``natgrad.NGD``, ``structure="full"``);
``kfac`` and ``foof`` with ``factor_period=10, inv_period=100``. A ``-fused`` suffix uses
``pre.backward(loss)`` instead of ``loss.backward()``. The optimiser is
``torch.optim.SGD(lr, momentum=0.9)``.

Time and memory
---------------
As in ``benchmarks/step_time.py``: each method runs in its own subprocess; the worker records
``ru_maxrss`` after building the model and the preconditioner, trains the method alone for
``--train-steps`` steps (its warm-up) and reports the increase of the high-water mark in MiB;
then it copies the trained weights into a second model and times the method's step and a plain
SGD step on that copy alternately, on the same batches, and reports the medians and their
ratio, and the ratio of the means. At one thread (the default) the SGD copy runs in a child
process of the worker that takes one step whenever the worker sends it a batch (``--reference
own-process``), so the two still alternate under the same load but each has its own heap, as a
user's training process would. In the worker's own process (``--reference same-process``, the
default at two threads, where ``own-process`` is refused: see ``benchmarks/step_time.py``)
the SGD step runs in the heap the method's larger step has just grown, and page-faults less
than in a process of its own (0-6,100 minor faults per step against 7,100-11,300; its step
104-115 ms against 116-134 ms, idle, docs/performance.md), which made the EF and iEF ratios
measured that way look worse than the comparison a user makes. With
``factor_period=10`` the median is the cost of a step that folds no factor, the mean counts
the folding steps at their share (a goal counts as met when both ratios meet it). The load
average is printed before and after.

Page faults
-----------
The worker also counts the minor page faults (``ru_minflt`` of the measuring thread, of the
process where the platform has no per-thread count) of each timed step of the method and of the
SGD step before it, and reports their medians: pages the kernel had to map (and zero) on first
touch, because the allocator handed them back to the system after an earlier step. Each costs
a few microseconds here; the counts move by tens of percent between identical runs (they depend
on where large blocks land in the heap), so compare them over several runs. With
``--keep-heap`` every worker and its SGD child start with glibc told to keep freed memory
(``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_MMAP_THRESHOLD_``; no effect with another C library):
the faults then mostly vanish on both sides, and the ratio is that of the steps' work, as with
an allocator that keeps memory (jemalloc, tcmalloc). It is a measurement setting, not what a
default process does.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

import natgrad
from step_time import (
    CLOCK_NAMES,
    CLOCKS,
    REFERENCES,
    max_rss_mib,
    reference_place,
    run_steps,
    sgd_reference,
    spawn_worker,
    timed_step,
)

CLASSES = 10
Row = dict[str, Any]
Batch = tuple[Tensor, Tensor]


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and a residual connection (a 1x1 projection when
    the shape changes)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


def make_model(seed: int = 0) -> nn.Module:
    """The benchmark ResNet (module docstring); the same seed gives an identical model."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, 1, 1, bias=False),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        BasicBlock(16, 16, 1),
        BasicBlock(16, 32, 2),
        BasicBlock(32, 64, 2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(64, CLASSES),
    )


def random_batches(batch_size: int, seed: int = 1) -> Callable[[], Batch]:
    """A source of fresh random batches: ``x ~ randn`` (3x32x32), labels uniform in 0..9."""
    generator = torch.Generator().manual_seed(seed)

    def draw() -> Batch:
        inputs = torch.randn(batch_size, 3, 32, 32, generator=generator)
        targets = torch.randint(0, CLASSES, (batch_size,), generator=generator)
        return inputs, targets

    return draw


KEEP_HEAP = {"MALLOC_TRIM_THRESHOLD_": str(2**40), "MALLOC_MMAP_THRESHOLD_": str(32 * 2**20)}
"""glibc settings for ``--keep-heap``: never hand the top of the heap back to the system, and
serve blocks up to 32 MiB (the largest threshold glibc accepts on 64-bit systems) from the heap
instead of fresh mappings."""

KRONECKER_SCHEDULE = {"factor_period": 10, "inv_period": 100}
PRECONDITIONERS: dict[str, Callable[[nn.Module], natgrad.Preconditioner]] = {
    "ef": lambda model: natgrad.NGD(model, fisher="empirical", damping=1e-3),
    "ief": lambda model: natgrad.NGD(model, fisher="ief", damping=1e-3),
    "exact": lambda model: natgrad.NGD(model, fisher="exact", damping=1e-3),
    "kfac": lambda model: natgrad.KFAC(model, damping=1e-3, **KRONECKER_SCHEDULE),
    "foof": lambda model: natgrad.FOOF(model, damping=1.0, **KRONECKER_SCHEDULE),
}
METHODS = ["sgd", *PRECONDITIONERS, *(f"{name}-fused" for name in PRECONDITIONERS)]
TIME_GOALS = {"ef": 1.6, "ief": 1.6, "kfac": 1.6, "foof": 1.5}


def worker(method: str, args: argparse.Namespace) -> Row:
    """Measure one method in this process (module docstring, "Time and memory")."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(1)
    timer = CLOCKS[args.clock]
    draw = random_batches(args.batch_size)
    model = make_model()
    base = method.removesuffix("-fused")
    pre = None if base == "sgd" else PRECONDITIONERS[base](model)
    fused = method.endswith("-fused")
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)

    baseline_mib = max_rss_mib()
    alone = run_steps(model, opt, pre, fused, draw, max(args.train_steps, 1), timer)
    peak_increase_mib = max_rss_mib() - baseline_mib

    method_times: list[float] = []
    sgd_times: list[float] = []
    method_faults: list[int] = []
    sgd_faults: list[int] = []
    with sgd_reference(
        make_model, model.state_dict(), args.lr, args.threads, args.clock, args.reference
    ) as sgd_step:
        for _ in range(5):  # the reference's warm-up
            sgd_step(draw())
        for _ in range(args.steps):
            batch = draw()
            seconds, faults = sgd_step(batch)
            sgd_times.append(seconds)
            sgd_faults.append(faults)
            seconds, faults = timed_step(model, opt, pre, fused, batch, timer)
            method_times.append(seconds)
            method_faults.append(faults)
    row: Row = {
        "method": method,
        "ms": 1e3 * statistics.median(method_times),
        "sgd_ms": 1e3 * statistics.median(sgd_times),
        "alone_ms": 1e3 * statistics.median(alone[-args.steps :]),
        "peak_mib": peak_increase_mib,
        "faults": statistics.median(method_faults),
        "sgd_faults": statistics.median(sgd_faults),
        "threads": torch.get_num_threads(),
        "clock": args.clock,
        "reference": args.reference,
    }
    row["ratio"] = row["ms"] / row["sgd_ms"]
    # the mean counts the steps that fold or invert factors (one in factor_period) at their
    # share, which the median leaves out
    row["mean_ratio"] = statistics.mean(method_times) / statistics.mean(sgd_times)
    return row


def run_worker(method: str, args: argparse.Namespace) -> Row:
    """Run :func:`worker` in a fresh Python process and return its row (an ``error`` row if
    it fails)."""
    arguments = [
        "--worker", method, "--threads", str(args.threads), "--clock", args.clock,
        "--batch-size", str(args.batch_size),
        "--train-steps", str(args.train_steps), "--lr", str(args.lr), "--steps", str(args.steps),
        "--reference", args.reference,
    ]  # fmt: skip
    return spawn_worker(__file__, arguments, {"method": method})


def format_table(rows: list[Row]) -> str:
    """The rows as a markdown table, with the memory ratio to SGD's and the time goals."""
    sgd_peak = next((r["peak_mib"] for r in rows if r["method"] == "sgd" and "ms" in r), None)
    lines = [
        "| method | ms/step | SGD ms/step (same run) | ratio | ratio of means | goal "
        "| peak RSS increase MiB | memory ratio vs SGD | minor faults/step | SGD's (same run) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            last = row["error"].splitlines()[-1] if row["error"] else "failed"
            lines.append(f"| {row['method']} | failed: {last} | | | | | | | | |")
            continue
        goal = TIME_GOALS.get(row["method"].removesuffix("-fused"))
        met = goal is not None and max(row["ratio"], row["mean_ratio"]) <= goal
        verdict = "" if goal is None else f"<= {goal:g} {'ok' if met else 'MISSED'}"
        memory = "" if not sgd_peak else f"{row['peak_mib'] / sgd_peak:.2f}"
        lines.append(
            f"| {row['method']} | {row['ms']:.1f} | {row['sgd_ms']:.1f} | {row['ratio']:.2f} "
            f"| {row['mean_ratio']:.2f} | {verdict} | {row['peak_mib']:.0f} | {memory} "
            f"| {row['faults']:.0f} | {row['sgd_faults']:.0f} |"
        )
    return "\n".join(lines)


def start_busy(count: int) -> list[subprocess.Popen]:
    """Start ``count`` processes that spin on a core until stopped."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]


def main() -> None:
    """Parse the command line; run the workers (or, with ``--worker``, be one)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--threads", type=int, default=1, choices=(1, 2))
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS))
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-steps", type=int, default=300, help="steps before timing")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per method")
    parser.add_argument("--busy", type=int, default=0, help="busy-looping processes meanwhile")
    parser.add_argument(
        "--keep-heap", action="store_true",
        help="glibc keeps freed memory in every worker process (module docstring)",
    )  # fmt: skip
    parser.add_argument(
        "--reference", choices=REFERENCES,
        help="where the SGD reference steps run (default: own-process at one thread, "
        "same-process at two; module docstring)",
    )  # fmt: skip
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.train_steps < 0 or args.busy < 0:
        parser.error("--steps must be >= 1, --train-steps and --busy >= 0")
    try:
        args.reference = reference_place(args.reference, args.threads)
    except ValueError as error:
        parser.error(str(error))
    if args.worker:
        print(json.dumps(worker(args.worker, args)))
        return
    methods = ["sgd", *(m for m in dict.fromkeys(args.methods) if m != "sgd")]
    if args.keep_heap:  # read by glibc when each worker (and its reference child) starts
        os.environ.update(KEEP_HEAP)
    load_before = os.getloadavg()
    busy = start_busy(args.busy)
    try:
        rows = []
        for method in methods:
            rows.append(run_worker(method, args))
            print(f"{method}: {'FAILED' if 'error' in rows[-1] else 'done'}", file=sys.stderr)
    finally:
        for process in busy:
            process.kill()
            process.wait()
    load_after = os.getloadavg()
    print(
        f"Small ResNet, batch {args.batch_size}, torch threads = {args.threads}, "
        f"{args.busy} busy processes; {args.train_steps} training steps at lr {args.lr:g}, "
        f"then {args.steps} timed steps (medians of {CLOCK_NAMES[args.clock]}), SGD timed "
        f"alternately ({args.reference.replace('-', ' ')})"
        f"{'; glibc keeps freed memory' if args.keep_heap else ''}. Load average (1, 5, 15 min) "
        f"{' '.join(f'{x:.2f}' for x in load_before)} at the start, "
        f"{' '.join(f'{x:.2f}' for x in load_after)} at the end ({os.cpu_count()} CPUs).\n"
    )
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
