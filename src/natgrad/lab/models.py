"""Models of the papers' experiments, built only from layers natgrad preconditions.

* :func:`mlp`: fully connected network (Benzing 2022, Fig. 1: three hidden layers of 1000, ReLU),
  widths, activation and bias configurable;
* :func:`autoencoder`: Hinton's ``d-1000-500-250-30-250-500-1000-d`` autoencoder with tanh
  (Benzing 2022, App. D.6) or ReLU and a linear code layer (Goldfarb et al. 2020, as Garcia et
  al. 2023, Fig. 2, uses it), widths scaled by ``width_scale`` for a CPU;
* :func:`deep_linear`: a deep linear network (Garcia et al. 2023, sec. 5.1: 20 layers of 20),
  no bias, weights ``N(0, 1/n)``;
* :func:`small_cnn`: two convolutions and a linear read-out, for image data.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "identity": nn.Identity}
HINTON_WIDTHS = (1000, 500, 250, 30, 250, 500, 1000)


def _activation(name: str) -> type[nn.Module]:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}: choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def mlp(
    inputs: int,
    outputs: int,
    hidden: Sequence[int] = (1000, 1000, 1000),
    activation: str = "relu",
    bias: bool = True,
) -> nn.Sequential:
    """``inputs - hidden... - outputs`` with ``activation`` between the layers."""
    widths = (inputs, *hidden, outputs)
    if any(width < 1 for width in widths):
        raise ValueError(f"every width must be >= 1, got {widths}")
    act = _activation(activation)
    layers: list[nn.Module] = [nn.Flatten()]
    for index in range(len(widths) - 1):
        layers.append(nn.Linear(widths[index], widths[index + 1], bias=bias))
        if index < len(widths) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def autoencoder(
    inputs: int, width_scale: float = 1.0, activation: str = "tanh", linear_code: bool = False
) -> nn.Sequential:
    """Hinton's deep autoencoder with every width scaled (at least 2); outputs are logits.

    ``linear_code=True`` leaves the code layer (the 30 units in the middle) linear, as
    Goldfarb et al. 2020's autoencoders do (ReLU elsewhere), whose setup Garcia et al. 2023,
    sec. 5.2, follows."""
    if not width_scale > 0:
        raise ValueError(f"width_scale must be positive, got {width_scale}")
    hidden = tuple(max(2, round(width * width_scale)) for width in HINTON_WIDTHS)
    model = mlp(inputs, inputs, hidden, activation=activation)
    if linear_code:  # the activation after the code layer: the 4th of Flatten, (Linear, act)...
        code = 2 * HINTON_WIDTHS.index(min(HINTON_WIDTHS)) + 2
        model[code] = nn.Identity()
    return model


def deep_linear(width: int = 20, depth: int = 20, seed: int | None = None) -> nn.Sequential:
    """``depth`` bias-free linear layers of ``width`` units, weights ``N(0, 1/width)``."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    layers = [nn.Linear(width, width, bias=False) for _ in range(depth)]
    with torch.no_grad():
        for layer in layers:
            layer.weight.normal_(0.0, width**-0.5, generator=generator)
    return nn.Sequential(*layers)


def small_cnn(
    channels: int, classes: int, image_size: int, width: int = 16, activation: str = "relu"
) -> nn.Sequential:
    """Two 3x3 convolutions (the second with stride 2) and a linear read-out."""
    act = _activation(activation)
    reduced = (image_size + 1) // 2
    return nn.Sequential(
        nn.Conv2d(channels, width, 3, padding=1),
        act(),
        nn.Conv2d(width, width, 3, stride=2, padding=1),
        act(),
        nn.Flatten(),
        nn.Linear(width * reduced * reduced, classes),
    )


__all__ = ["ACTIVATIONS", "HINTON_WIDTHS", "autoencoder", "deep_linear", "mlp", "small_cnn"]
