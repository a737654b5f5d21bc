"""Bytes each rank communicates per step, per natgrad method, next to DDP's gradient all-reduce.

Purpose
-------
Say what data parallelism costs each natgrad method in communication, on the MLP
784-1000-1000-1000-10 of ``benchmarks/step_time.py`` (ReLU, float32, 2.8 M parameters),
cross-entropy with mean reduction, fresh random batches of ``--batch-size`` datapoints per rank
(default 32), 2 processes with the gloo backend on CPU (one torch thread each).

Run ``python benchmarks/communication.py`` (about a minute on 2 cores: the exact Fisher solves
a 640-row system per step, KFAC and FOOF run one inversion period of 100 steps). Options:
``--methods``, ``--batch-size`` and ``--json PATH``. The script is a benchmark, not a test: it
prints the table and checks nothing.

What is counted
---------------
natgrad counts, per collective, the bytes of the tensor each rank passes to it
(``pre.communicator.traffic``): the input of an all-reduce, or the rank's own (padded) part of
an all-gather. DDP is measured the same way, by a communication hook that counts the bucket
bytes each rank all-reduces (``torch.nn.parallel.DistributedDataParallel`` with plain SGD, no
natgrad). With 2 ranks, ring algorithms send exactly that many bytes per rank for both an
all-reduce and an all-gather, so the columns compare like for like; with ``R`` ranks an
all-reduce of ``S`` bytes sends ``2 S (R - 1) / R`` per rank, an all-gather ``S (R - 1)``.

natgrad runs without a DDP wrapper here (its result does not depend on one, and under DDP one
would add DDP's redundant all-reduce or use ``no_sync()``). Each method runs one step first
(initialisation, not counted), then one period of its schedule: 100 steps for KFAC and FOOF
with ``inv_period=100, pre_inversion_steps=10`` (factors are averaged on 10 of them), 10 for
FishLeg with ``aux_period=10`` (one auxiliary step), 2 for the Woodbury methods (every step is
alike). The table gives the mean per step, the largest single step, and the mean per step by
purpose: ``rows`` (all-gathered neuron-view rows), ``factors`` (Kronecker batch statistics),
``inverses`` (inverses broadcast by the rank that computed them, ``spread_inversions=True``),
``gradients`` / ``aux`` (FishLeg's gradients and auxiliary gradients), ``directions`` (averaged
directions and plain gradients) and ``consensus`` (the per-step agreement on finiteness).
Rank 0's wall time per step (forward, backward, ``pre.step``, optimiser) is reported too, mean
and largest: for KFAC and FOOF the largest is the inversion step, which ``spread_inversions``
shares between the ranks. Both ranks share the 2 cores of this machine, one thread each.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

import natgrad
from step_time import WIDTHS, make_model  # the benchmark model, from this directory

WORLD = 2
LEARNING_RATE = 1e-4

Row = dict[str, Any]
Build = Callable[[nn.Module], natgrad.Preconditioner]

METHODS: dict[str, tuple[Build, int]] = {
    "ef": (lambda m: natgrad.EF(m), 2),
    "ief": (lambda m: natgrad.IEF(m), 2),
    "mc": (lambda m: natgrad.NGD(m, fisher="mc"), 2),
    "exact": (lambda m: natgrad.NGD(m, fisher="exact"), 2),
    "tengrad": (lambda m: natgrad.TENGraD(m), 2),
    "ef-local": (lambda m: natgrad.EF(m, distributed="local"), 2),
    "exact-local": (lambda m: natgrad.NGD(m, fisher="exact", distributed="local"), 2),
    "kfac-T100": (
        lambda m: natgrad.KFAC(m, damping=1e-3, inv_period=100, pre_inversion_steps=10),
        100,
    ),
    "foof-T100": (
        lambda m: natgrad.FOOF(m, damping=1.0, inv_period=100, pre_inversion_steps=10),
        100,
    ),
    "kfac-T100-spread": (
        lambda m: natgrad.KFAC(
            m, damping=1e-3, inv_period=100, pre_inversion_steps=10, spread_inversions=True
        ),
        100,
    ),
    "foof-T100-spread": (
        lambda m: natgrad.FOOF(
            m, damping=1.0, inv_period=100, pre_inversion_steps=10, spread_inversions=True
        ),
        100,
    ),
    "fishleg-k10": (lambda m: natgrad.FishLeg(m, aux_period=10, momentum_on="update"), 10),
    "fishleg-k10-gradmom": (lambda m: natgrad.FishLeg(m, aux_period=10), 10),
}
"""Method name: (preconditioner factory, steps in one period of its schedule)."""


def batch(batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A fresh random batch of one rank: ``x ~ randn``, labels uniform in ``0..9``."""
    inputs = torch.randn(batch_size, WIDTHS[0], generator=generator)
    return inputs, torch.randint(0, WIDTHS[-1], (batch_size,), generator=generator)


