"""R11 (Shrestha 2023, Fig. 5, sec. 4.4): time and memory of exact, blockwise and TENGraD NGD
vs SGD.

Shrestha 2023 compares the time and memory of exact NGD, block-diagonal ("Blockwise") NGD, TENGraD
and SGD on networks whose hidden layers have 20 units, as the parameter count ``P`` grows, and
states that exact NGD (``O(P^2)`` space, ``O(P^3)`` time) grows too fast for deep networks while
TENGraD "scales in a similar fashion to the SGD method". Every NGD method there uses the damped
empirical Fisher ``F = (1/m) J^T J + λI`` of the mini-batch (Shrestha 2023, eq. 36-37).

Setup (what the paper leaves unstated is chosen here): MLPs ``20 - 20 x depth - 10`` (tanh,
biases, float32) on random data (``x ~ randn``, labels uniform in ``0..9``, a fresh batch every
step, drawn outside the timed region), cross-entropy with mean reduction, batch 128 (Shrestha 2023's
batch), damping ``λ = 1e-3`` and plain SGD steps (learning rate ``1e-4``, no momentum: Shrestha 2023
uses none) for every method. Depth 1, 2, 4, 8, 16 gives ``P = 420 depth + 210`` = 630 ... 6930.
The methods, each a full training step (forward, backward, direction, ``opt.step``):

* ``exact NGD (dense)``: :func:`dense_ngd_direction` with ``structure="full"``, the paper's exact
  NGD written out: per-sample gradients ``J`` (``N x P``, by ``torch.func``), the ``P x P``
  matrix ``J^T J / N + λI`` and its Cholesky solve with the mean gradient, in float32. It is
  skipped above ``dense_max_params`` parameters (one step at ``P = 6930`` already takes seconds).
* ``blockwise NGD (dense)``: the same with one ``d_l x d_l`` block per layer (weight and bias).
* ``TENGraD``: :class:`natgrad.TENGraD`, the same block-diagonal update by Woodbury per layer
  from the layer's inputs and output gradients (Shrestha 2023, eq. 39-43), one ``N x N`` solve per
  layer.
* ``NGD (natgrad, Woodbury)``: ``natgrad.NGD(fisher="empirical", structure="full")``, the same
  update as exact NGD (the tests check both equalities to 1e-9 in float64), solved in the
  ``N``-dimensional datapoint space: an extra row showing that exact NGD need not pay the dense
  cost. It is not part of the paper's claim, so no check reads it.
* ``SGD``: the plain gradient.

Time: for every depth and seed, one model per method (the same initialisation) takes 2 warm-up
steps and then ``steps`` timed steps (default 5), the methods taking turns on the same batch
(SGD, TENGraD, NGD, blockwise, exact, SGD, ...), so all see the same load from the machine. The
time of a method at a depth is the median over seeds of its median wall-clock step time
(``time.perf_counter``), all in this process; seeds change the initialisation and the data, so
they repeat the measurement. Its ratio to SGD divides by SGD's time at the same depth. Torch
runs on one thread during the measurement (restored after): the layers are 20 wide, and with
two threads on a machine whose two cores are busy with other work a step waits at OpenMP
barriers (a 1 ms SGD step took 145 ms that way).

Memory (the approach of ``benchmarks/step_time.py``): for each (method, depth), a fresh spawned
process (one torch thread) builds the model and the method with the first seed, records the
resident-memory high-water mark, runs 3 steps and reports the increase of the mark in MiB. The
mark is ``VmHWM`` of ``/proc/self/status`` on Linux rather than ``ru_maxrss``, which in a
spawned process starts at the parent's resident size (see :func:`high_water_mib`). It
includes one-off costs (library pages first touched by a step), the same for every method.
Next to it, the analytic size of the curvature objects each method holds
(:func:`curvature_bytes`, float32 entries, natgrad's ``N x N`` systems in float64):
``P^2 + N P`` for exact NGD (the matrix and the per-sample gradients; its Cholesky factor is another
``P^2``), ``sum_l d_l^2 + N P`` blockwise, ``sum_l (N^2 + N (d_in,l + d_out,l))`` for TENGraD
(one Gram and the rows ``A``, ``E`` per layer) and ``N^2 + sum_l N (d_in,l + d_out,l)`` for
natgrad's NGD.

Checks, fixed before any run (slopes are least-squares fits of ``log`` value on ``log P``,
:func:`loglog_slope`; "common depths" are those where exact NGD was measured):

1. exact NGD's time grows faster with ``P`` than TENGraD's: its log-log slope of step time,
   over the common depths, is larger;
2. exact NGD's memory grows faster than TENGraD's: the same for the measured peak-RSS increase
   (not the analytic bytes, whose slopes follow from their formulas);
3. TENGraD scales like SGD: its log-log slope of step time over all depths is within
   :data:`SCALING_TOLERANCE` (0.5) of SGD's (:func:`scales_like`);
4. blockwise NGD is cheaper than exact NGD at the largest common depth: lower step time and
   lower peak-RSS increase;
5. TENGraD is cheaper to compute than blockwise NGD (the paper: "drastically reduced from the
   Blockwise NGD"): lower step time at the largest depth.

The default run took 188 s and 214 s (two runs) on two cores shared with two other busy
processes (load average 4-5); ``full=True`` adds depths 32 and 64, 20 timed steps and exact NGD
up to 14,000 parameters (depth 32: about 30 s per step), which takes much longer.
"""

