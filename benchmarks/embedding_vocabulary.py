"""Time and memory of natgrad's steps on an ``nn.Embedding`` as the vocabulary grows.

natgrad keeps an embedding's inputs as token indices (``natgrad.precond.blocks.TokenBatch``):
for the Woodbury methods (EF, iEF, exact Fisher) the Gram is computed from matching tokens and
``J^T u`` is an index-add into the weight's gradient; for KFAC and FOOF the input factor of
one-hot inputs is diagonal (the token frequencies) and kept as a vector. Nothing of size
``N x T x vocabulary`` or ``vocabulary x vocabulary`` is formed. The model is
``Embedding(vocabulary, 64)``, the mean over 32 tokens, ``Linear(64, 10)``; batch 32 of
uniformly drawn tokens; float32, one torch thread, a fresh process per vocabulary size. Per
configuration: the fastest of 5 steps (after one warm-up) of the forward and backward passes
and of ``pre.step``, and the peak resident memory of each phase over the memory before it
(Linux ``VmHWM``, reset before each phase). The last column is the size the one-hot input rows
would have, for comparison (arithmetic, not measured). Run
``python benchmarks/embedding_vocabulary.py`` (about a minute).
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

BATCH, TOKENS, WIDTH, CLASSES, STEPS = 32, 32, 64, 10, 6
VOCABULARIES = (1_000, 10_000, 100_000)
METHODS = ("ef", "ief", "exact", "kfac", "foof")


class BagOfEmbeddings(nn.Module):
    """Token embeddings averaged over the sequence, then a linear classifier."""

    def __init__(self, vocabulary: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocabulary, WIDTH)
        self.head = nn.Linear(WIDTH, CLASSES)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens).mean(dim=1))


def build(method: str, model: nn.Module) -> natgrad.Preconditioner:
    if method == "ef":
        return natgrad.EF(model)
    if method == "ief":
        return natgrad.IEF(model)
    if method == "kfac":
        return natgrad.KFAC(model, inv_period=1)  # inverting every step: the worst case
    if method == "foof":
        return natgrad.FOOF(model, inv_period=1)
    return natgrad.NGD(model, fisher="exact")


def measure(job: tuple[str, int]) -> dict[str, float]:
    """In a fresh process: fastest times (ms) and peak memories (MiB) of the two phases."""
    method, vocabulary = job
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = BagOfEmbeddings(vocabulary)
    pre = build(method, model)
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    tokens = torch.randint(0, vocabulary, (BATCH, TOKENS))
    labels = torch.randint(0, CLASSES, (BATCH,))

    def forward_backward() -> torch.Tensor:
        logits = model(tokens)
        F.cross_entropy(logits, labels).backward()
        return logits

    result = dict.fromkeys(("passes_ms", "step_ms"), math.inf)
    result.update(passes_mib=0.0, step_mib=0.0)
    for index in range(STEPS):
        optimiser.zero_grad()
        start = time.perf_counter()
        logits, passes_mib = peak_over(forward_backward)
        middle = time.perf_counter()
        _, step_mib = peak_over(partial(pre.step, logits))
        end = time.perf_counter()
        optimiser.step()
        if index == 0:
            continue  # warm-up
        result["passes_ms"] = min(result["passes_ms"], 1e3 * (middle - start))
        result["step_ms"] = min(result["step_ms"], 1e3 * (end - middle))
        result["passes_mib"] = max(result["passes_mib"], passes_mib)
        result["step_mib"] = max(result["step_mib"], step_mib)
    return result


def main() -> None:
    jobs = [(method, vocabulary) for vocabulary in VOCABULARIES for method in METHODS]
    results = dict(zip(jobs, in_fresh_processes(measure, jobs), strict=True))
    print(
        f"Embedding(vocabulary, {WIDTH}) -> mean over {TOKENS} tokens -> Linear({WIDTH}, "
        f"{CLASSES}), batch {BATCH}, float32, one thread: fastest ms / peak MiB"
    )
    print(
        "| vocabulary | parameters | forward+backward | "
        + " | ".join(f"{method} pre.step" for method in METHODS)
        + " | one-hot rows would be (MiB) |"
    )
    print("|---|---|---|" + "---|" * len(METHODS) + "---|")
    for vocabulary in VOCABULARIES:
        row = [results[(method, vocabulary)] for method in METHODS]
        parameters = vocabulary * WIDTH + WIDTH * CLASSES + CLASSES
        one_hot = BATCH * TOKENS * vocabulary * 4 / 2**20
        steps = " | ".join(f"{r['step_ms']:.1f} / {r['step_mib']:.1f}" for r in row)
        print(
            f"| {vocabulary} | {parameters} | {row[0]['passes_ms']:.1f} / "
            f"{row[0]['passes_mib']:.1f} | {steps} | {one_hot:.0f} |"
        )


if __name__ == "__main__":
    main()
