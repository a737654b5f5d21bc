"""Step time and peak memory of every natgrad method, as ratios to a plain SGD step.

Purpose
-------
Check natgrad's cost goals on one fixed workload: the MLP 784-1000-1000-1000-10 (ReLU,
float32) on random data (``x ~ randn``, labels uniform in 0..9, a fresh batch every step,
drawn outside the timed region), cross-entropy with mean reduction,
``torch.set_num_threads(2)`` (``--threads``), batch sizes 32 and 100.

Run ``python benchmarks/step_time.py`` (about 10-15 minutes on 2 cores). Options:
``--methods`` (default: all), ``--batch-sizes`` (default ``32 100``), ``--steps`` (timed steps,
default 30), ``--warmup`` (default 5), ``--lr`` (the learning rate of every optimiser, default
1e-4), ``--threads`` (torch threads, 1 or 2, default 2), ``--clock`` (``wall``, the default:
``time.perf_counter``; ``thread``: the thread's CPU time, ``time.thread_time``, less sensitive
to other jobs on the machine when one thread runs; ``cpu``: the process's CPU time, all
threads), ``--train-steps K`` (default 0: train the method ``K`` more steps after the memory
phase, before timing, so that the weights and the preconditioner's state are those of a model
in training), ``--reference`` (``own-process`` or ``same-process``: where the SGD reference
runs, see "Time") and ``--json PATH`` to write the rows. The script is a benchmark, not a test: it
prints the table and checks nothing.

Methods
-------
``sgd`` (plain SGD, the reference); ``ef``, ``ief``, ``mc`` (``F(1)``, one sampled label per
datapoint) and ``exact`` (exact Fisher), all ``natgrad.NGD`` with ``structure="full"``;
``tengrad`` (block-diagonal EF); ``kfac-T*`` / ``foof-T*`` (inversion period T, factors folded
in the 10 steps before each inversion; ``-foldall``: every step, the default schedule) and
``fishleg-k*`` (auxiliary period k). A ``-fused`` suffix uses ``pre.backward(loss)`` (autograd
stops at the layer outputs) instead of ``loss.backward()``.

Time
----
Each method runs in its own subprocess (this script with a hidden ``--worker`` flag), so that
neither the timings nor the memory figures of one method leak into another's. A step is
``zero_grad``, forward, loss, backward (or ``pre.backward``), ``pre.step`` and ``opt.step``
with ``torch.optim.SGD(lr=1e-4, momentum=0.9)`` (``--lr``; FishLeg applies its own momentum, so
its optimiser has none). In the worker, after the memory phase below (and ``--train-steps``),
the method's step and a plain SGD step on a copy of the method's current weights are timed
alternately (SGD, method, SGD, ...), so the ratio compares two measurements taken under the
same conditions (the same load from whatever else runs on the machine). Where the SGD copy
runs is ``--reference``. ``same-process`` (the default at two threads): in the worker's
process, where its steps reuse (or are trimmed out of) the heap the method's steps grow, so
its page faults, hence its time, depend on the method it is interleaved with (on the small
ResNet of ``benchmarks/resnet_step_time.py``, 4-20% faster than SGD in a process of its own).
``own-process`` (the default at one thread): in a child process of the worker that takes a
step whenever the worker sends it a batch, so that each has a heap of its own, as a user's
training process would. It needs ``--threads 1``: at two threads the waiting process's idle
OpenMP threads spin on the cores the other is computing on (SGD ran up to 2x slower on this
machine's 2 cores, and as fast as in one process with ``OMP_WAIT_POLICY=PASSIVE``). The
figures are medians of wall-clock ``time.perf_counter`` per step, in ms (the JSON rows add
means, which count a method's occasional expensive steps, such as FishLeg's auxiliary ones, in
proportion). Run it on an
otherwise idle machine: with two OpenMP threads, another busy process can make any step several
times slower (a thread waits at a barrier for one that is descheduled), which the alternation
does not fully cancel; the header prints the load average before and after the run. On a busy
machine ``--threads 1 --clock cpu`` times the process's CPU time (``time.process_time``)
instead, which waiting for the CPU does not inflate.

Peak memory
-----------
``ru_maxrss`` (``resource.getrusage``) is the high-water mark of the process's resident memory:
it never decreases. The worker records it after building the model and the preconditioner but
before any step, then runs the method alone for its warm-up and timed number of steps (before
the SGD copy exists) and reports the increase of the high-water mark, in MiB: the most memory
the method's steps needed at any moment beyond what was resident before (gradients, optimiser
state, activations, the preconditioner's buffers, but also one-off costs such as the pages of
library code and thread pools first touched by a step, about 10-15 MiB here; memory the
allocator reused from before the baseline is not counted). Memory that a method leaks grows
with the number of steps, so it shows up as an increase that depends on ``--steps``. The
``sgd`` worker does the same for plain SGD, and the memory ratio divides the method's increase
by SGD's at the same batch size.

Goals (issues 2-4)
------------------
Time: EF, iEF and F(1) (full) <= 1.3x SGD; TENGraD <= 1.3x; exact Fisher <= 6x; KFAC T=100
<= 1.8x; FOOF T=100 <= 1.4x (and cheaper than KFAC at every T); FishLeg with auxiliary period
10 <= 2x. Memory: the peak-memory increase of every method <= 1.5x SGD's. The ``goal`` column
shows the time goal of a method (its fused variant shares it) and whether this run met it. The
``subnormals`` column counts subnormal entries in the weights, gradients, factors and inverses
after the timed steps (the JSON rows break it down).
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import os
import pickle
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import natgrad
from natgrad.precond.kronecker import KroneckerPreconditioner

WIDTHS = (784, 1000, 1000, 1000, 10)
CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,
    "thread": time.thread_time,
    "cpu": time.process_time,
}
CLOCK_NAMES = {
    "wall": "wall-clock, time.perf_counter",
    "thread": "thread CPU time, time.thread_time",
    "cpu": "process CPU time, time.process_time",
}
LEARNING_RATE = 1e-4
MEMORY_GOAL = 1.5

Row = dict[str, Any]
Batch = tuple[Tensor, Tensor]


def make_model(seed: int = 0) -> nn.Module:
    """Build the benchmark MLP 784-1000-1000-1000-10 with ReLU activations.

    Parameters
    ----------
    seed
        Seed of the initialisation; the same seed gives an identical model.

    Returns
    -------
    nn.Module
        The float32 model.
    """
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for index, (fan_in, fan_out) in enumerate(itertools.pairwise(WIDTHS)):
        layers.append(nn.Linear(fan_in, fan_out))
        if index < len(WIDTHS) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def random_batches(batch_size: int, seed: int = 1) -> Callable[[], Batch]:
    """A source of fresh random batches: ``x ~ randn``, labels uniform in ``0..9``.

    Every step draws a new batch, so no method can fit its data and drive the loss to zero
    (with a single fixed batch, KFAC fits its 32 random labels within 60 steps).

    Parameters
    ----------
    batch_size
        The number of datapoints per batch.
    seed
        Seed of the generator; the same seed gives the same sequence of batches.

    Returns
    -------
    Callable[[], Batch]
        A function returning the next ``(inputs, targets)``.
    """
    generator = torch.Generator().manual_seed(seed)

    def draw() -> Batch:
        inputs = torch.randn(batch_size, WIDTHS[0], generator=generator)
        targets = torch.randint(0, WIDTHS[-1], (batch_size,), generator=generator)
        return inputs, targets

    return draw


def woodbury(fisher: str, structure: str = "full") -> Callable[[nn.Module], natgrad.NGD]:
    """A factory of ``natgrad.NGD`` preconditioners of one Fisher type and structure.

    Parameters
    ----------
    fisher
        The Fisher type (``"empirical"``, ``"ief"``, ``"mc"`` or ``"exact"``).
    structure
        ``"full"`` or ``"layer"``.

    Returns
    -------
    Callable[[nn.Module], natgrad.NGD]
        A function building the preconditioner of a model.
    """

    def build(model: nn.Module) -> natgrad.NGD:
        return natgrad.NGD(model, fisher=fisher, structure=structure, damping=1e-3, mc_samples=1)

    return build


def kfac(period: int, window: int | None = 10) -> Callable[[nn.Module], natgrad.KFAC]:
    """A factory of KFAC preconditioners with inversion period ``period``, folding the factors
    in the ``min(period, window)`` steps before each inversion (every step if None)."""
    return lambda model: natgrad.KFAC(
        model,
        damping=1e-3,
        inv_period=period,
        pre_inversion_steps=None if window is None else min(period, window),
    )


def foof(period: int, window: int | None = 10) -> Callable[[nn.Module], natgrad.FOOF]:
    """A factory of FOOF preconditioners, as :func:`kfac`."""
    return lambda model: natgrad.FOOF(
        model,
        damping=1.0,
        inv_period=period,
        pre_inversion_steps=None if window is None else min(period, window),
    )


def fishleg(period: int, momentum_on: str) -> Callable[[nn.Module], natgrad.FishLeg]:
    """A factory of FishLeg preconditioners with auxiliary period ``period``."""
    return lambda model: natgrad.FishLeg(model, aux_period=period, momentum_on=momentum_on)


PRECONDITIONERS: dict[str, Callable[[nn.Module], natgrad.Preconditioner]] = {
    "ef": woodbury("empirical"),
    "ief": woodbury("ief"),
    "mc": woodbury("mc"),
    "exact": woodbury("exact"),
    "tengrad": woodbury("empirical", "layer"),
    **{f"kfac-T{period}": kfac(period) for period in (1, 10, 100)},
    **{f"foof-T{period}": foof(period) for period in (1, 10, 100)},
    "kfac-T100-foldall": kfac(100, None),
    "foof-T100-foldall": foof(100, None),
    **{
        f"fishleg-k{period}{suffix}": fishleg(period, target)
        for period in (1, 10)
        for suffix, target in (("", "update"), ("-gradmom", "gradient"))
    },
}
FUSED = (
    "ef", "ief", "mc", "exact", "tengrad", "kfac-T100", "foof-T100", "kfac-T100-foldall",
    "foof-T100-foldall", "fishleg-k10",
)  # fmt: skip
METHODS = ["sgd", *PRECONDITIONERS, *(f"{name}-fused" for name in FUSED)]
TIME_GOALS = {
    "ef": 1.3,
    "ief": 1.3,
    "mc": 1.3,
    "tengrad": 1.3,
    "exact": 6.0,
    "kfac-T100": 1.8,
    "foof-T100": 1.4,
    "kfac-T100-foldall": 2.7,
    "foof-T100-foldall": 1.7,
    "fishleg-k10": 2.0,
}


def make_step(
    method: str, model: nn.Module, lr: float = LEARNING_RATE
) -> tuple[torch.optim.Optimizer, natgrad.Preconditioner | None, bool]:
    """Set up one method on ``model``.

    Parameters
    ----------
    method
        A name of :data:`METHODS`.
    model
        The model the method trains (the preconditioner hooks into it).
    lr
        The optimiser's learning rate.

    Returns
    -------
    tuple
        The optimiser, the preconditioner (``None`` for SGD) and whether to use the fused path.
    """
    base = method.removesuffix("-fused")
    pre = None if base == "sgd" else PRECONDITIONERS[base](model)
    momentum = 0.0 if base.startswith("fishleg") else 0.9  # FishLeg applies its own
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    return opt, pre, method.endswith("-fused")



def run_steps(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    pre: natgrad.Preconditioner | None,
    fused: bool,
    draw: Callable[[], Batch],
    count: int,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Run ``count`` training steps.

    Parameters
    ----------
    model, opt, pre, fused
        The method, as returned by :func:`make_step` (``pre=None``: plain SGD).
    draw
        Returns the next batch; called before each step's timer starts.
    count
        The number of steps.
    clock
        The clock (:data:`CLOCKS`).

    Returns
    -------
    list[float]
        The time of each step in seconds by ``clock``.
    """
    times = []
    for _ in range(count):
        inputs, targets = draw()
        start = clock()
        opt.zero_grad()
        logits = model(inputs)
        loss = F.cross_entropy(logits, targets)
        if fused and pre is not None:
            pre.backward(loss)
        else:
            loss.backward()
        if pre is not None:
            pre.step(logits)
        opt.step()
        times.append(clock() - start)
    return times