from __future__ import annotations

import itertools
import math
import multiprocessing
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

import natgrad
from natgrad.lab import models
from natgrad.lab.plotting import pyplot
from natgrad.lab.reproduce.finding import Finding
from natgrad.lab.runner import torch_threads

INPUTS = 20
CLASSES = 10
WIDTH = 20
DAMPING = 1e-3
LEARNING_RATE = 1e-4
WARMUP_STEPS = 2
MEMORY_STEPS = 3
SCALING_TOLERANCE = 0.5
METHODS = {
    "sgd": "SGD",
    "tengrad": "TENGraD",
    "ngd_woodbury": "NGD (natgrad, Woodbury)",
    "blockwise_dense": "blockwise NGD (dense)",
    "exact_dense": "exact NGD (dense)",
}
DEFAULTS = {
    False: {"depths": (1, 2, 4, 8, 16), "steps": 5, "dense_max_params": 8000},
    True: {"depths": (1, 2, 4, 8, 16, 32, 64), "steps": 20, "dense_max_params": 14000},
}

Batch = tuple[Tensor, Tensor]
Step = Callable[[Batch], None]


Job = TypeVar("Job")
Result = TypeVar("Result")


def cost_mlp(depth: int, seed: int) -> nn.Sequential:
    """The MLP ``20 - 20 x depth - 10`` with tanh (Shrestha 2023, Fig. 5: hidden layers of 20).

    Parameters
    ----------
    depth
        The number of hidden layers.
    seed
        Seed of the initialisation; the same seed gives an identical model.

    Returns
    -------
    nn.Sequential
        The model, in the default dtype.
    """
    torch.manual_seed(seed)
    return models.mlp(INPUTS, CLASSES, (WIDTH,) * depth, activation="tanh")


def random_batches(batch_size: int, seed: int) -> Callable[[], Batch]:
    """A source of fresh random batches: ``x ~ randn(batch_size, 20)``, labels in ``0..9``."""
    generator = torch.Generator().manual_seed(seed)

    def draw() -> Batch:
        inputs = torch.randn(batch_size, INPUTS, generator=generator)
        return inputs, torch.randint(0, CLASSES, (batch_size,), generator=generator)

    return draw


def dense_ngd_direction(
    model: nn.Module, inputs: Tensor, targets: Tensor, damping: float, structure: str = "full"
) -> Tensor:
    """Dense reference: ``(J^T J / N + λI)^{-1} ∇L`` with ``J`` materialised (Shrestha 2023,
    eq. 36-37).

    This is what Shrestha 2023 calls exact NGD (``structure="full"``, one ``P x P`` system) and
    Blockwise NGD (``structure="layer"``, one ``d_l x d_l`` system per module): the per-sample
    gradients of the cross-entropy (mean reduction) are formed by ``torch.func``, the damped
    empirical Fisher of the batch is formed explicitly and solved by Cholesky in the model's
    dtype. It is the update of ``natgrad.NGD(fisher="empirical", structure=structure)``.

    Parameters
    ----------
    model
        The model; its forward pass returns logits ``(N, C)``.
    inputs, targets
        The batch (class indices as targets).
    damping
        ``λ > 0``.
    structure
        ``"full"`` or ``"layer"``.

    Returns
    -------
    Tensor
        The flat direction ``Δ``, in the order of ``model.parameters()``.
    """
    params = {name: param.detach() for name, param in model.named_parameters()}

    def sample_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.cross_entropy(functional_call(model, params, (x.unsqueeze(0),)), y.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, inputs, targets)
    jacobian = torch.cat([g.reshape(inputs.shape[0], -1) for g in per_sample.values()], dim=1)
    directions = []
    for columns in _blocks(model, structure):
        rows = jacobian[:, columns]
        fisher = rows.T @ rows / inputs.shape[0]
        fisher.diagonal().add_(damping)
        factor = torch.linalg.cholesky(fisher)
        directions.append(torch.cholesky_solve(rows.mean(dim=0).unsqueeze(1), factor)[:, 0])
    return torch.cat(directions)


