"""Two-parameter problems of Kunstner et al. 2019: library directions against closed forms;
plots."""

from __future__ import annotations

import pytest
import torch

from figures import line_data
from natgrad.lab import datasets, fields


@pytest.fixture(scope="module")
def data():
    return datasets.regression_data(num=200, seed=1)


def closed_form(theta, x, y, damping=1e-8):
    features = torch.cat([torch.ones_like(x), x], dim=1)
    residuals = features @ torch.tensor(theta, dtype=x.dtype) - y[:, 0]
    gradient = features.T @ residuals / len(x)
    fisher = features.T @ features / len(x)
    weighted = features * residuals.unsqueeze(1)
    empirical = weighted.T @ weighted / len(x)
    eye = torch.eye(2, dtype=x.dtype)
    return {
        "gd": gradient,
        "ngd": torch.linalg.solve(fisher + damping * eye, gradient),
        "ief": torch.linalg.solve(fisher + damping * eye, gradient),
        "ef": torch.linalg.solve(empirical + damping * eye, gradient),
    }


@pytest.mark.parametrize("theta", [(2.0, 4.5), (-0.5, 3.0), (4.0, 0.5)])
def test_library_directions_match_closed_forms_and_trajectories(theta, data):
    x, y = data
    expected = closed_form(theta, x, y)
    for method in fields.FIELD_METHODS:
        direction = fields.regression_direction(method, theta, x, y)
        assert torch.allclose(direction, expected[method], rtol=1e-8), method
        path = fields.regression_trajectory(method, theta, x, y, step_size=0.1, steps=1)
        step = torch.tensor(theta, dtype=x.dtype) - path[1]
        assert torch.allclose(step / 0.1, direction, rtol=1e-8), method


def test_ngd_and_ief_fields_coincide_and_ef_differs(data):
    x, y = data
    grid = torch.linspace(0.0, 4.0, 3, dtype=torch.float64)
    vector_fields = fields.regression_vector_fields(x, y, grid, grid)
    assert torch.allclose(vector_fields.cosine("ngd", "ief"), torch.ones(3, 3, dtype=x.dtype))
    assert vector_fields.cosine("ngd", "ef").min() < 0.99


def test_logistic_quadratic_models_are_the_fisher_and_ef_at_the_minimum():
    x, y = datasets.logistic_data("misspecified_b", num=300, seed=2)
    quadratic = fields.logistic_quadratic_models(x, y)
    probs = torch.sigmoid(x @ quadratic.theta).unsqueeze(1)
    gradient = ((probs - y) * x).mean(dim=0)
    assert gradient.norm() < 1e-8
    fisher = (x * probs * (1 - probs)).T @ x / len(x)
    empirical = (x * (probs - y) ** 2).T @ x / len(x)
    assert torch.allclose(quadratic.fisher, fisher, rtol=1e-8)
    assert torch.allclose(quadratic.empirical_fisher, empirical, rtol=1e-8)


def test_plots_show_the_fields_trajectories_and_level_sets(tmp_path, data, saved_figures):
    """The arrows are the closed-form directions (unit length), the drawn path is the
    trajectory, and every point of a drawn ellipse lies on ½ dᵀ M d = ½ of its matrix."""
    x, y = data
    grid = torch.linspace(0.0, 4.0, 3, dtype=torch.float64)
    vector_fields = fields.regression_vector_fields(x, y, grid, grid)
    path = fields.regression_trajectory("ngd", (1.0, 0.0), x, y, steps=10)
    fields.plot_regression_fields(vector_fields, x, y, {"ngd": [path]}, str(tmp_path / "f.png"))
    quadratic = fields.logistic_quadratic_models(*datasets.logistic_data("correct", num=100))
    fields.plot_quadratic_models({"correct": quadratic}, str(tmp_path / "q.png"))
    assert (tmp_path / "f.png").exists() and (tmp_path / "q.png").exists()
    regression, quadratics = saved_figures

    for axis, method in zip(regression.axes[1:], ("gd", "ngd", "ef"), strict=True):
        arrows = axis.collections[0]
        for (theta0, theta1), u, v in zip(arrows.get_offsets(), arrows.U, arrows.V, strict=True):
            expected = -closed_form((float(theta0), float(theta1)), x, y)[method]
            expected = expected / expected.norm()
            assert torch.allclose(torch.tensor([u, v], dtype=x.dtype), expected, atol=1e-6)
    assert len(regression.axes[1].collections[0].get_offsets()) == 9
    drawn = regression.axes[2].get_lines()[0]
    assert torch.allclose(torch.tensor(drawn.get_xdata()), path[:, 0].detach())
    assert torch.allclose(torch.tensor(drawn.get_ydata()), path[:, 1].detach())

    curves = line_data(quadratics.axes[0])
    assert set(curves) == {"Fisher", "empirical Fisher"}
    for label, matrix in (
        ("Fisher", quadratic.fisher),
        ("empirical Fisher", quadratic.empirical_fisher),
    ):
        offsets = torch.tensor(curves[label], dtype=matrix.dtype).T - quadratic.theta
        levels = torch.einsum("ni,ij,nj->n", offsets, matrix, offsets)
        assert torch.allclose(levels, torch.ones_like(levels), rtol=1e-8)


def test_unknown_names_raise():
    x, y = datasets.regression_data(num=5)
    with pytest.raises(ValueError, match="unknown method 'newton'"):
        fields.regression_direction("newton", (0.0, 0.0), x, y)
    with pytest.raises(ValueError, match="unknown dataset 'iris'"):
        datasets.logistic_data("iris")
