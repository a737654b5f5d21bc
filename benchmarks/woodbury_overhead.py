"""The fixed per-step cost of the fused Woodbury steps (EF, iEF) beyond an SGD step.

Purpose
-------
On a model whose arithmetic is negligible, a 4-layer MLP of width 8 (batch 32, 4 classes,
cross-entropy with mean reduction), an EF or iEF step costs what natgrad's bookkeeping costs:
the capture hooks, the checks and the Python around the small torch calls of ``pre.step``.
That cost is paid again on every model, whatever its size (issue 18: about 12-15% of an SGD
step of the benchmark MLP 784-1000-1000-1000-10 at batch 32).

Run ``python benchmarks/woodbury_overhead.py`` (under a minute). One torch thread; SGD, fused
EF and fused iEF steps (``pre.backward(loss)``, ``pre.step(logits)``, ``opt.step()``) are
timed round-robin in one process by the thread's CPU time (``time.thread_time``), ``--steps``
each after 200 untimed ones; the medians of the forward pass, the backward pass, ``pre.step``
and the whole step are printed, and each method's extra time over SGD. A benchmark, not a
test: it checks nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import natgrad

WARMUP = 200


def make_model() -> nn.Module:
    """The width-8 MLP (the same weights for every method)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
        nn.Linear(8, 4),
    )  # fmt: skip


def main() -> None:
    """Time the methods round-robin and print the medians."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1300, help="timed steps per method")
    args = parser.parse_args()
    torch.set_num_threads(1)
    inputs, targets = torch.randn(32, 8), torch.randint(0, 4, (32,))
    methods = {}
    for name in ("sgd", "empirical", "ief"):
        model = make_model()
        pre = None if name == "sgd" else natgrad.NGD(model, fisher=name, damping=1e-3)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        methods[name] = (
            model,
            pre,
            opt,
            {"forward": [], "backward": [], "pre.step": [], "step": []},
        )
    for index in range(WARMUP + args.steps):
        for model, pre, opt, times in methods.values():
            start = time.thread_time()
            opt.zero_grad()
            logits = model(inputs)
            loss = F.cross_entropy(logits, targets)
            forward = time.thread_time()
            pre.backward(loss) if pre is not None else loss.backward()
            backward = time.thread_time()
            if pre is not None:
                pre.step(logits)
            preconditioned = time.thread_time()
            opt.step()
            end = time.thread_time()
            if index >= WARMUP:
                times["forward"].append(forward - start)
                times["backward"].append(backward - forward)
                times["pre.step"].append(preconditioned - backward)
                times["step"].append(end - start)
    medians = {
        name: {part: 1e3 * statistics.median(values) for part, values in entry[3].items()}
        for name, entry in methods.items()
    }
    print(f"ms per step (medians of thread CPU time, 1 thread, load {os.getloadavg()[0]:.1f}):")
    for name, parts in medians.items():
        print(f"  {name:10s} " + "  ".join(f"{part} {ms:.3f}" for part, ms in parts.items()))
    for name in ("empirical", "ief"):
        extra = medians[name]["step"] - medians["sgd"]["step"]
        print(f"  {name} fused: {extra:.3f} ms more than SGD per step")


if __name__ == "__main__":
    main()