def _blocks(model: nn.Module, structure: str) -> list[slice]:
    """Column ranges of the flat parameter vector: all of it, or one per module."""
    if structure not in ("full", "layer"):
        raise ValueError(f"unknown structure={structure!r}: choose 'full' or 'layer'")
    sizes = [sum(p.numel() for p in module.parameters(recurse=False)) for module in model.modules()]
    sizes = [size for size in sizes if size]
    if structure == "full":
        return [slice(0, sum(sizes))]
    ends = list(itertools.accumulate(sizes))
    return [slice(end - size, end) for size, end in zip(sizes, ends, strict=True)]


def make_step(method: str, model: nn.Module) -> Step:
    """One training step of ``method`` (a key of :data:`METHODS`) on ``model``.

    Parameters
    ----------
    method
        The method.
    model
        The model it trains (natgrad's preconditioners hook into it).

    Returns
    -------
    Step
        A function taking a batch and applying one step (plain SGD on the direction).
    """
    opt = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    if method in ("blockwise_dense", "exact_dense"):
        structure = "full" if method == "exact_dense" else "layer"

        def dense_step(batch: Batch) -> None:
            direction = dense_ngd_direction(model, *batch, DAMPING, structure)
            offset = 0
            for param in model.parameters():
                param.grad = direction[offset : offset + param.numel()].view_as(param)
                offset += param.numel()
            opt.step()

        return dense_step
    pre = {
        "sgd": None,
        "tengrad": lambda: natgrad.TENGraD(model, damping=DAMPING),
        "ngd_woodbury": lambda: natgrad.NGD(
            model, fisher="empirical", structure="full", damping=DAMPING
        ),
    }[method]
    preconditioner = None if pre is None else pre()

    def step(batch: Batch) -> None:
        inputs, targets = batch
        opt.zero_grad()
        logits = model(inputs)
        F.cross_entropy(logits, targets).backward()
        if preconditioner is not None:
            preconditioner.step(logits)
        opt.step()

    return step


def num_params(depth: int) -> int:
    """``P`` of :func:`cost_mlp` at ``depth``: ``420 depth + 210``."""
    widths = (INPUTS, *(WIDTH,) * depth, CLASSES)
    return sum((a + 1) * b for a, b in itertools.pairwise(widths))


def curvature_bytes(method: str, depth: int, batch_size: int) -> int:
    """Analytic size of the curvature objects ``method`` holds in one step (see the module).

    Float32 entries (4 bytes), natgrad's ``N x N`` systems in float64 (8 bytes); SGD holds none.
    """
    widths = (INPUTS, *(WIDTH,) * depth, CLASSES)
    layers = list(itertools.pairwise(widths))
    n, p = batch_size, num_params(depth)
    rows = sum(n * (d_in + d_out) for d_in, d_out in layers)
    entries = {
        "sgd": 0,
        "exact_dense": 4 * (p * p + n * p),
        "blockwise_dense": 4 * (sum(((d_in + 1) * d_out) ** 2 for d_in, d_out in layers) + n * p),
        "tengrad": 8 * n * n * len(layers) + 4 * rows,
        "ngd_woodbury": 8 * n * n + 4 * rows,
    }
    return entries[method]


def loglog_slope(sizes: Sequence[float], values: Sequence[float]) -> float:
    """Least-squares slope of ``log value`` on ``log size``: ``b`` in ``value ~ size^b``.

    NaN when fewer than two distinct sizes are given or a value is not positive and finite
    (a check reading a NaN slope fails).
    """
    if len(sizes) != len(values):
        raise ValueError(f"got {len(sizes)} sizes but {len(values)} values")
    if len(set(sizes)) < 2 or not all(math.isfinite(v) and v > 0 for v in values):
        return math.nan
    xs = [math.log(s) for s in sizes]
    ys = [math.log(v) for v in values]
    x_mean, y_mean = statistics.fmean(xs), statistics.fmean(ys)
    covariance = sum((x - x_mean) * (y - y_mean) for x, y in zip(xs, ys, strict=True))
    return covariance / sum((x - x_mean) ** 2 for x in xs)


