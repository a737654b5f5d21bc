"""Two-parameter problems of seed 002: library directions against closed forms; plots."""

from __future__ import annotations

import pytest
import torch

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


def test_plots_are_written(tmp_path, data):
    pytest.importorskip("matplotlib")
    x, y = data
    grid = torch.linspace(0.0, 4.0, 3, dtype=torch.float64)
    vector_fields = fields.regression_vector_fields(x, y, grid, grid)
    trajectory = {"ngd": [fields.regression_trajectory("ngd", (1.0, 0.0), x, y, steps=10)]}
    fields.plot_regression_fields(vector_fields, x, y, trajectory, str(tmp_path / "f.png"))
    quadratic = fields.logistic_quadratic_models(*datasets.logistic_data("correct", num=100))
    fields.plot_quadratic_models({"correct": quadratic}, str(tmp_path / "q.png"))
    assert (tmp_path / "f.png").stat().st_size > 10_000
    assert (tmp_path / "q.png").stat().st_size > 10_000


def test_unknown_names_raise():
    x, y = datasets.regression_data(num=5)
    with pytest.raises(ValueError, match="unknown method 'newton'"):
        fields.regression_direction("newton", (0.0, 0.0), x, y)
    with pytest.raises(ValueError, match="unknown dataset 'iris'"):
        datasets.logistic_data("iris")
