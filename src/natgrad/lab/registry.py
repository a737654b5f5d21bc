"""Optimiser registry: every method the benchmark runner can train with, and its default grid.

A method is a function ``build(model, likelihood, reduction, **hyper_parameters)`` returning a
``torch.optim`` optimiser and a natgrad preconditioner (``None`` for first-order methods),
plus a grid of hyper-parameters to search. Preconditioned methods train with
``torch.optim.SGD`` on the preconditioned gradient; their ``momentum`` (0.9 unless the grid
sets it) is a hyper-parameter like the others. New methods register with :func:`register`; the
runner and the CLI pick them up by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

import natgrad

Built = tuple[torch.optim.Optimizer, natgrad.Preconditioner | None]


@dataclass
class Method:
    """A named training method with its default hyper-parameter grid."""

    name: str
    build: Callable[..., Built]
    grid: dict[str, list[Any]] = field(default_factory=dict)
    description: str = ""


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to :data:`REGISTRY` (a name may be registered once)."""
    if method.name in REGISTRY:
        raise ValueError(f"a method named {method.name!r} is already registered")
    REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method ``name``, or a ValueError listing the choices."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}: choose one of {sorted(REGISTRY)}")
    return REGISTRY[name]


def _first_order(optimiser: Callable[..., torch.optim.Optimizer]) -> Callable[..., Built]:
    def build(model: nn.Module, likelihood: str, reduction: str, **hyper: Any) -> Built:
        return optimiser(model.parameters(), **hyper), None

    return build


def _preconditioned(
    make: Callable[..., natgrad.Preconditioner], momentum: float = 0.9
) -> Callable[..., Built]:
    def build(
        model: nn.Module,
        likelihood: str,
        reduction: str,
        lr: float,
        momentum: float = momentum,
        **hyper: Any,
    ) -> Built:
        pre = make(model, likelihood=likelihood, reduction=reduction, **hyper)
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum), pre

    return build


LEARNING_RATES = [1e-4, 1e-3, 1e-2, 1e-1]
KRONECKER_SCHEDULE = {"factor_period": 1, "inv_period": 1, "pre_inversion_steps": None}
"""The lab's KFAC/FOOF schedule unless a grid sets one: inversion every step, the library's
default before issue 18, kept so that benchmark and claim numbers do not change."""


def _kronecker(make: Callable[..., natgrad.Preconditioner], **fixed: Any) -> Callable[..., Any]:
    """``make`` with :data:`KRONECKER_SCHEDULE` and ``fixed``, overridden by the grid's values."""
    return lambda model, **hyper: make(model, **{**KRONECKER_SCHEDULE, **fixed, **hyper})

for _method in (
    Method(
        "sgd",
        _first_order(torch.optim.SGD),
        {"lr": LEARNING_RATES, "momentum": [0.9]},
        "SGD with momentum 0.9",
    ),
    Method("adam", _first_order(torch.optim.Adam), {"lr": [1e-4, 1e-3, 1e-2]}, "Adam"),
    Method("adamw", _first_order(torch.optim.AdamW), {"lr": [1e-4, 1e-3, 1e-2]}, "AdamW"),
    Method(
        "adafactor", _first_order(torch.optim.Adafactor), {"lr": [1e-3, 1e-2, 1e-1]}, "Adafactor"
    ),
    Method(
        "ngd",
        _preconditioned(lambda m, **k: natgrad.NGD(m, fisher="exact", **k)),
        {"lr": LEARNING_RATES, "damping": [1e-3, 1e-1]},
        "exact mini-batch NGD",
    ),
    Method(
        "mc",
        _preconditioned(lambda m, **k: natgrad.NGD(m, fisher="mc", **k)),
        {"lr": LEARNING_RATES, "damping": [1e-3, 1e-1]},
        "sampled Fisher F(1)",
    ),
    Method(
        "ef",
        _preconditioned(natgrad.EF),
        {"lr": LEARNING_RATES, "damping": [1e-3, 1e-1]},
        "empirical Fisher",
    ),
    Method(
        "ief",
        _preconditioned(natgrad.IEF),
        {"lr": LEARNING_RATES, "damping": [1e-3, 1e-1]},
        "improved empirical Fisher",
    ),
    Method(
        "tengrad",
        _preconditioned(natgrad.TENGraD),
        {"lr": LEARNING_RATES, "damping": [1e-3, 1e-1]},
        "block-diagonal EF (TENGraD)",
    ),
    Method(
        "kfac",
        _preconditioned(_kronecker(natgrad.KFAC)),
        {"lr": LEARNING_RATES, "damping": [1e-3, 1e-1]},
        "KFAC, heuristic damping",
    ),
    Method(
        "kfac-correct",
        _preconditioned(_kronecker(natgrad.KFAC, damping_mode="correct")),
        {"lr": LEARNING_RATES, "damping": [1e-3, 1e-1]},
        "KFAC, correct damping",
    ),
    Method(
        "kfac-subsampled",
        _preconditioned(_kronecker(natgrad.KFAC, ema_decay=0.0)),
        {"lr": LEARNING_RATES, "damping": [1e-3, 1e-1]},
        "KFAC without averaging (m = 0)",
    ),
    Method(
        "foof",
        _preconditioned(_kronecker(natgrad.FOOF)),
        {"lr": LEARNING_RATES, "damping": [1.0, 100.0]},
        "FOOF",
    ),
    Method(
        "fishleg",
        _preconditioned(natgrad.FishLeg, momentum=0.0),
        {"lr": [1e-2, 1e-1], "aux_lr": [1e-3], "init_scale": [1.0]},
        "FishLeg",
    ),
):
    register(_method)


__all__ = ["REGISTRY", "Built", "Method", "get_method", "register"]