def scales_like(slope: float, reference: float, tolerance: float = SCALING_TOLERANCE) -> bool:
    """Check 3's rule: ``|slope - reference| <= tolerance`` (False when either is NaN)."""
    return abs(slope - reference) <= tolerance


def _time_depth(
    depth: int, seed: int, batch_size: int, steps: int, methods: Sequence[str]
) -> dict[str, float]:
    """Median step time in seconds of each method at one depth and seed, taking turns."""
    draw = random_batches(batch_size, seed)
    runs = {method: make_step(method, cost_mlp(depth, seed)) for method in methods}
    times: dict[str, list[float]] = {method: [] for method in methods}
    for index in range(WARMUP_STEPS + steps):
        batch = draw()
        for method, step in runs.items():
            start = time.perf_counter()
            step(batch)
            if index >= WARMUP_STEPS:
                times[method].append(time.perf_counter() - start)
    return {method: statistics.median(values) for method, values in times.items()}


def high_water_mib() -> float:
    """This process's resident-memory high-water mark in MiB.

    ``VmHWM`` of ``/proc/self/status`` where it exists (Linux), else ``ru_maxrss``. On Linux
    ``ru_maxrss`` of a freshly spawned process starts at its parent's resident size at the fork
    (a child of a 600 MiB parent reads 600 MiB while its own peak is 220 MiB), which would hide
    every increase below that; ``VmHWM`` is the same kernel high-water mark for this process
    alone.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # KiB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024**2 if sys.platform == "darwin" else peak / 1024  # bytes / KiB


def resident_mib(field: str) -> float:
    """``VmRSS`` (current) or ``VmHWM`` (high-water mark) of this process in MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status: this measurement needs Linux")


def peak_over(run: Callable[[], Result]) -> tuple[Result, float]:
    """``run()``'s result and its peak resident memory over the memory before it, in MiB.

    Linux only: resets the ``VmHWM`` high-water mark to the current resident size through
    ``/proc/self/clear_refs`` before the call, so a phase of a process is measured alone.
    """
    before = resident_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    result = run()
    return result, resident_mib("VmHWM") - before


def _memory_worker(job: tuple[str, int, int, int]) -> float:
    """In a fresh process: the increase of the high-water mark (MiB) over the method's steps."""
    method, depth, batch_size, seed = job
    torch.set_num_threads(1)
    draw = random_batches(batch_size, seed)
    batches = [draw() for _ in range(MEMORY_STEPS)]
    step = make_step(method, cost_mlp(depth, seed))
    baseline = high_water_mib()
    for batch in batches:
        step(batch)
    return high_water_mib() - baseline