def measure_natgrad(name: str, batch_size: int, rank: int) -> Row:
    """Bytes per step of one natgrad method on this rank (no DDP wrapper).

    Parameters
    ----------
    name
        A key of :data:`METHODS`.
    batch_size
        Datapoints per rank.
    rank
        This process's rank (seeds its batches).

    Returns
    -------
    Row
        ``method``, ``mode``, ``mean_bytes``, ``max_bytes`` and ``by_purpose`` (mean bytes
        per step).
    """
    build, period = METHODS[name]
    model = make_model()
    pre = build(model)
    momentum = 0.0 if name.startswith("fishleg") else 0.9  # FishLeg applies its own
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=momentum)
    generator = torch.Generator().manual_seed(1 + rank)
    per_step: list[dict[str, int]] = []
    seconds: list[float] = []
    for _ in range(1 + period):
        before = dict(pre.communicator.traffic)
        start = time.perf_counter()
        inputs, targets = batch(batch_size, generator)
        opt.zero_grad()
        logits = model(inputs)
        pre.backward(F.cross_entropy(logits, targets))
        pre.step(logits)
        opt.step()
        seconds.append(time.perf_counter() - start)
        after = pre.communicator.traffic
        per_step.append({k: v - before.get(k, 0) for k, v in after.items()})
    measured = per_step[1:]  # the first step initialises (first factors, inverses)
    totals = [sum(step.values()) for step in measured]
    purposes = sorted({k for step in measured for k in step})
    return {
        "method": name,
        "mode": pre.communicator.mode,
        "steps": period,
        "mean_bytes": sum(totals) / len(totals),
        "max_bytes": max(totals),
        "by_purpose": {p: sum(s.get(p, 0) for s in measured) / len(measured) for p in purposes},
        "mean_ms": 1e3 * sum(seconds[1:]) / period,
        "max_ms": 1e3 * max(seconds[1:]),
    }


def measure_ddp(batch_size: int, rank: int, steps: int = 3) -> Row:
    """Bytes per step of DDP's gradient all-reduce with plain SGD, counted by a comm hook."""
    model = make_model()
    ddp = nn.parallel.DistributedDataParallel(model)
    counted = {"bytes": 0}

    # no annotations: DDP compares them with dist.GradBucket, and here they would be strings
    def counting_hook(state, bucket):
        buffer = bucket.buffer()
        state["bytes"] += buffer.numel() * buffer.element_size()
        return allreduce_hook(None, bucket)

    ddp.register_comm_hook(counted, counting_hook)
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE, momentum=0.9)
    generator = torch.Generator().manual_seed(1 + rank)
    seconds = []
    for _ in range(steps):
        inputs, targets = batch(batch_size, generator)
        start = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(ddp(inputs), targets).backward()
        opt.step()
        seconds.append(time.perf_counter() - start)
    mean = counted["bytes"] / steps
    return {
        "method": "DDP (SGD)",
        "mode": "all-reduce",
        "steps": steps,
        "mean_bytes": mean,
        "max_bytes": mean,
        "by_purpose": {"gradients": mean},
        "mean_ms": 1e3 * sum(seconds) / steps,
        "max_ms": 1e3 * max(seconds),
    }


def worker(rank: int, methods: list[str], batch_size: int, store: str, output: str) -> None:
    """One rank: DDP's reference, then every method; rank 0 writes the rows to ``output``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        rows = [measure_ddp(batch_size, rank)]
        for name in methods:
            rows.append(measure_natgrad(name, batch_size, rank))
            if rank == 0:
                print(f"{name}: done", file=sys.stderr, flush=True)
        dist.barrier()
        if rank == 0:
            with open(output, "w") as handle:
                json.dump(rows, handle)
    finally:
        dist.destroy_process_group()


def format_table(rows: list[Row], batch_size: int) -> str:
    """The rows as a markdown table, bytes in MB (10^6) and as a ratio to DDP's."""
    reference = rows[0]["mean_bytes"]
    lines = [
        f"| method | mode | MB/step per rank (batch {batch_size}/rank) | vs DDP | largest step MB "
        "| MB/step by purpose | ms/step | largest step ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        purposes = ", ".join(f"{k} {v / 1e6:.3g}" for k, v in row["by_purpose"].items() if v)
        lines.append(
            f"| {row['method']} | {row['mode']} | {row['mean_bytes'] / 1e6:.3g} "
            f"| {row['mean_bytes'] / reference:.3f} | {row['max_bytes'] / 1e6:.3g} | {purposes} "
            f"| {row['mean_ms']:.1f} | {row['max_ms']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Parse the command line, spawn the two ranks and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--batch-size", type=int, default=32, help="datapoints per rank")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        store, output = os.path.join(directory, "store"), os.path.join(directory, "rows.json")
        mp.spawn(
            worker,
            args=(args.methods, args.batch_size, store, output),
            nprocs=WORLD,
            join=True,
        )
        with open(output) as handle:
            rows = json.load(handle)
    parameters = sum(p.numel() for p in make_model().parameters())
    print(
        f"Bytes each rank passes to collectives per step, {WORLD} gloo ranks, MLP "
        f"{'-'.join(map(str, WIDTHS))} ({parameters} float32 parameters, "
        f"{4 * parameters / 1e6:.2f} MB), batch {args.batch_size} per rank.\n"
    )
    print(format_table(rows, args.batch_size))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
