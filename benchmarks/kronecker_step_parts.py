"""The parts of a KFAC / FOOF step that neither folds nor inverts, against their flop floor.

Run ``python benchmarks/kronecker_step_parts.py`` (about two minutes on one core). On the MLP
784-1000-1000-1000-10 of ``benchmarks/step_time.py`` (float32, one torch thread), for
``kfac-T100-fused`` and ``foof-T100-fused`` (``inv_period=100``, factors folded in the 10
steps before each inversion, ``pre.backward(loss)``) at batch 32 and 100, after 35 training
steps (so the timed steps 36-65 neither fold nor invert), it prints with the thread's CPU
time (``time.thread_time``, medians of 30 steps interleaved with an SGD step on a copy of the
weights):

* the phases of the SGD step and of the method's step (forward and loss, backward,
  ``pre.step``, ``opt.step``);
* the application alone (every layer's inverse applied to that step's gradient, as
  ``pre.step`` does it), so that ``pre.step`` minus the application is the step's bookkeeping
  (checks, capture, the blocks);
* the floor by multiply-adds: an SGD step is the forward pass, the input gradients of the
  layers above the first and the weight gradients; the fused step replaces the weight
  gradients with the application, per layer ``N (d_out^2 + d_in^2 + d_out d_in)`` for KFAC
  and ``N (d_in^2 + d_out d_in)`` for FOOF in the low-rank form (the last layer's
  ``d_out = 10`` takes the dense form, ``N d_out d_in + d_out d_in^2``; bias columns
  left out).

A benchmark, not a test: it checks nothing.
"""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from natgrad.precond.layer_gradient import LayerGradient
from step_time import WIDTHS, make_model, make_step, random_batches, run_steps

PHASES = ("forward", "backward", "pre.step", "opt.step", "total")


def timed_step(model, opt, pre, draw) -> dict[str, float]:
    """One step's phases in ms of thread CPU time (``pre=None``: SGD with ``loss.backward()``)."""
    inputs, targets = draw()
    clock = time.thread_time
    start = clock()
    opt.zero_grad()
    logits = model(inputs)
    loss = F.cross_entropy(logits, targets)
    forward = clock()
    if pre is None:
        loss.backward()
    else:
        pre.backward(loss)
    backward = clock()
    if pre is not None:
        pre.step(logits)
    stepped = clock()
    opt.step()
    end = clock()
    parts = (forward - start, backward - forward, stepped - backward, end - stepped, end - start)
    return {name: 1e3 * value for name, value in zip(PHASES, parts, strict=True)}


def median_ms(function: Callable[[], object], repeats: int = 30) -> float:
    """Median thread CPU time of ``function()`` in ms, after one untimed call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        function()
        times.append(time.thread_time() - start)
    return 1e3 * statistics.median(times)


def floor_ratio(method: str, batch: int) -> float:
    """The fused step's multiply-adds over an SGD step's (module docstring)."""
    layers = list(itertools.pairwise(WIDTHS))
    forward = sum(d_in * d_out for d_in, d_out in layers)
    input_grads = sum(d_in * d_out for d_in, d_out in layers[1:])
    application = 0
    for d_in, d_out in layers:
        left = d_out * d_out if method == "kfac" else 0
        low_rank = left + d_in * d_in + d_out * d_in
        dense = d_out * d_in + (d_out * d_in * d_in + d_out * d_out * d_in * (left > 0)) / batch
        application += min(low_rank, dense)
    return (forward + input_grads + application) / (forward + input_grads + forward)


def measure(method: str, batch: int) -> None:
    """Print the parts of ``method``'s steps at one batch size."""
    draw = random_batches(batch)
    model = make_model()
    opt, pre, _ = make_step(method, model)
    run_steps(model, opt, pre, True, draw, 35)
    reference = make_model()
    reference.load_state_dict(model.state_dict())
    sgd_opt, _, _ = make_step("sgd", reference)
    run_steps(reference, sgd_opt, None, False, draw, 3)
    rows: dict[str, list[dict[str, float]]] = {"sgd": [], "method": []}
    for _ in range(30):
        rows["sgd"].append(timed_step(reference, sgd_opt, None, draw))
        rows["method"].append(timed_step(model, opt, pre, draw))
    medians = {
        key: {name: statistics.median(row[name] for row in steps) for name in PHASES}
        for key, steps in rows.items()
    }

    captured = {}
    precondition = pre._precondition

    def capture(batches, factor, per_sample_output_grad) -> None:
        captured.update(batches=batches, factor=factor)
        precondition(batches, factor, per_sample_output_grad)

    pre._precondition = capture
    timed_step(model, opt, pre, draw)
    pre._precondition = precondition

    def application() -> None:
        for block in captured["batches"]:
            buffer = block.grad_buffer()
            gradient = LayerGradient.of(block, captured["factor"])
            block.write_grad(*pre.inverses[block.name].apply(gradient, buffer), buffer)

    with torch.no_grad():
        applied = median_ms(application)
    sgd, own = medians["sgd"], medians["method"]
    parts_floor = sgd["total"] + applied + own["backward"] - sgd["backward"]
    print(
        f"{method} batch {batch}: SGD {sgd['total']:.1f} ms (forward {sgd['forward']:.1f}, "
        f"backward {sgd['backward']:.1f}, opt {sgd['opt.step']:.1f}); method "
        f"{own['total']:.1f} ms (forward {own['forward']:.1f}, backward {own['backward']:.1f}, "
        f"pre.step {own['pre.step']:.1f} = application {applied:.1f} + bookkeeping "
        f"{own['pre.step'] - applied:.1f}, opt {own['opt.step']:.1f})"
    )
    print(
        f"  ratio {own['total'] / sgd['total']:.2f}; floor by multiply-adds "
        f"{floor_ratio(method.split('-')[0], batch):.2f}; SGD + application - SGD's backward "
        f"+ the fused backward: {parts_floor / sgd['total']:.2f}"
    )


def main() -> None:
    torch.set_num_threads(1)
    for batch in (32, 100):
        for method in ("kfac-T100-fused", "foof-T100-fused"):
            measure(method, batch)


if __name__ == "__main__":
    main()
