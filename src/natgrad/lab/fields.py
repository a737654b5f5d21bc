"""Two-parameter problems of Kunstner et al. 2019 (Fig. 1-2, App. D.1-D.2) and Wu et al. 2024,
sec. 2.

* Linear regression ``y = 2 + 2x + ε`` with ``x ~ Lognormal(0, 3/4)``, ``ε ~ N(0, 1)``,
  ``N = 1000`` (Kunstner et al. 2019, eq. 49) and the loss ``1/N sum ½ (θ_0 + θ_1 x - y)^2``: the
  GD, NGD, EF and iEF vector fields on a grid of ``θ``, each computed by natgrad's preconditioners
  on an ``nn.Linear(1, 1)`` (NGD: ``fisher="exact"``; EF: ``"empirical"``; iEF: ``"ief_matrix"``,
  the gradient preconditioned by the iEF matrix, which for least squares is the Fisher,
  Wu et al. 2024, sec. 2.2), and trajectories from the paper's four starting points.
* Logistic regression without bias on the datasets of Kunstner et al. 2019, Table 2, with the
  quadratic models ``½ (θ - θ*)^T M (θ - θ*)`` of the Fisher and the empirical Fisher at the
  minimum.

The plotting functions need matplotlib (``pip install natgrad[plots]``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import natgrad
from natgrad.analysis.compare import method_update
from natgrad.analysis.quality import BatchFisher, per_sample_gradients
from natgrad.lab.plotting import pyplot

REGRESSION_STARTS = ((2.0, 4.5), (1.0, 0.0), (4.5, 3.0), (-0.5, 3.0))
FIELD_METHODS = ("gd", "ngd", "ef", "ief")


def _regression_model(theta: tuple[float, float]) -> nn.Linear:
    model = nn.Linear(1, 1).double()
    with torch.no_grad():
        model.bias.fill_(theta[0])
        model.weight.fill_(theta[1])
    return model


def regression_direction(
    method: str, theta: tuple[float, float], x: Tensor, y: Tensor, damping: float = 1e-8
) -> Tensor:
    """The preconditioned gradient ``(θ_0, θ_1)`` of one method at ``θ`` (ascent direction)."""
    if method not in FIELD_METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {FIELD_METHODS}")
    likelihood = natgrad.likelihoods.Gaussian(variance=1.0)
    fisher = {"ngd": "exact", "ef": "empirical", "ief": "ief_matrix"}.get(method)
    model = _regression_model(theta)

    def make(module: nn.Module) -> natgrad.NGD | None:
        if fisher is None:
            return None
        return natgrad.NGD(module, likelihood=likelihood, fisher=fisher, damping=damping)

    update = method_update(model, x, lambda z: 0.5 * F.mse_loss(z, y), make)
    return torch.stack([update[1], update[0]])  # (weight, bias) -> (θ_0 = bias, θ_1 = slope)


@dataclass
class VectorFields:
    """Directions of each method on a grid.

    ``directions[m]`` has shape ``(2, len(theta1), len(theta0))``.
    """

    theta0: Tensor
    theta1: Tensor
    directions: dict[str, Tensor]

    def cosine(self, first: str, second: str) -> Tensor:
        """Cosine between two methods' arrows at every grid point."""
        a, b = self.directions[first], self.directions[second]
        return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0))


def regression_vector_fields(
    x: Tensor,
    y: Tensor,
    theta0: Tensor,
    theta1: Tensor,
    methods: tuple[str, ...] = FIELD_METHODS,
    damping: float = 1e-8,
) -> VectorFields:
    """Every method's direction on the grid ``theta0 x theta1``."""
    directions = {m: torch.zeros(2, len(theta1), len(theta0), dtype=x.dtype) for m in methods}
    for i, t1 in enumerate(theta1.tolist()):
        for j, t0 in enumerate(theta0.tolist()):
            for method in methods:
                directions[method][:, i, j] = regression_direction(method, (t0, t1), x, y, damping)
    return VectorFields(theta0, theta1, directions)


def regression_trajectory(
    method: str,
    start: tuple[float, float],
    x: Tensor,
    y: Tensor,
    step_size: float = 1e-4,
    steps: int = 50_000,
    damping: float = 1e-8,
) -> Tensor:
    """``θ_{t+1} = θ_t - γ Δ(θ_t)`` (Kunstner et al. 2019, eq. 50-52), shape ``(steps + 1, 2)``.

    Tens of thousands of steps of a 2-D problem: the gradient, Fisher and empirical Fisher
    are evaluated from moments of the features ``φ = (1, x)`` (the EF is quadratic in ``θ``),
    in numpy; ``tests/test_fields.py`` checks these directions against natgrad's
    preconditioners (:func:`regression_direction`).
    """
    if method not in FIELD_METHODS:
        raise ValueError(f"unknown method {method!r}: choose one of {FIELD_METHODS}")
    phi = np.concatenate([np.ones_like(x.numpy()), x.numpy()], axis=1)
    targets = y.numpy()[:, 0]
    second = phi.T @ phi / len(phi)
    cross = phi.T @ targets / len(phi)
    fourth = np.einsum("na,nb,ni,nj->abij", phi, phi, phi, phi) / len(phi)
    third = np.einsum("n,na,nb,ni->abi", targets, phi, phi, phi) / len(phi)
    weighted = np.einsum("n,na,nb->ab", targets**2, phi, phi) / len(phi)
    eye = np.eye(2)
    path = np.empty((steps + 1, 2))
    theta = np.asarray(start, dtype=np.float64)
    path[0] = theta
    for t in range(steps):
        gradient = second @ theta - cross
        if method == "gd":
            direction = gradient
        elif method == "ef":
            empirical = fourth @ theta @ theta - 2 * third @ theta + weighted
            direction = np.linalg.solve(empirical + damping * eye, gradient)
        else:  # ngd and ief: the Fisher (= the iEF matrix) of least squares
            direction = np.linalg.solve(second + damping * eye, gradient)
        theta = theta - step_size * direction
        path[t + 1] = theta
    return torch.from_numpy(path)


