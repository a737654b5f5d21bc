"""Compare the updates of several methods on one batch (Wu et al. 2024, sec. 6-8, Figures 2-4)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from natgrad.analysis.quality import (
    BatchFisher,
    cosine_similarity,
    gamma,
    gradient_norm_imbalance,
    per_sample_gradient_norms,
)
from natgrad.likelihoods import Likelihood
from natgrad.precond.base import Preconditioner

MethodFactory = Callable[[nn.Module], Preconditioner | None]


def method_update(
    model: nn.Module, inputs: Tensor, loss_fn: Callable[[Tensor], Tensor], make: MethodFactory
) -> Tensor:
    """The flat update direction of one method on one batch (``None`` factory: the gradient).

    The model's parameters are not changed; its ``.grad`` is left holding the direction.
    """
    pre = make(model)
    try:
        model.zero_grad()
        logits = model(inputs)
        loss_fn(logits).backward()
        if pre is not None:
            pre.step(logits)
    finally:
        if pre is not None:
            pre.remove()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.requires_grad])


def compare_updates(
    model: nn.Module,
    inputs: Tensor,
    loss_fn: Callable[[Tensor], Tensor],
    methods: dict[str, MethodFactory],
    likelihood: str | Likelihood = "categorical",
    reduction: str = "mean",
    reference: str = "ngd",
) -> dict[str, float]:
    """γ of every method, its ratio to SGD's γ, cosines with ``reference`` and SGD, imbalance.

    ``methods`` maps names to preconditioner factories; ``"sgd"`` (the plain gradient) is
    added if missing. Returns one flat record: ``gamma_<m>``, ``gamma_ratio_<m>`` (γ_m /
    γ_SGD), ``cos_<reference>_<m>``, ``cos_sgd_<m>`` and ``imbalance``.
    """
    methods = {"sgd": lambda model: None, **methods}
    if reference not in methods:
        raise ValueError(f"reference method {reference!r} is not among {sorted(methods)}")
    updates = {name: method_update(model, inputs, loss_fn, make) for name, make in methods.items()}
    fisher = BatchFisher(model, inputs, likelihood, reduction)
    gradient = updates["sgd"]
    record: dict[str, float] = {}
    gammas = {name: gamma(fisher, update, gradient) for name, update in updates.items()}
    for name, update in updates.items():
        record[f"gamma_{name}"] = gammas[name]
        record[f"gamma_ratio_{name}"] = gammas[name] / gammas["sgd"]
        record[f"cos_{reference}_{name}"] = cosine_similarity(updates[reference], update)
        record[f"cos_sgd_{name}"] = cosine_similarity(gradient, update)
    norms = per_sample_gradient_norms(model, inputs, loss_fn, likelihood, reduction)
    record["imbalance"] = gradient_norm_imbalance(norms)
    return record


__all__ = ["MethodFactory", "compare_updates", "method_update"]