def in_fresh_processes(worker: Callable[[Job], float], jobs: Sequence[Job]) -> list[float]:
    """``worker(job)`` for every job, each in its own spawned process (two at a time), so a
    high-water mark read there belongs to that job alone."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(processes=min(2, os.cpu_count() or 1), maxtasksperchild=1) as pool:
        return pool.map(worker, jobs, chunksize=1)


def _plot(rows: list[dict[str, Any]], path: Path) -> str:
    """Log-log step time, peak-RSS increase and curvature bytes vs ``P``, a line per method."""
    plt = pyplot()
    panels = (
        ("ms", "median step time (ms)"),
        ("peak_mib", "peak RSS increase (MiB)"),
        ("curvature_bytes", "curvature objects, bytes (analytic; SGD: none)"),
    )
    figure, axes = plt.subplots(1, len(panels), figsize=(16, 4.5))
    for axis, (key, title) in zip(axes, panels, strict=True):
        for index, (method, label) in enumerate(METHODS.items()):
            points = [
                (r["params"], r[key])
                for r in rows
                if r["method"] == method and r[key] is not None and r[key] > 0
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                axis.plot(xs, ys, marker="o", color=f"C{index}", label=label)
        axis.set(xscale="log", yscale="log", xlabel="parameters P", title=title)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize="small")
    figure.suptitle("Cost vs parameter count, hidden layers of 20 units (Shrestha 2023, Fig. 5)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return str(path)


def _time_cell(row: dict[str, Any]) -> str:
    if row["ms"] is None:
        return "skipped"
    return f"{row['ms']:.3g} ({row['ratio_to_sgd']:.3g}x)"


def _memory_cell(row: dict[str, Any]) -> str:
    peak = "skipped" if row["peak_mib"] is None else f"{row['peak_mib']:.1f}"
    return f"{peak} ({row['curvature_bytes'] / 2**20:.3g})"


def _method_lines(rows: list[dict[str, Any]], cell: Callable[[dict[str, Any]], str]) -> list[str]:
    """One report line per method: ``cell`` of its rows, in the order of the depths."""
    return [
        f"  {label}: " + ", ".join(cell(r) for r in rows if r["method"] == method)
        for method, label in METHODS.items()
    ]


def r11_cost_scaling(
    output: Path,
    seeds: Sequence[int] = (0, 1, 2),
    full: bool = False,
    depths: Sequence[int] | None = None,
    batch_size: int = 128,
    steps: int | None = None,
    dense_max_params: int | None = None,
) -> Finding:
    """Shrestha 2023, Fig. 5 (sec. 4.4): exact NGD's time and memory grow fast with ``P``; TENGraD's
    grow like SGD's and stay below Blockwise NGD's.

    Setup, measurements and the five checks are stated in the module docstring.

    Parameters
    ----------
    output
        Directory of the figure ``R11.png``.
    seeds
        Seeds of initialisation and data; each repeats the timing (median over seeds). Memory
        is measured once, with the first seed (it does not depend on the values).
    full
        Chooses the defaults of ``depths``, ``steps`` and ``dense_max_params`` in
        :data:`DEFAULTS`.
    depths
        Numbers of hidden layers of 20 units.
    batch_size
        ``N``, 128 in Shrestha 2023.
    steps
        Timed steps per method, depth and seed (after 2 warm-up steps).
    dense_max_params
        Exact NGD (dense) is skipped, and recorded as skipped, above this parameter count.

    Returns
    -------
    Finding
        Claim ``"R11"`` with the five checks; ``numbers`` holds every row (time per seed,
        ratio to SGD, peak-memory increase, analytic bytes, skip reason) and the slopes.
    """
    settings = DEFAULTS[full]
    depths = sorted(set(depths or settings["depths"]))
    steps = steps or settings["steps"]
    dense_max_params = dense_max_params or settings["dense_max_params"]
    if not seeds or steps < 1 or batch_size < 1 or depths[0] < 1:
        raise ValueError("need at least one seed, steps >= 1, batch_size >= 1 and depths >= 1")
    load_before = os.getloadavg()[0]
    measured = {
        depth: [m for m in METHODS if m != "exact_dense" or num_params(depth) <= dense_max_params]
        for depth in depths
    }
    per_seed: dict[tuple[str, int], list[float]] = {}
    with torch_threads(1):
        for depth in depths:
            for seed in seeds:
                medians = _time_depth(depth, seed, batch_size, steps, measured[depth])
                for method, seconds in medians.items():
                    per_seed.setdefault((method, depth), []).append(1e3 * seconds)
    jobs = [(m, d, batch_size, seeds[0]) for d in depths for m in measured[d]]
    peaks = dict(
        zip([(m, d) for m, d, _, _ in jobs], in_fresh_processes(_memory_worker, jobs), strict=True)
    )
    load_after = os.getloadavg()[0]

    rows: list[dict[str, Any]] = []
    for depth in depths:
        sgd_ms = statistics.median(per_seed[("sgd", depth)])
        for method in METHODS:
            p = num_params(depth)
            row: dict[str, Any] = {"method": method, "depth": depth, "params": p}
            row["curvature_bytes"] = curvature_bytes(method, depth, batch_size)
            if method not in measured[depth]:
                reason = f"P = {p} > dense_max_params = {dense_max_params} (O(P^3) per step)"
                empty = dict.fromkeys(("ms", "ms_per_seed", "ratio_to_sgd", "peak_mib"))
                rows.append({**row, **empty, "skipped": reason})
                continue
            ms = statistics.median(per_seed[(method, depth)])
            rows.append(
                {
                    **row,
                    "ms": ms,
                    "ms_per_seed": per_seed[(method, depth)],
                    "ratio_to_sgd": ms / sgd_ms,
                    "peak_mib": peaks[(method, depth)],
                    "skipped": None,
                }
            )

    def series(method: str, key: str, among: Sequence[int]) -> tuple[list[int], list[float]]:
        chosen = [
            r for r in rows if r["method"] == method and r["depth"] in among and r[key] is not None
        ]
        return [r["params"] for r in chosen], [r[key] for r in chosen]

    def cell(method: str, depth: int) -> dict[str, Any]:
        return next(r for r in rows if r["method"] == method and r["depth"] == depth)

    common = [d for d in depths if "exact_dense" in measured[d]]
    slopes = {
        "time_measured_depths": {m: loglog_slope(*series(m, "ms", depths)) for m in METHODS},
        "time_common_depths": {m: loglog_slope(*series(m, "ms", common)) for m in METHODS},
        "peak_common_depths": {m: loglog_slope(*series(m, "peak_mib", common)) for m in METHODS},
    }
    time_common, peak_common = slopes["time_common_depths"], slopes["peak_common_depths"]
    time_all = slopes["time_measured_depths"]
    checks: dict[str, bool] = {
        "exact NGD's step time grows faster with P than TENGraD's (log-log slope over the "
        "common depths)": time_common["exact_dense"] > time_common["tengrad"],
        "exact NGD's peak-RSS increase grows faster with P than TENGraD's (log-log slope over "
        "the common depths)": peak_common["exact_dense"] > peak_common["tengrad"],
        f"TENGraD scales like SGD: |slope of time vs P - SGD's| <= {SCALING_TOLERANCE} over "
        "all depths": scales_like(time_all["tengrad"], time_all["sgd"]),
    }
    if common:
        largest = common[-1]
        exact, blockwise = cell("exact_dense", largest), cell("blockwise_dense", largest)
        checks[
            f"blockwise NGD cheaper than exact NGD at depth {largest}: lower step time and "
            "peak-RSS increase"
        ] = blockwise["ms"] < exact["ms"] and blockwise["peak_mib"] < exact["peak_mib"]
    else:
        checks["blockwise NGD cheaper than exact NGD (no depth within dense_max_params)"] = False
    checks[f"TENGraD's step time below blockwise NGD's at depth {depths[-1]}"] = (
        cell("tengrad", depths[-1])["ms"] < cell("blockwise_dense", depths[-1])["ms"]
    )

    lines = [
        "P by depth: " + ", ".join(f"{d} -> {num_params(d)}" for d in depths),
        f"median ms/step (x SGD), batch {batch_size}, median over seeds {list(seeds)} of "
        f"{steps} steps after {WARMUP_STEPS} warm-up, by depth:",
        *_method_lines(rows, _time_cell),
        f"peak RSS increase over {MEMORY_STEPS} steps, MiB (analytic curvature MiB), by depth:",
        *_method_lines(rows, _memory_cell),
        "log-log slopes vs P (time, depths measured / time, common depths / peak, common): "
        + "; ".join(
            f"{label} {time_all[m]:.2f} / {time_common[m]:.2f} / {peak_common[m]:.2f}"
            for m, label in METHODS.items()
        ),
        f"exact NGD skipped above {dense_max_params} parameters; 1-minute load average "
        f"{load_before:.1f} before, {load_after:.1f} after ({os.cpu_count()} CPUs, one torch "
        "thread)",
    ]
    numbers = {
        "settings": {
            "depths": depths,
            "seeds": list(seeds),
            "batch_size": batch_size,
            "steps": steps,
            "warmup_steps": WARMUP_STEPS,
            "memory_steps": MEMORY_STEPS,
            "damping": DAMPING,
            "learning_rate": LEARNING_RATE,
            "width": WIDTH,
            "inputs": INPUTS,
            "classes": CLASSES,
            "dense_max_params": dense_max_params,
            "threads": 1,
            "cpus": os.cpu_count(),
        },
        "rows": rows,
        "slopes": slopes,
        "load_average": [load_before, load_after],
    }
    return Finding(
        "R11",
        "time and memory vs P: exact NGD grows fast, TENGraD like SGD (Shrestha 2023, Fig. 5)",
        checks,
        lines,
        numbers,
        [_plot(rows, Path(output) / "R11.png")],
    )


__all__ = [
    "DEFAULTS",
    "METHODS",
    "SCALING_TOLERANCE",
    "cost_mlp",
    "curvature_bytes",
    "dense_ngd_direction",
    "high_water_mib",
    "in_fresh_processes",
    "loglog_slope",
    "make_step",
    "num_params",
    "peak_over",
    "r11_cost_scaling",
    "random_batches",
    "scales_like",
]