FAULTS_WHO = getattr(resource, "RUSAGE_THREAD", resource.RUSAGE_SELF)
"""Whose minor page faults are counted: this thread's where the platform says (Linux)."""

REFERENCES = ("own-process", "same-process")
"""Where the SGD reference steps run (module docstring, "Time")."""


def reference_place(requested: str | None, threads: int) -> str:
    """Where the SGD reference runs for ``--reference requested`` (``None``: the default) at
    ``threads`` torch threads: in a process of its own at one thread, in the method's process
    at more, where the idle process's OpenMP threads would spin-wait for their next parallel
    region on the cores the other process is computing on (module docstring, "Time")."""
    if requested is None:
        return "own-process" if threads == 1 else "same-process"
    if requested == "own-process" and threads > 1:
        raise ValueError(
            "--reference own-process needs --threads 1: with more threads, the waiting "
            "process's idle OpenMP threads spin on the cores the other process is using (SGD "
            "ran up to 2x slower on 2 cores); use --reference same-process"
        )
    return requested


def minor_faults() -> int:
    """Minor page faults so far (``ru_minflt``; each a page the kernel mapped on first touch)."""
    return resource.getrusage(FAULTS_WHO).ru_minflt


def timed_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    pre: natgrad.Preconditioner | None,
    fused: bool,
    batch: Batch,
    clock: Callable[[], float],
) -> tuple[float, int]:
    """One step of :func:`run_steps` on ``batch`` (``pre=None``: plain SGD): its time by
    ``clock`` and its minor page faults."""
    before = minor_faults()
    (seconds,) = run_steps(model, opt, pre, fused, lambda: batch, 1, clock)
    return seconds, minor_faults() - before