# ---------------------------------------------------------------------- logistic regression
@dataclass
class QuadraticModels:
    """Minimum ``θ*`` and the Fisher and empirical Fisher there (2 x 2)."""

    theta: Tensor
    fisher: Tensor
    empirical_fisher: Tensor


def logistic_quadratic_models(x: Tensor, y: Tensor, iterations: int = 100) -> QuadraticModels:
    """Fit the bias-free logistic regression by L-BFGS; return F and EF at the minimum."""
    model = nn.Linear(2, 1, bias=False).double()
    nn.init.zeros_(model.weight)

    def loss_fn(logits: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(logits, y)

    optimiser = torch.optim.LBFGS(
        model.parameters(),
        max_iter=iterations,
        tolerance_grad=1e-12,
        tolerance_change=1e-15,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        optimiser.zero_grad()
        loss = loss_fn(model(x))
        loss.backward()
        return loss

    optimiser.step(closure)
    fisher = BatchFisher(model, x, "bernoulli").dense()
    gradients = per_sample_gradients(model, x, loss_fn, "bernoulli")
    empirical = gradients.T @ gradients / len(x)
    return QuadraticModels(model.weight.detach()[0].clone(), fisher, empirical)


# ---------------------------------------------------------------------- plots
def plot_regression_fields(
    fields: VectorFields,
    x: Tensor,
    y: Tensor,
    trajectories: dict[str, list[Tensor]],
    path: str,
) -> None:
    """Kunstner et al. 2019, Fig. 1 / Wu et al. 2024, Fig. 1: data, GD, NGD = iEF and EF fields with
    trajectories.

    Arrows are normalised to unit length so the directions can be compared.
    """
    plt = pyplot()

    grid0, grid1 = torch.meshgrid(fields.theta0, fields.theta1, indexing="xy")
    figure, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    axes[0].scatter(x[:, 0], y[:, 0], s=2, alpha=0.4)
    axes[0].set(title="data: y = 2 + 2x + ε", xlabel="x", ylabel="y")
    panels = (("gd", "GD"), ("ngd", "NGD and iEF (identical)"), ("ef", "EF"))
    colours = {"gd": "tab:blue", "ngd": "tab:green", "ief": "tab:olive", "ef": "tab:red"}
    for axis, (method, title) in zip(axes[1:], panels, strict=True):
        arrows = -fields.directions[method]
        arrows = arrows / arrows.norm(dim=0, keepdim=True)
        axis.quiver(grid0, grid1, arrows[0], arrows[1], color=colours[method], width=0.004)
        if method == "ngd" and "ief" in fields.directions:
            other = -fields.directions["ief"]
            other = other / other.norm(dim=0, keepdim=True)
            axis.quiver(grid0, grid1, other[0], other[1], color=colours["ief"], width=0.002)
        for line in trajectories.get(method, []):
            axis.plot(line[:, 0], line[:, 1], color="black", linewidth=1.2)
            axis.plot(line[0, 0], line[0, 1], "ko", markersize=3)
        axis.plot(2.0, 2.0, "k*", markersize=10)
        axis.set(title=title, xlabel="θ0 (bias)", ylabel="θ1 (slope)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_quadratic_models(models: dict[str, QuadraticModels], path: str) -> None:
    """Kunstner et al. 2019, Fig. 2: contours ``½ (θ - θ*)^T M (θ - θ*) = const`` of the Fisher
    and EF."""
    plt = pyplot()

    figure, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.5), squeeze=False)
    angles = torch.linspace(0, 2 * math.pi, 200, dtype=torch.float64)
    circle = torch.stack([angles.cos(), angles.sin()])
    for axis, (name, quadratic) in zip(axes[0], models.items(), strict=True):
        for matrix, label, colour in (
            (quadratic.fisher, "Fisher", "tab:green"),
            (quadratic.empirical_fisher, "empirical Fisher", "tab:red"),
        ):
            # the level set ½ d^T M d = ½ of the quadratic model, d = θ - θ*
            values, vectors = torch.linalg.eigh(matrix)
            ellipse = vectors @ (circle / values.clamp_min(1e-12).sqrt().unsqueeze(1))
            ellipse = ellipse + quadratic.theta.unsqueeze(1)
            axis.plot(ellipse[0], ellipse[1], color=colour, label=label)
        axis.plot(quadratic.theta[0], quadratic.theta[1], "k*")
        axis.set(title=name.replace("_", " "), xlabel="θ1", ylabel="θ2", aspect="equal")
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


__all__ = [
    "FIELD_METHODS",
    "REGRESSION_STARTS",
    "QuadraticModels",
    "VectorFields",
    "logistic_quadratic_models",
    "plot_quadratic_models",
    "plot_regression_fields",
    "regression_direction",
    "regression_trajectory",
    "regression_vector_fields",
]
