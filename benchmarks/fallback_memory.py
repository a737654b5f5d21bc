"""Peak memory of natgrad's torch.func fallback: what ``pre.step`` adds, chunked or not.

A sequence model whose body is frozen (``hidden`` wide linear layers over the tokens, not
trained) reads ``prompt_tokens`` trainable prompt vectors of width 32 in front of 16 input
tokens: the prompt is a free ``nn.Parameter``, so EF preconditions it through the torch.func
fallback, which re-runs the model per datapoint and materialises one gradient row per
datapoint (``N x prompt size``). Each configuration runs in a fresh process (one torch thread)
and measures, over ``STEPS`` steps, two peaks of resident memory (Linux: the ``VmHWM``
high-water mark, reset through ``/proc/self/clear_refs`` before each phase): the forward and
backward passes over the memory before them, and ``pre.step`` over the memory before it (with
its fastest time), for the whole batch re-run at once and for ``CHUNKS`` datapoints at a time
(``fallback_chunk_size``; 32 is natgrad's default). Next to them, the size of the fallback rows
``N x P_prompt x 4`` bytes. Run ``python benchmarks/fallback_memory.py`` (Linux, about 6
minutes).
"""

from __future__ import annotations

import math
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.lab.reproduce.cost import in_fresh_processes, peak_over

BATCH, TOKENS, WIDTH, STEPS = 128, 16, 32, 3
CHUNKS = (None, 32, 8)


class PromptedBody(nn.Module):
    """``prompt_tokens`` trainable vectors prepended to the tokens of a frozen body."""

    def __init__(self, prompt_tokens: int, hidden: int) -> None:
        super().__init__()
        self.prompt = nn.Parameter(0.02 * torch.randn(prompt_tokens, WIDTH))
        self.body = nn.Sequential(
            nn.Linear(WIDTH, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
            nn.Linear(hidden, 10),
        ).requires_grad_(False)  # fmt: skip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        prompt = self.prompt.expand(tokens.shape[0], -1, -1)
        return self.body(torch.cat([prompt, tokens], dim=1)).mean(dim=1)


def measure(job: tuple[int | None, int, int]) -> tuple[float, float, float]:
    """In a fresh process: the peaks (MiB) of the forward/backward passes and of ``pre.step``,
    and ``pre.step``'s fastest time (ms)."""
    chunk_size, prompt_tokens, hidden = job
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = PromptedBody(prompt_tokens, hidden)
    pre = natgrad.EF(model, fallback_chunk_size=chunk_size)
    optimiser = torch.optim.SGD([model.prompt], lr=0.1)
    inputs, targets = torch.randn(BATCH, TOKENS, WIDTH), torch.randint(0, 10, (BATCH,))

    def forward_backward() -> torch.Tensor:
        logits = model(inputs)
        F.cross_entropy(logits, targets).backward()
        return logits

    passes, steps, seconds = 0.0, 0.0, math.inf
    for _ in range(STEPS):
        optimiser.zero_grad()
        logits, passes_mib = peak_over(forward_backward)
        start = time.perf_counter()
        _, step_mib = peak_over(partial(pre.step, logits))
        seconds = min(seconds, time.perf_counter() - start)
        passes, steps = max(passes, passes_mib), max(steps, step_mib)
        optimiser.step()
    return passes, steps, 1e3 * seconds


def main() -> None:
    configurations = [(k, h) for k in (4, 64, 512) for h in (256, 2048)]
    jobs = [(chunk, k, h) for k, h in configurations for chunk in CHUNKS]
    results = dict(zip(jobs, in_fresh_processes(measure, jobs), strict=True))
    print(
        f"batch {BATCH}, {TOKENS} tokens of width {WIDTH}, frozen body, {STEPS} steps: peak MiB "
        "over the memory before each phase; pre.step as peak MiB / fastest ms"
    )
    labels = ["whole batch" if chunk is None else f"chunks of {chunk}" for chunk in CHUNKS]
    print(
        "| prompt params | body hidden | forward+backward | "
        + " | ".join(f"pre.step, {label}" for label in labels)
        + " | rows N x P |"
    )
    print("|---|---|---|" + "---|" * len(CHUNKS) + "---|")
    for k, h in configurations:
        measured = [results[(chunk, k, h)] for chunk in CHUNKS]
        steps = " | ".join(f"{mib:.1f} / {ms:.0f}" for _, mib, ms in measured)
        rows = BATCH * k * WIDTH * 4 / 2**20
        print(f"| {k * WIDTH} | {h} | {measured[0][0]:.1f} | {steps} | {rows:.2f} |")


if __name__ == "__main__":
    main()
