"""Checks of what users pass to natgrad's preconditioners, and mixed-precision conversions.

Settings are checked when a preconditioner is built (a bad damping or count raises there, as
``torch.optim`` does); a model on the meta device and a loss that broadcasts its outputs are
refused with the fix named; rows captured in bfloat16 or float16 are converted to float32
before any curvature is formed, and a ``torch.amp.GradScaler``'s scale is read where
:meth:`natgrad.Preconditioner.step` is given one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

Damping = float | Callable[[int], float]
"""A hyper-parameter that may vary: a float, or a callable of the step count ``t`` (0 at the
first step) returning it."""


def check_damping(damping: float, name: str = "damping") -> float:
    """Return ``damping`` as a float if it is finite and positive, else raise."""
    if isinstance(damping, bool) or not isinstance(damping, (int, float)):
        raise TypeError(f"{name} must be a positive float, got {type(damping).__name__}")
    if not (math.isfinite(damping) and damping > 0):
        raise ValueError(f"{name} must be positive and finite, got {damping}")
    return float(damping)


def check_count(value: int, name: str) -> int:
    """Return ``value`` if it is an integer >= 1 (not a bool), else raise a ValueError."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def at_least_float32(tensor: Tensor) -> Tensor:
    """``tensor`` in float32 if it is in a lower floating-point precision (bfloat16 or float16
    rows of an autocast forward pass: natgrad forms its curvature in float32), else as is."""
    dtype = tensor.dtype  # attributes, not torch.finfo: this runs per captured tensor and step
    if dtype.is_floating_point and dtype.itemsize < 4:
        return tensor.float()
    return tensor


def loss_scale(grad_scaler: torch.amp.GradScaler | None) -> float:
    """The scale of the loss that was back-propagated: ``grad_scaler``'s, or 1."""
    if grad_scaler is None or not grad_scaler.is_enabled():
        return 1.0
    if not isinstance(grad_scaler, torch.amp.GradScaler):
        raise TypeError(
            f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}"
        )
    states = getattr(grad_scaler, "_per_optimizer_states", {})
    if any(getattr(state.get("stage"), "name", "") == "UNSCALED" for state in states.values()):
        raise RuntimeError(
            "grad_scaler.unscale_(optimizer) was called before step(): natgrad writes the "
            "directions in the scaled units for grad_scaler.step(optimizer) to unscale, so "
            "call unscale_ (e.g. for gradient clipping) after pre.step(logits, grad_scaler)"
        )
    return float(grad_scaler.get_scale())


def check_not_meta(model: nn.Module) -> None:
    """Raise if a trainable parameter of ``model`` is on the meta device (no values)."""
    meta = [name for name, p in model.named_parameters() if p.requires_grad and p.is_meta]
    if meta:
        raise ValueError(
            f"the model's parameters are on the meta device (shapes without values, e.g. "
            f"'{meta[0]}'): natgrad computes with the values; materialise the model first "
            "(model.to_empty(device=...) and load or initialise its weights), then build the "
            "preconditioner"
        )


def check_not_broadcast(loss: Tensor, logits: Tensor, max_nodes: int = 1000) -> None:
    """Raise if the loss graph expands the logits before the loss (a broadcast target).

    ``F.mse_loss`` (and ``F.l1_loss``...) broadcasts a target of shape ``(N,)`` against outputs
    ``(N, 1)`` to ``N x N`` pairs through an expand of the outputs: a valid loss of the mean
    target whose gradient natgrad cannot tell apart from a Gaussian one. The graph between the
    loss and the logits shows it; it is searched up to ``max_nodes`` nodes, not into the model.
    """
    source = logits.grad_fn
    if source is None or loss.grad_fn is None:
        return
    seen, frontier = set(), [loss.grad_fn]
    while frontier and len(seen) < max_nodes:
        node = frontier.pop()
        if node is None or node is source or node in seen:
            continue
        seen.add(node)
        children = [child for child, _ in node.next_functions]
        if node.name() == "ExpandBackward0" and source in children:
            raise ValueError(
                f"the loss broadcasts the logits of shape {tuple(logits.shape)} to a larger "
                "shape (a target of shape (N,) against outputs (N, 1) makes F.mse_loss "
                "average over all N x N pairs): give the target the logits' shape, e.g. "
                "F.mse_loss(logits, y.view_as(logits))"
            )
        frontier.extend(children)


__all__ = [
    "Damping",
    "at_least_float32",
    "check_count",
    "check_damping",
    "check_not_broadcast",
    "check_not_meta",
    "loss_scale",
]
