"""Peak memory of natgrad's torch.func fallback: it grows with the fallback parameters only.

A sequence model whose body is frozen (``hidden`` wide linear layers over the tokens, not
trained) reads ``prompt_tokens`` trainable prompt vectors of width 32 in front of 16 input
tokens: the prompt is a free ``nn.Parameter``, so EF preconditions it through the torch.func
fallback, which materialises one gradient row per datapoint (``N x prompt size``). Each
configuration runs in a fresh process (``VmHWM`` high-water mark, one torch thread): a plain
SGD step, then the EF step, and the table reports the peak-memory increase of each over the
process after building the model, and the EF - SGD difference next to the size of the
fallback rows ``N x P_prompt x 4`` bytes; a second EF column re-runs ``CHUNK`` datapoints at a
time (``fallback_chunk_size``), which bounds the re-run's activations. Run
``python benchmarks/fallback_memory.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import natgrad
from natgrad.reproduce.cost import high_water_mib, in_fresh_processes

BATCH, TOKENS, WIDTH, STEPS, CHUNK = 128, 16, 32, 3, 8


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


def measure(job: tuple[str, int, int]) -> float:
    """In a fresh process: the high-water-mark increase (MiB) over ``STEPS`` steps."""
    method, prompt_tokens, hidden = job
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = PromptedBody(prompt_tokens, hidden)
    chunk_size = CHUNK if method == "ef-chunked" else None
    pre = None if method == "sgd" else natgrad.EF(model, fallback_chunk_size=chunk_size)
    optimiser = torch.optim.SGD([model.prompt], lr=0.1)
    inputs, targets = torch.randn(BATCH, TOKENS, WIDTH), torch.randint(0, 10, (BATCH,))
    baseline = high_water_mib()
    for _ in range(STEPS):
        optimiser.zero_grad()
        logits = model(inputs)
        F.cross_entropy(logits, targets).backward()
        if pre is not None:
            pre.step(logits)
        optimiser.step()
    return high_water_mib() - baseline


def main() -> None:
    configurations = [(k, h) for k in (4, 64, 512) for h in (256, 2048)]
    methods = ("sgd", "ef", "ef-chunked")
    jobs = [(method, k, h) for k, h in configurations for method in methods]
    peaks = dict(zip(jobs, in_fresh_processes(measure, jobs), strict=True))
    print(f"batch {BATCH}, {TOKENS} tokens of width {WIDTH}, frozen body, {STEPS} steps")
    print(
        "| prompt params | body hidden | SGD peak +MiB | EF peak +MiB | EF - SGD "
        f"| EF chunk {CHUNK} - SGD | rows N x P (MiB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for k, h in configurations:
        sgd, ef, chunked = (peaks[(method, k, h)] for method in methods)
        rows = BATCH * k * WIDTH * 4 / 2**20
        print(
            f"| {k * WIDTH} | {h} | {sgd:.1f} | {ef:.1f} | {ef - sgd:.1f} | {chunked - sgd:.1f} "
            f"| {rows:.2f} |"
        )


if __name__ == "__main__":
    main()