def sgd_copy(
    build: Callable[[], nn.Module], state: dict[str, Tensor], lr: float
) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``build()`` with the weights ``state``, and its SGD optimiser (momentum 0.9)."""
    model = build()
    model.load_state_dict(state)
    return model, torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def reference_process(
    connection: Connection,
    build: Callable[[], nn.Module],
    state: bytes,
    lr: float,
    threads: int,
    clock: str,
) -> None:
    """The SGD reference in a process of its own: one step per pickled batch received,
    answered with its time and minor faults, until an empty message arrives. Tensors travel as
    plain pickles (copied into this process's own memory before the step is timed), not
    through ``multiprocessing``'s tensor sharing, which would move the sender's tensors into
    shared memory."""
    torch.set_num_threads(threads)
    model, opt = sgd_copy(build, pickle.loads(state), lr)
    while message := connection.recv_bytes():
        connection.send(timed_step(model, opt, None, False, pickle.loads(message), CLOCKS[clock]))


@contextmanager
def sgd_reference(
    build: Callable[[], nn.Module],
    state: dict[str, Tensor],
    lr: float,
    threads: int,
    clock: str,
    where: Literal["own-process", "same-process"],
) -> Iterator[Callable[[Batch], tuple[float, int]]]:
    """A plain SGD step on ``build()`` with a copy of the weights ``state``, as a function of
    the batch that returns the step's time (by ``clock``) and its minor page faults.

    ``where="same-process"``: the copy lives in this process. ``"own-process"``: in a child
    process that takes a step whenever it is sent a batch, so that its steps and the caller's
    still alternate (under the same load) but each has a heap of its own, as in a user's
    training process (module docstring, "Time"). ``build`` must be importable by name (a
    module-level function) for the child.
    """
    if where == "same-process":
        model, opt = sgd_copy(build, state, lr)
        yield lambda batch: timed_step(model, opt, None, False, batch, CLOCKS[clock])
        return
    context = multiprocessing.get_context("spawn")
    connection, child_end = context.Pipe()
    process = context.Process(
        target=reference_process,
        args=(child_end, build, pickle.dumps(state), lr, threads, clock),
    )
    process.start()
    child_end.close()  # the child's end lives in the child: its exit ends the pipe here

    def step(batch: Batch) -> tuple[float, int]:
        try:
            connection.send_bytes(pickle.dumps(batch))
            return connection.recv()
        except (EOFError, OSError) as error:
            process.join(timeout=5)
            raise RuntimeError(
                f"the SGD reference process ended (exit code {process.exitcode}); its "
                "traceback, if any, is above"
            ) from error

    try:
        yield step
    finally:
        try:
            connection.send_bytes(b"")
        except OSError:
            pass  # the child has gone already
        process.join(timeout=60)
        if process.is_alive():
            process.terminate()
            process.join()
        connection.close()


def max_rss_mib() -> float:
    """The process's resident-memory high-water mark ``ru_maxrss`` in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**2 if sys.platform == "darwin" else peak / 1024  # bytes / KiB


def worker(
    method: str,
    batch_size: int,
    steps: int,
    warmup: int,
    lr: float = LEARNING_RATE,
    train_steps: int = 0,
    threads: int = 2,
    clock: str = "wall",
    reference: Literal["own-process", "same-process"] | None = None,
) -> Row:
    """Measure one method in this process (and its SGD reference, here or in a child).

    Parameters
    ----------
    method
        A name of :data:`METHODS`.
    batch_size
        The number of datapoints per batch.
    steps
        The number of timed steps (of the method and of SGD each).
    warmup
        The number of untimed steps before the timed ones.
    lr
        The learning rate of the method's and of SGD's optimiser.
    train_steps
        Untimed training steps of the method after the memory phase, before timing.
    threads
        Torch's intra-op threads.
    clock
        A name of :data:`CLOCKS`.
    reference
        Where the SGD reference steps run (:func:`sgd_reference`); ``None``: as
        :func:`reference_place` chooses for ``threads``.

    Returns
    -------
    Row
        ``batch``, ``method``, ``ms`` and ``sgd_ms`` (medians of the interleaved timing;
        ``mean_ms``, ``sgd_mean_ms`` and ``mean_ratio`` their means, which count a method's
        occasional expensive steps, e.g. FishLeg's auxiliary ones, in proportion),
        ``ratio``, ``alone_ms`` (median of the memory phase's last ``steps`` steps, the method
        running alone), ``peak_mib`` (increase of ``ru_maxrss`` over the memory phase) and,
        for Kronecker methods, ``inversion_ms`` (one inversion of all factors).
    """
    torch.set_num_threads(threads)
    torch.manual_seed(1)
    timer = CLOCKS[clock]
    draw = random_batches(batch_size)
    model = make_model()
    opt, pre, fused = make_step(method, model, lr)

    # memory phase: the method alone (its warm-up and timed number of steps)
    baseline_mib = max_rss_mib()
    alone = run_steps(model, opt, pre, fused, draw, warmup + steps, timer)
    peak_increase_mib = max_rss_mib() - baseline_mib

    run_steps(model, opt, pre, fused, draw, train_steps)

    # timing phase: the method (already warm) and SGD on a copy of its weights, alternately
    method_times: list[float] = []
    sgd_times: list[float] = []
    state = model.state_dict()
    where = reference_place(reference, threads)
    with sgd_reference(make_model, state, lr, threads, clock, where) as sgd_step:
        for _ in range(warmup):
            sgd_step(draw())
        for _ in range(steps):
            batch = draw()  # the same batch for both
            sgd_times.append(sgd_step(batch)[0])
            method_times += run_steps(model, opt, pre, fused, lambda b=batch: b, 1, timer)
    row: Row = {
        "batch": batch_size,
        "method": method,
        "ms": 1e3 * statistics.median(method_times),
        "sgd_ms": 1e3 * statistics.median(sgd_times),
        "alone_ms": 1e3 * statistics.median(alone[warmup:] or alone),
        "peak_mib": peak_increase_mib,
        "mean_ms": 1e3 * statistics.mean(method_times),
        "sgd_mean_ms": 1e3 * statistics.mean(sgd_times),
        "clock": clock,
        "threads": torch.get_num_threads(),
        "reference": where,
    }
    row["ratio"] = row["ms"] / row["sgd_ms"]
    row["mean_ratio"] = row["mean_ms"] / row["sgd_mean_ms"]
    row["subnormals"] = subnormal_counts(model, pre)
    if isinstance(pre, KroneckerPreconditioner):
        inversions = []
        for _ in range(3):
            start = time.perf_counter()
            pre.invert_all()
            inversions.append(time.perf_counter() - start)
        row["inversion_ms"] = 1e3 * statistics.median(inversions)
    return row


def count_subnormals(tensors: list[Tensor | float | None]) -> int:
    """The number of subnormal entries (nonzero, below ``finfo.tiny`` in magnitude)."""
    count = 0
    for tensor in tensors:
        if isinstance(tensor, Tensor) and tensor.is_floating_point():
            tiny = torch.finfo(tensor.dtype).tiny
            count += int(((tensor != 0) & (tensor.abs() < tiny)).sum())
    return count


def subnormal_counts(model: nn.Module, pre: natgrad.Preconditioner | None) -> dict[str, int]:
    """Subnormal entries in the weights, their gradients and, for Kronecker methods, the factors
    and inverses after the timed steps: where subnormal arithmetic (slow on some CPUs) can come
    from."""
    params = list(model.parameters())
    counts = {
        "weights": count_subnormals(params),
        "grads": count_subnormals([param.grad for param in params]),
    }
    if isinstance(pre, KroneckerPreconditioner):
        factors = [*pre.input_factors.values(), *pre.grad_factors.values()]
        counts["factors"] = count_subnormals(factors)
        entries = [
            value for inverse in pre.inverses.values() for value in inverse.tensors().values()
        ]
        counts["inverses"] = count_subnormals(entries)
    return counts


def spawn_worker(script: str, arguments: list[str], identity: Row) -> Row:
    """Run ``script`` with ``arguments`` (its hidden ``--worker`` mode) in a fresh Python
    process and return the JSON row it prints last; a failing worker gives ``identity`` with
    an ``error`` entry instead of stopping the benchmark."""
    command = [sys.executable, script, *arguments]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        print(result.stderr, file=sys.stderr)
        return {**identity, "error": result.stderr.strip()[-2000:]}
    return json.loads(lines[-1])


def run_worker(
    method: str,
    batch_size: int,
    steps: int,
    warmup: int,
    lr: float,
    train_steps: int,
    threads: int = 2,
    clock: str = "wall",
    reference: str = "same-process",
) -> Row:
    """Run :func:`worker` in a fresh Python process and return its row (``reference``: as
    :func:`reference_place` returned it)."""
    arguments = [
        "--worker", method, "--batch-sizes", str(batch_size), "--steps", str(steps),
        "--warmup", str(warmup), "--lr", str(lr), "--train-steps", str(train_steps),
        "--threads", str(threads), "--clock", clock, "--reference", reference,
    ]  # fmt: skip
    return spawn_worker(__file__, arguments, {"batch": batch_size, "method": method})


def add_ratios(rows: list[Row]) -> None:
    """Add the memory ratio to SGD's and the time-goal verdict to every row, in place."""
    sgd_peak = {
        r["batch"]: r["peak_mib"] for r in rows if r["method"] == "sgd" and "error" not in r
    }
    for row in rows:
        if "error" in row:
            continue
        reference = sgd_peak.get(row["batch"])
        row["memory_ratio"] = None if not reference else row["peak_mib"] / reference
        goal = TIME_GOALS.get(row["method"].removesuffix("-fused"))
        row["time_goal"] = goal
        row["time_goal_met"] = None if goal is None else row["ratio"] <= goal


def format_table(rows: list[Row]) -> str:
    """The rows as a markdown table."""
    lines = [
        "| batch | method | ms/step | SGD ms/step (same run) | ratio | goal "
        "| peak RSS increase MiB | memory ratio vs SGD | inversion ms | subnormals |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "error" in row:
            last = row["error"].splitlines()[-1] if row["error"] else "failed"
            lines.append(f"| {row['batch']} | {row['method']} | failed: {last} | | | | | | | |")
            continue
        goal = row["time_goal"]
        verdict = (
            "" if goal is None else f"<= {goal:g} {'ok' if row['time_goal_met'] else 'MISSED'}"
        )
        memory = row["memory_ratio"]
        memory_text = "" if memory is None else f"{memory:.2f}"
        if memory is not None and memory > MEMORY_GOAL:
            memory_text += " (> 1.5)"
        inversion = f"{row['inversion_ms']:.0f}" if "inversion_ms" in row else ""
        lines.append(
            f"| {row['batch']} | {row['method']} | {row['ms']:.1f} | {row['sgd_ms']:.1f} "
            f"| {row['ratio']:.2f} | {verdict} | {row['peak_mib']:.0f} | {memory_text} "
            f"| {inversion} | {sum(row['subnormals'].values())} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Parse the command line; run the workers (or, with ``--worker``, be one)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[32, 100])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--lr", type=float, default=LEARNING_RATE, help="every optimiser's")
    parser.add_argument("--train-steps", type=int, default=0, help="steps before timing")
    parser.add_argument("--threads", type=int, default=2, choices=(1, 2))
    parser.add_argument("--clock", default="wall", choices=sorted(CLOCKS))
    parser.add_argument(
        "--reference", choices=REFERENCES,
        help="where the SGD reference steps run (default: own-process at one thread, "
        "same-process at two; module docstring, 'Time')",
    )  # fmt: skip
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.train_steps < 0:
        parser.error("--steps must be >= 1, --warmup and --train-steps >= 0")
    try:
        args.reference = reference_place(args.reference, args.threads)
    except ValueError as error:
        parser.error(str(error))
    if args.worker:
        row = worker(
            args.worker, args.batch_sizes[0], args.steps, args.warmup, args.lr, args.train_steps,
            args.threads, args.clock, args.reference,
        )  # fmt: skip
        print(json.dumps(row))
        return
    methods = ["sgd", *(m for m in dict.fromkeys(args.methods) if m != "sgd")]
    load_before = os.getloadavg()[0]
    rows = []
    for batch_size in args.batch_sizes:
        for method in methods:
            arguments = (
                args.steps, args.warmup, args.lr, args.train_steps, args.threads, args.clock,
                args.reference,
            )  # fmt: skip
            rows.append(run_worker(method, batch_size, *arguments))
            status = "FAILED" if "error" in rows[-1] else "done"
            print(f"{method} at batch {batch_size}: {status}", file=sys.stderr, flush=True)
    add_ratios(rows)
    load = (load_before, os.getloadavg()[0])
    print(
        f"Median ms/step ({CLOCK_NAMES[args.clock]}), torch threads = {args.threads}, "
        f"lr {args.lr:g}, "
        f"{args.steps} timed steps after {args.warmup} warm-up and {args.train_steps} training "
        f"steps; SGD timed alternately ({args.reference.replace('-', ' ')}). "
        f"1-minute load average {load[0]:.1f} at the start, {load[1]:.1f} at the end "
        f"({os.cpu_count()} CPUs).\n"
    )
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(rows, handle, indent=1)


if __name__ == "__main__":
    main()
