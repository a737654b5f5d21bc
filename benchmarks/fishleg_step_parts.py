"""The parts of a FishLeg step timed alone: the floor of its cost on the step-time workload.

Run ``python benchmarks/fishleg_step_parts.py`` (about a minute on one core). On the MLP
784-1000-1000-1000-10 of ``benchmarks/step_time.py`` (float32, one torch thread), after 41
FishLeg steps (momentum on ``Q g``, auxiliary period 10, so ``Q`` has had five auxiliary
steps), it times with the process's CPU time (median of repeated calls):

* an SGD step (with momentum) on a copy of the weights, the reference;
* ``Q g`` of every layer from its rank-``N`` rows (the products with the triangular factors,
  what a step with momentum on ``Q g`` adds to the forward and backward pass);
* the outer products ``Ēᵀ Ā`` of every layer (one per layer: autograd's weight gradient, or
  FishLeg's momentum update on the fused path, into a buffer with padded rows as FishLeg's);
* the exact Fisher-vector product of the batch and one Adam step on the auxiliary blocks;
* the full-rank products of an auxiliary step with momentum on ``g``: ``P = ḡ R Rᵀ``,
  ``K = L Lᵀ ḡ``, ``P Wᵀ``, ``Wᵀ K``, the gradients' lower triangles and ``Q ḡ`` after Adam.

It prints them per batch size with the floors they imply, as multiples of the SGD step; a
benchmark, not a test.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import natgrad
from natgrad.fisher_vector import fisher_vector_product
from natgrad.linalg import aligned_empty
from natgrad.precond import kron_q
from step_time import make_model, random_batches, run_steps


def cpu_ms(function: Callable[[], object], repeats: int = 15) -> float:
    """Median process CPU time of ``function()`` in ms, after one untimed call."""
    function()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        function()
        times.append(time.process_time() - start)
    return 1e3 * statistics.median(times)


def measure(batch: int) -> dict[str, float]:
    """The parts' CPU times at one batch size."""
    draw = random_batches(batch)
    model = make_model()
    pre = natgrad.FishLeg(model, aux_period=10, momentum_on="update")
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    run_steps(model, opt, pre, True, draw, 41)
    pre.remove()
    reference = make_model()
    reference.load_state_dict(model.state_dict())
    sgd_opt = torch.optim.SGD(reference.parameters(), lr=1e-4, momentum=0.9)
    inputs, targets = draw()
    linears = [m for m in model if isinstance(m, nn.Linear)]
    factors = {name: tuple(p.detach() for p in pair) for name, pair in pre.aux_params.items()}
    rows, hidden = {}, inputs
    for module in model:  # each layer's inputs with the bias column, random output gradients
        if isinstance(module, nn.Linear):
            name = str(list(model).index(module))
            augmented = torch.cat([hidden, torch.ones(batch, 1)], dim=1)
            rows[name] = (1e-3 * torch.randn(batch, module.out_features), augmented)
        hidden = module(hidden).detach()

    def q_rows() -> None:
        for name, row in rows.items():
            pre._q_rows(name, row)

    outer = {  # rows padded as FishLeg's momentum buffers (natgrad.linalg.aligned_empty)
        n: aligned_empty(m.out_features, m.in_features + 1, like=m.weight.detach()).zero_()
        for n, m in zip(rows, linears, strict=True)
    }

    def outer_products() -> None:
        for name, (grad_rows, layer_inputs) in rows.items():
            outer[name].addmm_(grad_rows.T, layer_inputs, beta=0.9, alpha=0.1)

    params = dict(model.named_parameters())
    vector = [torch.randn_like(p) for p in params.values()]
    for param in (p for group in pre.aux_optimizer.param_groups for p in group["params"]):
        param.grad = torch.randn_like(param)
    momentum = {
        n: torch.randn(m.out_features, m.in_features + 1)
        for n, m in zip(rows, linears, strict=True)
    }

    def full_rank_auxiliary() -> None:
        for name, gradient in momentum.items():
            out = tuple(
                [torch.empty_like(v) for v in kron_q.lower_blocks(f)] for f in factors[name]
            )
            kron_q.dense_factor_gradients(gradient, gradient, *factors[name], out)
            kron_q.apply_dense(gradient, *factors[name])

    sgd = cpu_ms(lambda: run_steps(reference, sgd_opt, None, False, lambda: (inputs, targets), 1))
    with torch.no_grad():
        return {
            "sgd": sgd,
            "q_rows": cpu_ms(q_rows),
            "outer": cpu_ms(outer_products),
            "fvp": cpu_ms(
                lambda: fisher_vector_product(
                    model, (inputs,), params, vector, pre.likelihood, "mean"
                ),
                7,
            ),
            "adam": cpu_ms(pre.aux_optimizer.step, 7),
            "full_rank": cpu_ms(full_rank_auxiliary, 3),
        }


def main() -> None:
    torch.set_num_threads(1)
    for batch in (32, 100):
        t = measure(batch)
        sgd = t["sgd"]
        auxiliary = t["fvp"] + 3 * t["q_rows"] + 2 * t["outer"] + t["adam"]
        print(
            f"batch {batch}: SGD step {sgd:.1f} ms; Q g from the rows {t['q_rows']:.1f}; outer "
            f"products {t['outer']:.1f}; Fisher-vector product {t['fvp']:.1f}; Adam "
            f"{t['adam']:.1f}; full-rank products of an auxiliary step on g {t['full_rank']:.0f}"
        )
        print(
            f"  momentum on Q g: a step without auxiliary work >= (SGD + Q g) / SGD = "
            f"{(sgd + t['q_rows']) / sgd:.2f} (fused path); the auxiliary step's extra, "
            f"FVP + 3 Q g (probe, gradients, update) + 2 outer products + Adam = "
            f"{auxiliary / sgd:.1f} SGD steps, +{auxiliary / sgd / 10:.2f} over 10 steps"
        )
        on_gradient = t["fvp"] + t["adam"] + t["full_rank"]
        print(
            f"  momentum on g: a step without auxiliary work >= (SGD + Q g + outer) / SGD = "
            f"{(sgd + t['q_rows'] + t['outer']) / sgd:.2f}; its auxiliary step adds FVP + Adam "
            f"+ the full-rank products = {on_gradient / sgd:.1f} SGD steps, "
            f"+{on_gradient / sgd / 10:.2f} over 10 steps"
        )


if __name__ == "__main__":
    main()
